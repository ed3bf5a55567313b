"""The Cheers trainer: one engine for every stage, one process or many (DDP / FSDP2), exact resume.

`train(cfg, resume=False)` runs a whole stage with the trainer that `TRAINERS` registers for its kind: `flow`
(stages >= 1, `cheers.train.flow_stage`) trains the unified model on mixed batches with
`loss = CE + flow_loss_weight * MSE` (spec §D); `vae` (stage 0, `cheers.train.vae_stage`) trains the autoencoder of
the tiny presets; `vision` (`cheers.train.vision_stage`) pretrains a from-scratch ViT. What the stages share (model
set-up, optimizer step, step loop, checkpoints) is `cheers.train.run`.

The step-level names of the flow stage and the run are re-exported here for the callers that drive steps
themselves (benchmarks, tests).
"""

from __future__ import annotations

from typing import Any

import torch

from cheers.train.distributed import teardown
from cheers.train.flow_stage import (
    IMAGE_ROLES,
    ROW_KINDS,
    FlowTrainer,
    MicroBatch,
    StepResult,
    count_ce_targets,
    expanded_tokens,
    forward_backward,
    image_roles,
    row_kinds,
)
from cheers.train.run import (
    NonFiniteLossError,
    RunBase,
    build_model,
    clip_gradients,
    init_weights,
    load_tokenizer,
)
from cheers.train.settings import TrainConfig, TrainConfigError
from cheers.train.vae_stage import VAETrainer
from cheers.train.vision_stage import VisionTrainer

__all__ = [
    "TRAINERS", "make_trainer", "train", "TrainConfig", "NonFiniteLossError", "RunBase", "FlowTrainer", "VAETrainer",
    "VisionTrainer", "MicroBatch", "StepResult", "ROW_KINDS", "IMAGE_ROLES", "count_ce_targets", "row_kinds",
    "image_roles", "expanded_tokens", "forward_backward", "clip_gradients", "init_weights", "build_model",
    "load_tokenizer",
]

# stage kind (`kind:` of a training config) -> the trainer that runs it
TRAINERS: dict[str, type[RunBase]] = {t.kind: t for t in (FlowTrainer, VAETrainer, VisionTrainer)}


def make_trainer(cfg: TrainConfig, resume: bool = False) -> RunBase:
    """The trainer of `cfg.kind`, set up (model, optimizer, feed; resumed from the latest checkpoint if asked)."""
    if cfg.kind not in TRAINERS:
        raise TrainConfigError(f"kind: unknown stage kind {cfg.kind!r}; choose one of {', '.join(TRAINERS)}")
    return TRAINERS[cfg.kind](cfg, resume)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run a stage to completion (or to `debug.max_steps_this_run`). Returns the last logged metrics."""
    trainer = None
    threads = torch.get_num_threads()
    try:
        trainer = make_trainer(cfg, resume)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        torch.set_num_threads(threads)
        teardown()
