"""The object detector of the ShapesWorld judge (deterministic, model-independent).

`detect(image)` recovers the objects of an image (any resolution; above 160 px it is analysed at 128 px):

1. background = per-channel median of the image border; the image is lightly smoothed (DENOISE);
2. every pixel is explained as a mix `bg + a (C - bg)` of the background and one palette colour C (the colour whose
   segment from the background passes closest to the pixel); pixels with a >= 0.5 are foreground, so blurred
   edges and noise barely move the mask, and colour shifts move pixels along/near the segments only;
3. 4-connected components of the foreground (tiny ones dropped); a component holding two large differently
   coloured parts (touching objects) is split by colour;
4. colour = majority of the component's core pixels; shape = a multinomial logistic regression over a 16x16
   scale-normalised template of the component plus fill ratio, aspect, solidity, compactness and quadrant masses.
   It is trained once (a few seconds, then cached in memory and on disk under $CHEERS_CACHE or ~/.cache/cheers) on
   renders of the ShapesWorld renderer with blur/noise/colour-shift augmentation, from a fixed seed: deterministic;
5. plausibility: a component that does not look like a drawn shape (touching the border, not isolated on the
   background, mixed colours, or a template far from every training render of its predicted shape) is reported
   as shape "unknown" - so noise and smeared colour fields do not pass for objects (GenEval scoring ignores
   unknowns; scene/edit matching counts them as extra objects).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from cheers.shapes import world as W

__all__ = ["Detection", "detect", "estimate_background", "shape_classifier", "perturb", "UNKNOWN"]

PALETTE_NAMES = tuple(W.COLORS)
PALETTE = np.array([W.COLORS[c] for c in PALETTE_NAMES], np.float32) / 255.0
MAX_SIDE = 160  # larger images are analysed at 128 px
TEMPLATE = 16
MIN_AREA_FRAC = 0.0025  # components smaller than this fraction of the image are noise
# a component whose 16x16 template (in [0, 1], blurred by TEMPLATE_BLUR cells) is farther (L2) than
# TEMPLATE_DISTANCE from every training template of its predicted shape is "unknown". Calibration: renders at the
# stated perturbation levels stay below 1.32; 1.5 still accepts ~93% of objects under blur 1.5 + noise 0.08 +
# shift 0.08 and rejects ~96% of the isolated blobs of smeared noise that pass the other checks.
TEMPLATE_BLUR = 1.2
TEMPLATE_DISTANCE = 1.5
UNKNOWN = "unknown"
DENOISE = 0.6  # sigma (px at 64 px) of the Gaussian applied before segmentation, against pixel noise


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    confidence: float  # probability of `shape`
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image side
    area: float  # fraction of the image

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "confidence": round(self.confidence, 4),
                "box": [round(v, 4) for v in self.box], "area": round(self.area, 5)}


# ---- segmentation -------------------------------------------------------------------------------------------------


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        if arr.max() > 1.5:
            arr = arr / 255.0
        image = Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8))
    im = image.convert("RGB")
    if max(im.size) > MAX_SIDE:
        scale = 128 / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX)
    return np.asarray(im, np.float32) / 255.0


def estimate_background(arr: np.ndarray) -> np.ndarray:
    """Per-channel median of the border ring (width ~3% of the side)."""
    h, w, _ = arr.shape
    k = max(1, min(h, w) // 32)
    ring = np.concatenate([arr[:k].reshape(-1, 3), arr[-k:].reshape(-1, 3), arr[:, :k].reshape(-1, 3),
                           arr[:, -k:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def _explain(arr: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index of the palette colour whose bg->colour segment is nearest, and the mixing weight a."""
    d = PALETTE - bg  # K, 3
    v = (arr - bg).reshape(-1, 3)  # P, 3
    dd = np.maximum((d * d).sum(1), 1e-6)  # K
    p = v @ d.T  # P, K
    a = np.clip(p / dd, 0.0, 1.25)
    res2 = (v * v).sum(1, keepdims=True) - 2 * a * p + a * a * dd  # squared distance to each segment
    best = res2.argmin(1)
    alpha = a[np.arange(len(best)), best]
    return best.reshape(arr.shape[:2]), alpha.reshape(arr.shape[:2])


