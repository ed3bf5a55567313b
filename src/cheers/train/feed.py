"""The global record stream of a run and its deterministic split over processes.

Every rank reads the *same* global stream of raw records (cheap: one jsonl line each) and builds only the samples
of its own slots, so the global batch of a step does not depend on how many processes share it:

    step s draws G = world_size * micro_batch * grad_accum records, global indices i .. i+G-1
    micro-step k of rank r builds records  k*W*b + r*b  ..  k*W*b + (r+1)*b - 1   of that step

Two ranks with micro-batch b therefore train on exactly the samples one rank with micro-batch 2b sees. Per-sample
randomness (t, CFG dropout in `SampleBuilder`, the flow noise x0 here) is seeded by the global index, never by the
rank. A bad sample is dropped from its slot (policy "skip"): the global batch is "the good samples among the G
records", again independent of the split.

Mixing:
* `pairing: mix` - each record picks its source at random with the configured weights (`MixedSource`);
* `pairing: alternate` - each global batch holds equal contiguous shares of every source, in the listed order
  (stage-4 SFT: with micro-batch = G/2 every micro-batch is pure understanding or pure generation, 1:1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cheers.train.records import Record
from cheers.train.settings import DataSection, TrainConfigError
from cheers.train.sources import JsonlSource, MixedSource


def seed_int(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


NOISE_SALT = 0x7E57_0001
SOURCE_SALT = 0x7E57_0002


def sample_noise(seed: int, index: int, n_images: int, shape: tuple[int, ...]) -> torch.Tensor:
    """x0 ~ N(0, I) for the images of global sample `index` (float32 [n_images, *shape])."""
    g = torch.Generator()
    g.manual_seed(seed_int(seed, NOISE_SALT, index))
    return torch.randn((n_images, *shape), generator=g)


def source_names(data: DataSection) -> list[str]:
    names = []
    for i, s in enumerate(data.sources):
        name = s.name or Path(s.path).stem
        if name in names:
            name = f"{name}_{i}"
        names.append(name)
    return names


class RecordFeed:
    """The run's global stream of (global index, Record); identical on every rank."""

    def __init__(self, data: DataSection, seed: int):
        if not data.sources:
            raise TrainConfigError("data.sources is empty: give at least one jsonl file")
        self.pairing = data.pairing
        self.add_sources_on_resume = data.add_sources_on_resume
        self.names = source_names(data)
        self.sources = []
        for i, s in enumerate(data.sources):
            root = s.image_root if s.image_root else None
            src = JsonlSource(s.path, data_root=root, shuffle=True, seed=seed_int(seed, SOURCE_SALT, i), loop=True)
            self.sources.append(src)
        self.weights = [s.weight for s in data.sources]
        self.mixed = None
        if self.pairing == "mix":
            live = {n: (src, w) for n, src, w in zip(self.names, self.sources, self.weights) if w > 0}
            if not live:
                raise TrainConfigError("data.sources: every weight is 0")
            self.mixed = MixedSource(live, seed=seed)
        self.index = 0

    def take(self, n: int) -> list[tuple[int, Record]]:
        if self.mixed is not None:
            out = [(self.index + i, next(self.mixed)) for i in range(n)]
        else:
            k = len(self.sources)
            if n % k:
                raise TrainConfigError(
                    f"data.pairing=alternate needs a global batch divisible by the {k} sources (got {n})"
                )
            out = []
            for j, (name, src) in enumerate(zip(self.names, self.sources)):
                for i in range(n // k):
                    rec = next(src)
                    out.append((self.index + j * (n // k) + i, dataclasses.replace(rec, source=name)))
        self.index += n
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"index": self.index, "pairing": self.pairing, "names": self.names}
        if self.mixed is not None:
            state["mixed"] = self.mixed.state_dict()
        else:
            state["sources"] = [s.state_dict() for s in self.sources]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = list(state.get("names", []))
        added = [n for n in self.names if n not in saved]
        extend = bool(self.add_sources_on_resume and self.mixed is not None and state.get("pairing") == self.pairing
                      and added and all(n in self.names for n in saved))
        if not extend and (state.get("pairing") != self.pairing or saved != self.names):
            hint = (" (to add sources on resume set data.add_sources_on_resume: true; removing sources is not "
                    "supported)" if self.pairing == "mix" else "")
            raise TrainConfigError(
                f"the checkpoint's data stream ({state.get('pairing')}, sources {saved}) does not "
                f"match this config ({self.pairing}, sources {self.names}){hint}"
            )
        self.index = int(state["index"])
        if self.mixed is not None:
            self.mixed.load_state_dict(state["mixed"], allow_new=extend)
        else:
            for s, st in zip(self.sources, state["sources"]):
                s.load_state_dict(st)


def slot_range(k: int, rank: int, world: int, micro: int) -> tuple[int, int]:
    """Positions inside a step's global record list of micro-step k on `rank`."""
    start = k * world * micro + rank * micro
    return start, start + micro
