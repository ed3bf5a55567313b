from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHEERS_SHARED", REPO.parent / "shared")).resolve()
PARITY = SHARED / "parity"
GOLDENS = PARITY / "goldens"
TINY_OFFICIAL = PARITY / "tiny-official"

needs_shared = pytest.mark.skipif(
    not (PARITY / "tiny-official" / "config.json").exists(),
    reason=f"../shared (parity checkpoint and goldens) not found at {SHARED}; set CHEERS_SHARED",
)


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def parity_model():
    if not (TINY_OFFICIAL / "config.json").exists():
        pytest.skip(f"parity checkpoint not found under {SHARED}")
    from cheers import Cheers

    return Cheers.from_pretrained(TINY_OFFICIAL).model  # the model exactly as the public entry point prepares it


def golden(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDENS / f"{name}.safetensors"))


def golden_meta(name: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(GOLDENS / f"{name}.safetensors"), "pt") as f:
        return f.metadata() or {}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight cheers-tiny model directory with a small tokenizer (official format)."""
    from cheers.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
