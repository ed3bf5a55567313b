"""The smoke corpus: pinned pixels and records, captions that match their pictures, its tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cheers.shapes import smoke

BACKGROUND = (20, 20, 20)


def _digest(root: Path) -> str:
    """sha256 of the jsonl bytes and the decoded pixels of every picture (not of the PNG encoding)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        h.update(str(p.relative_to(root)).encode())
        if p.suffix == ".png":
            with Image.open(p) as im:
                h.update(repr(im.size).encode() + im.mode.encode() + im.tobytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


def test_the_corpus_is_pinned(tmp_path):
    """The trainer's tests and benchmarks measure on these exact pictures and records (digests of the corpus as
    first written, before it was drawn through the ShapesWorld renderer)."""
    smoke.make_dataset(tmp_path / "a", n_understanding=8, n_generation=8, n_edit=4, n_text=4)
    assert _digest(tmp_path / "a") == "d7114cb84d2c484e2d0463fb82dbe61ee6628c6e615f7e5fc10f4bc0797d4dc3"
    files = smoke.make_dataset(tmp_path / "b", seed=3, split=False)
    assert list(files) == ["all"] and len(files["all"].read_text().splitlines()) == 6 + 6 + 2 + 3
    assert _digest(tmp_path / "b") == "821a69389c275f30f320dc01f520c27d93847c3c276d7035499f30c6c028e144"


def _colour_at(path: Path, fx: float, fy: float) -> tuple[int, ...]:
    with Image.open(path) as im:
        return im.getpixel((int(fx * im.width), int(fy * im.height)))


def test_captions_describe_their_pictures(tmp_path):
    files = smoke.make_dataset(tmp_path, n_understanding=10, n_generation=10, n_edit=4, n_text=7, seed=5)
    assert {k: len(p.read_text().splitlines()) for k, p in files.items()} == \
        {"understanding": 10, "generation": 10, "edit": 4, "text": 7}
    sizes = set()
    for name in ("understanding", "generation"):
        for line in files[name].read_text().splitlines():
            rec = json.loads(line)
            text = rec["conversations"][1 if name == "understanding" else 0]["value"]
            colour, shape = text.split(".")[0].split()[1:3]
            img = tmp_path / rec["image"]
            with Image.open(img) as im:
                sizes.add(im.size)
            assert _colour_at(img, 0.5, 0.6) == smoke.LOOK.colors[colour]  # every shape covers this point
            assert _colour_at(img, 0.02, 0.02) == BACKGROUND
            # the shapes differ where a box has a corner and a disk or a triangle has none
            assert (_colour_at(img, 0.22, 0.22) == smoke.LOOK.colors[colour]) == (shape == "box")
    assert sizes == {(48, 40), (64, 64), (80, 56)}
    for line in files["edit"].read_text().splitlines():
        rec = json.loads(line)
        src, tgt = (tmp_path / p.strip() for p in rec["image"].split(","))
        colour = rec["conversations"][0]["value"].rstrip(".").split()[-1]
        assert _colour_at(tgt, 0.5, 0.6) == smoke.LOOK.colors[colour] != _colour_at(src, 0.5, 0.6)
    texts = [json.loads(x)["conversations"][0]["value"] for x in files["text"].read_text().splitlines()]
    assert texts == [q for q, _ in smoke.TEXT_QA] + [q for q, _ in smoke.TEXT_QA[:2]]


def test_draw_names_the_shapes_it_knows():
    im = smoke.draw("triangle", "green", (60, 30))
    assert im.size == (60, 30) and im.getpixel((30, 2)) == BACKGROUND and im.getpixel((30, 20)) == (40, 180, 60)
    with pytest.raises(ValueError, match="unknown shape 'star'; choose one of disk, box, triangle"):
        smoke.draw("star", "red", (64, 64))


def test_the_tokenizer_covers_the_corpus(tmp_path):
    tok = smoke.make_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and tok.vocab_size <= 400
    for text in smoke.corpus()[:40]:
        assert tok.decode(tok.encode(text)) == text
    assert np.mean([len(tok.encode(t)) for t in smoke.corpus()]) < 12  # trained on these texts: few tokens each
