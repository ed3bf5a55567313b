"""Fixtures of the trainer tests: the smoke corpus with its tokenizer, and small flow-stage configs over it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from cheers.shapes.smoke import make_dataset, make_tokenizer
from cheers.train.settings import TrainConfig, load_config


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(root, {task: jsonl}): the smoke corpus under root/data and its tokenizer under root/tok."""
    root = tmp_path_factory.mktemp("engine")
    files = make_dataset(root / "data", n_understanding=4, n_generation=4, n_edit=2, n_text=2)
    make_tokenizer(root / "tok")
    return root, files


@pytest.fixture
def flow_config(work) -> Callable[..., TrainConfig]:
    """flow_config(output_dir, **overrides): a 2-step cheers-tiny flow stage over the smoke corpus (3:6:1:1 mix)."""
    root, files = work

    def make(out: Path, **extra) -> TrainConfig:
        raw = {
            "stage": "test", "steps": 2, "micro_batch_size": 2, "output_dir": str(out), "threads": 1,
            "model": {"preset": "cheers-tiny", "tokenizer": str(root / "tok")},
            "schedule": {"warmup": 0}, "log": {"interval": 1, "progress": False},
            "ckpt": {"interval": 0, "export_final": False},
            "latents": {"dir": "memory"},
            "data": {"sources": [{"path": str(files[k]), "weight": w}
                                 for k, w in (("understanding", 3), ("generation", 6), ("text", 1), ("edit", 1))]},
        }
        overrides = [f"{k}={json.dumps(v)}" for k, v in extra.items()]
        return load_config(None, overrides, raw=raw)

    return make
