"""Digits: real handwritten digits (scikit-learn's bundled `load_digits`, 1,797 8x8 images, no download).

Each 8x8 digit is up-scaled smoothly (bicubic) to the model resolution, white on black by default. A fixed,
stratified, deterministic split puts 75% of the real digits in "train" and 25% in "heldout" (`digit_split`).

* `make_digits_dataset` writes generation ("Draw the digit 7.", several phrasings) and understanding ("Which digit
  is this?") samples in the official jsonl format (train split -> train digits, eval split -> held-out digits);
* `digit_judge()` is an SVC trained on renders of the train digits, classifying any image by its 8x8 area-averaged
  grey levels (polarity normalised); `digit_judge().heldout_accuracy` is its accuracy on the held-out digits;
* `digit_eval_items(seed, n, resolution)` gives the generation prompts and understanding questions of the harness.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cheers.shapes.datasets import GEN_ANSWER, GEN_SUFFIX, IMAGE_PREFIX
from cheers.shapes.samples import SPLITS
from cheers.shapes.world import NUMBER_WORDS

__all__ = ["load_real_digits", "digit_split", "render_digit", "digit_features", "DigitJudge", "digit_judge",
           "make_digits_dataset", "digit_eval_items", "DigitGenItem", "DigitQAItem", "GEN_TEMPLATES",
           "QUESTION_TEMPLATES"]

GEN_TEMPLATES = ["Draw the digit {d}.", "Write the number {d}.", "An image of the digit {w}.", "A handwritten {d}.",
                 "Generate a picture of the number {w}.", "The digit {d}, handwritten."]
QUESTION_TEMPLATES = ["Which digit is this?", "What number is written in the image?",
                      "What digit is shown? Answer with a single number.", "Which number do you see?"]
HELDOUT_FRACTION = 0.25
SPLIT_SEED = 20240  # fixed: the held-out digits never change
_KINDS = {"generation": 0, "understanding": 1}


@lru_cache(maxsize=1)
def load_real_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float in [0, 1], labels [1797] int)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def digit_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, heldout) of the real digits: per class, a fixed permutation, the last 25% held out."""
    _, y = load_real_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * HELDOUT_FRACTION))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def render_digit(img8: np.ndarray, resolution: int = 64, polarity: str = "white_on_black") -> Image.Image:
    """RGB image of an 8x8 digit (values in [0, 1]), up-scaled with bicubic interpolation."""
    if polarity not in ("white_on_black", "black_on_white"):
        raise ValueError(f"polarity must be white_on_black or black_on_white, got {polarity!r}")
    small = Image.fromarray(np.clip(np.asarray(img8, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    big = np.asarray(small.resize((resolution, resolution), Image.Resampling.BICUBIC), np.uint8)
    if polarity == "black_on_white":
        big = 255 - big
    return Image.fromarray(np.repeat(big[..., None], 3, -1), "RGB")


def digit_features(image: Image.Image) -> np.ndarray:
    """64 features: grey levels averaged over an 8x8 grid, ink bright (inverted when the border is bright),
    contrast-stretched to [0, 16] like `load_digits`."""
    g = np.asarray(image.convert("L"), np.float32) / 255.0
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if np.median(border) > 0.5:
        g = 1.0 - g
    small = np.asarray(Image.fromarray(g, "F").resize((8, 8), Image.Resampling.BOX), np.float32)
    lo, hi = float(np.percentile(small, 5)), float(small.max())
    small = np.clip((small - lo) / max(hi - lo, 1e-3), 0, 1)
    return (small * 16.0).ravel()


@dataclass
class DigitJudge:
    """Classifier of digit images (SVC on `digit_features`), trained on renders of the train digits."""
    model: Any
    heldout_accuracy: float
    resolution: int

    def predict(self, images: Sequence[Image.Image]) -> list[int]:
        if not images:
            return []
        x = np.stack([digit_features(im) for im in images])
        return [int(v) for v in self.model.predict(x)]


@lru_cache(maxsize=4)
def digit_judge(resolution: int = 64) -> DigitJudge:
    """The digit classifier (deterministic; trained once per process in about a second)."""
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits

    x8, y = load_real_digits()
    tr, ho = digit_split()
    feats = lambda idx: np.stack([digit_features(render_digit(x8[i], resolution)) for i in idx])  # noqa: E731
    with threadpool_limits(1):
        clf = SVC(C=10.0, gamma=0.002).fit(feats(tr), y[tr])
        acc = float((clf.predict(feats(ho)) == y[ho]).mean())
    return DigitJudge(clf, acc, resolution)


def _rng(seed: int, split: str, kind: str) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return np.random.default_rng([SPLITS[split], 0xD1617, int(seed), _KINDS[kind]])


def _gen_prompt(rng: np.random.Generator, label: int) -> str:
    return GEN_TEMPLATES[int(rng.integers(len(GEN_TEMPLATES)))].format(d=label, w=NUMBER_WORDS[label])


def make_digits_dataset(out_dir: str | os.PathLike, seed: int = 0, split: str = "train", resolution: int = 64,
                        n_gen: int | None = None, n_und: int | None = None, polarity: str = "white_on_black",
                        meta: str = "inline", name: str | None = None) -> Path:
    """Write `out_dir/<name or 'digits_' + split>.jsonl` + PNGs: one generation and one understanding sample per
    real digit of the split (train digits for "train", held-out digits for "eval"), or the first `n_gen` /
    `n_und` of a seeded permutation. `meta` as in `cheers.shapes.datasets.make_dataset`. Returns the jsonl path."""
    if meta not in ("inline", "sidecar", "none"):
        raise ValueError(f"meta must be inline, sidecar or none, got {meta!r}")
    x8, y = load_real_digits()
    tr, ho = digit_split()
    pool = tr if split == "train" else ho
    out = Path(out_dir)
    name = name or f"digits_{split}"
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    side = open(out / f"{name}.meta.jsonl", "w", encoding="utf-8") if meta == "sidecar" else None
    try:
        with open(path, "w", encoding="utf-8") as f:
            for kind, n in (("generation", n_gen), ("understanding", n_und)):
                rng = _rng(seed, split, kind)
                order = pool[rng.permutation(len(pool))]
                if n is not None:
                    order = order[:n]
                for i, src in enumerate(order):
                    label = int(y[src])
                    rid = f"{name}_{kind}_{i:05d}"
                    rel = f"images/{rid}.png"
                    render_digit(x8[src], resolution, polarity).save(out / rel, format="PNG")
                    if kind == "generation":
                        prompt = _gen_prompt(rng, label)
                        conv = [{"from": "human", "value": prompt + GEN_SUFFIX}, {"from": "gpt", "value": GEN_ANSWER}]
                        m: dict[str, Any] = {"family": "generation", "kind": "digit_generation", "prompt": prompt}
                    else:
                        q = QUESTION_TEMPLATES[int(rng.integers(len(QUESTION_TEMPLATES)))]
                        conv = [{"from": "human", "value": IMAGE_PREFIX + q}, {"from": "gpt", "value": str(label)}]
                        m = {"family": "understanding", "kind": "digit_question", "qtype": "digit",
                             "answer": str(label), "answer_type": "number"}
                    m.update({"label": label, "source_index": int(src), "resolution": resolution,
                              "polarity": polarity})
                    rec: dict[str, Any] = {"id": rid, "image": rel, "conversations": conv}
                    if meta == "inline":
                        rec["meta"] = m
                    elif side is not None:
                        side.write(json.dumps({"id": rid, "meta": m}, sort_keys=True) + "\n")
                    f.write(json.dumps(rec) + "\n")
    finally:
        if side is not None:
            side.close()
    return path


@dataclass
class DigitGenItem:
    id: str
    label: int
    prompt: str
    text: str  # prompt + GEN_SUFFIX: what the model receives


@dataclass
class DigitQAItem:
    id: str
    label: int
    question: str
    image: Image.Image
    source_index: int


def digit_eval_items(seed: int = 0, n: int = 50, resolution: int = 64) -> dict[str, list]:
    """`n` generation prompts (labels cycle 0-9, seeded phrasings) and `n` questions on held-out real digits
    (seeded choice, classes balanced as far as n allows)."""
    x8, y = load_real_digits()
    _, ho = digit_split()
    rng = _rng(seed, "eval", "generation")
    gen = []
    for i in range(n):
        label = i % 10
        p = _gen_prompt(rng, label)
        gen.append(DigitGenItem(f"digit_gen_{i:04d}", label, p, p + GEN_SUFFIX))
    rng = _rng(seed, "eval", "understanding")
    per_class = [ho[y[ho] == c][rng.permutation(int((y[ho] == c).sum()))] for c in range(10)]
    und = []
    for i in range(n):
        c = i % 10
        src = int(per_class[c][(i // 10) % len(per_class[c])])
        q = QUESTION_TEMPLATES[int(rng.integers(len(QUESTION_TEMPLATES)))]
        und.append(DigitQAItem(f"digit_qa_{i:04d}", c, q, render_digit(x8[src], resolution), src))
    return {"generation": gen, "understanding": und}
