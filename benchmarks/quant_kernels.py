"""Which quantized matmul kernel is fastest on this CPU, per phase: a Qwen2.5-1.5B-sized SwiGLU MLP
(1536 -> 8960 -> 1536) at the prefill / text-to-image shape (hundreds of tokens) and at the one-token decode shape.

Candidates: float32 and bfloat16 `F.linear`; PyTorch's dynamic int8 linear (`torch.ao.nn.quantized.dynamic`, the
x86/fbgemm engine); `torch._int_mm` with per-token activation quantization written out (eager and compiled);
`aten._weight_int8pack_mm` (int8 weight-only); int8 weights dequantized inside a compiled graph; the 4-bit CPU
kernels (`_weight_int4pack_mm_for_cpu`, `_dyn_quant_matmul_4bit`); and torchao's `quantize_` configs, eager and
under `torch.compile`. Candidates are timed in interleaved rounds (min over rounds) so a busy machine slows all alike.

    python benchmarks/quant_kernels.py [--tokens 512] [--rounds 5] [--no-torchao] [--no-compile]
Prints one line per candidate and a JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

D, H = 1536, 8960


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D, H, bias=False)
        self.up_proj = nn.Linear(D, H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1).clamp(min=1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _dyn_int8_mm(x: torch.Tensor, wt: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations x int8 weights [K, N] -> float32."""
    xs = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.round(x / xs).clamp(-127, 127).to(torch.int8)
    return torch._int_mm(xq, wt).float() * xs * ws


