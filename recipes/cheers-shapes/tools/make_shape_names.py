"""Shape-naming questions over pictures: "What shape is the red object?" -> "star", at three object sizes.

Why: picture yes/no and multiple choice stay at chance because the vision path hardly knows which shape it sees
(6-way linear probe of the ViT features 0.43 after stage 08 of the recipe, chance 0.17), while the comparison
itself is learnt over scene descriptions (yes/no AUC 0.82). No understanding type of the mixture asks for a shape by
name: the shape reaches an answer only through a letter (MCQ), a comparison (yes/no) or a whole-scene caption.
Naming the shape of a single object is learnt at once by the LLM when the ViT features carry it (held-out
0.17 -> 0.63 in 100 probe steps), so a direct picture -> shape-word question gives the ViT a plain shape gradient.
Three rungs, like the generation size ladder (`make_big_objects.py`):

- `shapes`: ShapesWorld scenes of 1-3 objects with distinct shapes (the understanding split's own sizes, 13-22 px);
  one object whose colour is unique in the scene is asked for by colour ("What shape is shown?" when alone);
- `mid`: one object at 0.34-0.55 of the side anywhere on the scene's background;
- `big`: one object at 0.55-0.8 of the side near the centre on a plain background.

Held-out (shape, colour) pairs never appear (the scenes are train-split samples). Writes `shape_names.jsonl`, an
ordinary understanding source of the official format (PNGs under images/); `--start N --file F` writes more questions
past index N into F (stage 10's extra ShapesWorld-size names). `--split eval --seed 1` writes the held-out set that
`--evaluate MODEL` scores (exact match of the shape word, per rung).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cheers.shapes.datasets import IMAGE_PREFIX, write_record
from cheers.shapes.samples import make_sample
from cheers.shapes.world import SHAPES, SceneSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the size-ladder rungs come from a sibling script
from make_big_objects import big_scene  # noqa: E402

RUNGS = {"shapes": None, "mid": ((0.34, 0.55), 0.2, True), "big": ((0.55, 0.8), 0.08, False)}
ONE = ["What shape is shown?", "What shape is in the image?", "Name the shape in the image."]
BY_COLOR = ["What shape is the {c} object?", "What is the shape of the {c} object?", "Which shape is {c}?"]


def name_question(rung: str, index: int, seed: int, split: str, rng: np.random.Generator) -> tuple[SceneSpec, str, str]:
    """(scene, question, shape) of question `index` of a rung. ShapesWorld rung: the scene of a colour question
    (1-3 objects, distinct shapes); the asked object is one whose colour no other object has."""
    if rung == "shapes":
        spec = make_sample("color", seed, split, index)["scene"]
        colors = [o.color for o in spec.objects]
        unique = [o for o in spec.objects if colors.count(o.color) == 1]
        if not unique:  # every colour shared: keep the first object alone
            spec, unique = spec.replace_objects(spec.objects[:1]), spec.objects[:1]
        o = unique[int(rng.integers(len(unique)))]
        if len(spec.objects) == 1:
            return spec, ONE[int(rng.integers(len(ONE)))], o.shape
        return spec, BY_COLOR[int(rng.integers(len(BY_COLOR)))].format(c=o.color), o.shape
    sizes, jitter, texture = RUNGS[rung]
    spec = big_scene(make_sample("single_object", seed, split, index)["scene"], rng, sizes, jitter, texture)
    return spec, ONE[int(rng.integers(len(ONE)))], spec.objects[0].shape


def write(out: Path, counts: dict[str, int], seed: int, split: str, resolution: int,
          name: str = "shape_names.jsonl", start: int = 0) -> Path:
    """Questions `start .. start + n - 1` of each rung into out/name (images named by rung and index, so sets written
    with different starts never share a picture)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rung, n in counts.items():
            rng = np.random.default_rng([seed, list(RUNGS).index(rung)])
            for i in range(start, start + n):
                spec, question, shape = name_question(rung, i, seed, split, rng)
                sample = {"family": "understanding", "scene": spec, "question": question, "answer": shape}
                rec = write_record(out, sample, f"shape_names_{split}_{rung}_{i:06d}", resolution)
                f.write(json.dumps(rec) + "\n")
    tmp.replace(path)
    return path


def evaluate(model_dir: str, data: Path, batch: int = 25) -> dict[str, Any]:
    """Exact-match accuracy of the shape word per rung (greedy answers), and how often each shape is said."""
    from PIL import Image

    from cheers.pipeline import Cheers

    model = Cheers.from_pretrained(model_dir)
    with open(data / "shape_names.jsonl", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    right: dict[str, list[bool]] = {}
    said = {s: 0 for s in SHAPES + ("other",)}
    for k in range(0, len(recs), batch):
        chunk = recs[k:k + batch]
        images = [Image.open(data / r["image"]).convert("RGB") for r in chunk]
        questions = [r["conversations"][0]["value"].removeprefix(IMAGE_PREFIX) for r in chunk]
        for r, reply in zip(chunk, model.answer(images, questions, max_new_tokens=4)):
            word = re.sub(r"[^a-z]", "", reply.lower())
            said[word if word in said else "other"] += 1
            right.setdefault(r["id"].split("_")[3], []).append(word == r["conversations"][1]["value"])
    scores = {rung: round(float(np.mean(v)), 3) for rung, v in right.items()}
    return {"model": model_dir, "n": {rung: len(v) for rung, v in right.items()}, "accuracy": scores, "said": said}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/embedded/data")
    ap.add_argument("--n", default="3000,1500,1000", help="questions per rung: shapes,mid,big")
    ap.add_argument("--seed", type=int, default=17, help="data seed (the picture data uses 0)")
    ap.add_argument("--split", default="train", choices=("train", "eval"))
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--file", default="shape_names.jsonl", help="jsonl name inside --out")
    ap.add_argument("--start", type=int, default=0, help="first question index of each rung (more data: past the "
                    "indices already written)")
    ap.add_argument("--evaluate", metavar="MODEL", help="score MODEL on the set already written in --out")
    a = ap.parse_args()
    out = Path(a.out)
    if a.evaluate:
        print(json.dumps(evaluate(a.evaluate, out)))
        return
    try:
        counts = dict(zip(RUNGS, (int(v) for v in a.n.split(",")), strict=True))
    except ValueError:
        ap.error(f"--n {a.n!r}: expected three integers, shapes,mid,big")
    print(json.dumps({"file": str(write(out, counts, a.seed, a.split, a.resolution, a.file, a.start)), "samples": counts}))


if __name__ == "__main__":
    main()
