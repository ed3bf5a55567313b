"""The autoencoder's ceiling: judge the VAE reconstructions of the held-out ShapesBench generation scenes.

No generator can score above what survives encode -> decode, so this bounds text-to-image quality from above
(and shows whether understanding, which reads decoded pixels, can see colour and shape at all)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from cheers.checkpoint import load_model
from cheers.eval.judge import detect, score_geneval
from cheers.eval.shapes import eval_prompts
from cheers.processor import preprocess_generation
from cheers.shapes.world import render_scene
from cheers.train.ckpt import load_checkpoint_model, resolve_training_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="model directory, or a stage-0 training checkpoint step_N")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    step = resolve_training_checkpoint(a.model)
    # a training checkpoint carries no measured latent statistics, but encode -> decode does not depend on them
    model = load_model(a.model) if step is None else load_checkpoint_model(step).eval()
    res = model.config.resolution
    items = eval_prompts(seed=a.seed, n=a.n, resolution=res, families=("generation",))["generation"]
    scores: dict[str, list[bool]] = defaultdict(list)
    clean: list[bool] = []
    mse = []
    for k in range(0, len(items), 32):
        chunk = items[k:k + 32]
        pics = [render_scene(it.spec, res) for it in chunk]
        x = torch.stack([preprocess_generation(p, res) for p in pics])
        with torch.no_grad():
            rec = model.decode_latents(model.encode_images(x))
        mse.append(float(((rec - x) ** 2).mean()))
        for it, pic, r in zip(chunk, pics, rec):
            arr = (r.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            scores[it.category].append(score_geneval(detect(arr), it.geneval)[0])
            clean.append(score_geneval(detect(pic), it.geneval)[0])
    cats = {c: float(np.mean(v)) for c, v in scores.items()}
    print(json.dumps({"model": a.model, "n": a.n, "seed": a.seed, "recon_mse": round(float(np.mean(mse)), 5),
                      "judge_on_reconstructions": {"overall": round(float(np.mean(list(cats.values()))), 3),
                                                   "categories": {c: round(v, 3) for c, v in cats.items()}},
                      "judge_on_clean_renders": round(float(np.mean(clean)), 3)}))


if __name__ == "__main__":
    main()
