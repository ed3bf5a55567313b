"""Trainable-parameter selection by name patterns, AdamW with decay / no-decay groups, and the LR schedule."""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Iterable

import torch
from torch import nn

from cheers.train.settings import OptimSection, TrainConfig, TrainConfigError


def matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch patterns (`model.gen_projector.*`), or regular expressions written `re:<regex>` (full match)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def parameter_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (a tied embedding is also `lm_head.weight`)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def select_trainable(model: nn.Module, include: list[str], exclude: list[str]) -> tuple[list[str], list[str]]:
    """Set `requires_grad` from the patterns (a parameter trains if any of its names matches `include` and none
    matches `exclude`). Returns (trainable names, frozen names). An include pattern that matches nothing is an
    error (a typo would otherwise silently freeze a module)."""
    aliases = parameter_aliases(model)
    for pat in include:
        if not any(matches(n, [pat]) for names in aliases.values() for n in names):
            raise TrainConfigError(f"trainable.include pattern '{pat}' matches no parameter of the model")
    trainable, frozen = [], []
    for name, p in model.named_parameters():
        names = aliases[id(p)]
        on = any(matches(n, include) for n in names) and not any(matches(n, exclude) for n in names)
        p.requires_grad_(on)
        (trainable if on else frozen).append(name)
    if not trainable:
        raise TrainConfigError("no trainable parameters: trainable.include/exclude select nothing")
    return trainable, frozen


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; names matching `no_decay` get weight decay 0."""
    aliases = parameter_aliases(model)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(matches(n, cfg.no_decay) for n in aliases[id(p)]) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs = {}
    if cfg.fused and torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


class LRSchedule:
    """lr(step) = base * warm-up(step) * decay(step); `step` = optimizer steps already taken (0 for the first).

    Warm-up is linear from 0: multiplier step / warmup for step < warmup. Then "constant" keeps 1; "cosine" goes
    from 1 to `min_lr_ratio` over the remaining steps; "wsd" (warm-up, stable, decay) keeps 1 and then falls
    linearly to `min_lr_ratio` over the last `decay` steps, so a run can be extended without a decayed LR in the
    middle. A pure function of the step: its state is just the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, warmup_steps: int,
                 kind: str = "constant", min_lr_ratio: float = 0.0, decay_steps: int = 0):
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.total = int(total_steps)
        self.warmup = int(warmup_steps)
        self.kind = kind
        self.min_ratio = float(min_lr_ratio)
        self.decay = int(decay_steps)
        self.step_count = 0

    @classmethod
    def for_run(cls, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> "LRSchedule":
        return cls(optimizer, cfg.optim.lr, cfg.steps, cfg.warmup_steps(), cfg.schedule.kind,
                   cfg.schedule.min_lr_ratio, cfg.decay_steps())

    def multiplier(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return step / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "wsd" and self.decay > 0:
            start = self.total - self.decay
            if step >= start:
                progress = min(1.0, (step - start) / self.decay)
                return 1.0 - (1.0 - self.min_ratio) * progress
        return 1.0

    def lr(self, step: int | None = None) -> float:
        return self.base_lr * self.multiplier(self.step_count if step is None else step)

    def apply(self) -> float:
        """Set the learning rate of every group for the coming optimizer step."""
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "kind": self.kind, "base_lr": self.base_lr, "total": self.total,
                "warmup": self.warmup, "min_lr_ratio": self.min_ratio, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
