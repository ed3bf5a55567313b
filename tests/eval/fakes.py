"""Fake models with the `cheers.pipeline.Cheers` API for the harness and adapter tests."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from cheers.eval import digits as D
from cheers.eval import shapes as S
from cheers.shapes import world as W


def image_key(im: Image.Image | list | None) -> str:
    if im is None or isinstance(im, list):  # text-only questions come with an empty image list
        assert not im
        return "-"
    return hashlib.sha1(np.asarray(im.convert("RGB")).tobytes()).hexdigest()


def verbose_answer(answer: str, answer_type: str) -> str:
    """A chatty rendering of the right answer, to exercise the answer normalisers."""
    return {
        "letter": f"The answer is {answer}.",
        "yesno": "Yes, there is." if answer == "Yes" else "No, there is not.",
        "number": f"There are {answer}." if answer not in ("0",) else "None.",
        "color": f"It is {answer}.",
        "shape": f"A {answer}.",
        "position": f"It is {'to the ' + answer if answer in ('left', 'right') else answer}.",
    }.get(answer_type, answer)


class OracleShapes:
    """Knows the evaluation items of (seed, n, resolution): draws each prompt's spec with the real renderer,
    answers right (verbosely) and returns the expected edit."""

    def __init__(self, seed: int, n: int, resolution: int = 64, verbose: bool = True):
        items = S.eval_prompts(seed, n, resolution)
        self.resolution = resolution
        self.gen = {g.text: g.spec for g in items["generation"]}
        self.qa = {(image_key(q.image), q.question): (verbose_answer(q.answer, q.answer_type) if verbose else q.answer)
                   for q in items["understanding"]}
        self.edits = {(image_key(e.source_image), e.instruction): e.target for e in items["editing"]}
        self.calls: list[tuple[str, int, int | None]] = []

    def generate_image(self, prompts, seed=0, **kw):
        self.calls.append(("generate_image", len(prompts), seed))
        return [W.render_scene(self.gen[p], self.resolution) for p in prompts]

    def answer(self, images, questions, **kw):
        self.calls.append(("answer", len(questions), None))
        return [self.qa[(image_key(im), q)] for im, q in zip(images, questions)]

    def edit(self, images, instructions, seed=0, **kw):
        self.calls.append(("edit", len(instructions), seed))
        return [W.render_scene(self.edits[(image_key(im), t)], self.resolution) for im, t in zip(images, instructions)]


class WrongShapes(OracleShapes):
    """Draws every object with the next shape and the next colour, answers "Yes" / "A" / "I don't know", and returns
    edit sources unchanged."""

    def generate_image(self, prompts, seed=0, **kw):
        out = []
        for p in prompts:
            spec = self.gen[p]
            objs = [W.ObjectSpec(W.SHAPES[(W.SHAPES.index(o.shape) + 1) % 6],
                                 list(W.COLORS)[(list(W.COLORS).index(o.color) + 1) % 8], o.size, o.cx, o.cy)
                    for o in spec.objects]
            out.append(W.render_scene(spec.replace_objects(objs), self.resolution))
        return out

    def answer(self, images, questions, **kw):
        return ["Yes" if q.startswith(("Is there", "Does", "Can you")) else "A" if "\nA. " in q else "I don't know"
                for q in questions]

    def edit(self, images, instructions, seed=0, **kw):
        return [im.copy() for im in images]


class DigitOracle:
    """Draws a real (train split) digit of the asked label; reads held-out digits by their index."""

    def __init__(self, seed: int, n: int, resolution: int = 64, offset: int = 0):
        items = D.digit_eval_items(seed, n, resolution)
        x8, y = D.load_real_digits()
        tr, _ = D.digit_split()
        self.resolution, self.offset = resolution, offset
        self.labels = {g.text: g.label for g in items["generation"]}
        self.by_label = {c: [int(i) for i in tr if y[i] == c] for c in range(10)}
        self.x8 = x8
        self.reads = {image_key(q.image): q.label for q in items["understanding"]}

    def generate_image(self, prompts, seed=0, **kw):
        out = []
        for k, p in enumerate(prompts):
            c = (self.labels[p] + self.offset) % 10
            pool = self.by_label[c]
            out.append(D.render_digit(self.x8[pool[(seed + k) % len(pool)]], self.resolution))
        return out

    def answer(self, images, questions, **kw):
        return [f"It is {(self.reads[image_key(im)] + self.offset) % 10}." for im in images]

    def edit(self, images, instructions, seed=0, **kw):
        return list(images)


class SolidColors:
    """Generates solid images whose colour encodes the seed (to check seeds and layouts of the writers)."""

    def __init__(self, size: int = 32):
        self.size = size
        self.prompts: list[str] = []

    def color(self, seed: int) -> tuple[int, int, int]:
        return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)

    def generate_image(self, prompts, seed=0, **kw):
        self.prompts += list(prompts)
        return [Image.new("RGB", (self.size, self.size), self.color(seed + i)) for i in range(len(prompts))]


class FixedAnswers:
    """Answers from a {question: answer} table (text-only or image questions); records the images it saw."""

    def __init__(self, table: dict[str, str]):
        self.table = table
        self.seen: list[tuple[str, tuple | None]] = []

    def answer(self, images, questions, **kw):
        for im, q in zip(images, questions):
            self.seen.append((q, None if isinstance(im, list) else im.size))
        return [self.table[q] for q in questions]
