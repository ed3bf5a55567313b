"""Training benchmark: train-step time on the golden-e batch (tiny parity checkpoint), samples/s at batch 16,
tokens/s at a larger preset, peak memory; compared with the reference's CPU timing in ../shared/parity/BASELINE.md.

    python benchmarks/train.py            # full (a few minutes)
    python benchmarks/train.py --quick    # fewer repeats, smaller larger-preset batch (< 1 minute)

Method (BASELINE.md "training step"): golden-e batch (2 rows, 42 ids -> 57 positions, two 128 px images, t = 1 and
0.3125, stored x0), model in train mode, loss = text + image, gradients set to None before each run, forward and
backward timed separately, 2 warm-up + 5 timed runs, medians; float32, 2 threads, no optimizer step.

Rows:
* `model fwd+bwd (pixels)` - `model(**batch)` exactly as the reference runs it (the frozen VAE encoder inside);
* `trainer fwd+bwd (cached latents)` - the trainer's path: `forward_backward` on a micro-batch whose images come
  from the latent cache, so the frozen VAE encoder is not run (spec §H.14). This is the figure behind
  `train_speedup_vs_reference`; the next row is the same with the `model.channels_last` option;
* `optimizer step, batch 16` - a whole trainer step (forward, backward, clip, AdamW) on 16 samples (8 copies of
  the golden rows with different t and noise), as samples/s;
* `larger preset` - cheers-small (6-layer 256-wide LLM), random init, 8 synthetic mixed samples per step:
  expanded tokens/s of whole optimizer steps.
The script ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import SHARED, peak_rss_gb  # noqa: E402  (puts src/ on the path)
from cheers.checkpoint import load_model  # noqa: E402
from cheers.train import engine as E  # noqa: E402
from cheers.train.distributed import DistInfo  # noqa: E402

REF_FWD_S, REF_BWD_S, REF_FWD_BWD_S = 0.846, 0.889, 1.72  # BASELINE.md medians


def golden_batch():
    from safetensors.torch import load_file

    g = load_file(str(SHARED / "parity" / "goldens" / "e_train_loss.safetensors"))
    batch = {"input_ids": g["input_ids"], "attention_mask": g["attention_mask"], "labels": g["labels"],
             "pixel_values": g["pixel_values"].float(), "t": g["t"].reshape(-1)}
    return batch, g["x0_noise"].float()


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def time_model_pixels(model, batch, x0, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    fwd, bwd = [], []
    for i in range(warmup + reps):
        zero_grads(model)
        t0 = time.perf_counter()
        out = model(**batch, x0=x0)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return fwd, bwd


def time_trainer_latents(model, batch, x0, warmup: int, reps: int, channels_last: bool = False) -> list[float]:
    """The trainer's path: cached latents (optionally a channels-last latent-to-pixel decoder)."""
    cfg = model.config
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.model.vae_decoder_projector.to(memory_format=fmt)
    latents = torch.stack([model.encode_images(px[None])[0] for px in batch["pixel_values"]])  # the cache's encoding
    mb = E.MicroBatch.from_batch(batch, x0, cfg.num_image_tokens, cfg.tokens.img_end, latents=latents)
    times = []
    for i in range(warmup + reps):
        zero_grads(model)
        t0 = time.perf_counter()
        E.forward_backward(model, [mb], DistInfo(), cfg.flow_loss_weight)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def optimizer_steps(model, micro, warmup: int, reps: int, lr: float = 1e-5) -> list[float]:
    from cheers.train.optim import build_optimizer
    from cheers.train.settings import OptimSection

    for p in model.parameters():
        p.requires_grad_(True)
    model.model.vae_model.requires_grad_(False)
    opt = build_optimizer(model, OptimSection(lr=lr))
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        E.forward_backward(model, micro, DistInfo(), model.config.flow_loss_weight)
        E.clip_gradients(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def batch16(model, batch, x0):
    cfg = model.config
    latents = torch.stack([model.encode_images(px[None])[0] for px in batch["pixel_values"]])
    g = torch.Generator().manual_seed(0)
    reps = 8
    t = batch["t"].repeat(reps).clone()
    t[1::2] = torch.rand(reps, generator=g)
    big = {"input_ids": batch["input_ids"].repeat(reps, 1), "attention_mask": batch["attention_mask"].repeat(reps, 1),
           "labels": batch["labels"].repeat(reps, 1), "pixel_values": batch["pixel_values"].repeat(reps, 1, 1, 1),
           "t": t}
    noise = torch.randn((2 * reps, *x0.shape[1:]), generator=g)
    return [E.MicroBatch.from_batch(big, noise, cfg.num_image_tokens, cfg.tokens.img_end,
                                    latents=latents.repeat(reps, 1, 1, 1))]


def larger_preset(n_samples: int, warmup: int, reps: int) -> dict:
    """cheers-small, random init, synthetic mixed batch through the real data pipeline."""
    import tempfile

    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.data import SampleBuilder, collate
    from cheers.train.feed import RecordFeed, sample_noise
    from cheers.train.settings import DataSection, SourceSection
    from cheers.shapes.smoke import make_dataset, make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        files = make_dataset(Path(tmp) / "data", n_understanding=8, n_generation=8, n_edit=4, n_text=4)
        tok = make_tokenizer(Path(tmp) / "tok", vocab_size=600)
        cfg = preset("cheers-small")
        cfg.tokens = tok.token_ids
        torch.manual_seed(0)
        model = CheersModel(cfg).train()
        E.init_weights(model, 0.02)
        data = DataSection(sources=[SourceSection(path=str(files[k]), weight=w)
                                    for k, w in (("understanding", 3), ("generation", 6), ("text", 1), ("edit", 1))])
        feed = RecordFeed(data, 0)
        builder = SampleBuilder.from_config(cfg, tok, max_length=2048, cfg_dropout=0.2, seed=0)
        recs = feed.take(n_samples)
        samples = [builder.build(r, i) for i, r in recs]
        batch = collate(samples, tok.token_ids.pad)
        shape = (cfg.latent_channels, cfg.grid, cfg.grid)
        x0 = torch.cat([sample_noise(0, i, int(s.t.numel()), shape) for (i, _), s in zip(recs, samples)])
        latents = torch.stack([model.encode_images(px[None])[0] for px in batch["pixel_values"]])
        mb = E.MicroBatch.from_batch(batch, x0, cfg.num_image_tokens, cfg.tokens.img_end, latents=latents)
        times = optimizer_steps(model, [mb], warmup, reps)
        params = sum(p.numel() for p in model.parameters())
    med = statistics.median(times)
    return {"preset": "cheers-small", "params_m": params / 1e6, "samples": n_samples, "tokens": mb.n_tokens,
            "step_s": med, "tokens_per_s": mb.n_tokens / med, "samples_per_s": n_samples / med}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (< 1 minute)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = SHARED / "parity" / "tiny-official"
    if not (ckpt / "config.json").exists():
        print(f"benchmark needs {ckpt} (the parity checkpoint)", file=sys.stderr)
        return 2
    model = load_model(ckpt).train()
    batch, x0 = golden_batch()
    warm, reps = 2, 5
    fwd, bwd = time_model_pixels(model, batch, x0, warm, reps)
    fb_pixels = [a + b for a, b in zip(fwd, bwd)]
    fb_trainer = time_trainer_latents(model, batch, x0, *((1, 3) if args.quick else (warm, reps)))
    fb_trainer_cl = [float("nan")]
    if not args.quick:  # the channels-last comparison only in the full run
        fb_trainer_cl = time_trainer_latents(model, batch, x0, warm, reps, channels_last=True)
        model.model.vae_decoder_projector.to(memory_format=torch.contiguous_format)
    b16_w, b16_r = (0, 1) if args.quick else (1, 3)  # quick: one step, no warm-up (an upper bound)
    step16 = optimizer_steps(model, batch16(model, batch, x0), b16_w, b16_r)
    larger = larger_preset(4 if args.quick else 8, 1, 1 if args.quick else 3)

    med = statistics.median
    rows = [
        ("model fwd (pixels)", med(fwd), min(fwd), REF_FWD_S),
        ("model bwd (pixels)", med(bwd), min(bwd), REF_BWD_S),
        ("model fwd+bwd (pixels)", med(fb_pixels), min(fb_pixels), REF_FWD_BWD_S),
        ("trainer fwd+bwd (cached latents)", med(fb_trainer), min(fb_trainer), REF_FWD_BWD_S),
    ]
    if not args.quick:
        rows.append(("  same, channels-last decoder", med(fb_trainer_cl), min(fb_trainer_cl), REF_FWD_BWD_S))
    print(f"{'measurement (golden-e batch, tiny-official)':<44} {'median s':>9} {'min s':>8} {'reference s':>12} {'speedup':>8}")
    for name, m, lo, ref in rows:
        print(f"{name:<44} {m:9.3f} {lo:8.3f} {ref:12.3f} {ref / m:8.2f}")
    s16 = med(step16)
    print(f"{'optimizer step, batch 16 (cached latents)':<44} {s16:9.3f} {min(step16):8.3f} {'':>12} "
          f"{16 / s16:6.2f} samples/s")
    print(f"{'larger preset ' + larger['preset'] + ' (' + format(larger['params_m'], '.1f') + 'M), batch ' + str(larger['samples']):<44} "
          f"{larger['step_s']:9.3f} {'':>8} {'':>12} {larger['tokens_per_s']:6.0f} tokens/s")
    print(f"peak RSS {peak_rss_gb():.2f} GB, threads {torch.get_num_threads()}")
    result = {
        "benchmark": "train",
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "fwd_s": med(fwd),
        "bwd_s": med(bwd),
        "fwd_bwd_s": med(fb_pixels),
        "trainer_fwd_bwd_s": med(fb_trainer),
        "trainer_fwd_bwd_channels_last_s": None if args.quick else med(fb_trainer_cl),
        "reference_fwd_bwd_s": REF_FWD_BWD_S,
        "model_speedup_vs_reference": REF_FWD_BWD_S / med(fb_pixels),
        "train_speedup_vs_reference": REF_FWD_BWD_S / med(fb_trainer),
        "batch16_step_s": s16,
        "batch16_samples_per_s": 16 / s16,
        "larger_preset": larger,
        "peak_rss_gb": peak_rss_gb(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
