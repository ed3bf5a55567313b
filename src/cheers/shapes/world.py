"""ShapesWorld: scenes of simple coloured shapes, their geometry, their rendering and their random sampling.

A scene is a `SceneSpec`: a background (a dark colour, plain or lightly textured) and up to four objects, each a
shape (circle, square, triangle, star, cross, heart) in one of eight named colours far apart in RGB, with a size
(side of its bounding square, as a fraction of the image side) and a centre (fractions, x right, y down).
`render_scene(spec, resolution)` draws it at 4x and downsamples with LANCZOS, so any resolution works (64, 128...);
a `Look` changes how names become pixels (the smoke corpus, `cheers.shapes.smoke`, is drawn in a look of its own).
`SceneSampler` draws random scene parts (shapes, colours, sizes, free positions) from a numpy generator.

The seeded samples of every task family are built on it in `cheers.shapes.samples`, written as datasets by
`cheers.shapes.datasets`, and scored by the judge (`cheers.eval.judge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES", "PLURALS", "COLORS", "BACKGROUNDS", "TEXTURES", "SIZES", "NUMBER_WORDS", "RELATIONS", "DIRECTIONS",
    "HELDOUT_PAIRS", "ObjectSpec", "SceneSpec", "Look", "SHAPESWORLD_LOOK", "object_box", "relative_position",
    "render_scene", "SceneSampler", "separated", "in_bounds",
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


@dataclass(frozen=True)
class Look:
    """How names become pixels: the RGB of each colour and background name, and each shape's outline (a polygon
    whose bounding box is centred at 0, drawn scaled by the object's size; circles are drawn as ellipses)."""

    colors: Mapping[str, tuple[int, int, int]]
    backgrounds: Mapping[str, tuple[int, int, int]]
    outlines: Mapping[str, np.ndarray]


SHAPESWORLD_LOOK = Look(COLORS, BACKGROUNDS, UNIT_POLYGONS)


def _canvas(resolution: int | tuple[int, int]) -> tuple[int, int]:
    w, h = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    if min(w, h) < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    return w, h


def _background(spec: SceneSpec, w: int, h: int, look: Look) -> np.ndarray:
    base = np.array(look.backgrounds[spec.background], float)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    rng = np.random.default_rng([0xB6, spec.texture_seed])
    if spec.texture == "noise":
        img += rng.normal(0, 4.0, (h, w, 1))
    elif spec.texture == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None] - 0.5
        img += (8.0 * (xx * math.cos(ang) + yy * math.sin(ang)))[..., None] * rng.uniform(0.5, 1.0)
    elif spec.texture == "checker":
        cell = max(2, min(w, h) // 8)
        yy, xx = np.mgrid[0:h, 0:w] // cell
        img += np.where((yy + xx) % 2 == 0, 3.0, -3.0)[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(spec: SceneSpec, resolution: int | tuple[int, int] = 64, supersample: int = SUPERSAMPLE,
                 look: Look = SHAPESWORLD_LOOK) -> Image.Image:
    """RGB image of `spec`, drawn at `supersample` x `resolution` and downsampled with LANCZOS. `resolution` is the
    side of a square image or (width, height); object fractions then apply to each axis."""
    w, h = _canvas(resolution)
    unknown = sorted({o.color for o in spec.objects} - set(look.colors)
                     | {o.shape for o in spec.objects if o.shape != "circle"} - set(look.outlines)
                     | {spec.background} - set(look.backgrounds))
    if unknown:
        raise ValueError(f"the look draws no {', '.join(unknown)}")
    bw, bh = w * supersample, h * supersample
    im = Image.fromarray(_background(spec, w, h, look), "RGB").resize((bw, bh), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    for o in spec.objects:
        color = look.colors[o.color]
        if o.shape == "circle":
            rx, ry = o.size * bw / 2, o.size * bh / 2
            draw.ellipse([o.cx * bw - rx, o.cy * bh - ry, o.cx * bw + rx, o.cy * bh + ry], fill=color)
        else:
            pts = look.outlines[o.shape] * np.array([o.size * bw, o.size * bh]) + np.array([o.cx * bw, o.cy * bh])
            draw.polygon([(float(x), float(y)) for x, y in pts], fill=color)
    return im.resize((w, h), Image.Resampling.LANCZOS)


# ---- random scenes ------------------------------------------------------------------------------------------------


def round4(x: float) -> float:
    return round(float(x), 4)


class SceneSampler:
    """Random scene parts drawn from `rng`; `heldout_ok=False` (train) never yields a HELDOUT_PAIRS pair."""

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

    def shapes(self, k: int) -> list[str]:
        idx = self.rng.permutation(len(SHAPES))[:k]
        return [SHAPES[i] for i in idx]

    def size(self, max_name: str = "large") -> float:
        names = list(SIZES)[: list(SIZES).index(max_name) + 1]
        return round4(SIZES[self.choice(names)] + self.rng.uniform(-0.015, 0.015))

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
                o = ObjectSpec(shape, color, s, round4(self.rng.uniform(lo, hi)), round4(self.rng.uniform(lo, hi)))
                if all(separated(o, p) for p in list(fixed) + out):
                    out.append(o)
                    break
            else:
                return None
        return out


def separated(a: ObjectSpec, b: ObjectSpec, gap: float = GAP) -> bool:
    """Bounding squares of a and b separated by at least `gap` along x or y."""
    d = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) >= d or abs(a.cy - b.cy) >= d


def in_bounds(o: ObjectSpec) -> bool:
    """The object's bounding square keeps the MARGIN from every edge."""
    h = o.size / 2 + MARGIN
    return h <= o.cx <= 1 - h and h <= o.cy <= 1 - h
