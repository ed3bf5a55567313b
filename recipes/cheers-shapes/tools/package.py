"""Write a trained export as a package: fp16 safetensors (loaded back into fp32), the tokenizer and the recommended
sampling settings (generation_config.json); with --card, also a model card as README.md. The recipe packages
intermediate stages this way (later stages start from those packages) and, last, the embedded default, whose
model card is already in its directory and is kept."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from cheers.checkpoint import load_model, save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--export", required=True)
    ap.add_argument("--dest", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--cfg-interval", default="0,1", help="LO,HI: guidance only for LO <= t <= HI (t = 0 is noise)")
    ap.add_argument("--card", default=None, help="model card to copy in as README.md (default: none; an existing "
                    "README.md in --dest is kept)")
    a = ap.parse_args()
    try:
        lo, hi = (float(v) for v in a.cfg_interval.split(","))
    except ValueError:
        ap.error(f"--cfg-interval {a.cfg_interval!r}: expected LO,HI (two numbers)")
    if a.card and not Path(a.card).is_file():
        ap.error(f"--card {a.card}: no such file")
    src, dest = Path(a.export), Path(a.dest)
    model = load_model(src)
    dest.mkdir(parents=True, exist_ok=True)
    # the output head is tied: store it once to stay small
    save_model(model, dest, dtype=torch.float16, include_tied_head=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dest / name)
    image = {"steps": a.steps, "cfg_scale": a.cfg, "shift": a.shift, "sampler": a.sampler, "cfg_interval": [lo, hi]}
    gen = {"cheers": {"image": image,
                      "text": {"max_new_tokens": 64, "temperature": 0.0}}}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if a.card:
        shutil.copy(a.card, dest / "README.md")
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(json.dumps({"dest": str(dest), "bytes": size}))


if __name__ == "__main__":
    main()