def candidates(mlp: MLP, use_torchao: bool, use_compile: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    ws = [mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()]
    out: dict[str, Callable] = {"float32": mlp}
    bf = copy.deepcopy(mlp).to(torch.bfloat16)
    out["bfloat16"] = lambda x: bf(x.to(torch.bfloat16)).float()

    dyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(mlp), {nn.Linear}, dtype=torch.qint8)
    out["ao.dynamic int8 (x86)"] = dyn

    q = [_int8_rows(w) for w in ws]
    qt = [(wq.t().contiguous(), s) for wq, s in q]

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        g = _dyn_int8_mm(x, *qt[0])
        u = _dyn_int8_mm(x, *qt[1])
        return _dyn_int8_mm(F.silu(g) * u, *qt[2])

    out["_int_mm per-token int8"] = int_mm

    # oneDNN's int8 GEMM (what inductor's x86 quantization lowers to): per-token int8 activations passed with
    # scale 1, the per-token scales applied to its float output afterwards (the product is linear in them)
    packed = [(torch.ops.onednn.qlinear_prepack(wq, None), s) for wq, s in q]
    zeros = [torch.zeros(s.shape[0], dtype=torch.long) for _, s in q]

    def onednn_lin(x: torch.Tensor, i: int) -> torch.Tensor:
        xs = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        xq = torch.round(x / xs).clamp(-127, 127).to(torch.int8)
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed[i][0], packed[i][1], zeros[i], None, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y * xs

    out["onednn qlinear per-token int8"] = lambda x: onednn_lin(F.silu(onednn_lin(x, 0)) * onednn_lin(x, 1), 2)

    def wo8(x: torch.Tensor) -> torch.Tensor:
        g = torch._weight_int8pack_mm(x, q[0][0], q[0][1])
        u = torch._weight_int8pack_mm(x, q[1][0], q[1][1])
        return torch._weight_int8pack_mm(F.silu(g) * u, q[2][0], q[2][1])

    out["_weight_int8pack_mm"] = wo8
    bq = [(wq, s.to(torch.bfloat16)) for wq, s in q]

    def wo8_bf16(x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        g = torch._weight_int8pack_mm(xb, bq[0][0], bq[0][1])
        u = torch._weight_int8pack_mm(xb, bq[1][0], bq[1][1])
        return torch._weight_int8pack_mm(F.silu(g) * u, bq[2][0], bq[2][1]).float()

    out["_weight_int8pack_mm bf16 act"] = wo8_bf16

    # 4-bit weights, groups of 128 along K: asymmetric (scale, zero) as the CPU int4 kernel wants
    def int4_pack(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = w.shape
        g = w.reshape(n, k // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo).clamp(min=1e-8) / 15)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        qv = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # [k/group, n, 2]
        return torch._convert_weight_to_int4pack_for_cpu(qv, 1), sz

    try:
        q4 = [int4_pack(w) for w in ws]

        def wo4(x: torch.Tensor) -> torch.Tensor:
            g = torch._weight_int4pack_mm_for_cpu(x, q4[0][0], 128, q4[0][1])
            u = torch._weight_int4pack_mm_for_cpu(x, q4[1][0], 128, q4[1][1])
            return torch._weight_int4pack_mm_for_cpu(F.silu(g) * u, q4[2][0], 128, q4[2][1])

        wo4(torch.randn(2, D))
        out["_weight_int4pack_mm_for_cpu g128"] = wo4
    except Exception as err:  # noqa: BLE001 - a probe reports what does not run
        print(f"skip int4pack: {str(err).splitlines()[0][:120]}")

    try:
        def dq4_pack(w: torch.Tensor, group: int = 32) -> torch.Tensor:
            n, k = w.shape
            g = w.reshape(n, k // group, group)
            scale = g.abs().amax(-1).clamp(min=1e-8) / 7
            qv = (torch.round(g / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, k)
            packed = (qv[:, 1::2] << 4 | qv[:, ::2]).to(torch.uint8)
            return torch.ops.aten._dyn_quant_pack_4bit_weight(packed, scale.to(torch.float32), None, group, k, n)

        p4 = [(dq4_pack(w), w.shape[1], w.shape[0]) for w in ws]

        def dq4(x: torch.Tensor) -> torch.Tensor:
            mm = torch.ops.aten._dyn_quant_matmul_4bit
            g = mm(x, p4[0][0], 32, p4[0][1], p4[0][2])
            u = mm(x, p4[1][0], 32, p4[1][1], p4[1][2])
            return mm(F.silu(g) * u, p4[2][0], 32, p4[2][1], p4[2][2])

        dq4(torch.randn(2, D))
        out["_dyn_quant_matmul_4bit g32"] = dq4
    except Exception as err:  # noqa: BLE001
        print(f"skip dyn_quant_4bit: {str(err).splitlines()[0][:120]}")

    if use_compile:
        deq = [(wq, s) for wq, s in q]

        def deq_mlp(x: torch.Tensor) -> torch.Tensor:
            def lin(v: torch.Tensor, wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return F.linear(v, wq.to(v.dtype)) * s
            g = lin(x, *deq[0])
            u = lin(x, *deq[1])
            return lin(F.silu(g) * u, *deq[2])

        out["compiled int8 dequant-in-graph"] = torch.compile(deq_mlp, dynamic=False)

        def rowdot_mlp(x: torch.Tensor) -> torch.Tensor:
            # broadcast product + reduction: inductor fuses the int8 -> float conversion into one GEMV loop
            def lin(v: torch.Tensor, wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return (v[:, None, :] * wq.to(v.dtype)).sum(-1) * s
            g = lin(x, *deq[0])
            u = lin(x, *deq[1])
            return lin(F.silu(g) * u, *deq[2])

        rowdot = torch.compile(rowdot_mlp, dynamic=False)
        out["compiled int8 row-dot GEMV"] = lambda x: rowdot(x) if x.shape[0] <= 4 else deq_mlp(x)
        out["compiled _int_mm per-token int8"] = torch.compile(int_mm, dynamic=False)
        out["compiled float32"] = torch.compile(copy.deepcopy(mlp), dynamic=False)

    if use_torchao:
        try:
            from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                              quantize_)
        except ImportError:
            print("skip torchao: not installed (pip install torchao)")
            return out

        for name, cfg in (("torchao int8 dyn-act", Int8DynamicActivationInt8WeightConfig),
                          ("torchao int8 weight-only", Int8WeightOnlyConfig)):
            try:
                m = copy.deepcopy(mlp)
                quantize_(m, cfg())
                out[name] = m
                if use_compile:
                    out[name + " compiled"] = torch.compile(m, dynamic=False)
            except Exception as err:  # noqa: BLE001
                print(f"skip {name}: {str(err).splitlines()[0][:120]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated substrings: time only candidates whose name has one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    mlp = MLP().eval()
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.normal_(0, 0.02)
    shapes = {"prefill": torch.randn(args.tokens, D), "decode": torch.randn(1, D)}
    seconds: dict[str, dict[str, float]] = {}
    errs: dict[str, float] = {}
    fns: dict[str, Callable] = {}
    with torch.no_grad():
        ref = mlp(shapes["prefill"])
        only = [o for o in args.only.split(",") if o]
        for name, fn in candidates(mlp, not args.no_torchao, not args.no_compile).items():
            if only and name != "float32" and not any(o in name for o in only):
                continue
            try:
                t = time.perf_counter()
                for x in shapes.values():
                    fn(x)  # warm-up (and compile)
                first = time.perf_counter() - t
                errs[name] = float((fn(shapes["prefill"]).float() - ref).norm() / ref.norm())
            except Exception as err:  # noqa: BLE001 - a probe reports what does not run
                print(f"{name:36s} does not run: {str(err).splitlines()[0][:160]}", flush=True)
                continue
            if name != "float32" and first > 8 * seconds["float32"]["first"]:
                print(f"{name:36s} dropped: first calls took {first:.1f} s", flush=True)
                continue
            seconds[name] = {"first": first, "prefill": float("inf"), "decode": float("inf")}
            fns[name] = fn
        # interleaved rounds: a machine that gets busier slows every candidate of a round alike
        for r in range(args.rounds):
            for phase, x in shapes.items():
                reps = 1 if phase == "prefill" else 20
                for name, fn in fns.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn(x)
                    seconds[name][phase] = min(seconds[name][phase], (time.perf_counter() - t) / reps)
            print(f"-- after round {r + 1} of {args.rounds}", flush=True)
            base = seconds["float32"]
            for name, row in seconds.items():
                print(f"{name:36s} prefill {row['prefill'] * 1e3:8.1f} ms ({base['prefill'] / row['prefill']:5.2f}x)"
                      f"   decode {row['decode'] * 1e3:7.2f} ms ({base['decode'] / row['decode']:5.2f}x)"
                      f"   rel.err {errs[name]:.4f}", flush=True)
    print(json.dumps({"tokens": args.tokens, "threads": args.threads,
                      "seconds": {n: {ph: round(v, 6) for ph, v in r.items()} for n, r in seconds.items()},
                      "relative_error": {n: round(e, 5) for n, e in errs.items()}}))


if __name__ == "__main__":
    main()