def _split_by_color(comp: np.ndarray, label: np.ndarray, alpha: np.ndarray,
                    min_area: int) -> list[tuple[np.ndarray, int]]:
    """[(mask, colour index)] of one component: one part per large colour region (usually a single part)."""
    core = comp & (alpha >= 0.7)
    if core.sum() < max(3, min_area // 4):
        core = comp
    votes = np.bincount(label[core], minlength=len(PALETTE))
    order = np.argsort(-votes, kind="stable")
    total = votes.sum()
    major = [int(k) for k in order if votes[k] >= max(min_area, 0.2 * total)]
    if len(major) <= 1:
        return [(comp, int(order[0]))]
    # assign every pixel of the component to the nearest major colour (on its label), then split into regions
    parts: list[tuple[np.ndarray, int]] = []
    lab_major = np.where(np.isin(label, major), label, -1)
    if (comp & (lab_major < 0)).any():  # pixels labelled with a minor colour join the nearest major region
        idx = ndimage.distance_transform_edt(lab_major < 0, return_distances=False, return_indices=True)
        lab_major = lab_major[idx[0], idx[1]]
    for k in major:
        sub, n = ndimage.label(comp & (lab_major == k))
        for j in range(1, n + 1):
            m = sub == j
            if m.sum() >= min_area:
                parts.append((m, k))
    return parts or [(comp, int(order[0]))]


def _segments(arr: np.ndarray) -> list[tuple[np.ndarray, int, np.ndarray, bool]]:
    """[(component mask, colour index, soft alpha, plausible)] of the image's foreground components.
    plausible = the component lies on background (not touching the image border, >= 60% of a ring 1-3 px around
    it is background) and >= 75% of its core pixels have its colour: what a drawn object looks like, unlike
    texture, noise or smeared colour fields."""
    bg = estimate_background(arr)
    if DENOISE > 0:
        arr = ndimage.gaussian_filter(arr, (DENOISE * arr.shape[0] / 64, DENOISE * arr.shape[1] / 64, 0))
    label, alpha = _explain(arr, bg)
    fg = alpha >= 0.5
    h, w = fg.shape
    min_area = max(4, int(round(MIN_AREA_FRAC * h * w)))
    comps, n = ndimage.label(fg)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(fg, comps, index=np.arange(1, n + 1))
    out = []
    for j in np.flatnonzero(sizes >= min_area) + 1:
        comp = comps == j
        for part, k in _split_by_color(comp, label, alpha, min_area):
            out.append((part, k, alpha, _plausible(part, k, label, fg)))
    return out


def _plausible(mask: np.ndarray, k: int, label: np.ndarray, fg: np.ndarray) -> bool:
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        return False
    ys, xs = np.nonzero(mask)
    y0, y1 = max(ys.min() - 4, 0), min(ys.max() + 5, mask.shape[0])
    x0, x1 = max(xs.min() - 4, 0), min(xs.max() + 5, mask.shape[1])
    m = mask[y0:y1, x0:x1]
    ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m, iterations=1)
    if ring.any() and (~fg[y0:y1, x0:x1][ring]).mean() < 0.6:
        return False
    return bool((label[y0:y1, x0:x1][m] == k).mean() >= 0.75)


# ---- shape features -----------------------------------------------------------------------------------------------


