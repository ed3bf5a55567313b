"""ShapesWorld samples: splits are disjoint and held-out compositions never reach the train split."""

from __future__ import annotations

import json

from cheers.shapes import samples as SM
from cheers.shapes import world as W


def _pairs_of(sample) -> set[tuple[str, str]]:
    out = set()
    for key in ("scene", "source", "target"):
        if key in sample:
            out |= set(sample[key].pairs())
    return out


def test_splits_are_disjoint_and_heldout_pairs_never_trained():
    seen_train, train_scenes, heldout_hits = set(), set(), 0
    for kind in SM.ALL_KINDS:
        for i in range(60):
            s = SM.make_sample(kind, 0, "train", i)
            seen_train |= _pairs_of(s)
            text = " ".join(str(s.get(k, "")) for k in ("prompt", "question", "instruction", "answer"))
            for shape, color in W.HELDOUT_PAIRS:
                assert f"{color} {shape}" not in text
            for key in ("scene", "source"):
                if key in s:
                    train_scenes.add(json.dumps(s[key].to_dict(), sort_keys=True))
    assert not seen_train & W.HELDOUT_PAIRS
    assert len(seen_train) == len(W.SHAPES) * len(W.COLORS) - len(W.HELDOUT_PAIRS)  # everything else is seen
    eval_pairs = set()
    for kind in SM.ALL_KINDS:
        for i in range(60):
            s = SM.make_sample(kind, 0, "eval", i)  # same seed, eval split: other seed sequences
            eval_pairs |= _pairs_of(s)
            for key in ("scene", "source"):
                if key in s:
                    assert json.dumps(s[key].to_dict(), sort_keys=True) not in train_scenes
            if kind in ("colors", "color_attr"):
                heldout_hits += bool(s["heldout"])
                assert s["heldout"] == bool(_pairs_of(s) & W.HELDOUT_PAIRS)
    assert W.HELDOUT_PAIRS <= eval_pairs
    assert heldout_hits >= 60  # every even index of both categories uses a held-out composition
