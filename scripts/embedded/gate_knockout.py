"""What the high-frequency gate does in a trained model: the gate's values along the flow, and the same weights with
the gate knocked out at inference (the detail path cut, `HighFrequencyGate.enabled = False`).

A knockout is not the paper's ablation (a model trained without the gate; `ablation_no_gate.sh`), but it is cheap and
it asks a sharper question of the shipped weights: how much of their velocity and of their pictures comes through
the detail path. Reports, with the gate on and knocked out:
- the held-out velocity MSE per t on oracle renders of ShapesBench prompts (`flow_loss.flow_errors`),
- the mean gate value sigma(S) per t (gate on only),
- ShapesBench T2I (GenEval rules, n per category) and the sharpness ratio (high-frequency energy of the generated
  pictures / real renders of the same prompts), with the model's own sampling defaults.

    python scripts/embedded/gate_knockout.py --model src/cheers/assets/cheers-shapes --n 50 --seed 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from cheers.eval.harness import evaluate_shapes, generation_sharpness
from cheers.pipeline import Cheers
from cheers.sampling import left_pad

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_loss import T_GRID, flow_errors, oracle_batch  # noqa: E402  (a sibling script)


@torch.no_grad()
def gate_values(model, tok, n: int, seed: int) -> dict[float, float]:
    """Mean sigma(S) over the image positions of held-out renders with their prompts, per t of T_GRID."""
    rows, lat, noise = oracle_batch(model, tok, n, seed)
    ids, mask = left_pad(rows, model.config.tokens.pad)
    seen: list[torch.Tensor] = []
    handle = model.model.hi_gate.register_forward_hook(lambda _m, _i, out: seen.append(out[1].detach()))
    try:
        by_t = {}
        for t in T_GRID:
            seen.clear()
            model(ids, t=torch.full((len(rows),), t), attention_mask=mask, latents=lat, x0=noise)
            by_t[t] = float(torch.cat([s.flatten() for s in seen]).mean())
    finally:
        handle.remove()
    return by_t


def t2i(c: Cheers, n: int, seed: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rep = evaluate_shapes(c, n=n, seed=seed, out_dir=tmp, batch_size=batch, tasks=("generation",), verbose=False)
        sharp = generation_sharpness(tmp, n, seed, c.model.config.resolution)
    g = rep["generation"]
    return {"overall": g["overall"], "categories": {k: v["score"] for k, v in g["categories"].items()},
            "partial": g.get("partial"), "sharpness": sharp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=50, help="prompts per ShapesBench category")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--n-flow", type=int, default=20, help="prompts per category for the velocity error")
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    a = ap.parse_args()
    c = Cheers.from_pretrained(a.model)
    model, tok = c.model, c.tokenizer
    if not model.model.hi_gate.enabled:
        raise SystemExit(f"{a.model}: the gate is already disabled in this model's config; nothing to knock out")
    report: dict = {"model": a.model, "seed": a.seed, "n": a.n,
                    "gate_value_by_t": gate_values(model, tok, a.n_flow, a.seed)}
    for name, enabled in (("gate_on", True), ("knocked_out", False)):
        model.model.hi_gate.enabled = enabled
        flow = flow_errors(model, tok, a.n_flow, a.seed)
        report[name] = {"velocity_mse": flow["prompt"]["mean"], "velocity_mse_by_t": flow["prompt"]["by_t"],
                        "prompt_gain": flow["prompt_gain"], **t2i(c, a.n, a.seed, a.batch)}
        print(json.dumps({name: report[name]}), flush=True)
    model.model.hi_gate.enabled = True
    print(json.dumps({"gate_value_by_t": report["gate_value_by_t"]}))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".tmp").write_text(json.dumps(report, indent=1), encoding="utf-8")
        out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
