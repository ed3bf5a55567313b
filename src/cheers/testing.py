"""Small real artefacts for tests and examples: a random-weight `cheers-tiny` model directory with a trained
small tokenizer (no download, a few seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

SAMPLE_TEXTS = [
    "a red circle and a blue square", "two green triangles", "What color is the star?", "It is yellow.",
    "Draw the digit 7.", "Which digit is this?", "There are three hearts above a purple cross.",
    "Hello! How can I help you today?", "Make the circle green.", "Remove the square.", "yes", "no",
] * 20


def make_tiny_model_dir(path: str | os.PathLike, seed: int = 0, preset_name: str = "cheers-tiny",
                        vocab_size: int = 512) -> Path:
    """Write config.json + model.safetensors + tokenizer.json of a random `preset_name` model to `path`."""
    from cheers.checkpoint import save_model
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.tokenizer import train_small_tokenizer

    path = Path(path)
    tok = train_small_tokenizer(SAMPLE_TEXTS, vocab_size=vocab_size, out_dir=path)
    cfg = preset(preset_name)
    cfg.text.vocab_size = max(tok.vocab_size, cfg.tokens.no_mean + 1)
    torch.manual_seed(seed)
    model = CheersModel(cfg)
    with torch.no_grad():  # random (not zero-initialized) heads so every path contributes
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("model.hi_gate.gate.2"):
                p.normal_(0, 0.02)
    save_model(model, path)
    return path
