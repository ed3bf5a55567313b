"""Quantized inference benchmark: float32 against every CPU quantization mode on one model (default cheers-1.5b,
random weights, 512 px), each in a fresh process so peak memory is its own.

    python benchmarks/quantized.py                      # float32, int8, int8-weight on cheers-1.5b (~15 minutes)
    python benchmarks/quantized.py --preset cheers-small --modes float32,int8    # a quick run

Per mode: a text-to-image step with classifier-free guidance (batch 1: the conditional and unconditional rows in
one forward, the image read once; the time between the starts of successive velocity evaluations, median), prefill
tokens/s (an image and a 29-token prompt: the image read + the LLM over its positions), greedy decode tokens/s
(batch 1, rate over tokens 2..N), and peak resident memory (ru_maxrss of the process, loading included: weights
are made module by module and quantized as they are made, as loading a checkpoint does). The modes run one
after another, never side by side. The last line is JSON: the table, and the best CPU mode's
`t2i_speedup_vs_fp32`, `decode_speedup_vs_fp32` and `peak_rss_fraction_of_fp32` (targets: >= 2, >= 1.5, <= 0.4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import peak_rss_gb  # noqa: E402  (puts src/ on the path)
from cheers import quantize as Q  # noqa: E402
from cheers import sampling as S  # noqa: E402
from cheers.config import preset  # noqa: E402
from cheers.decoding import OutputHead  # noqa: E402
from cheers.model.cheers import CheersModel  # noqa: E402

PROMPT_LEN = 29


def _ordinary_ids(cfg, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random ids below the special tokens (the Qwen2 specials sit at the top, small tokenizers' at the bottom)."""
    tk = cfg.tokens
    lo, hi = (0, tk.pad) if tk.pad > 100 else (max(vars(tk).values()) + 1, cfg.text.vocab_size)
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed))
CPU_MODES = [m for m in Q.MODES if m not in Q.CUDA_ONLY]
TARGETS = {"t2i_speedup_vs_fp32": 2.0, "decode_speedup_vs_fp32": 1.5, "peak_rss_fraction_of_fp32": 0.4}


