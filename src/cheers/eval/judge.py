"""The automatic judge of ShapesWorld images and answers (deterministic, model-independent).

Objects are found by `cheers.eval.detector.detect`. `score_geneval(detections, metadata)` applies GenEval's rules
to GenEval-format metadata (tag, include, exclude); `partial_credit` gives softer views of the same image;
`score_edit` checks an edit was applied and the rest of the scene preserved. Answers are scored by
`cheers.eval.answers.score_answer`. This module is the judge's one entry point: it re-exports both.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from cheers.eval.answers import (
    normalize_color,
    normalize_letter,
    normalize_number,
    normalize_position,
    normalize_shape,
    normalize_yesno,
    parse_caption,
    score_answer,
)
from cheers.eval.detector import UNKNOWN, Detection, detect, estimate_background, perturb, shape_classifier
from cheers.shapes.world import DIRECTIONS, ObjectSpec, SceneSpec, relative_position

__all__ = [
    "Detection", "detect", "estimate_background", "shape_classifier", "score_geneval", "score_generation",
    "match_scene", "score_edit", "perturb", "partial_credit", "UNKNOWN", "MIN_CONFIDENCE",
    "normalize_letter", "normalize_yesno", "normalize_number", "normalize_color", "normalize_shape",
    "normalize_position", "parse_caption", "score_answer",
]

MIN_CONFIDENCE = 0.3  # GenEval's detector threshold


# ---- generation scoring (GenEval rules) ---------------------------------------------------------------------------


def score_geneval(detections: Sequence[Detection], metadata: Mapping[str, Any],
                  min_confidence: float = MIN_CONFIDENCE) -> tuple[bool, str]:
    """GenEval's decision for one image: every `include` requirement met (the `count` most confident objects of the
    class, with the colour / position asked), no `exclude` class reaching its count. Returns (correct, reason)."""
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.confidence):
        if d.confidence >= min_confidence:
            by_class.setdefault(d.shape, []).append(d)
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        found = by_class.get(cls, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    ok = False
                    reasons.append(f"expected {req['color']} {cls}, found {' '.join(colors)}")
            if "position" in req and ok:
                rel, gi = req["position"]
                target = groups[int(gi)] if int(gi) < len(groups) else None
                if target is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for d in found:
                        for t in target:
                            got = relative_position(d.box, t.box)
                            if rel not in got:
                                ok = False
                                found_rel = " and ".join(sorted(got)) or "overlap"
                                reasons.append(f"expected {cls} {rel} target, found {found_rel}")
                                break
                        if not ok:
                            break
        correct &= ok
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        if len(by_class.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(by_class[cls])}")
    return correct, "; ".join(reasons)


def partial_credit(detections: Sequence[Detection], metadata: Mapping[str, Any],
                   min_confidence: float = MIN_CONFIDENCE) -> dict[str, float | None]:
    """Softer views of one generated image than GenEval's all-or-nothing decision, for models whose strict score is
    still ~0: the share of the prompt's object classes recognised at least once (`shape`), the share of its
    requested colours present on any object, recognised or not (`colour`; None if no colour is asked), and whether
    the number of objects drawn equals the number asked (`count`)."""
    reqs = metadata.get("include", [])
    if not reqs:
        return {"shape": None, "colour": None, "count": None}
    known = {d.shape for d in detections if d.confidence >= min_confidence}
    colours = {d.color for d in detections}
    asked_colours = [r["color"] for r in reqs if "color" in r]
    return {
        "shape": sum(r["class"] in known for r in reqs) / len(reqs),
        "colour": sum(c in colours for c in asked_colours) / len(asked_colours) if asked_colours else None,
        "count": float(len(detections) == sum(int(r["count"]) for r in reqs)),
    }


def score_generation(image: Image.Image, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Detect the objects of a generated image and score it against GenEval-format metadata."""
    dets = detect(image)
    ok, reason = score_geneval(dets, metadata)
    return {"correct": ok, "reason": reason, "partial": partial_credit(dets, metadata),
            "detections": [d.to_dict() for d in dets]}


