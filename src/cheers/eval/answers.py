"""Scoring a model's free-text answer to a ShapesWorld question.

`score_answer(prediction, answer, answer_type)` normalises the prediction by the answer's type (letter / yes-no /
number / colour / shape / position / caption: `normalize_*`, `parse_caption`) and compares it with the truth.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping

from cheers.shapes.world import COLORS, NUMBER_WORDS, SHAPES, SceneSpec

__all__ = ["normalize_letter", "normalize_yesno", "normalize_number", "normalize_color", "normalize_shape",
           "normalize_position", "parse_caption", "score_answer"]

_WORD_NUMBERS = {w: i for i, w in NUMBER_WORDS.items()} | {"none": 0, "no": 0, "eleven": 11, "twelve": 12,
                                                               "a single": 1, "single": 1, "once": 1}
_COLOR_SYNONYMS = {"grey": "gray", "violet": "purple", "magenta": "purple", "lilac": "purple", "teal": "cyan",
                   "turquoise": "cyan", "aqua": "cyan", "golden": "yellow", "gold": "yellow", "crimson": "red",
                   "scarlet": "red", "lime": "green", "navy": "blue", "amber": "orange"}
_COLOR_WORDS = list(COLORS) + ["pink", "gray", "black", "brown"]
_SHAPE_SYNONYMS = {"circles": "circle", "round": "circle", "ring": "circle", "disc": "circle", "disk": "circle",
                   "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross",
                   "plus": "cross", "hearts": "heart"}
_POSITION_WORDS = {"left": "left", "right": "right", "above": "above", "below": "below", "over": "above",
                   "under": "below", "beneath": "below", "underneath": "below", "top": "above", "up": "above",
                   "higher": "above", "bottom": "below", "down": "below", "lower": "below"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def normalize_letter(text: str, options: Mapping[str, str] | None = None) -> str | None:
    """'B', 'B.', '(B) star', 'C: heart', 'The answer is B', 'Option B' -> 'B'; else the single option whose
    text the answer names ('star' -> the letter of option 'star')."""
    t = str(text).strip()
    m = re.match(r"^\(?([A-D])\)?[\.\):]?$", t) or re.match(r"^\(?([A-D])[\.\):]", t) or re.match(r"^([B-D])\s", t)
    if m:
        return m.group(1)
    m = re.search(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-D])\b", t, re.I)
    if m:
        return m.group(1).upper()
    if options:
        words = " " + " ".join(_words(t)) + " "
        hits = [k for k, v in options.items() if v and f" {' '.join(_words(v))} " in words]
        if len(hits) == 1:
            return hits[0]
    m = re.match(r"^([a-d])$", t)
    return m.group(1).upper() if m else None


def normalize_yesno(text: str) -> str | None:
    """'Yes', 'yes, there is', 'No.', 'There is no ...' -> 'yes' / 'no' (None when unclear)."""
    w = _words(text)
    if not w:
        return None
    if w[0] in ("yes", "yeah", "yep", "true", "correct"):
        return "yes"
    if w[0] in ("no", "nope", "false", "incorrect"):
        return "no"
    neg = any(x in w for x in ("no", "not", "none", "nothing", "isn", "doesn", "cannot", "can't"))
    pos = any(x in w for x in ("yes", "there is", "contains")) or "yes" in w
    if "yes" in w and "no" not in w:
        return "yes"
    if neg and not pos:
        return "no"
    if "no" in w and "yes" not in w:
        return "no"
    return None


def normalize_number(text: str) -> int | None:
    """First number of the answer, as digits or a word ('3', 'three', 'There are 3.')."""
    t = str(text).lower()
    m = re.search(r"-?\d+", t)
    cands = []
    if m:
        cands.append((m.start(), int(m.group())))
    for word, val in _WORD_NUMBERS.items():
        m2 = re.search(rf"\b{word}\b", t)
        if m2 and word not in ("no", "a single", "single", "once"):
            cands.append((m2.start(), val))
    if not cands:
        return 0 if re.search(r"\b(?:no|none)\b", t) else None
    return min(cands)[1]


def _first_of(text: str, vocab: Mapping[str, str]) -> str | None:
    t = str(text).lower()
    best = None
    for word, val in vocab.items():
        m = re.search(rf"\b{re.escape(word)}\b", t)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), val)
    return best[1] if best else None


def normalize_color(text: str) -> str | None:
    """First colour word of the answer ('It is red.' -> 'red'; synonyms such as grey/violet/teal mapped)."""
    return _first_of(text, {w: w for w in _COLOR_WORDS} | _COLOR_SYNONYMS)


def normalize_shape(text: str) -> str | None:
    return _first_of(text, {s: s for s in SHAPES} | _SHAPE_SYNONYMS)


def normalize_position(text: str) -> str | None:
    return _first_of(text, _POSITION_WORDS)


def parse_caption(text: str) -> Counter:
    """Objects named by a caption: Counter{(colour, shape): count}. 'two red circles and a blue star' ->
    {('red', 'circle'): 2, ('blue', 'star'): 1}; a shape without colour counts as (None, shape)."""
    toks = _words(text)
    out: Counter = Counter()
    for i, tok in enumerate(toks):
        shape = SHAPES[SHAPES.index(tok)] if tok in SHAPES else _SHAPE_SYNONYMS.get(tok)
        if shape is None or tok in ("round", "plus", "ring", "disc", "disk"):
            continue
        color, count = None, 1
        j = i - 1
        if j >= 0 and (toks[j] in _COLOR_WORDS or toks[j] in _COLOR_SYNONYMS):
            color = _COLOR_SYNONYMS.get(toks[j], toks[j])
            j -= 1
        if j >= 0:
            if toks[j].isdigit():
                count = int(toks[j])
            elif toks[j] in _WORD_NUMBERS and toks[j] not in ("no", "single", "once"):
                count = _WORD_NUMBERS[toks[j]]
        out[(color, shape)] += count
    return out


def score_answer(prediction: str, answer: str, answer_type: str, options: Mapping[str, str] | None = None,
                 spec: SceneSpec | None = None) -> bool:
    """Is a free-text `prediction` right? Normalises it by `answer_type` first."""
    if answer_type == "letter":
        return normalize_letter(prediction, options) == answer.strip().upper()
    if answer_type == "yesno":
        return normalize_yesno(prediction) == normalize_yesno(answer)
    if answer_type == "number":
        got = normalize_number(prediction)
        return got is not None and got == normalize_number(answer)
    if answer_type == "color":
        return normalize_color(prediction) == normalize_color(answer)
    if answer_type == "shape":
        return normalize_shape(prediction) == normalize_shape(answer)
    if answer_type == "position":
        return normalize_position(prediction) == normalize_position(answer)
    if answer_type == "caption":
        truth = Counter((o.color, o.shape) for o in spec.objects) if spec is not None else parse_caption(answer)
        return parse_caption(prediction) == truth
    return " ".join(_words(prediction)) == " ".join(_words(answer))
