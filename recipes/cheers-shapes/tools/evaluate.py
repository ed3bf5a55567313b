"""Measure a Cheers model on held-out ShapesBench + Digits with the harness; optionally the sampling comparison
(the default step count vs 4x fewer steps with a second-order and with the renoise sampler). Writes <out>/summary.json."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cheers.eval.harness import evaluate_digits, evaluate_shapes, generation_sharpness
from cheers.pipeline import Cheers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="runs/embedded/eval")
    ap.add_argument("--n", type=int, default=20, help="items per category / question type / edit kind")
    ap.add_argument("--n-digits", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--compare-samplers", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    c = Cheers.from_pretrained(a.model)
    gen_kw = {k: v for k, v in (("steps", a.steps), ("cfg_scale", a.cfg), ("sampler", a.sampler)) if v is not None}
    out = Path(a.out)
    t0 = time.time()
    summary = {"model": a.model, "seed": a.seed, "gen_kw": gen_kw or vars(c.image_defaults)}
    summary["shapes"] = evaluate_shapes(c, n=a.n, seed=a.seed, out_dir=out / "shapes", batch_size=a.batch,
                                        gen_kw=gen_kw, edit_kw=gen_kw, answer_kw={"max_new_tokens": 48})
    summary["sharpness"] = generation_sharpness(out / "shapes", a.n, a.seed, c.config.resolution)
    summary["digits"] = evaluate_digits(c, n=a.n_digits, seed=a.seed, out_dir=out / "digits", batch_size=a.batch,
                                        gen_kw=gen_kw, answer_kw={"max_new_tokens": 4})
    if a.compare_samplers:
        # 4x fewer steps with a second-order ODE sampler (2 evaluations per step) and with the stochastic one
        steps = a.steps or c.image_defaults.steps
        for sampler in ("heun", "renoise"):
            few = {**gen_kw, "steps": max(1, steps // 4), "sampler": sampler}
            summary[f"sampling_4x_fewer_{sampler}"] = evaluate_shapes(
                c, n=a.n, seed=a.seed, out_dir=out / f"shapes_{sampler}", batch_size=a.batch, gen_kw=few,
                tasks=("generation",))
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: summary[k] for k in ("model", "seconds")}))


if __name__ == "__main__":
    main()
