"""Training data of the embedded model: ShapesWorld (train split, seed 0) + real Digits (train split), written in the
official jsonl format by source family, plus the small tokenizer trained on all of their text."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cheers.eval.digits import make_digits_dataset
from cheers.shapes.datasets import make_dataset
from cheers.shapes.samples import EDIT_KINDS, GENERATION_CATEGORIES, TEXT_KIND, UNDERSTANDING_TYPES
from cheers.tokenizer import train_small_tokenizer


def texts_of(jsonl: Path):
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            for turn in json.loads(line)["conversations"]:
                yield turn["value"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/embedded/data")
    ap.add_argument("--n-gen", type=int, default=1500, help="samples per generation category")
    ap.add_argument("--n-und", type=int, default=1500, help="samples per understanding question type")
    ap.add_argument("--n-edit", type=int, default=600, help="samples per edit kind")
    ap.add_argument("--n-text", type=int, default=1500, help="text-only samples")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    t0 = time.time()
    files = {
        "generation": make_dataset(out, {k: a.n_gen for k in GENERATION_CATEGORIES}, a.seed, "train", a.resolution,
                                   meta="none", name="shapes_generation"),
        "understanding": make_dataset(out, {k: a.n_und for k in UNDERSTANDING_TYPES}, a.seed, "train", a.resolution,
                                      meta="none", name="shapes_understanding"),
        "edit": make_dataset(out, {k: a.n_edit for k in EDIT_KINDS}, a.seed, "train", a.resolution, meta="none",
                             name="shapes_edit"),
        "text": make_dataset(out, {TEXT_KIND: a.n_text}, a.seed, "train", a.resolution, meta="none",
                             name="shapes_text"),
    }
    digits = make_digits_dataset(out, a.seed, "train", a.resolution, meta="none")
    # split the digits file into its generation and understanding halves
    gen, und = out / "digits_generation.jsonl", out / "digits_understanding.jsonl"
    with open(digits, encoding="utf-8") as f, open(gen, "w") as fg, open(und, "w") as fu:
        for line in f:
            (fg if "_generation_" in json.loads(line)["id"] else fu).write(line)
    files["digits_generation"], files["digits_understanding"] = gen, und
    texts = [t for p in files.values() for t in texts_of(p)]
    tok = train_small_tokenizer(texts, vocab_size=a.vocab, out_dir=out / "tokenizer")
    counts = {k: sum(1 for _ in open(p)) for k, p in files.items()}
    print(json.dumps({"files": {k: str(p) for k, p in files.items()}, "samples": counts,
                      "vocab": tok.vocab_size, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