def _match(dets: Sequence[Detection], objs: Sequence[ObjectSpec],
           free: Sequence[int] = ()) -> tuple[dict[int, int], list[int], list[int]]:
    """Match detections to spec objects of the same (shape, colour), minimising centre distances.
    Objects in `free` match at a constant cost (their position is unconstrained).
    Returns ({object index: detection index}, unmatched objects, unmatched detections)."""
    pairs: dict[int, int] = {}
    keys = {(o.shape, o.color) for o in objs} | {(d.shape, d.color) for d in dets}
    for key in sorted(keys):
        oi = [i for i, o in enumerate(objs) if (o.shape, o.color) == key]
        di = [j for j, d in enumerate(dets) if (d.shape, d.color) == key]
        if not oi or not di:
            continue
        cost = np.zeros((len(oi), len(di)))
        for a, i in enumerate(oi):
            for b, j in enumerate(di):
                cx, cy = dets[j].center
                cost[a, b] = 0.5 if i in free else math.hypot(objs[i].cx - cx, objs[i].cy - cy)
        ra, rb = linear_sum_assignment(cost)
        for a, b in zip(ra, rb):
            pairs[oi[a]] = di[b]
    return (pairs, [i for i in range(len(objs)) if i not in pairs],
            [j for j in range(len(dets)) if j not in pairs.values()])


def match_scene(detections: Sequence[Detection], spec: SceneSpec, tol: float = 0.08) -> bool:
    """Every object of `spec` found with its shape and colour within `tol` of its centre, and nothing else."""
    pairs, missing, extra = _match(detections, spec.objects)
    if missing or extra:
        return False
    for i, j in pairs.items():
        o, (cx, cy) = spec.objects[i], detections[j].center
        if math.hypot(o.cx - cx, o.cy - cy) > tol:
            return False
    return True


def score_edit(image: Image.Image, item: Any, tol: float = 0.1) -> dict[str, Any]:
    """Score an edited image against an `EditItem` (or a mapping with kind, source, target, edit).

    applied: the edited object is as asked (recolor: new colour in place; move: displaced >= 0.1 of the side in
    the asked direction, <= tol across; add: present; remove: gone); preserved: every other object of the target
    is found (same shape and colour) within `tol` of its place, and there is nothing else (apart from leftovers
    within `tol` of the edited object's old/new place, which only fail "applied"). correct = both.
    """
    get = item.get if isinstance(item, Mapping) else (lambda k: getattr(item, k))
    kind, edit = get("kind"), dict(get("edit"))
    src, tgt = get("source"), get("target")
    if isinstance(src, Mapping):
        src, tgt = SceneSpec.from_dict(src), SceneSpec.from_dict(tgt)
    dets = detect(image)
    idx = int(edit["index"]) if kind != "remove" else -1
    pairs, missing, extra = _match(dets, tgt.objects, free=[idx] if kind == "add" else [])
    applied = True
    if kind == "remove":
        o = src.objects[int(edit["index"])]
        applied = not any((d.shape, d.color) == (o.shape, o.color)
                          and math.hypot(d.center[0] - o.cx, d.center[1] - o.cy) <= tol for d in dets)
    elif idx not in pairs:
        applied = False
    else:
        cx, cy = dets[pairs[idx]].center
        o = tgt.objects[idx]
        if kind == "recolor":
            applied = math.hypot(cx - o.cx, cy - o.cy) <= tol
        elif kind == "move":
            s = src.objects[idx]
            ux, uy = DIRECTIONS[edit["direction"]]
            along = (cx - s.cx) * ux + (cy - s.cy) * uy
            across = abs((cx - s.cx) * uy - (cy - s.cy) * ux)
            applied = along >= 0.1 and across <= tol
    others_ok = all(i in pairs and math.hypot(tgt.objects[i].cx - dets[pairs[i]].center[0],
                                                tgt.objects[i].cy - dets[pairs[i]].center[1]) <= tol
                    for i in range(len(tgt.objects)) if i != idx)
    # leftovers where the edited object was or should be belong to "applied", anything else breaks "preserved"
    zone = []
    if kind in ("recolor", "move", "remove"):
        o = src.objects[int(edit["index"])]
        zone.append((o.cx, o.cy))
    if kind in ("recolor", "move"):
        zone.append((tgt.objects[idx].cx, tgt.objects[idx].cy))
    stray = [j for j in extra if not any(math.hypot(dets[j].center[0] - x, dets[j].center[1] - y) <= tol
                                         for x, y in zone)]
    preserved = others_ok and not stray
    return {"correct": bool(applied and preserved), "applied": bool(applied), "preserved": bool(preserved),
            "detections": [d.to_dict() for d in dets]}
