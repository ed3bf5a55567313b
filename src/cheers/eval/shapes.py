"""ShapesWorld: procedural, seeded scenes of simple coloured shapes, rendered with PIL.

A scene is a `SceneSpec`: a background (a dark colour, plain or lightly textured) and up to four objects, each a
shape (circle, square, triangle, star, cross, heart) in one of eight named colours far apart in RGB, with a size
(side of its bounding square, as a fraction of the image side) and a centre (fractions, x right, y down).
`render_scene(spec, resolution)` draws it at 4x and downsamples with LANCZOS, so any resolution works (64, 128...).

From a seed, `make_dataset` writes the official jsonl format (images relative to the data root) with samples of
four families:

* generation (text-to-image) in GenEval's six categories: single_object, two_object, counting (1-4), colors,
  position (left of / right of / above / below) and color_attr;
* understanding: caption, mcq (MMBench-like, options A-D, the answer is the letter), yesno (POPE-like, balanced),
  count, color and relation (left/right, above/below) questions;
* editing: recolor, move, add and remove an object (source image, instruction, target image);
* text: text-only questions about shapes and colours.

Every record keeps its structured spec under "meta" (objects, category, answer, GenEval metadata...), which the
judge (`cheers.eval.judge`) scores against. Randomness is a pure function of (split, seed, kind, index): the train
and eval splits draw from disjoint seed sequences, and the (shape, colour) pairs of `HELDOUT_PAIRS` never appear
in any train sample, so the eval split measures compositions never seen in training.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cheers import constants as C

__all__ = [
    "SHAPES", "PLURALS", "COLORS", "BACKGROUNDS", "TEXTURES", "SIZES", "HELDOUT_PAIRS", "GEN_SUFFIX",
    "GENERATION_CATEGORIES", "UNDERSTANDING_TYPES", "EDIT_KINDS", "TEXT_KIND", "ALL_KINDS", "SPLITS",
    "ObjectSpec", "SceneSpec", "GenItem", "QAItem", "EditItem",
    "render_scene", "object_box", "relative_position", "sample_rng", "make_sample", "write_record", "make_dataset",
    "eval_prompts", "describe_scene", "geneval_metadata",
]

# ---- vocabulary ---------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "heart": "hearts"}
# eight object colours, pairwise >= ~95 apart in RGB and far from every background
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 235),
    "yellow": (250, 230, 50),
    "purple": (150, 60, 200),
    "orange": (250, 130, 10),
    "cyan": (40, 215, 225),
    "white": (240, 240, 240),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (14, 14, 18),
    "navy": (20, 24, 46),
    "charcoal": (42, 42, 46),
    "umber": (46, 32, 26),
    "forest": (18, 38, 28),
}
TEXTURES = ("plain", "noise", "gradient", "checker")
SIZES = {"small": 0.20, "medium": 0.27, "large": 0.34}
NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine", 10: "ten"}
RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

# (shape, colour) pairs that no train sample ever contains; eval colors / color_attr prompts use them half the time
HELDOUT_PAIRS = frozenset({
    ("circle", "orange"), ("square", "cyan"), ("triangle", "purple"),
    ("star", "blue"), ("cross", "yellow"), ("heart", "green"),
})

GEN_SUFFIX = "\n" + C.GENERATION_INSTRUCTION
IMAGE_PREFIX = "<im_start><image><im_end>\n"
GEN_ANSWER = "<im_start><image_gen><im_end>"

GENERATION_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
UNDERSTANDING_TYPES = ("caption", "mcq", "yesno", "count", "color", "relation")
EDIT_KINDS = ("recolor", "move", "add", "remove")
TEXT_KIND = "text"
ALL_KINDS = GENERATION_CATEGORIES + UNDERSTANDING_TYPES + EDIT_KINDS + (TEXT_KIND,)
SPLITS = {"train": 0x5EED_7A1, "eval": 0xE7A1_0FF}  # first word of every seed sequence: the splits never share one

MARGIN = 0.04  # free border around objects
GAP = 0.06  # free space between the bounding squares of two objects
SUPERSAMPLE = 4


# ---- specs --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: float  # side of the bounding square, fraction of the image side
    cx: float  # centre, fractions of the image side (x to the right, y down)
    cy: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; choose one of {', '.join(COLORS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "center": [self.cx, self.cy]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ObjectSpec":
        cx, cy = d["center"]
        return cls(str(d["shape"]), str(d["color"]), float(d["size"]), float(cx), float(cy))

    def moved(self, cx: float, cy: float) -> "ObjectSpec":
        return ObjectSpec(self.shape, self.color, self.size, cx, cy)

    def recolored(self, color: str) -> "ObjectSpec":
        return ObjectSpec(self.shape, color, self.size, self.cx, self.cy)


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...] = ()
    background: str = "black"
    texture: str = "plain"
    texture_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; choose one of {', '.join(TEXTURES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background,
                "texture": self.texture, "texture_seed": self.texture_seed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SceneSpec":
        return cls(tuple(ObjectSpec.from_dict(o) for o in d.get("objects", ())), str(d.get("background", "black")),
                   str(d.get("texture", "plain")), int(d.get("texture_seed", 0)))

    def replace_objects(self, objects: Sequence[ObjectSpec]) -> "SceneSpec":
        return SceneSpec(tuple(objects), self.background, self.texture, self.texture_seed)

    def pairs(self) -> list[tuple[str, str]]:
        return [(o.shape, o.color) for o in self.objects]


@dataclass
class GenItem:
    """A text-to-image evaluation prompt: `text` is what the model receives (prompt + GEN_SUFFIX), `spec` one
    scene satisfying it (what an oracle would draw), `geneval` its GenEval-format metadata."""
    id: str
    category: str
    prompt: str
    text: str
    spec: SceneSpec
    geneval: dict[str, Any]
    heldout: bool = False


@dataclass
class QAItem:
    """An understanding question (qtype in UNDERSTANDING_TYPES) or a text-only one (qtype "text", image None)."""
    id: str
    qtype: str
    question: str
    answer: str
    answer_type: str  # letter | yesno | number | color | shape | position | caption
    spec: SceneSpec | None = None
    image: Image.Image | None = None
    options: dict[str, str] | None = None
    subtype: str = ""


@dataclass
class EditItem:
    id: str
    kind: str
    instruction: str
    source: SceneSpec
    target: SceneSpec
    edit: dict[str, Any] = field(default_factory=dict)
    source_image: Image.Image | None = None


# ---- geometry and rendering ---------------------------------------------------------------------------------------


def _normalise(points: np.ndarray, scale: float) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    centred = points - (lo + hi) / 2
    return centred * (scale / float((hi - lo).max()))


def _unit_polygons() -> dict[str, np.ndarray]:
    """Each shape as a polygon whose bounding box is centred at 0 with its longer side = the shape's scale."""
    polys: dict[str, np.ndarray] = {}
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    polys["circle"] = np.stack([np.cos(t), np.sin(t)], 1) * 0.5
    polys["square"] = _normalise(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), 0.86)
    polys["triangle"] = _normalise(np.array([[0, -math.sqrt(3) / 2], [1, math.sqrt(3) / 2],
                                             [-1, math.sqrt(3) / 2]]), 1.0)
    ang = -math.pi / 2 + np.arange(10) * math.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    polys["star"] = _normalise(np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1), 1.0)
    a = 0.17  # half thickness of the arms (arm length 1)
    polys["cross"] = np.array([[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5],
                               [-a, a], [-0.5, a], [-0.5, -a], [-a, -a]], float)
    th = np.linspace(0, 2 * math.pi, 120, endpoint=False)
    hx = 16 * np.sin(th) ** 3
    hy = -(13 * np.cos(th) - 5 * np.cos(2 * th) - 2 * np.cos(3 * th) - np.cos(4 * th))
    polys["heart"] = _normalise(np.stack([hx, hy], 1), 1.0)
    return polys


