"""Inference benchmark: T2I step time with CFG (batch 1/4/16), decode tokens/s, peak memory, fraction of the
measured fp32 matmul peak; compared with the reference's CPU timings in ../shared/parity/BASELINE.md.

    python benchmarks/inference.py            # tiny parity config + cheers-1.5b (random weights, slow: minutes)
    python benchmarks/inference.py --quick    # tiny parity config only (< 1 minute)

Method (as BASELINE.md): prompt "A small red apple on a wooden table." in the chat format with <im_start>
appended, dummy image prefix, cfg 3.0, shift 0.5; one step = the CFG velocity (both guidance rows) + Euler update
+ cache slot reuse, timed as the interval between the starts of successive velocity evaluations; decode = the
golden-a prompt and image, 32 greedy tokens, rate over tokens 2..32. Figures are medians of repeats after warm-up.
The script ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import SHARED, matmul_peak, peak_rss_gb  # noqa: E402  (puts src/ on the path)
from cheers import sampling as S  # noqa: E402
from cheers.checkpoint import load_model  # noqa: E402
from cheers.config import preset  # noqa: E402
from cheers.decoding import OutputHead  # noqa: E402
from cheers.model.cheers import CheersModel  # noqa: E402

# ../shared/parity/BASELINE.md (official code, fp32, 2 threads): medians
REF_T2I_STEP_S = 0.381
REF_DECODE_TOK_S = 292.0
PROMPT_LEN = 29  # ids of the benchmark prompt (golden d)


def prompt_rows(model: CheersModel, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B conditional + B unconditional rows of the benchmark prompt's length (ids are irrelevant to timing)."""
    tk = model.config.tokens
    gen = torch.Generator().manual_seed(0)
    cond = torch.randint(0, min(tk.pad, model.config.text.vocab_size), (batch, PROMPT_LEN), generator=gen)
    cond[:, -1] = tk.img_start
    uncond = torch.full_like(cond, tk.no_mean)
    uncond[:, -1] = tk.img_start
    return torch.cat([cond, uncond]), torch.ones(2 * batch, PROMPT_LEN, dtype=torch.long)


@torch.no_grad()
def t2i_steps(model: CheersModel, batch: int, steps: int, repeats: int) -> dict:
    cfg = model.config
    g = cfg.grid
    R = cfg.resolution
    ids, mask = prompt_rows(model, batch)
    latents = model.encode_images(torch.rand(batch, 3, R, R))
    times, totals = [], []
    for rep in range(repeats + 1):  # first = warm-up
        starts: list[float] = []
        t0 = time.perf_counter()
        prefix = S.prefill(model, ids, mask, torch.cat([latents, latents]))
        velocity = S.GuidedVelocity(model, prefix, 3.0, True)
        timed = _TimedVelocity(velocity, starts)
        x = torch.randn(batch, cfg.latent_channels, g, g)
        S.integrate(timed, x, S.time_grid(steps, 0.5))
        total = time.perf_counter() - t0
        if rep:
            times += [b - a for a, b in zip(starts[:-1], starts[1:])]
            totals.append(total)
    step = statistics.median(times)
    return {"batch": batch, "step_s": step, "images_per_s": batch / step, "call_s": statistics.median(totals)}


class _TimedVelocity:
    def __init__(self, inner: S.GuidedVelocity, starts: list[float]) -> None:
        self.inner, self.starts = inner, starts

    def __call__(self, x, t, commit=False):
        self.starts.append(time.perf_counter())
        return self.inner(x, t, commit=commit)


@torch.no_grad()
def step_flops(model_cfg, batch: int) -> float:
    """FLOPs of one CFG step (read path once, LLM + heads on 2B rows), counted on the meta device."""
    with torch.device("meta"):
        model = CheersModel(model_cfg)
        g = model_cfg.grid
        x = torch.randn(batch, model_cfg.latent_channels, g, g)
        prefix_len = PROMPT_LEN + model_cfg.num_image_tokens
        with FlopCounterMode(display=False) as fc:
            reading = model.read_latents(x)
            tokens = torch.cat([reading.tokens, reading.tokens])
            detail = torch.cat([reading.detail, reading.detail])
            # the LLM pass over the image block on top of a cached prefix: count it with a prefix of zeros
            embeds = torch.cat([torch.zeros(2 * batch, prefix_len, model_cfg.text.hidden_size), tokens], 1)
            hidden = model.model.language_model(embeds, causal=False)[:, prefix_len:]
            model.velocity_head(hidden, torch.full((2 * batch,), 0.5), detail)
        total = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc_prefix:  # remove the prefix positions' share (they are cached)
            model.model.language_model(torch.zeros(2 * batch, prefix_len, model_cfg.text.hidden_size))
        return float(total - fc_prefix.get_total_flops())