def _features(mask: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Shape features of one component and its box (x0, y0, x1, y1) in pixels."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = y1 - y0, x1 - x0
    side = max(h, w)
    # a square window centred on the box, 2 px larger, zero outside the image
    cy2, cx2 = y0 + y1, x0 + x1  # twice the centre
    top, left = (cy2 - side) // 2 - 2, (cx2 - side) // 2 - 2
    n = side + 4
    win_m = np.zeros((n, n), bool)
    win_a = np.zeros((n, n), np.float32)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + n, mask.shape[0]), min(left + n, mask.shape[1])
    win_m[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = mask[sy0:sy1, sx0:sx1]
    win_a[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = alpha[sy0:sy1, sx0:sx1]
    # soft edges (sub-pixel information), solid interior (immune to noise)
    soft = np.where(ndimage.binary_erosion(win_m), 1.0, np.clip(win_a, 0, 1) * ndimage.binary_dilation(win_m))
    soft = soft.astype(np.float32)
    crop = np.ascontiguousarray(soft[2:2 + side, 2:2 + side])
    tpl = np.asarray(Image.fromarray(crop, "F").resize((TEMPLATE, TEMPLATE), Image.Resampling.BILINEAR), np.float32)
    area = float(soft.sum())
    fill = area / float(h * w)
    aspect = w / h
    count = float(win_m.sum())
    pts = np.stack(np.nonzero(win_m)[::-1], 1).astype(np.float64)
    corners = np.concatenate([pts + off for off in ((0, 0), (1, 0), (0, 1), (1, 1))])
    try:
        hull_area = ConvexHull(corners).volume
    except (QhullError, ValueError):
        hull_area = float(h * w)
    solidity = count / max(hull_area, 1.0)
    perim = float((win_m & ~ndimage.binary_erosion(win_m)).sum())
    compact = perim / math.sqrt(max(count, 1.0))
    # where the ink lies: mass of the four quadrants of the template
    q = tpl / max(float(tpl.sum()), 1e-6)
    hh = TEMPLATE // 2
    quads = [q[:hh, :hh].sum(), q[:hh, hh:].sum(), q[hh:, :hh].sum(), q[hh:, hh:].sum()]
    geo = np.array([fill, aspect, solidity, compact / 4.0, *quads], np.float32)
    return np.concatenate([tpl.ravel(), geo]), (x0, y0, x1, y1)


@dataclass
class _Linear:
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # K, F
    bias: np.ndarray  # K
    templates: np.ndarray  # N, TEMPLATE**2: the training components' templates, blurred (`_blur_template`)
    labels: np.ndarray  # N

    def template_distance(self, x: np.ndarray, k: int) -> float:
        """Distance from the (blurred) template part of features `x` to the nearest training template of shape k."""
        ref = self.templates[self.labels == k]
        return float(np.sqrt(((ref - _blur_template(x)) ** 2).sum(1)).min())


    def proba(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.scale) @ self.weight.T + self.bias
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)


def _blur_template(x: np.ndarray) -> np.ndarray:
    t = np.asarray(x[: TEMPLATE * TEMPLATE], np.float32).reshape(TEMPLATE, TEMPLATE)
    return ndimage.gaussian_filter(t, TEMPLATE_BLUR).ravel()


def perturb(image: Image.Image, rng: np.random.Generator, blur: float = 0.0, noise: float = 0.0,
            shift: float = 0.0) -> Image.Image:
    """Degrade an image like a small generator would: Gaussian blur (radius in px), additive Gaussian noise
    (sigma, in [0, 1] units) and a colour shift (per-channel gain 1 +- shift and offset +- shift/2)."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image.convert("RGB"), np.float32) / 255.0
    if shift > 0:
        gain = 1 + rng.uniform(-shift, shift, 3)
        offset = rng.uniform(-shift / 2, shift / 2, 3)
        arr = arr * gain + offset
    if noise > 0:
        arr = arr + rng.normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def _training_set(n_scenes: int = 400, seed: int = 0x5A9E) -> tuple[np.ndarray, np.ndarray]:
    """Features and shape labels of the components of `n_scenes` augmented renders (all shapes, colours, sizes,
    resolutions 48-128, clean or blurred/noisy/shifted)."""
    xs, ys = [], []
    n_obj = 0
    for k in range(n_scenes):
        rng = np.random.default_rng([seed, k])
        sc = W.SceneSampler(rng, heldout_ok=True)
        count = int(rng.integers(1, 4))
        sizes = [float(rng.uniform(0.13, 0.42 if count == 1 else 0.3)) for _ in range(count)]
        pairs = []
        for _ in range(count):
            shape = W.SHAPES[n_obj % len(W.SHAPES)]
            n_obj += 1
            pairs.append((shape, PALETTE_NAMES[int(rng.integers(len(PALETTE_NAMES)))]))
        objs = sc.place(pairs, sizes=sizes)
        if objs is None:
            continue
        res = int((48, 64, 64, 96, 128)[int(rng.integers(5))])
        spec = sc.scene(objs)
        im = W.render_scene(spec, res)
        mode = k % 4
        if mode:
            im = perturb(im, rng, blur=float(rng.uniform(0.3, 1.6)) * res / 64 if mode in (1, 3) else 0.0,
                         noise=float(rng.uniform(0.01, 0.07)) if mode in (2, 3) else 0.0,
                         shift=float(rng.uniform(0.0, 0.06)))
        arr = _as_array(im)
        hw = arr.shape[0]
        for mask, _, alpha, _ in _segments(arr):
            f, (x0, y0, x1, y1) = _features(mask, alpha)
            c = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) / hw
            dist = [math.hypot(o.cx - c[0], o.cy - c[1]) for o in objs]
            j = int(np.argmin(dist))
            if dist[j] < 0.06:
                xs.append(f)
                ys.append(W.SHAPES.index(objs[j].shape))
    return np.stack(xs), np.array(ys)


def _cache_path() -> Path | None:
    root = os.environ.get("CHEERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cheers")
    h = hashlib.sha256()
    for src in (Path(W.__file__), Path(__file__)):  # the renders it trains on, and this code
        h.update(src.read_bytes())
    h.update(np.__version__.encode())
    return Path(root) / f"shape_judge_{h.hexdigest()[:16]}.npz"


@lru_cache(maxsize=2)
def shape_classifier(use_disk_cache: bool = True) -> _Linear:
    """The shape classifier (trained on first use from a fixed seed; cached in memory and on disk)."""
    path = _cache_path() if use_disk_cache else None
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                return _Linear(z["mean"], z["scale"], z["weight"], z["bias"], z["templates"], z["labels"])
        except Exception:  # a broken cache file is rebuilt
            pass
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x, y = _training_set()
    mean = x.mean(0)
    scale = x.std(0) + 1e-3
    clf = LogisticRegression(C=0.5, max_iter=3000)
    with threadpool_limits(1):  # multi-threaded BLAS is slower than one thread for this tiny problem
        clf.fit((x - mean) / scale, y)
    model = _Linear(mean.astype(np.float32), scale.astype(np.float32), clf.coef_.astype(np.float32),
                    clf.intercept_.astype(np.float32), np.stack([_blur_template(r) for r in x]),
                    y.astype(np.int64))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, mean=model.mean, scale=model.scale, weight=model.weight, bias=model.bias,
                     templates=model.templates, labels=model.labels)
            os.replace(tmp, path)
        except OSError:
            pass
    return model


def detect(image: Image.Image | np.ndarray, include_unknown: bool = True) -> list[Detection]:
    """Objects of an image, most confident first. Components that do not look like a drawn shape (not isolated
    on the background, mixed colours, touching the border, or a template farther than TEMPLATE_DISTANCE from
    every training render of the predicted shape) are returned as shape "unknown" with confidence 0 (GenEval
    scoring ignores them; scene and edit matching count them as extra objects), or dropped."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    segs = _segments(arr)
    if not segs:
        return []
    clf = shape_classifier()
    feats, boxes = zip(*(_features(m, a) for m, _, a, _ in segs))
    probs = clf.proba(np.stack(feats))
    out = []
    for (mask, k, _, plausible), f, (x0, y0, x1, y1), p in zip(segs, feats, boxes, probs):
        j = int(np.argmax(p))
        shape, conf = W.SHAPES[j], float(p[j])
        if not plausible or clf.template_distance(f, j) > TEMPLATE_DISTANCE:
            if not include_unknown:
                continue
            shape, conf = UNKNOWN, 0.0
        out.append(Detection(shape, PALETTE_NAMES[k], conf, (x0 / w, y0 / h, x1 / w, y1 / h),
                             float(mask.sum()) / (h * w)))
    out.sort(key=lambda d: (-d.confidence, -d.area, d.box))
    return out
