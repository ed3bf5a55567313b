"""Does the first answer token depend on the picture? Score held-out yes/no and multiple-choice questions by the
logits of the first reply token, asked about the picture and, as a control, about the scene's text description
(`make_scene_text.py`'s twins, here on the held-out split).

- yes/no: AUC of logit(Yes) - logit(No) against the truth (0.5: the answer ignores the input), and the accuracy of
  its sign; the greedy accuracy is an AUC at one threshold, so the AUC moves before the accuracy does.
- multiple choice: accuracy of the argmax restricted to the offered letters (chance 1 / #options).

Session 8 measured the picture yes/no AUC at 0.47-0.56 for every model it tried (scripts/embedded/p8/RESULTS.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_scene_text import twin_question  # noqa: E402

from cheers.pipeline import Cheers  # noqa: E402
from cheers.shapes.samples import make_sample  # noqa: E402
from cheers.shapes.world import render_scene  # noqa: E402


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2): Mann-Whitney U / n+n-."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    if y.all() or not y.any():
        raise ValueError("AUC needs both positive and negative items")
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _conversations(samples: list[dict], resolution: int, as_text: bool) -> list[list[dict]]:
    if as_text:
        return [[{"role": "user", "content": twin_question(s)}] for s in samples]
    return [[{"role": "user", "content": s["question"], "images": [render_scene(s["scene"], resolution)]}]
            for s in samples]


def _first_id(model: Cheers, word: str) -> int:
    return model.tokenizer.encode(word)[0]


def score(model: Cheers, n: int = 100, seed: int = 1, batch: int = 16) -> dict:
    res = model.config.resolution
    out: dict = {"n": n, "seed": seed}
    yes, no = _first_id(model, "Yes"), _first_id(model, "No")
    letters = {k: _first_id(model, k) for k in "ABCD"}
    yesno = [make_sample("yesno", seed, "eval", i) for i in range(n)]
    mcq = [make_sample("mcq", seed, "eval", i) for i in range(n)]
    for mode in ("picture", "text"):
        as_text = mode == "text"
        margins: list[float] = []
        picks: list[str] = []
        for lo in range(0, n, batch):
            lg = model.next_token_logits(_conversations(yesno[lo:lo + batch], res, as_text))
            margins += (lg[:, yes] - lg[:, no]).tolist()
            lg = model.next_token_logits(_conversations(mcq[lo:lo + batch], res, as_text))
            for row, s in zip(lg, mcq[lo:lo + batch]):
                offered = sorted(s["options"])
                picks.append(offered[int(row[[letters[k] for k in offered]].argmax())])
        truth = [s["answer"] == "Yes" for s in yesno]
        out[mode] = {
            "yesno_auc": round(auc(margins, truth), 4),
            "yesno_sign_accuracy": round(float(np.mean([(m > 0) == t for m, t in zip(margins, truth)])), 4),
            "yesno_mean_margin": round(float(np.mean(margins)), 4),
            "mcq_restricted_accuracy": round(float(np.mean([p == s["answer"] for p, s in zip(picks, mcq)])), 4),
            "mcq_chance": round(float(np.mean([1 / len(s["options"]) for s in mcq])), 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--n", type=int, default=100, help="held-out questions per type")
    ap.add_argument("--seed", type=int, default=1, help="evaluation seed (the harness's held-out split)")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    print(json.dumps(score(Cheers.from_pretrained(a.model), a.n, a.seed, a.batch)))


if __name__ == "__main__":
    main()
