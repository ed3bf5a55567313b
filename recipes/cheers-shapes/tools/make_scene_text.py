"""Text twins of the ShapesWorld understanding questions: the picture replaced by a description of the scene.

Why: the embedded model answers yes/no and multiple-choice questions from their priors even on its training
pictures, and the same comparison over plain text is not learnt either (a from-scratch 6 x 256 LLM sits on a long
ln 2 plateau). Mixing in retrieval questions over scene descriptions
("Scene: ... What color is the star?", the answer is a word of the context) broke that plateau: held-out text
yes/no 0.48 -> 0.91 in 1,000 steps, against 0.47-0.53 without them. This writes that mixture as an ordinary text
source of the official jsonl format, so any stage of `cheers train` can weight it in (`task: text`).

Each record is one understanding question of the train split (`make_sample`, the same generators and held-out
pairs as the picture data, another seed) asked about its scene's description instead of its picture:

    Scene: from left to right, a red star and two blue circles; from top to bottom, a blue circle, the red star
    and a blue circle.
    Is there a green star in the scene?                                   -> No

The description names every object (colour + shape) in both orders, so every question type is answerable from
it: colours, counts, presence, shape, left/right and above/below of objects whose relation is clear.

`--pictures yesno,mcq` also writes the same questions about the same scenes over their pictures
(`scene_pictures.jsonl`, an ordinary understanding source): more picture questions of the kinds the model answers
from its priors, each with a text twin in the same mixture."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

from cheers.shapes.datasets import write_record
from cheers.shapes.samples import _a, list_phrase, make_sample
from cheers.shapes.world import ObjectSpec, SceneSpec

# Question types answerable from the description (captions are left out: the answer would be the description).
KINDS = ("yesno", "mcq", "color", "count", "relation")


def _names(objects: Sequence[ObjectSpec], first: bool) -> list[str]:
    """'a red star' the first time an object is listed, 'the red star' or 'a red star' (when another object of the
    same colour and shape exists) the second time."""
    def twin(o: ObjectSpec) -> bool:
        return sum((p.shape, p.color) == (o.shape, o.color) for p in objects) > 1

    return [_a(o.color, o.shape) if first or twin(o) else f"the {o.color} {o.shape}" for o in objects]


def describe(spec: SceneSpec) -> str:
    """Every object of the scene, left to right and top to bottom (image y grows downwards)."""
    if not spec.objects:
        return "Scene: nothing."
    by_x = sorted(spec.objects, key=lambda o: (o.cx, o.cy))
    by_y = sorted(spec.objects, key=lambda o: (o.cy, o.cx))
    if len(spec.objects) == 1:
        return f"Scene: {_names(by_x, True)[0]}."
    return (f"Scene: from left to right, {list_phrase(_names(by_x, True))}; "
            f"from top to bottom, {list_phrase(_names(by_y, False))}.")


def twin_question(sample: dict) -> str:
    """An understanding sample's question asked about its scene's description instead of its picture."""
    question = re.sub(r"\bimage\b", "scene", sample["question"])  # "Is there a red star in the scene?"
    return describe(sample["scene"]) + "\n" + question


def text_twin(kind: str, index: int, sample: dict) -> dict:
    """The official-format record of understanding sample `index` of `kind` (train split), asked over text."""
    return {"id": f"scene_text_{kind}_{index:06d}",
            "conversations": [{"from": "human", "value": twin_question(sample)},
                              {"from": "gpt", "value": sample["answer"]}]}


def twin_samples(kind: str, seed: int, n: int) -> list[tuple[int, dict]]:
    """n (train-split index, sample) pairs of `kind`; yes/no ones exactly balanced and alternating (the train split
    draws each answer with probability 1/2, and a model stuck on a prior should not find one answer paying off more
    often)."""
    if kind != "yesno":
        return [(i, make_sample(kind, seed, "train", i)) for i in range(n)]
    by_answer: dict[str, list[tuple[int, dict]]] = {"Yes": [], "No": []}
    i = 0
    while len(by_answer["Yes"]) < (n + 1) // 2 or len(by_answer["No"]) < n // 2:
        s = make_sample(kind, seed, "train", i)
        by_answer[s["answer"]].append((i, s))
        i += 1
    return [by_answer["Yes" if k % 2 == 0 else "No"][k // 2] for k in range(n)]


def write_picture_twins(out: Path, samples: dict[str, list[tuple[int, dict]]], resolution: int = 64) -> Path:
    """The same questions about the same scenes, asked over their pictures (an ordinary understanding source,
    `scene_pictures.jsonl` + PNGs under images/): `samples` are `twin_samples` lists by kind, so with the text
    twins' lists (or their prefixes) record k of a kind here is record k of that kind in scene_text.jsonl, and
    the text and picture forms of one question can be weighted in side by side."""
    path = out / "scene_pictures.jsonl"
    tmp = path.with_suffix(".tmp")
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for kind, pairs in samples.items():
            for i, s in pairs:
                f.write(json.dumps(write_record(out, s, f"scene_pictures_{kind}_{i:06d}", resolution)) + "\n")
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/embedded/data")
    ap.add_argument("--n", type=int, default=2000, help="questions per type")
    ap.add_argument("--seed", type=int, default=13, help="train-split seed (the picture data uses 0)")
    ap.add_argument("--pictures", default="", metavar="KINDS",
                    help="comma-separated question kinds (of " + ", ".join(KINDS) + ") to write also as picture "
                         "questions about the same scenes, to scene_pictures.jsonl (default: none)")
    ap.add_argument("--n-pictures", type=int, default=None, help="picture questions per kind (default: --n)")
    a = ap.parse_args()
    picture_kinds = [k for k in a.pictures.split(",") if k]
    bad = [k for k in picture_kinds if k not in KINDS]
    if bad:
        ap.error(f"--pictures: unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scene_text.jsonl"
    tmp = path.with_suffix(".tmp")
    n_pic = a.n if a.n_pictures is None else a.n_pictures
    samples = {kind: twin_samples(kind, a.seed, max(a.n, n_pic) if kind in picture_kinds else a.n) for kind in KINDS}
    with open(tmp, "w", encoding="utf-8") as f:
        for kind in KINDS:
            for i, s in samples[kind][:a.n]:
                f.write(json.dumps(text_twin(kind, i, s)) + "\n")
    tmp.replace(path)
    report = {"file": str(path), "samples": a.n * len(KINDS)}
    if picture_kinds:
        picked = {kind: samples[kind][:n_pic] for kind in picture_kinds}
        report["pictures"] = str(write_picture_twins(out, picked))
        report["picture_samples"] = n_pic * len(picture_kinds)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
