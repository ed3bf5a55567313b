"""The smoke corpus: a few ShapesWorld records in the official jsonl format, for the trainer's tests, smoke runs
and benchmarks.

Every picture is one shape (captioned "disk", "box" or "triangle": a ShapesWorld circle, square or triangle)
filling the middle 60 % of a canvas of one of several aspect ratios, so the data pipeline's resizing and cropping
are exercised. It is drawn flat (no supersampling) in the corpus's own `LOOK`, which fixes its pixels. Captions
describe the pictures, so understanding, generation, editing and text-only records are consistent with their
images. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from cheers.shapes.world import Look, ObjectSpec, SceneSpec, render_scene
from cheers.tokenizer import CheersTokenizer, train_small_tokenizer

WORDS = {"disk": "circle", "box": "square", "triangle": "triangle"}  # caption word -> ShapesWorld shape
SHAPES = tuple(WORDS)
COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
_APEX = 0.35 / 0.6  # the triangle's corners sit at 15 % and 85 % of the canvas
LOOK = Look(
    colors={"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
            "white": (240, 240, 240), "purple": (150, 60, 170)},
    backgrounds={"black": (20, 20, 20)},
    outlines={"square": np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]),
              "triangle": np.array([[0.0, -_APEX], [_APEX, _APEX], [-_APEX, _APEX]])},
)
TEXT_QA = [
    ("What is two plus two?", "Two plus two is four."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("Say hello.", "Hello! How can I help you today?"),
    ("What shape has three sides?", "A triangle has three sides."),
    ("Is the sky blue?", "On a clear day the sky looks blue."),
]


def draw(shape: str, colour: str, size: tuple[int, int]) -> Image.Image:
    """A `shape` (a caption word of SHAPES) of `colour` on black, on a canvas of `size` = (width, height)."""
    if shape not in WORDS:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    spec = SceneSpec((ObjectSpec(WORDS[shape], colour, 0.6, 0.5, 0.5),), "black")
    return render_scene(spec, size, supersample=1, look=LOOK)


def make_dataset(directory: str | os.PathLike, n_understanding: int = 6, n_generation: int = 6, n_edit: int = 2,
                 n_text: int = 3, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((48, 40), (64, 64), (80, 56)),
                 split: bool = True) -> dict[str, Path]:
    """Write images and jsonl files under `directory`. `split=True`: one file per task (understanding.jsonl,
    generation.jsonl, edit.jsonl, text.jsonl); otherwise one mixed `all.jsonl`. Returns name -> path."""
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: dict[str, list[dict]] = {"understanding": [], "generation": [], "edit": [], "text": []}
    colours = [c for c in COLOURS if c != "white"]

    def picture(name: str, shape: str, colour: str) -> str:
        size = sizes[rng.randrange(len(sizes))]
        draw(shape, colour, size).save(root / "images" / name)
        return f"images/{name}"

    for i in range(n_understanding):
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        path = picture(f"und_{i}.png", shape, colour)
        records["understanding"].append({
            "id": f"und_{i}", "image": path,
            "conversations": [{"from": "human", "value": "<im_start><image><im_end>\nWhat is this?"},
                              {"from": "gpt", "value": f"A {colour} {shape}."}],
        })
    for i in range(n_generation):
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        path = picture(f"gen_{i}.png", shape, colour)
        records["generation"].append({
            "id": f"gen_{i}", "image": path,
            "conversations": [{"from": "human",
                               "value": f"A {colour} {shape}.\nBased on the above description, generate an image."},
                              {"from": "gpt", "value": "<im_start><image_gen><im_end>"}],
        })
    for i in range(n_edit):
        shape, c1 = rng.choice(SHAPES), rng.choice(colours)
        c2 = rng.choice([c for c in colours if c != c1])
        src = picture(f"edit_src_{i}.png", shape, c1)
        tgt = picture(f"edit_tgt_{i}.png", shape, c2)
        records["edit"].append({
            "id": f"edit_{i}", "image": f"{src}, {tgt}",
            "conversations": [{"from": "human", "value": f"<im_start><image><im_end>\nMake the {shape} {c2}."},
                              {"from": "gpt", "value": "<im_start><image_gen><im_end>"}],
        })
    for i in range(n_text):
        q, a = TEXT_QA[i % len(TEXT_QA)]
        records["text"].append({"id": f"text_{i}", "image": None,
                                "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    out: dict[str, Path] = {}
    if split:
        for name, recs in records.items():
            if recs:
                p = root / f"{name}.jsonl"
                p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
                out[name] = p
    else:
        p = root / "all.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for recs in records.values() for r in recs), encoding="utf-8")
        out["all"] = p
    return out


def corpus() -> list[str]:
    """Texts to train a small tokenizer that covers the corpus's records and the chat template."""
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
             "<|im_end|>\n<|im_start|>assistant\n", "Based on the above description, generate an image.",
             "What is this?"]
    for c in COLOURS:
        for s in SHAPES:
            texts += [f"A {c} {s}.", f"Make the {s} {c}."]
    for q, a in TEXT_QA:
        texts += [q, a]
    return texts * 4


def make_tokenizer(directory: str | os.PathLike, vocab_size: int = 400) -> CheersTokenizer:
    """A small BPE tokenizer trained on `corpus()`, saved under `directory`."""
    return train_small_tokenizer(corpus(), vocab_size=vocab_size, out_dir=directory)
