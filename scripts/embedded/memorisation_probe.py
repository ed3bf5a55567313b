"""Does the model memorise its generation images? Velocity MSE on training images vs held-out renders.

The same t grid as `flow_loss.py` and the same noise for both sides; n images per ShapesBench category from the
training jsonl (the first n of each category) and n eval-split prompts rendered by the oracle. Equal errors mean the
velocity field is under-fit rather than over-fit, so new data of the same kind would not help (session 27)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from cheers.checkpoint import load_model
from cheers.eval.shapes import eval_prompts
from cheers.processor import preprocess_generation
from cheers.sampling import left_pad
from cheers.shapes.world import render_scene
from cheers.tokenizer import CheersTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts are not a package
from flow_loss import T_GRID, training_rows  # noqa: E402


def training_items(jsonl: Path, n: int) -> tuple[list[str], list[Image.Image], list[str]]:
    """First n records of each category of a `make_data.py` generation file (ids `<name>_<category>_<index>`)."""
    per: dict[str, list[dict]] = defaultdict(list)
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            category = rec["id"].rsplit("_", 1)[0].removeprefix(jsonl.stem + "_")
            if len(per[category]) < n:
                per[category].append(rec)
    texts, images, cats = [], [], []
    for category, recs in per.items():
        for rec in recs:
            texts.append(rec["conversations"][0]["value"])
            images.append(Image.open(jsonl.parent / rec["image"]).convert("RGB"))
            cats.append(category)
    return texts, images, cats


@torch.no_grad()
def errors(model, tok, texts: list[str], images: list[Image.Image], cats: list[str], batch: int = 50) -> dict:
    """Mean velocity MSE per (category, t) over the given prompt/image pairs."""
    ids_of = model.config.tokens
    res = model.config.resolution
    out: dict[tuple[str, float], list[float]] = defaultdict(list)
    for s in range(0, len(texts), batch):
        rows = training_rows(tok, texts[s:s + batch], ids_of)
        lat = model.encode_images(torch.stack([preprocess_generation(im, res) for im in images[s:s + batch]]))
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(s))
        ids, mask = left_pad(rows, ids_of.pad)
        for t in T_GRID:
            o = model(ids, t=torch.full((len(rows),), t), attention_mask=mask, latents=lat, x0=noise)
            per_image = ((o.velocity - o.flow_target) ** 2).flatten(1).mean(1)
            for c, v in zip(cats[s:s + batch], per_image.tolist()):
                out[(c, t)].append(v)
    return out


def summary(err: dict) -> dict:
    cats = sorted({c for c, _ in err})
    by_cat = {c: {str(t): round(sum(err[(c, t)]) / len(err[(c, t)]), 4) for t in T_GRID} for c in cats}
    values = [v for vs in err.values() for v in vs]
    return {"overall": round(sum(values) / len(values), 4), "by_category": by_cat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train-jsonl", default="runs/embedded/data/shapes_generation.jsonl")
    ap.add_argument("--n", type=int, default=25, help="images per category on each side")
    ap.add_argument("--seed", type=int, default=1, help="eval-split seed of the held-out prompts")
    a = ap.parse_args()
    model = load_model(a.model).eval()
    tok = CheersTokenizer.from_dir(a.model)
    train = errors(model, tok, *training_items(Path(a.train_jsonl), a.n))
    items = eval_prompts(seed=a.seed, n=a.n, resolution=model.config.resolution, families=("generation",))["generation"]
    held = errors(model, tok, [it.text for it in items],
                  [render_scene(it.spec, model.config.resolution) for it in items], [it.category for it in items])
    print(json.dumps({"model": a.model, "train": summary(train), "held_out": summary(held)}))


if __name__ == "__main__":
    main()
