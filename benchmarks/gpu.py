"""The released-size model on one CUDA GPU, in bf16 (run by scripts/gpu_check.sh).

Writes a random-weight `cheers-1.5b` bf16 checkpoint, loads it through `Cheers.from_pretrained(device="cuda")`
(peak GPU memory over weight bytes), then measures a 512 px text-to-image step with CFG (conditional and
unconditional rows in one batch; s/step and the fraction of this GPU's bf16 matmul peak, measured in the same run),
greedy decode tokens/s, and one bf16 training step (forward + backward + AdamW) of the flow objective.

    python benchmarks/gpu.py [--dir /tmp/cheers-1.5b-bf16]

JSON last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import _common  # noqa: E402,F401  (puts src/ on the path)
from cheers import sampling as S  # noqa: E402
from cheers.pipeline import Cheers  # noqa: E402
from memory import write_checkpoint  # noqa: E402


def bf16_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="cheers-1.5b-bf16-"))
    out: dict = {"device": torch.cuda.get_device_name()}
    try:
        if not (directory / "config.json").exists():
            directory.mkdir(parents=True, exist_ok=True)
            write_checkpoint(directory)
        peak = bf16_peak_tflops()
        out["bf16_matmul_peak_tflops"] = round(peak, 1)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pipe = Cheers.from_pretrained(directory, device="cuda", dtype="auto")
        out["load_s"] = round(time.perf_counter() - t0, 1)
        weights = sum(t.numel() * t.element_size() for t in list(pipe.model.parameters()) + list(pipe.model.buffers()))
        out["weights_gb"] = round(weights / 1e9, 3)
        out["load_peak_over_weights_cuda"] = round(torch.cuda.max_memory_allocated() / weights, 4)
        out["dtype"] = str(pipe.dtype)
        m, cfg = pipe.model, pipe.config
        print(json.dumps(out), flush=True)

        # one T2I step with CFG at 512 px: the image read once, both rows in one LLM pass
        rows = [pipe.tokenizer.encode_prompt("a red apple on a wooden table", task="t2i")]
        tk = cfg.tokens
        all_rows = rows + S.cfg_rows(rows, {tk.img_start, tk.img_end}, tk.no_mean)
        lat = pipe._latents(pipe._row_images(rows, [0]))
        prefix = pipe._prefill(all_rows, torch.cat([lat, lat]))
        velocity = S.GuidedVelocity(m, prefix, 9.5, True)
        x = torch.randn(1, cfg.latent_channels, cfg.grid, cfg.grid, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        step_s = timed(lambda: velocity(x, 0.5), 5)
        with FlopCounterMode(display=False) as counter:
            velocity(x, 0.5)
        flops = counter.get_total_flops()
        out.update(t2i_step_s=round(step_s, 4), t2i_step_tflops=round(flops / 1e12, 2),
                   t2i_fraction_of_bf16_peak=round(flops / step_s / 1e12 / peak, 3),
                   t2i_peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))
        print(json.dumps(out), flush=True)

        # greedy decoding at batch 1 and 8 (tokens/s after the first token)
        for batch in (1, 8):
            convs = [[{"role": "user", "content": f"Tell me a story about the number {i}."}] for i in range(batch)]
            kw = dict(max_new_tokens=64, temperature=0.0, stop=["\uffff"])
            pipe.chat(convs, max_new_tokens=4)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            replies = pipe.chat(convs, **kw)
            torch.cuda.synchronize()
            tokens = sum(len(pipe.tokenizer.encode(r)) for r in replies)
            out[f"decode_tok_s_batch{batch}"] = round(tokens / (time.perf_counter() - t0), 1)
        print(json.dumps(out), flush=True)

        # one bf16 training step of the flow objective (a generation row), AdamW on the LLM and heads
        m.train()
        params = [p for n, p in m.named_parameters() if not n.startswith("model.vae_model.")]
        opt = torch.optim.AdamW(params, lr=1e-5)
        ids = torch.tensor([rows[0] + [-300, tk.img_end]], device="cuda")  # prompt <im_start> [image] <im_end>
        pixels = torch.rand(1, 3, cfg.resolution, cfg.resolution, device="cuda", dtype=pipe.dtype)

        def train_step():
            loss = m(ids, pixel_values=pixels, t=torch.full((1,), 0.5, device="cuda"), labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        out["train_step_s"] = round(timed(train_step, 3), 3)
        out["train_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
