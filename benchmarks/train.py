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

    python benchmarks/train.py --lora     # LoRA vs full fine-tuning (a few minutes; no parity checkpoint needed)

`--lora` compares a LoRA step (rank 16 on the LLM's attention and MLP projections, base frozen) with a full
fine-tuning step (every weight but the VAE) on the same batch: cheers-small, 8 mixed samples, the trainer's own
path (cached latents, forward_backward, clipping, AdamW). Each mode runs in a fresh process, so its peak RSS is its
own; the tensors are also counted exactly (weights, gradients, AdamW state, and the activations autograd keeps for
the backward, summed through saved-tensor hooks). It then gives the memory of both at the 1.5B size (cheers-1.5b,
float32 as the trainer holds it): weights, gradients and AdamW state from the parameter counts, activations of one
512 px generation sample measured on the 1.5B widths at depth 2 (every layer stack: LLM, ViT, both flow-head
stages) and extrapolated layer by layer to the full depths.
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


# ---- LoRA vs full fine-tuning ---------------------------------------------------------------------------------

LORA_RANK, LORA_TARGETS = 16, ["llm"]
LAYER_STACKS = {  # module-name prefix of one layer -> the config field holding the stack's depth
    "model.language_model.layers": ("text", "num_layers"),
    "model.vision_representation.encoder.layers": ("vision", "num_layers"),
    "model.gen_projector.diffusion_head_a": ("head", "stage1_layers"),
    "model.hi_projector.diffusion_head_a": ("head", "stage2_layers"),
}


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _prepare(model, mode: str) -> None:
    """Full: every weight but the frozen VAE trains. LoRA: the peft adapter alone trains."""
    from cheers.adapters import add_adapter, make_config, resolve_targets

    if mode == "lora":
        config = make_config(resolve_targets(model, LORA_TARGETS), LORA_RANK, 2.0 * LORA_RANK)
        add_adapter(model, config, "default", trainable=True)
    else:
        model.requires_grad_(True)
        model.model.vae_model.requires_grad_(False)


def _mixed_batch(cfg, n_samples: int, tmp: Path, tasks=(("understanding", 3), ("generation", 6), ("text", 1),
                                                        ("edit", 1))):
    """A micro-batch of `n_samples` smoke-corpus samples through the real data pipeline (random latents)."""
    from cheers.shapes.smoke import make_dataset, make_tokenizer
    from cheers.train.data import SampleBuilder, collate
    from cheers.train.feed import RecordFeed, sample_noise
    from cheers.train.settings import DataSection, SourceSection

    files = make_dataset(tmp / "data", n_understanding=8, n_generation=8, n_edit=4, n_text=4)
    tok = make_tokenizer(tmp / "tok", vocab_size=600)
    cfg.tokens = tok.token_ids
    data = DataSection(sources=[SourceSection(path=str(files[k]), weight=w) for k, w in tasks])
    recs = RecordFeed(data, 0).take(n_samples)
    builder = SampleBuilder.from_config(cfg, tok, max_length=4096, cfg_dropout=0.0, seed=0)
    samples = [builder.build(r, i) for i, r in recs]
    batch = collate(samples, tok.token_ids.pad)
    shape = (cfg.latent_channels, cfg.grid, cfg.grid)
    x0 = torch.cat([sample_noise(0, i, int(s.t.numel()), shape) for (i, _), s in zip(recs, samples)])
    latents = torch.randn((batch["pixel_values"].shape[0], *shape), generator=torch.Generator().manual_seed(0))
    return E.MicroBatch.from_batch(batch, x0, cfg.num_image_tokens, cfg.tokens.img_end, latents=latents)


def saved_activations(model, mb) -> dict[str, int]:
    """Bytes of the tensors autograd would keep for the backward of one forward (parameters excluded, each storage
    once), by the layer that saved them (`<stack prefix>.<i>`), else by the component (`model.<name>`, or
    "other" for the model's own code). Nothing is kept: the hook hands autograd a placeholder (no backward runs),
    so the forward of a large model at 512 px needs no memory for what it measures. A storage counts once until
    it is freed (its memory may then hold a new tensor, which counts again, as it would when kept)."""
    import re
    import weakref
    from collections import defaultdict

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    layer_re = re.compile("^(" + "|".join(re.escape(p) for p in LAYER_STACKS) + r")\.(\d+)(\.|$)")
    names = {m: n for n, m in model.named_modules()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    live: set[int] = set()  # storages counted and not freed since
    per: dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in params:
            return t
        if ptr not in live:
            owner = next((m.group(1) + "." + m.group(2) for n in reversed(stack) if (m := layer_re.match(n))),
                         ".".join(next((n for n in stack if n.count(".") >= 1), "other").split(".")[:2]))
            per[owner] += storage.nbytes()
            live.add(ptr)
            weakref.finalize(storage, live.discard, ptr)  # the storage object lives exactly as long as the memory
        return None

    def enter(module, args) -> None:
        stack.append(names.get(module, ""))

    def leave(module, args, output) -> None:  # returning None keeps the module's output
        stack.pop()

    pre = register_module_forward_pre_hook(enter)
    post = register_module_forward_hook(leave)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**mb.inputs, x0=mb.x0)
        del out
    finally:
        pre.remove()
        post.remove()
    return dict(per)


def lora_worker(mode: str, preset_name: str, n_samples: int, warmup: int, reps: int) -> dict:
    """One mode in this (fresh) process: optimizer steps on a mixed batch; memory of the process and of the tensors."""
    import tempfile

    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.train.optim import build_optimizer
    from cheers.train.settings import OptimSection

    if mode == "lora":
        import peft  # noqa: F401  (its import is not part of the step's memory)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset(preset_name)
        mb = _mixed_batch(cfg, n_samples, Path(tmp))
    rss_start = _rss_gb()
    torch.manual_seed(0)
    model = CheersModel(cfg).train()
    E.init_weights(model, 0.02)
    _prepare(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, OptimSection(lr=1e-5))
    rss_model = _rss_gb()
    acts = saved_activations(model, mb)
    times, grads_bytes = [], 0
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        E.forward_backward(model, [mb], DistInfo(), model.config.flow_loss_weight)
        grads_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        E.clip_gradients(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    return {
        "mode": mode, "preset": preset_name, "samples": n_samples, "tokens": mb.n_tokens,
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times), "step_s_min": min(times),
        "peak_rss_gb": peak_rss_gb(), "rss_before_model_gb": rss_start, "rss_model_gb": rss_model,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "grads_mb": grads_bytes / 2**20, "adamw_mb": state_bytes / 2**20,
        "activations_mb": sum(acts.values()) / 2**20,
    }


def _run_worker(mode: str, args) -> dict:
    import subprocess

    cmd = [sys.executable, __file__, "--lora-worker", mode, "--preset", args.preset, "--batch", str(args.batch),
           "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def activations_at_scale(name: str = "cheers-1.5b", depth: int = 2) -> dict:
    """Saved activations of one 512 px generation sample (float32) for the full and the LoRA step of `name`,
    measured on its widths with every layer stack cut to `depth` layers and extrapolated to the full depths: the
    last measured layer of a stack stands for each further layer (the first one also keeps the stack's input)."""
    import gc
    import tempfile

    from cheers.config import preset
    from cheers.model.cheers import CheersModel

    full_cfg = preset(name)
    cut = preset(name)
    depths = {}
    for prefix, (section, field) in LAYER_STACKS.items():
        depths[prefix] = getattr(getattr(full_cfg, section), field)
        setattr(getattr(cut, section), field, depth)
    with tempfile.TemporaryDirectory() as tmp:
        mb = _mixed_batch(cut, 1, Path(tmp), tasks=(("generation", 1),))
    out = {"sample": "generation", "positions": mb.n_tokens, "resolution": cut.resolution, "measured_depth": depth}
    for mode in ("full", "lora"):
        torch.manual_seed(0)
        model = CheersModel(cut).train()
        model.model.vae_model.to("meta")  # never run in a trainer step (cached latents): no need to hold it
        _prepare(model, mode)
        per = saved_activations(model, mb)
        del model
        gc.collect()
        layers = {p: [per.pop(f"{p}.{i}", 0) for i in range(depth)] for p in LAYER_STACKS}
        total = sum(per.values()) + sum(sum(v) + (depths[p] - depth) * v[-1] for p, v in layers.items())
        out[f"{mode}_gb"] = total / 2**30
        out[f"{mode}_per_layer_mb"] = {p: v[-1] / 2**20 for p, v in layers.items()}
        out[f"{mode}_outside_layers_mb"] = {k: v / 2**20 for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
    return out


def memory_at_scale(name: str = "cheers-1.5b") -> dict:
    """Weights, gradients and AdamW state (float32) of the full and the LoRA step, from the parameter counts."""
    from cheers.config import preset
    from cheers.model.cheers import CheersModel

    out = {}
    for mode in ("full", "lora"):
        with torch.device("meta"):
            model = CheersModel(preset(name))
        _prepare(model, mode)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[mode] = {"params": total, "trainable": trainable, "weights_gb": 4 * total / 2**30,
                     "weights_bf16_base_gb": (2 * (total - trainable) + 4 * trainable) / 2**30,
                     "grads_gb": 4 * trainable / 2**30, "adamw_gb": 8 * trainable / 2**30}
    return out


def lora_main(args) -> int:
    full, lora = _run_worker("full", args), _run_worker("lora", args)
    print(f"LoRA (rank {LORA_RANK}, {'+'.join(LORA_TARGETS)}) vs full fine-tuning: {args.preset}, "
          f"{full['samples']} samples ({full['tokens']} positions) per step, {args.threads} threads, float32")
    print(f"{'':<28} {'full':>10} {'lora':>10}")
    rows = [("trainable params", "trainable", "{:,.0f}"), ("step time s (median)", "step_s", "{:.3f}"),
            ("peak RSS GB (process)", "peak_rss_gb", "{:.3f}"), ("weights MB", "weights_mb", "{:.1f}"),
            ("gradients MB", "grads_mb", "{:.1f}"), ("AdamW state MB", "adamw_mb", "{:.1f}"),
            ("saved activations MB", "activations_mb", "{:.1f}")]
    for label, key, fmt in rows:
        print(f"{label:<28} {fmt.format(full[key]):>10} {fmt.format(lora[key]):>10}")
    scale = memory_at_scale()
    acts = activations_at_scale()
    print(f"\ncheers-1.5b, float32 (GiB): one {acts['resolution']} px generation sample ({acts['positions']} "
          "positions) per step")
    print(f"{'':<28} {'full':>10} {'lora':>10}")
    for label, key in (("weights", "weights_gb"), ("gradients", "grads_gb"), ("AdamW state", "adamw_gb")):
        print(f"{label:<28} {scale['full'][key]:>10.2f} {scale['lora'][key]:>10.2f}")
    print(f"{'activations (1 sample)':<28} {acts['full_gb']:>10.2f} {acts['lora_gb']:>10.2f}")
    for mode in ("full", "lora"):
        scale[mode]["total_gb"] = sum(scale[mode][k] for k in ("weights_gb", "grads_gb", "adamw_gb")) + acts[f"{mode}_gb"]
    print(f"{'total':<28} {scale['full']['total_gb']:>10.2f} {scale['lora']['total_gb']:>10.2f}")
    print(json.dumps({"benchmark": "train_lora", "threads": args.threads, "full": full, "lora": lora,
                      "at_1p5b": scale, "activations_1p5b": acts}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (< 1 minute)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", action="store_true", help="LoRA vs full fine-tuning only (see above)")
    ap.add_argument("--preset", default="cheers-small", help="--lora: the preset of the measured steps")
    ap.add_argument("--batch", type=int, default=8, help="--lora: samples per step")
    ap.add_argument("--lora-worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.lora_worker:
        print(json.dumps(lora_worker(args.lora_worker, args.preset, args.batch, 1, 2 if args.quick else 5)))
        return 0
    if args.lora:
        return lora_main(args)
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