UNIT_POLYGONS = _unit_polygons()
# (width, height) of each shape's drawn extent for size 1
UNIT_EXTENT = {s: tuple(float(v) for v in (p.max(0) - p.min(0))) for s, p in UNIT_POLYGONS.items()}


def object_box(o: ObjectSpec) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1), fractions of the image side, of the drawn object."""
    w, h = UNIT_EXTENT[o.shape]
    return (o.cx - w * o.size / 2, o.cy - h * o.size / 2, o.cx + w * o.size / 2, o.cy + h * o.size / 2)


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of A to B as GenEval computes them: centre offset shrunk by `threshold` x the summed box sizes,
    then a relation holds when its normalised component exceeds 0.5. Boxes are (x0, y0, x1, y1), y down."""
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    ca, cb = a.mean(0), b.mean(0)
    da, db = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - threshold * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def _background(spec: SceneSpec, resolution: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[spec.background], float)
    img = np.broadcast_to(base, (resolution, resolution, 3)).copy()
    rng = np.random.default_rng([0xB6, spec.texture_seed])
    if spec.texture == "noise":
        img += rng.normal(0, 4.0, (resolution, resolution, 1))
    elif spec.texture == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = (np.mgrid[0:resolution, 0:resolution] + 0.5) / resolution - 0.5
        img += (8.0 * (xx * math.cos(ang) + yy * math.sin(ang)))[..., None] * rng.uniform(0.5, 1.0)
    elif spec.texture == "checker":
        cell = max(2, resolution // 8)
        yy, xx = np.mgrid[0:resolution, 0:resolution] // cell
        img += np.where((yy + xx) % 2 == 0, 3.0, -3.0)[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(spec: SceneSpec, resolution: int = 64, supersample: int = SUPERSAMPLE) -> Image.Image:
    """RGB image of `spec`, drawn at `supersample` x `resolution` and downsampled with LANCZOS."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    big = resolution * supersample
    im = Image.fromarray(_background(spec, resolution), "RGB").resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    for o in spec.objects:
        color = COLORS[o.color]
        if o.shape == "circle":
            r = o.size * big / 2
            draw.ellipse([o.cx * big - r, o.cy * big - r, o.cx * big + r, o.cy * big + r], fill=color)
        else:
            pts = UNIT_POLYGONS[o.shape] * (o.size * big) + np.array([o.cx * big, o.cy * big])
            draw.polygon([(float(x), float(y)) for x, y in pts], fill=color)
    return im.resize((resolution, resolution), Image.Resampling.LANCZOS)


# ---- random scenes ------------------------------------------------------------------------------------------------


def sample_rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    """The generator of sample `index` of `kind`: a pure function of (split, seed, kind, index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return np.random.default_rng([SPLITS[split], int(seed), ALL_KINDS.index(kind), int(index)])


def _r(x: float) -> float:
    return round(float(x), 4)


class _Scenes:
    """Random scene parts for one sample; `heldout_ok=False` (train) never yields a HELDOUT_PAIRS pair."""

    def __init__(self, rng: np.random.Generator, heldout_ok: bool):
        self.rng = rng
        self.heldout_ok = heldout_ok

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def allowed(self, shape: str, color: str) -> bool:
        return self.heldout_ok or (shape, color) not in HELDOUT_PAIRS

    def color_for(self, shape: str, exclude: Sequence[str] = ()) -> str:
        cands = [c for c in COLORS if c not in exclude and self.allowed(shape, c)]
        return self.choice(cands)

    def shape_for(self, color: str, exclude: Sequence[str] = ()) -> str:
        cands = [s for s in SHAPES if s not in exclude and self.allowed(s, color)]
        return self.choice(cands)

    def shapes(self, k: int) -> list[str]:
        idx = self.rng.permutation(len(SHAPES))[:k]
        return [SHAPES[i] for i in idx]

    def size(self, max_name: str = "large") -> float:
        names = list(SIZES)[: list(SIZES).index(max_name) + 1]
        return _r(SIZES[self.choice(names)] + self.rng.uniform(-0.015, 0.015))

    def background(self) -> tuple[str, str, int]:
        return self.choice(list(BACKGROUNDS)), self.choice(TEXTURES), int(self.rng.integers(2**31))

    def scene(self, objects: Sequence[ObjectSpec]) -> SceneSpec:
        bg, tex, ts = self.background()
        return SceneSpec(tuple(objects), bg, tex, ts)

    def place(self, pairs: Sequence[tuple[str, str]], sizes: Sequence[float] | None = None,
              fixed: Sequence[ObjectSpec] = (), tries: int = 400) -> list[ObjectSpec] | None:
        """Objects for `pairs` at random free positions (not overlapping each other nor `fixed`)."""
        if sizes is None:
            max_name = "large" if len(pairs) + len(fixed) <= 2 else "medium"
            sizes = [self.size(max_name) for _ in pairs]
        out: list[ObjectSpec] = []
        for (shape, color), s in zip(pairs, sizes):
            for _ in range(tries):
                lo, hi = MARGIN + s / 2, 1 - MARGIN - s / 2
                o = ObjectSpec(shape, color, s, _r(self.rng.uniform(lo, hi)), _r(self.rng.uniform(lo, hi)))
                if all(_free(o, p) for p in list(fixed) + out):
                    out.append(o)
                    break
            else:
                return None
        return out


def _free(a: ObjectSpec, b: ObjectSpec, gap: float = GAP) -> bool:
    """Bounding squares of a and b separated by at least `gap` along x or y."""
    d = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) >= d or abs(a.cy - b.cy) >= d


def _in_bounds(o: ObjectSpec) -> bool:
    h = o.size / 2 + MARGIN
    return h <= o.cx <= 1 - h and h <= o.cy <= 1 - h


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(*words: str) -> str:
    phrase = " ".join(w for w in words if w)
    return f"{_article(phrase)} {phrase}"


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def _count_phrase(n: int, color: str, shape: str) -> str:
    if n == 1:
        return _a(color, shape)
    return " ".join(w for w in (NUMBER_WORDS[n], color, PLURALS[shape]) if w)


def list_phrase(parts: Sequence[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_scene(spec: SceneSpec) -> str:
    """'a red circle, two blue squares and a yellow star': groups of equal (colour, shape), left to right."""
    groups: dict[tuple[str, str], list[ObjectSpec]] = {}
    for o in sorted(spec.objects, key=lambda o: (o.cx, o.cy)):
        groups.setdefault((o.color, o.shape), []).append(o)
    parts = [_count_phrase(len(v), c, s) for (c, s), v in groups.items()]
    if not parts:
        return "nothing"
    return list_phrase(parts)


def _unique_desc(spec: SceneSpec, i: int) -> str | None:
    """Shortest description ('the star' / 'the red star') that names only object i, or None."""
    o = spec.objects[i]
    if sum(p.shape == o.shape for p in spec.objects) == 1:
        return o.shape
    if sum((p.shape, p.color) == (o.shape, o.color) for p in spec.objects) == 1:
        return f"{o.color} {o.shape}"
    return None


# ---- generation samples (GenEval categories) ----------------------------------------------------------------------

GEN_TEMPLATES = {
    "single_object": ["a photo of {a}", "{a}", "an image of {a}", "a picture of {a}", "draw {a}"],
    "two_object": ["a photo of {a} and {b}", "{a} and {b}", "an image with {a} and {b}",
                   "a picture showing {a} and {b}", "{a} together with {b}"],
    "counting": ["a photo of {n}", "{n}", "an image of {n}", "a picture with exactly {n}"],
    "colors": ["a photo of {a}", "{a}", "an image of {a}", "a picture of {a}"],
    "color_attr": ["a photo of {a} and {b}", "{a} and {b}", "an image of {a} and {b}",
                   "a picture with {a} and {b}"],
}
POSITION_PHRASES = {
    "left of": ["left of", "to the left of", "on the left of"],
    "right of": ["right of", "to the right of", "on the right of"],
    "above": ["above", "over", "on top of"],
    "below": ["below", "under", "beneath"],
}
POSITION_TEMPLATES = ["a photo of {a} {rel} {b}", "{a} {rel} {b}", "an image of {a} {rel} {b}"]


def geneval_metadata(category: str, objects: Sequence[Mapping[str, Any]], prompt: str,
                     relation: str | None = None) -> dict[str, Any]:
    """GenEval's evaluation metadata for a prompt; `objects` = [{"shape", "color"?, "count"?}]."""
    inc: list[dict[str, Any]] = []
    exc: list[dict[str, Any]] = []
    if category == "counting":
        o = objects[0]
        inc.append({"class": o["shape"], "count": int(o["count"])})
        exc.append({"class": o["shape"], "count": int(o["count"]) + 1})
    elif category == "position":
        a, b = objects
        inc = [{"class": b["shape"], "count": 1}, {"class": a["shape"], "count": 1, "position": [relation, 0]}]
    else:
        for o in objects:
            d: dict[str, Any] = {"class": o["shape"], "count": 1}
            if category in ("colors", "color_attr"):
                d["color"] = o["color"]
            inc.append(d)
    meta: dict[str, Any] = {"tag": category, "include": inc, "prompt": prompt}
    if exc:
        meta["exclude"] = exc
    return meta


def _gen_sample(kind: str, sc: _Scenes, index: int, force_heldout: bool, balanced: bool) -> dict[str, Any]:
    rng = sc.rng
    for _ in range(100):
        heldout = False
        if kind == "single_object":
            shape = sc.choice(SHAPES)
            objs = sc.place([(shape, sc.color_for(shape))])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(shape))
            gmeta = [{"shape": shape}]
        elif kind == "two_object":
            s1, s2 = sc.shapes(2)
            objs = sc.place([(s1, sc.color_for(s1)), (s2, sc.color_for(s2))])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(s1), b=_a(s2))
            gmeta = [{"shape": s1}, {"shape": s2}]
        elif kind == "counting":
            shape = sc.choice(SHAPES)
            n = int(rng.integers(1, 5))
            same = rng.random() < 0.5
            c0 = sc.color_for(shape)
            objs = sc.place([(shape, c0 if same else sc.color_for(shape)) for _ in range(n)])
            text = sc.choice(GEN_TEMPLATES[kind]).format(n=_count_phrase(n, "", shape))
            gmeta = [{"shape": shape, "count": n}]
        elif kind == "colors":
            if force_heldout:
                shape, color = sorted(HELDOUT_PAIRS)[int(rng.integers(len(HELDOUT_PAIRS)))]
            else:
                shape = sc.choice(SHAPES)
                color = sc.color_for(shape)
            heldout = (shape, color) in HELDOUT_PAIRS
            objs = sc.place([(shape, color)])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(color, shape))
            gmeta = [{"shape": shape, "color": color}]
        elif kind == "color_attr":
            s1, s2 = sc.shapes(2)
            if force_heldout:
                s1 = sorted(HELDOUT_PAIRS)[int(rng.integers(len(HELDOUT_PAIRS)))][0]
                s2 = sc.choice([s for s in SHAPES if s != s1])
                c1 = dict(HELDOUT_PAIRS)[s1]
            else:
                c1 = sc.color_for(s1)
            c2 = sc.color_for(s2, exclude=[c1])
            if rng.random() < 0.5 and force_heldout:
                (s1, c1), (s2, c2) = (s2, c2), (s1, c1)
            heldout = (s1, c1) in HELDOUT_PAIRS or (s2, c2) in HELDOUT_PAIRS
            objs = sc.place([(s1, c1), (s2, c2)])
            text = sc.choice(GEN_TEMPLATES[kind]).format(a=_a(c1, s1), b=_a(c2, s2))
            gmeta = [{"shape": s1, "color": c1}, {"shape": s2, "color": c2}]
        elif kind == "position":
            s1, s2 = sc.shapes(2)
            rel = RELATIONS[index % 4] if balanced else RELATIONS[int(rng.integers(4))]
            objs = sc.place([(s1, sc.color_for(s1)), (s2, sc.color_for(s2))])
            if objs is None or not _clear_relation(objs[0], objs[1], rel):
                continue
            text = sc.choice(POSITION_TEMPLATES).format(a=_a(s1), b=_a(s2), rel=sc.choice(POSITION_PHRASES[rel]))
            gmeta = [{"shape": s1}, {"shape": s2}]
        else:
            raise ValueError(kind)
        if objs is None:
            continue
        prompt = _sentence(text)
        return {"category": kind, "prompt": prompt, "scene": sc.scene(objs), "heldout": heldout,
                "geneval": geneval_metadata(kind, gmeta, prompt, rel if kind == "position" else None)}
    raise RuntimeError(f"could not sample a {kind} scene")


def _clear_relation(a: ObjectSpec, b: ObjectSpec, rel: str) -> bool:
    """A `rel` B holds, and clearly: GenEval's test passes even with twice its threshold."""
    ba, bb = object_box(a), object_box(b)
    return relative_position(ba, bb, 0.2) == {rel} and relative_position(ba, bb) == {rel}


# ---- understanding samples ----------------------------------------------------------------------------------------

CAPTION_QUESTIONS = ["What is this?", "Describe the image.", "What is in the picture?",
                     "Describe this image briefly.", "What do you see?"]
CAPTION_TEMPLATES = ["{d}", "The image shows {d}", "There is {d} on a dark background", "In this picture: {d}"]
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
YESNO_TEMPLATES = ["Is there {a} in the image?", "Does the image contain {a}?", "Can you see {a} here?",
                   "Is there {a}?"]
COUNT_TEMPLATES = ["How many {p} are there?", "How many {p} are in the image?", "Count the {p}.",
                   "How many {p} can you see?"]
COLOR_TEMPLATES = ["What color is the {s}?", "What colour is the {s}?", "Which color does the {s} have?",
                   "What is the color of the {s}?"]
POSITION_LR = ["Is the {a} to the left or to the right of the {b}?", "Is the {a} left or right of the {b}?"]
POSITION_AB = ["Is the {a} above or below the {b}?", "Is the {a} over or under the {b}?"]


def _random_scene(sc: _Scenes, k: int, unique_shapes: bool = False) -> list[ObjectSpec] | None:
    shapes = sc.shapes(k) if unique_shapes else [sc.choice(SHAPES) for _ in range(k)]
    pairs: list[tuple[str, str]] = []
    for s in shapes:  # distinct (shape, colour) identities, so every object can be named
        used = [c for t, c in pairs if t == s]
        pairs.append((s, sc.color_for(s, exclude=used)))
    return sc.place(pairs)


def _options(sc: _Scenes, correct: str, pool: Sequence[str], index: int, balanced: bool) -> tuple[dict[str, str], str]:
    others = [p for p in pool if p != correct]
    picks = [others[i] for i in sc.rng.permutation(len(others))[:3]]
    pos = index % 4 if balanced else int(sc.rng.integers(4))
    picks.insert(pos, correct)
    return dict(zip("ABCD", picks)), "ABCD"[pos]


def _und_sample(kind: str, sc: _Scenes, index: int, balanced: bool) -> dict[str, Any]:
    rng = sc.rng
    for _ in range(200):
        if kind == "caption":
            objs = _random_scene(sc, int(rng.integers(1, 4)))
            if objs is None:
                continue
            spec = sc.scene(objs)
            return {"qtype": kind, "question": sc.choice(CAPTION_QUESTIONS), "answer_type": "caption",
                    "answer": _sentence(sc.choice(CAPTION_TEMPLATES).format(d=describe_scene(spec))), "scene": spec}
        if kind == "mcq":
            sub = ["shape", "color", "count", "position"][index % 4 if balanced else int(rng.integers(4))]
            if sub == "count":
                shape = sc.choice(SHAPES)
                n = int(rng.integers(1, 5))
                c = sc.color_for(shape)
                objs = sc.place([(shape, c)] * n, sizes=[sc.size("medium") for _ in range(n)])
                if objs is None:
                    continue
                q = f"How many {PLURALS[shape]} are in the image?"
                correct, pool = str(n), ["1", "2", "3", "4"]
            elif sub == "position":
                s1, s2 = sc.shapes(2)
                rel = RELATIONS[int(rng.integers(4))]
                objs = sc.place([(s1, sc.color_for(s1)), (s2, sc.color_for(s2))])
                if objs is None or not _clear_relation(objs[0], objs[1], rel):
                    continue
                q = f"Where is the {s1} relative to the {s2}?"
                word = {"left of": "left", "right of": "right", "above": "above", "below": "below"}[rel]
                correct, pool = word, ["left", "right", "above", "below"]
            else:
                objs = _random_scene(sc, int(rng.integers(1, 3)), unique_shapes=True)
                if objs is None or len({o.color for o in objs}) != len(objs):
                    continue
                o = objs[int(rng.integers(len(objs)))]
                if sub == "shape":
                    q = f"What shape is the {o.color} object?" if len(objs) > 1 else "What shape is shown?"
                    correct, pool = o.shape, list(SHAPES)
                else:
                    q = f"What color is the {o.shape}?"
                    correct, pool = o.color, list(COLORS)
            options, letter = _options(sc, correct, pool, index + index // 4, balanced)  # latin square
            text = q + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items()) + "\n" + MCQ_SUFFIX
            return {"qtype": kind, "subtype": sub, "question": text, "answer": letter, "answer_type": "letter",
                    "options": options, "scene": sc.scene(objs)}
        if kind == "yesno":
            objs = _random_scene(sc, int(rng.integers(1, 4)))
            if objs is None:
                continue
            yes = (index % 2 == 0) if balanced else bool(rng.random() < 0.5)
            present = {(o.shape, o.color) for o in objs}
            shape_only = rng.random() < 0.25
            if yes:
                o = objs[int(rng.integers(len(objs)))]
                a = _a(o.shape) if shape_only else _a(o.color, o.shape)
            elif shape_only:
                absent = [s for s in SHAPES if s not in {o.shape for o in objs}]
                a = _a(sc.choice(absent))
            else:
                if rng.random() < 0.5:  # adversarial: a present shape in another colour, or a present colour
                    o = objs[int(rng.integers(len(objs)))]
                    cands = [(o.shape, c) for c in COLORS] + [(s, o.color) for s in SHAPES]
                else:
                    cands = [(s, c) for s in SHAPES for c in COLORS]
                cands = [p for p in cands if p not in present and sc.allowed(*p)]
                s, c = cands[int(rng.integers(len(cands)))]
                a = _a(c, s)
            return {"qtype": kind, "question": sc.choice(YESNO_TEMPLATES).format(a=a),
                    "answer": "Yes" if yes else "No", "answer_type": "yesno", "scene": sc.scene(objs)}
        if kind == "count":
            shape = sc.choice(SHAPES)
            n = int(rng.integers(1, 5))
            pairs = [(shape, sc.color_for(shape)) for _ in range(n)]
            others = [s for s in SHAPES if s != shape]
            for _ in range(int(rng.integers(0, 3)) if n < 4 else 0):
                s = sc.choice(others)
                pairs.append((s, sc.color_for(s)))
            objs = sc.place(pairs, sizes=[sc.size("medium") for _ in pairs])
            if objs is None:
                continue
            return {"qtype": kind, "question": sc.choice(COUNT_TEMPLATES).format(p=PLURALS[shape]),
                    "answer": str(n), "answer_type": "number", "scene": sc.scene(objs)}
        if kind == "color":
            objs = _random_scene(sc, int(rng.integers(1, 4)), unique_shapes=True)
            if objs is None:
                continue
            o = objs[int(rng.integers(len(objs)))]
            return {"qtype": kind, "question": sc.choice(COLOR_TEMPLATES).format(s=o.shape), "answer": o.color,
                    "answer_type": "color", "scene": sc.scene(objs)}
        if kind == "relation":
            rel = RELATIONS[index % 4] if balanced else RELATIONS[int(rng.integers(4))]
            objs = _random_scene(sc, 2)
            if objs is None or not _clear_relation(objs[0], objs[1], rel):
                continue
            da, db = _unique_desc(SceneSpec(objs), 0), _unique_desc(SceneSpec(objs), 1)
            if da is None or db is None:
                continue
            tpl = POSITION_LR if rel in ("left of", "right of") else POSITION_AB
            word = {"left of": "left", "right of": "right", "above": "above", "below": "below"}[rel]
            return {"qtype": kind, "question": sc.choice(tpl).format(a=da, b=db), "answer": word,
                    "answer_type": "position", "scene": sc.scene(objs)}
        raise ValueError(kind)
    raise RuntimeError(f"could not sample a {kind} question")


# ---- editing samples ----------------------------------------------------------------------------------------------

RECOLOR_TEMPLATES = ["Change the color of the {d} to {c}.", "Make the {d} {c}.", "Paint the {d} {c}.",
                     "Turn the {d} {c}."]
MOVE_TEMPLATES = ["Move the {d} {dir}.", "Shift the {d} {dir}.", "Push the {d} {dir}."]
MOVE_WORDS = {"left": ["left", "to the left"], "right": ["right", "to the right"], "up": ["up", "upwards"],
              "down": ["down", "downwards"]}
ADD_TEMPLATES = ["Add {a}.", "Put {a} in the image.", "Insert {a}.", "Draw {a} as well."]
REMOVE_TEMPLATES = ["Remove the {d}.", "Delete the {d}.", "Take away the {d}.", "Erase the {d}."]


def _edit_sample(kind: str, sc: _Scenes) -> dict[str, Any]:
    rng = sc.rng
    for _ in range(200):
        k = int(rng.integers(2, 4)) if kind == "remove" else int(rng.integers(1, 4))
        objs = _random_scene(sc, k)
        if objs is None:
            continue
        src = sc.scene(objs)
        i = int(rng.integers(len(objs)))
        d = _unique_desc(src, i)
        if d is None:
            continue
        o = objs[i]
        new = list(objs)
        if kind == "recolor":
            used = [p.color for p in objs if p.shape == o.shape]
            c = sc.color_for(o.shape, exclude=used)
            new[i] = o.recolored(c)
            text = sc.choice(RECOLOR_TEMPLATES).format(d=d, c=c)
            edit = {"index": i, "from": o.color, "to": c}
        elif kind == "move":
            direction = sc.choice(list(DIRECTIONS))
            dist = _r(rng.uniform(0.22, 0.36))
            ux, uy = DIRECTIONS[direction]
            m = o.moved(_r(o.cx + ux * dist), _r(o.cy + uy * dist))
            if not _in_bounds(m) or not all(_free(m, p) for j, p in enumerate(objs) if j != i):
                continue
            new[i] = m
            text = sc.choice(MOVE_TEMPLATES).format(d=d, dir=sc.choice(MOVE_WORDS[direction]))
            edit = {"index": i, "direction": direction, "distance": dist}
        elif kind == "add":
            if len(objs) >= 3:
                continue
            s = sc.choice(SHAPES)
            used = [p.color for p in objs if p.shape == s]
            c = sc.color_for(s, exclude=used)
            extra = sc.place([(s, c)], fixed=objs)
            if extra is None:
                continue
            new.append(extra[0])
            i = len(new) - 1
            text = sc.choice(ADD_TEMPLATES).format(a=_a(c, s))
            edit = {"index": i, "shape": s, "color": c}
        elif kind == "remove":
            del new[i]
            text = sc.choice(REMOVE_TEMPLATES).format(d=d)
            edit = {"index": i, "shape": o.shape, "color": o.color}
        else:
            raise ValueError(kind)
        edit["kind"] = kind
        return {"kind": kind, "instruction": text, "source": src, "target": src.replace_objects(new), "edit": edit}
    raise RuntimeError(f"could not sample a {kind} edit")


# ---- text-only samples --------------------------------------------------------------------------------------------

MIXES = [(("red", "yellow"), "orange"), (("blue", "yellow"), "green"), (("red", "blue"), "purple"),
         (("red", "white"), "pink"), (("black", "white"), "gray")]
THINGS = {"a banana": "yellow", "grass": "green", "the sky": "blue", "snow": "white", "a strawberry": "red",
          "a tomato": "red", "a lemon": "yellow", "a leaf": "green", "a pumpkin": "orange", "an eggplant": "purple",
          "a fire truck": "red", "a cloud": "white", "milk": "white", "a carrot": "orange", "the sea": "blue"}
SHAPE_FACTS = [("Which shape has three sides?", "triangle"), ("Which shape has four equal sides?", "square"),
               ("Which shape is perfectly round?", "circle"), ("Which shape is a symbol of love?", "heart"),
               ("Which shape has five points?", "star"), ("Which shape looks like a plus sign?", "cross"),
               ("Which shape has no corners?", "circle")]
SIDE_FACTS = [("How many sides does a triangle have?", 3), ("How many sides does a square have?", 4),
              ("How many corners does a square have?", 4), ("How many corners does a triangle have?", 3),
              ("How many points does a star have?", 5), ("How many arms does a cross have?", 4),
              ("How many corners does a circle have?", 0)]


def _text_sample(sc: _Scenes) -> dict[str, Any]:
    rng = sc.rng
    sub = ["mix", "thing", "shape", "sides", "arith", "list"][int(rng.integers(6))]
    if sub == "mix":
        (a, b), ans = MIXES[int(rng.integers(len(MIXES)))]
        if rng.random() < 0.5:
            a, b = b, a
        q = sc.choice(["What color do you get when you mix {a} and {b}?",
                       "What colour do you get if you mix {a} paint with {b} paint?",
                       "If you mix {a} and {b}, which color do you get?"]).format(a=a, b=b)
        return {"question": q, "answer": ans, "answer_type": "color", "subtype": sub}
    if sub == "thing":
        thing = sc.choice(sorted(THINGS))
        q = sc.choice(["What color is {t}?", "What colour is {t} usually?", "Which color is {t}?"]).format(t=thing)
        return {"question": q, "answer": THINGS[thing], "answer_type": "color", "subtype": sub}
    if sub == "shape":
        q, ans = SHAPE_FACTS[int(rng.integers(len(SHAPE_FACTS)))]
        return {"question": q, "answer": ans, "answer_type": "shape", "subtype": sub}
    if sub == "sides":
        q, ans = SIDE_FACTS[int(rng.integers(len(SIDE_FACTS)))]
        return {"question": q, "answer": str(ans), "answer_type": "number", "subtype": sub}
    if sub == "arith":
        shape = sc.choice(SHAPES)
        a = int(rng.integers(1, 6))
        b = int(rng.integers(1, 5))
        if rng.random() < 0.5:
            q = f"I have {_count_phrase(a, '', shape)} and add {b} more. How many {PLURALS[shape]} do I have now?"
            ans = a + b
        else:
            a = a + b
            q = f"There are {a} {PLURALS[shape]}. If {b} are removed, how many are left?"
            ans = a - b
        return {"question": q, "answer": str(ans), "answer_type": "number", "subtype": sub}
    k = int(rng.integers(2, 6))
    items = [sc.choice(SHAPES) for _ in range(k)]
    q = f"How many shapes are in this list: {', '.join(items)}?"
    return {"question": q, "answer": str(k), "answer_type": "number", "subtype": sub}


# ---- samples, records, datasets -----------------------------------------------------------------------------------


def make_sample(kind: str, seed: int, split: str, index: int) -> dict[str, Any]:
    """Sample `index` of `kind` (a pure function of the arguments): a dict with the spec(s), text and answer."""
    rng = sample_rng(seed, split, kind, index)
    sc = _Scenes(rng, heldout_ok=(split == "eval"))
    evaluation = split == "eval"
    if kind in GENERATION_CATEGORIES:
        force = evaluation and kind in ("colors", "color_attr") and index % 2 == 0
        s = _gen_sample(kind, sc, index, force_heldout=force, balanced=evaluation)
        s["family"] = "generation"
    elif kind in UNDERSTANDING_TYPES:
        s = _und_sample(kind, sc, index, balanced=evaluation)
        s["family"] = "understanding"
    elif kind in EDIT_KINDS:
        s = _edit_sample(kind, sc)
        s["family"] = "editing"
    elif kind == TEXT_KIND:
        s = _text_sample(sc)
        s["qtype"] = TEXT_KIND
        s["family"] = "text"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    s["kind"] = kind
    return s


def _meta(s: Mapping[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {"family": s["family"], "kind": s["kind"]}
    for key in ("category", "prompt", "heldout", "geneval", "qtype", "subtype", "answer", "answer_type",
                "options", "instruction", "edit"):
        if key in s:
            m[key] = s[key]
    for key in ("scene", "source", "target"):
        if key in s:
            m[key] = s[key].to_dict()
    return m


def _record(s: Mapping[str, Any], rid: str, image_paths: Sequence[str]) -> dict[str, Any]:
    fam = s["family"]
    if fam == "generation":
        conv = [{"from": "human", "value": s["prompt"] + GEN_SUFFIX}, {"from": "gpt", "value": GEN_ANSWER}]
    elif fam == "understanding":
        conv = [{"from": "human", "value": IMAGE_PREFIX + s["question"]}, {"from": "gpt", "value": s["answer"]}]
    elif fam == "editing":
        conv = [{"from": "human", "value": IMAGE_PREFIX + s["instruction"]}, {"from": "gpt", "value": GEN_ANSWER}]
    else:
        conv = [{"from": "human", "value": s["question"]}, {"from": "gpt", "value": s["answer"]}]
    rec: dict[str, Any] = {"id": rid}
    if image_paths:
        rec["image"] = ", ".join(image_paths)
    rec["conversations"] = conv
    return rec


def _counts(n_per_kind: int | Mapping[str, int], kinds: Sequence[str] | None) -> dict[str, int]:
    kinds = list(ALL_KINDS if kinds is None else kinds)
    for k in kinds:
        if k not in ALL_KINDS:
            raise ValueError(f"unknown kind {k!r}; choose from {', '.join(ALL_KINDS)}")
    if isinstance(n_per_kind, Mapping):
        bad = set(n_per_kind) - set(ALL_KINDS)
        if bad:
            raise ValueError(f"unknown kind(s) {sorted(bad)}")
        return {k: int(n_per_kind.get(k, 0)) for k in kinds}
    return {k: int(n_per_kind) for k in kinds}


def write_record(out: Path, sample: Mapping[str, Any], rid: str, resolution: int = 64) -> dict[str, Any]:
    """Render a sample's picture(s) to `out/images/<rid>[_src|_tgt].png` and return its official-format record
    (image paths relative to `out`; `out/images` must exist)."""
    scenes = [("", sample["scene"])] if "scene" in sample else []
    if "source" in sample:
        scenes = [("_src", sample["source"]), ("_tgt", sample["target"])]
    images: list[str] = []
    for suffix, spec in scenes:
        rel = f"images/{rid}{suffix}.png"
        render_scene(spec, resolution).save(out / rel, format="PNG")
        images.append(rel)
    return _record(sample, rid, images)


def make_dataset(out_dir: str | os.PathLike, n_per_kind: int | Mapping[str, int] = 100, seed: int = 0,
                 split: str = "train", resolution: int = 64, kinds: Sequence[str] | None = None,
                 meta: str = "inline", name: str | None = None) -> Path:
    """Write `out_dir/<name or split>.jsonl` and its PNGs under `out_dir/images/` (paths relative to out_dir).

    `n_per_kind` is one count for every kind of `kinds` (default ALL_KINDS) or a {kind: count} mapping. `meta`:
    "inline" keeps each sample's structured spec under the record's "meta" key; "sidecar" writes the official
    keys only (what strict loaders such as `cheers.train.data` accept) and the metas, one per line in the same
    order with the record id, to `<name>.meta.jsonl`; "none" drops them. Returns the jsonl path.
    """
    if meta not in ("inline", "sidecar", "none"):
        raise ValueError(f"meta must be inline, sidecar or none, got {meta!r}")
    counts = _counts(n_per_kind, kinds)
    out = Path(out_dir)
    name = name or split
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    side = out / f"{name}.meta.jsonl"
    with open(path, "w", encoding="utf-8") as f, (open(side, "w", encoding="utf-8") if meta == "sidecar"
                                                  else open(os.devnull, "w")) as fm:
        for kind, n in counts.items():
            for i in range(n):
                s = make_sample(kind, seed, split, i)
                rid = f"{name}_{kind}_{i:06d}"
                rec = write_record(out, s, rid, resolution)
                m = _meta(s)
                m["resolution"] = resolution
                if meta == "inline":
                    rec["meta"] = m
                elif meta == "sidecar":
                    fm.write(json.dumps({"id": rid, "meta": m}, sort_keys=True) + "\n")
                f.write(json.dumps(rec) + "\n")
    return path


# ---- evaluation items ---------------------------------------------------------------------------------------------


def eval_prompts(seed: int = 0, n: int = 10, resolution: int = 64,
                 families: Sequence[str] = ("generation", "understanding", "editing", "text")) -> dict[str, list]:
    """Evaluation items of the eval split: `n` per generation category ("generation": list[GenItem]), per
    understanding type plus n text-only questions ("understanding": list[QAItem]) and per edit kind ("editing":
    list[EditItem]); images (questions, edit sources) rendered at `resolution`. Colors and color_attr items with
    an even index use a held-out (shape, colour) pair; yes/no answers alternate; mcq letters cycle A-D."""
    out: dict[str, list] = {"generation": [], "understanding": [], "editing": []}
    if "generation" in families:
        for kind in GENERATION_CATEGORIES:
            for i in range(n):
                s = make_sample(kind, seed, "eval", i)
                out["generation"].append(GenItem(f"{kind}_{i:04d}", kind, s["prompt"], s["prompt"] + GEN_SUFFIX,
                                                 s["scene"], s["geneval"], bool(s["heldout"])))
    und_kinds = (UNDERSTANDING_TYPES if "understanding" in families else ()) + \
        ((TEXT_KIND,) if "text" in families else ())
    for kind in und_kinds:
        for i in range(n):
            s = make_sample(kind, seed, "eval", i)
            spec = s.get("scene")
            out["understanding"].append(QAItem(
                f"{kind}_{i:04d}", s["qtype"], s["question"], s["answer"], s["answer_type"], spec,
                render_scene(spec, resolution) if spec is not None else None, s.get("options"), s.get("subtype", "")))
    if "editing" in families:
        for kind in EDIT_KINDS:
            for i in range(n):
                s = make_sample(kind, seed, "eval", i)
                out["editing"].append(EditItem(f"{kind}_{i:04d}", kind, s["instruction"], s["source"], s["target"],
                                               s["edit"], render_scene(s["source"], resolution)))
    return out
