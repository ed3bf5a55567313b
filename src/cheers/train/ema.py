"""Exponential moving average (EMA) of the trainable weights.

Flow and diffusion models are usually sampled from an average of their recent weights rather than from the last
optimizer step: the average smooths the step-to-step noise of the velocity field. The trainer keeps one float32
shadow per trainable parameter (a DTensor shard under FSDP2, so each process averages only its own shard), saves
it in every training checkpoint (exact resume) and exports it beside the plain weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class WeightEMA:
    """shadow <- decay * shadow + (1 - decay) * weight after every optimizer step past `start`; up to `start` the
    shadow is the weights themselves (an average of the first, fast-moving steps is not worth keeping)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float, start: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1) (got {decay})")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = float(decay)
        self.start = int(start)
        with torch.no_grad():
            self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based)."""
        if step <= self.start:
            self.reset_to_weights()
            return
        for s, p in zip(self.shadow, self.params):
            _local(s).lerp_(_local(p).float(), 1.0 - self.decay)

    @torch.no_grad()
    def reset_to_weights(self) -> None:
        """Restart the average at the current weights (before `start`, or on a resume from a checkpoint written
        without an EMA)."""
        for s, p in zip(self.shadow, self.params):
            _local(s).copy_(_local(p))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> shadow tensor (the live tensors: a checkpoint load writes into them in place)."""
        return dict(zip(self.names, self.shadow))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights (e.g. to export them); restored afterwards."""
        with torch.no_grad():
            kept = [_local(p).clone() for p in self.params]
            for s, p in zip(self.shadow, self.params):
                _local(p).copy_(_local(s))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in zip(kept, self.params):
                    _local(p).copy_(k)
