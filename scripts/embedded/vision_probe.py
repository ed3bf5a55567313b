"""Does a model's vision path know which shape it sees? Linear probes of shape identity on frozen features.

Pictures: the single-object ShapesWorld generation records of two data directories made by `make_data.py` with
different `--seed`s (probe trained on the first, scored on the second; labels from the prompt's shape word).
Features of the understanding path (pixels -> VAE -> latent-to-pixel decoder -> ViT): the mean ViT feature, the
SigLIP attention-pooling head (what `kind: vision` trains) and the LLM's final states over the image tokens.
Chance is 1/6. Prints one JSON line.

    python scripts/embedded/vision_probe.py --model DIR --train-data runs/embedded_p8/data --test-data DIR2
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cheers.checkpoint import load_model
from cheers.processor import preprocess_understanding
from cheers.shapes.world import SHAPES


def single_objects(data: Path, limit: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    pictures, labels = [], []
    with open(data / "shapes_generation.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "single_object" not in rec["id"]:
                continue
            prompt = rec["conversations"][0]["value"].split("\n")[0].lower()
            found = [i for i, s in enumerate(SHAPES) if re.search(rf"\b{s}", prompt)]
            if len(found) != 1:
                continue
            pictures.append(preprocess_understanding(Image.open(data / rec["image"]), resolution))
            labels.append(found[0])
            if len(labels) == limit:
                break
    if not labels:
        raise SystemExit(f"{data}: no single-object generation records")
    return torch.stack(pictures), torch.tensor(labels)


@torch.no_grad()
def features(model, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    reading = model.read_latents(model.encode_images(pixels), keep=True)
    n = reading.tokens.shape[1]
    states = model.model.language_model(reading.tokens, mask=torch.ones(1, 1, n, n, dtype=torch.bool))
    return {"vit_mean": reading.features.mean(1), "siglip_head": model.model.vision_representation.head(reading.features),
            "llm_image_states": states.flatten(1)}


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          steps: int = 500) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(train_x.shape[1], len(SHAPES))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(train_x), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(test_x).argmax(-1) == test_y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="official-format model directory")
    ap.add_argument("--train-data", required=True, type=Path)
    ap.add_argument("--test-data", required=True, type=Path, help="made with another --seed")
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=300)
    args = ap.parse_args()
    model = load_model(args.model).eval()
    r = model.config.resolution
    train_px, train_y = single_objects(args.train_data, args.n_train, r)
    test_px, test_y = single_objects(args.test_data, args.n_test, r)
    ftrain, ftest = features(model, train_px), features(model, test_px)
    scores = {k: round(probe(ftrain[k], train_y, ftest[k], test_y), 3) for k in ftrain}
    print(json.dumps({"model": args.model, "train": len(train_y), "test": len(test_y), "chance": round(1 / len(SHAPES), 3),
                      "held_out_accuracy": scores}))


if __name__ == "__main__":
    main()
