"""Curriculum data for the embedded model's generation: one ShapesWorld object drawn large (55-80 % of the image
side, near the centre) on a plain background, with the single_object and colors prompts of the train split.

Why: trained on ShapesWorld alone, the model ignores shape and colour words when it draws (the LLM's image states
barely change between "A red star." and "A green star.", relative spread 0.010 at t = 0.5) while digit words, whose
picture fills the frame, steer it strongly (0.144). A 13-22 px object lives in one or two of the 16 head positions,
so the prompt only pays off once the head can already locate the object in x_t; a frame-filling object pays off at
every position.
The same prompts with large objects give the prompt -> picture path a gradient from the first step.
Held-out (shape, colour) pairs stay out: the scenes come from the train split's own samples.

`--name mid --min-size 0.34 --max-size 0.55 --jitter 0.2 --keep-texture` writes the middle rung of a size ladder:
objects between ShapesWorld's largest (0.34) and the frame-filling ones, anywhere in the frame, on the scene's own
background, so the word sensitivity learnt on big objects carries down to ShapesWorld sizes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from cheers.shapes.datasets import write_record
from cheers.shapes.samples import make_sample
from cheers.shapes.world import HELDOUT_PAIRS, SceneSpec


def big_scene(scene: SceneSpec, rng: np.random.Generator, sizes: tuple[float, float] = (0.55, 0.8),
              jitter: float = 0.08, keep_texture: bool = False) -> SceneSpec:
    """The scene's only object, scaled to `sizes` of the side, centred within +-`jitter`, on a plain background
    (or the scene's own, textured one)."""
    (obj,) = scene.objects
    size = float(rng.uniform(*sizes))
    cx, cy = (float(v) for v in 0.5 + rng.uniform(-jitter, jitter, size=2))
    big = dataclasses.replace(obj, size=size, cx=cx, cy=cy)
    if keep_texture:
        return scene.replace_objects((big,))
    return SceneSpec((big,), scene.background, "plain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/embedded/data")
    ap.add_argument("--n", type=int, default=1500, help="samples per prompt family (single_object, colors)")
    ap.add_argument("--seed", type=int, default=11, help="train-split seed (the main data uses 0)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--name", default="big", help="family name: writes shapes_<name>_generation.jsonl")
    ap.add_argument("--min-size", type=float, default=0.55, help="object side, fraction of the image side")
    ap.add_argument("--max-size", type=float, default=0.8)
    ap.add_argument("--jitter", type=float, default=0.08, help="centre offset from the middle, at most")
    ap.add_argument("--keep-texture", action="store_true", help="the scene's own background instead of a plain one")
    a = ap.parse_args()
    if not 0 < a.min_size <= a.max_size or a.max_size / 2 + a.jitter > 0.5:
        ap.error(f"--min-size {a.min_size} / --max-size {a.max_size} / --jitter {a.jitter}: "
                 "need 0 < min <= max and max/2 + jitter <= 0.5 (the object must stay inside the frame)")
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    path = out / f"shapes_{a.name}_generation.jsonl"
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        for kind in ("single_object", "colors"):
            for i in range(a.n):
                s = make_sample(kind, a.seed, "train", i)
                (obj,) = s["scene"].objects
                assert (obj.shape, obj.color) not in HELDOUT_PAIRS
                big = big_scene(s["scene"], rng, (a.min_size, a.max_size), a.jitter, a.keep_texture)
                rec = write_record(out, {**s, "scene": big}, f"shapes_{a.name}_{kind}_{i:06d}", a.resolution)
                f.write(json.dumps(rec) + "\n")
    path.with_suffix(".tmp").replace(path)
    print(json.dumps({"file": str(path), "samples": 2 * a.n}))


if __name__ == "__main__":
    main()
