"""Weight average of two exports of one lineage (a later stage and the stage it continued from):
(1 - alpha) * A + alpha * B for every tensor, in float32, written as an export that `package.py` takes.

Why: a stage continued from another often gains in one skill and loses in another (the recipe's stage 10 answers
better and draws worse than stage 09, which it continues); both lie on one run family, so points on the straight
line between them can keep part of each side's gain. Averaging re-runs of one stage with different seeds (stages
14-17) cancels part of each run's noise. Buffers (non-trainable state) must match exactly; the tokenizer files must
be identical and are copied from A.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
from pathlib import Path

import torch

from cheers.checkpoint import load_model, save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def average(a: Path, b: Path, alpha: float, dest: Path) -> dict[str, float]:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: expected a number in [0, 1] (the weight of B)")
    for name in TOKENIZER_FILES:
        if not filecmp.cmp(a / name, b / name, shallow=False):
            raise ValueError(f"{a / name} and {b / name} differ: the two exports use different tokenizers")
    ma, mb = load_model(a), load_model(b)
    if ma.config != mb.config:
        raise ValueError(f"{a} and {b} have different model configs: only exports of one architecture average")
    sb = mb.state_dict()
    moved, done = 0.0, set()
    with torch.no_grad():
        for name, t in ma.state_dict().items():
            if t.data_ptr() in done:  # a tied tensor (the LM head is the embedding): average it once
                continue
            done.add(t.data_ptr())
            if not t.is_floating_point():
                if not torch.equal(t, sb[name]):
                    raise ValueError(f"non-float tensor {name} differs between {a} and {b}")
                continue
            moved += float((sb[name] - t).pow(2).sum())  # load_model gives float32: no casts needed
            t.lerp_(sb[name], alpha)
    dest.mkdir(parents=True, exist_ok=True)
    save_model(ma, dest)
    for name in TOKENIZER_FILES:
        shutil.copy(a / name, dest / name)
    return {"alpha": alpha, "distance": moved ** 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="export A (weight 1 - alpha)")
    ap.add_argument("--b", required=True, help="export B (weight alpha)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--dest", required=True)
    args = ap.parse_args()
    report = average(Path(args.a), Path(args.b), args.alpha, Path(args.dest))
    print(json.dumps({"dest": args.dest, **report}))


if __name__ == "__main__":
    main()
