"""Warm start of the 16-token model (`cheers-small-p8`) from a trained 4-token model (`cheers-small`).

Why (session 17): the 4-token model's pictures ignore shape words at ShapesWorld's object size (a 13-22 px object is
a fraction of one of its 4 image tokens; T2I 0.08 after ~33,000 joint steps), and the 16-token model trained from
scratch needed thousands of steps before it drew anything (p8/RESULTS.md). The two presets share every width and
depth: only the VAE (factor 8 -> 4), the ViT patch (16 -> 8 px) and the ViT position table (4x4 -> 8x8) differ. So
the LLM, the understanding projector, the cascaded head, the gate and the time embedding carry over unchanged, the
VAE comes from a factor-4 VAE stage, and the ViT is resized so that it sees each 8 px patch the way the donor saw
a 16 px patch of the picture upsampled 2x:
  - patch kernel: the 16x16 kernel summed over 2x2 blocks (the donor's response to a nearest-upsampled patch);
  - position table: the 4x4 grid of position vectors resampled bilinearly to 8x8.
The result is an official model directory that `model.init` of a joint stage takes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from cheers.checkpoint import load_model, save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FROM_VAE = ("model.vae_model.", "model.vae_decoder_projector.")  # the latent space is the new VAE's: keep both of its decoders
PATCH = "model.vision_representation.embeddings.patch_embedding.weight"
POSITIONS = "model.vision_representation.embeddings.position_embedding.weight"


def resize_patch_kernel(w: torch.Tensor, new: int) -> torch.Tensor:
    """(C_out, C_in, p, p) -> (C_out, C_in, new, new) with p a multiple of new: block sums."""
    c_out, c_in, p, _ = w.shape
    if p % new:
        raise ValueError(f"patch {p} is not a multiple of the new patch {new}")
    k = p // new
    return w.reshape(c_out, c_in, new, k, new, k).sum(dim=(3, 5))


def resize_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(g*g, D) -> (grid*grid, D), bilinear over the square grid of positions."""
    n, d = table.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position table of {n} rows is not a square grid")
    img = table.T.reshape(1, d, g, g)
    out = F.interpolate(img, size=(grid, grid), mode="bilinear", align_corners=False)
    return out.reshape(d, grid * grid).T.contiguous()


def transplant(donor_dir: Path, vae_dir: Path, dest: Path) -> dict[str, int]:
    for name in TOKENIZER_FILES:
        if not filecmp.cmp(donor_dir / name, vae_dir / name, shallow=False):
            raise ValueError(f"{donor_dir / name} and {vae_dir / name} differ: the VAE stage used another tokenizer")
    donor, target = load_model(donor_dir), load_model(vae_dir)
    dc, tc = donor.config, target.config
    if dc.text != tc.text or dc.head != tc.head or dc.tokens != tc.tokens:
        raise ValueError(f"{donor_dir} and {vae_dir} differ in the LLM, head or special tokens: nothing to transplant")
    src = donor.state_dict()
    counts = {"copied": 0, "resized": 0, "kept_from_vae": 0}
    with torch.no_grad():
        for name, t in target.state_dict().items():
            if name.startswith(FROM_VAE):
                counts["kept_from_vae"] += 1
                continue
            w = src[name]
            if name == PATCH:
                w = resize_patch_kernel(w, t.shape[-1])
                counts["resized"] += 1
            elif name == POSITIONS:
                w = resize_positions(w, int(round(t.shape[0] ** 0.5)))
                counts["resized"] += 1
            elif w.shape != t.shape:
                raise ValueError(f"{name}: donor shape {tuple(w.shape)} vs target {tuple(t.shape)}, no rule to resize it")
            else:
                counts["copied"] += 1
            t.copy_(w)
    dest.mkdir(parents=True, exist_ok=True)
    save_model(target, dest)
    for name in TOKENIZER_FILES:
        shutil.copy(donor_dir / name, dest / name)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--donor", required=True, help="trained cheers-small model directory (4 image tokens)")
    ap.add_argument("--vae", required=True, help="export of the cheers-small-p8 VAE stage")
    ap.add_argument("--dest", required=True)
    args = ap.parse_args()
    print(json.dumps({"dest": args.dest, **transplant(Path(args.donor), Path(args.vae), Path(args.dest))}))


if __name__ == "__main__":
    main()