def _rows(model: CheersModel, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    tk = model.config.tokens
    cond = _ordinary_ids(model.config, (batch, PROMPT_LEN), 0)
    cond[:, -1] = tk.img_start
    uncond = torch.full_like(cond, tk.no_mean)
    uncond[:, -1] = tk.img_start
    return torch.cat([cond, uncond]), torch.ones(2 * batch, PROMPT_LEN, dtype=torch.long)


@torch.no_grad()
def t2i_step(model: CheersModel, steps: int) -> dict:
    cfg = model.config
    g, R = cfg.grid, cfg.resolution
    ids, mask = _rows(model, 1)
    latents = model.encode_images(torch.rand(1, 3, R, R))
    starts: list[float] = []
    prefix = S.prefill(model, ids, mask, torch.cat([latents, latents]))
    velocity = S.GuidedVelocity(model, prefix, 3.0, True)

    def timed(x, t, commit=False):
        starts.append(time.perf_counter())
        return velocity(x, t, commit=commit)

    S.integrate(timed, torch.randn(1, cfg.latent_channels, g, g), S.time_grid(steps + 1, 0.5))
    gaps = [b - a for a, b in zip(starts[:-1], starts[1:])][1:]  # the first evaluation warms up
    return {"t2i_step_s": statistics.median(gaps)}


@torch.no_grad()
def text(model: CheersModel, tokens: int, repeats: int) -> dict:
    cfg = model.config
    R = cfg.resolution
    ids = _ordinary_ids(cfg, (1, PROMPT_LEN), 1)
    ids[0, 0] = -200  # one image placeholder, then the prompt
    latents = model.encode_images(torch.rand(1, 3, R, R))
    head = OutputHead(model)
    prefill_s, rates = [], []
    for _ in range(repeats + 1):  # the first round warms up
        t0 = time.perf_counter()
        prefix = S.prefill(model, ids, None, latents)
        prefill_s.append(time.perf_counter() - t0)
        marks = []
        for _ in S.decode_tokens(model, prefix, S.TextSampling(max_new_tokens=tokens, speculate=0), head=head):
            marks.append(time.perf_counter())
        rates.append((len(marks) - 1) / (marks[-1] - marks[0]))
    n = PROMPT_LEN - 1 + cfg.num_image_tokens
    return {"prefill_tokens": n, "prefill_tok_s": n / statistics.median(prefill_s[1:]),
            "decode_tok_s": statistics.median(rates[1:])}


def child(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    spec = None if args.child == "float32" else Q.parse_spec(args.child)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = CheersModel(preset(args.preset))
    Q.materialize_random(model, spec)
    model.eval().channels_last_()
    load_s = time.perf_counter() - t0
    weights = Q.footprint(model)["bytes"]
    out = {"mode": args.child, "load_s": round(load_s, 1), "weights_gib": round(weights / 2**30, 3)}
    out.update(t2i_step(model, args.steps))
    out.update(text(model, args.decode_tokens, args.repeats))
    out["peak_rss_gib"] = round(peak_rss_gb(), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cheers-1.5b")
    ap.add_argument("--modes", default=",".join(["float32", *CPU_MODES]),
                    help=f"comma-separated: float32 and any of {', '.join(CPU_MODES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed T2I steps (one more warms up)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timed prefill + decode rounds (one more warms up)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "float32" not in modes:
        raise SystemExit("benchmarks/quantized.py: --modes must include float32 (the baseline)")
    bad = [m for m in modes if m != "float32" and m not in CPU_MODES]
    if bad:
        raise SystemExit(f"benchmarks/quantized.py: mode(s) {', '.join(bad)}: expected float32 or one of "
                         f"{', '.join(CPU_MODES)} (CUDA modes are measured by scripts/gpu_check.sh)")
    rows = {}
    for mode in modes:  # one fresh process each, one at a time
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--preset", args.preset,
               "--threads", str(args.threads), "--steps", str(args.steps), "--decode-tokens",
               str(args.decode_tokens), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"benchmarks/quantized.py: mode {mode} failed: {tail}")
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = rows[mode]
        print(f"{mode:12s} T2I step {r['t2i_step_s']:7.2f} s   prefill {r['prefill_tok_s']:7.1f} tok/s   decode "
              f"{r['decode_tok_s']:6.2f} tok/s   peak RSS {r['peak_rss_gib']:6.2f} GiB   weights "
              f"{r['weights_gib']:6.2f} GiB   load {r['load_s']:.0f} s", flush=True)
    base = rows["float32"]
    for r in rows.values():
        r["t2i_speedup_vs_fp32"] = round(base["t2i_step_s"] / r["t2i_step_s"], 3)
        r["prefill_speedup_vs_fp32"] = round(r["prefill_tok_s"] / base["prefill_tok_s"], 3)
        r["decode_speedup_vs_fp32"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
        r["peak_rss_fraction_of_fp32"] = round(r["peak_rss_gib"] / base["peak_rss_gib"], 3)
    quantized = [m for m in modes if m != "float32"]

    def score(m: str) -> tuple:
        r = rows[m]
        met = sum(r[k] <= v if k.startswith("peak") else r[k] >= v for k, v in TARGETS.items())
        return met, r["t2i_speedup_vs_fp32"] * r["decode_speedup_vs_fp32"]

    best = max(quantized, key=score) if quantized else "float32"
    result = {"preset": args.preset, "threads": args.threads, "best_mode": best,
              **{k: rows[best][k] for k in TARGETS}, "targets": TARGETS,
              "targets_met": all(rows[best][k] <= v if k.startswith("peak") else rows[best][k] >= v
                                 for k, v in TARGETS.items()),
              "table": rows}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