@torch.no_grad()
def decode_rate(head: OutputHead, n_tokens: int = 32, repeats: int = 5, speculate: int | None = None) -> dict:
    """Golden-a prompt + image, greedy, n tokens; rate over tokens 2..n (KV cache). `speculate` = the prompt-lookup
    draft length (None: the pipeline's default, off at this size; 4: forced on)."""
    from safetensors.torch import load_file

    a = load_file(str(SHARED / "parity" / "goldens" / "a_understanding.safetensors"))
    model = head.model
    ids, mask = a["input_ids"][None], a["attention_mask"][None]
    rates, prefills = [], []
    for rep in range(repeats + 1):
        t0 = time.perf_counter()
        latents = model.encode_images(a["pixel_values"])
        prefix = S.prefill(model, ids, mask, latents)
        marks = []
        for _ in S.decode_tokens(model, prefix, S.TextSampling(max_new_tokens=n_tokens, speculate=speculate),
                                 prompt_ids=ids, head=head):
            marks.append(time.perf_counter())
        if rep:
            prefills.append(marks[0] - t0)
            rates.append((n_tokens - 1) / (marks[-1] - marks[0]))
    return {"decode_tok_s": statistics.median(rates), "prefill_s": statistics.median(prefills)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny parity configuration only (< 1 minute)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-decoding measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s ({args.threads} threads)")
    result: dict = {"matmul_peak_gflops": round(peak, 1)}

    tiny_dir = SHARED / "parity" / "tiny-official"
    tiny = load_model(tiny_dir) if tiny_dir.exists() else CheersModel(preset("cheers-parity-tiny")).eval()
    tiny.channels_last_()  # as the pipeline does on CPU
    rows = []
    for batch in ((1, 4) if args.quick else (1, 4, 16)):
        r = t2i_steps(tiny, batch, steps=4 if args.quick else 5, repeats=2 if args.quick else 5)
        flops = step_flops(tiny.config, batch)
        r["gflops_per_step"] = flops / 1e9
        r["fraction_of_peak"] = flops / r["step_s"] / 1e9 / peak
        rows.append(r)
    nan = {"decode_tok_s": float("nan"), "prefill_s": float("nan")}
    have_goldens = (SHARED / "parity").exists()
    head = OutputHead(tiny)
    dec = decode_rate(head, repeats=3 if args.quick else 5) if have_goldens else nan
    dec_spec = decode_rate(head, repeats=3 if args.quick else 5, speculate=4) if have_goldens else nan
    # opt-in compiled decoding (Cheers.from_pretrained(..., compile=True) / --compile); decode_rate's first
    # repeat is untimed, so it carries the one-time compile, timed separately here
    dec_c, compile_s = nan, float("nan")
    if have_goldens and not args.no_compile:
        head.compile()
        t0 = time.perf_counter()
        decode_rate(head, n_tokens=4, repeats=1)  # compiles prefill + one-token graphs; the timed run follows
        compile_s = time.perf_counter() - t0
        dec_c = decode_rate(head, repeats=3 if args.quick else 5)
    print("\ntiny parity configuration (18.1 M parameters, 128 px, 16 image tokens), T2I with CFG:")
    print(f"{'batch':>5} {'s/step':>9} {'images/s':>9} {'GFLOP/step':>11} {'of peak':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['step_s']:>9.4f} {r['images_per_s']:>9.2f} {r['gflops_per_step']:>11.2f} "
              f"{r['fraction_of_peak']:>8.1%}")
    t2i_speedup = REF_T2I_STEP_S / rows[0]["step_s"]
    dec_speedup = dec["decode_tok_s"] / REF_DECODE_TOK_S
    spec_speedup = dec_spec["decode_tok_s"] / REF_DECODE_TOK_S
    compiled_speedup = dec_c["decode_tok_s"] / REF_DECODE_TOK_S
    print(f"reference step (batch 1): {REF_T2I_STEP_S} s -> speedup {t2i_speedup:.2f}x (target >= 1.7x)")
    print(f"decode: {dec['decode_tok_s']:.0f} tok/s (reference {REF_DECODE_TOK_S:.0f}) -> {dec_speedup:.2f}x "
          f"(target >= 2x); prefill {dec['prefill_s'] * 1000:.0f} ms")
    print(f"decode with prompt-lookup drafts forced on (off by default at this size): "
          f"{dec_spec['decode_tok_s']:.0f} tok/s -> {spec_speedup:.2f}x")
    print(f"decode, compiled (compile=True / --compile): {dec_c['decode_tok_s']:.0f} tok/s -> {compiled_speedup:.2f}x "
          f"(target >= 2x); one-time compile {compile_s:.1f} s")
    result.update({
        "tiny_t2i": rows, "tiny_decode_tok_s": round(dec["decode_tok_s"], 1),
        "t2i_speedup_vs_reference": round(t2i_speedup, 3), "decode_speedup_vs_reference": round(dec_speedup, 3),
        "tiny_decode_lookup_tok_s": round(dec_spec["decode_tok_s"], 1),
        "tiny_decode_compiled_tok_s": round(dec_c["decode_tok_s"], 1),
        "decode_compiled_speedup_vs_reference": round(compiled_speedup, 3), "compile_s": round(compile_s, 1),
    })
    del tiny

    if not args.quick:
        cfg = preset("cheers-1.5b")
        torch.manual_seed(0)
        with torch.device("meta"):
            big = CheersModel(cfg)
        # random N(0, 0.02) weights, fp32: the values do not change the FLOP rate and the default init takes minutes
        big = big.to_empty(device="cpu")
        for p in big.parameters():
            p.data.normal_(0, 0.02)
        big.eval().channels_last_()
        big_rows = []
        for batch in (1,):  # one 512 px image per row already takes tens of seconds on 2 cores
            r = t2i_steps(big, batch, steps=2, repeats=1)
            flops = step_flops(cfg, batch)
            r["gflops_per_step"] = flops / 1e9
            r["fraction_of_peak"] = flops / r["step_s"] / 1e9 / peak
            big_rows.append(r)
        print("\ncheers-1.5b (random weights, fp32, 512 px, 256 image tokens), T2I with CFG:")
        for r in big_rows:
            print(f"batch {r['batch']}: {r['step_s']:.2f} s/step, {r['gflops_per_step']:.0f} GFLOP/step, "
                  f"{r['fraction_of_peak']:.1%} of the matmul peak")
        result["big_t2i"] = big_rows
        result["big_fraction_of_peak"] = round(big_rows[0]["fraction_of_peak"], 3)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    print(f"\npeak memory (RSS): {result['peak_rss_gb']} GB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
