"""Record sources of the training data: one jsonl file (`JsonlSource`) and a weighted mix of sources
(`MixedSource`).

Both are iterators of `Record`s with `state_dict()` / `load_state_dict()`, so a run resumes at the exact record it
would have read next; their order is a pure function of the seeds and of positions in the stream.
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cheers.train.records import DataError, Record

__all__ = ["JsonlSource", "MixedSource"]


class JsonlSource:
    """Records of one jsonl file, looped over epochs, optionally shuffled and sharded over ranks.

    Lines are read one at a time, never the whole file. Blank lines are not records (line numbers still count them).

    * `shuffle=True`: a first pass stores the byte offset and line number of every record (8 + 8 bytes each);
      each epoch visits them in the order `np.random.default_rng([seed, epoch]).permutation(n)`, rank `r` of
      `world_size` taking positions r, r + world_size, ... of that order. State: (epoch, position).
    * `shuffle=False`: plain streaming in file order, rank `r` taking records r, r + world_size, ...
      State: (epoch, byte offset, line number, records seen).

    `loop=False` stops after one epoch. Use one iterator at a time (`iter(source)` is the source itself).
    """

    def __init__(
        self,
        path: str | Path,
        data_root: str | Path | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        loop: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(str(self.path), "no such data file")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.data_root = Path(data_root) if data_root is not None else self.path.parent
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.loop = bool(loop)
        self.rank, self.world_size = int(rank), int(world_size)
        self._epoch = 0
        self._pos = 0  # shuffle: positions of this epoch's order already consumed
        self._offset = 0  # stream: byte offset of the next line
        self._line = 0  # stream: lines consumed this epoch
        self._seen = 0  # stream: records (non-blank lines) seen this epoch
        self._yielded = 0  # records returned this epoch (both modes)
        self._fh = None
        self._index: tuple[array, array] | None = None
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    # -- helpers
    def _file(self):
        if self._fh is None or self._fh.closed:
            self._fh = open(self.path, "rb")
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def _build_index(self) -> tuple[array, array]:
        if self._index is None:
            offsets, lines = array("q"), array("q")
            off = 0
            with open(self.path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        offsets.append(off)
                        lines.append(lineno)
                    off += len(line)
            self._index = (offsets, lines)
        return self._index

    @property
    def num_records(self) -> int:
        """Records in the file (all ranks)."""
        return len(self._build_index()[0])

    @property
    def epoch(self) -> int:
        return self._epoch

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            n = self.num_records
            perm = np.random.default_rng([self.seed, self._epoch]).permutation(n)
            self._order = perm[self.rank :: self.world_size]
            self._order_epoch = self._epoch
        assert self._order is not None
        return self._order

    def _next_epoch(self) -> None:
        if self._yielded == 0:
            who = f" for rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
            raise DataError(str(self.path), f"contains no records{who}")
        self._epoch += 1
        self._pos = self._offset = self._line = self._seen = self._yielded = 0

    # -- iteration
    def __iter__(self) -> "JsonlSource":
        return self

    def __next__(self) -> Record:
        return self._next_shuffled() if self.shuffle else self._next_streamed()

    def _next_shuffled(self) -> Record:
        offsets, lines = self._build_index()
        while True:
            order = self._epoch_order()
            if self._pos < len(order):
                j = int(order[self._pos])
                self._pos += 1
                self._yielded += 1
                f = self._file()
                f.seek(offsets[j])
                return Record(f.readline(), f"{self.path}:{lines[j]}", self.data_root)
            if not self.loop:
                raise StopIteration
            self._next_epoch()

    def _next_streamed(self) -> Record:
        f = self._file()
        while True:
            f.seek(self._offset)
            line = f.readline()
            if not line:
                if not self.loop:
                    raise StopIteration
                self._next_epoch()
                continue
            self._offset += len(line)
            self._line += 1
            if not line.strip():
                continue
            k = self._seen
            self._seen += 1
            if k % self.world_size != self.rank:
                continue
            self._yielded += 1
            return Record(line, f"{self.path}:{self._line}", self.data_root)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "jsonl",
            "path": str(self.path),
            "file_size": self.path.stat().st_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "pos": self._pos,
            "offset": self._offset,
            "line": self._line,
            "seen": self._seen,
            "yielded": self._yielded,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "jsonl":
            raise ValueError(f"not a JsonlSource state: kind={state.get('kind')!r}")
        for key in ("shuffle", "seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{self.path}: state was saved with {key}={state[key]!r}, source has {getattr(self, key)!r}")
        size = self.path.stat().st_size
        if state["file_size"] != size:
            raise ValueError(f"{self.path}: file changed since the state was saved ({state['file_size']} -> {size} bytes)")
        self._epoch = int(state["epoch"])
        self._pos = int(state["pos"])
        self._offset = int(state["offset"])
        self._line = int(state["line"])
        self._seen = int(state["seen"])
        self._yielded = int(state["yielded"])


class MixedSource:
    """Draws records from several sources with fixed probabilities (e.g. 3:6:1 understanding : generation : text).

    Draw k picks a source with the uniform number `np.random.default_rng([seed, k]).random()` against the
    normalised cumulative weights, so the sequence of choices depends only on the seed and k. A source that is
    exhausted (`loop=False`) leaves the mix; the mix ends when all are exhausted. Returned records carry the
    source name in `Record.source`. `counts` tells how many records each source gave.
    """

    def __init__(self, sources: Mapping[str, tuple[Any, float]], seed: int = 0):
        if not sources:
            raise ValueError("MixedSource needs at least one source")
        self.names = list(sources)
        self.sources = []
        weights = []
        for name, pair in sources.items():
            try:
                src, w = pair
            except (TypeError, ValueError):
                raise ValueError(f"source '{name}': expected (source, weight), got {pair!r}") from None
            w = float(w)
            if not math.isfinite(w) or w <= 0:
                raise ValueError(f"source '{name}': weight must be a positive number, got {w}")
            self.sources.append(src)
            weights.append(w)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = int(seed)
        self._draws = 0
        self._exhausted: set[str] = set()
        self.counts = {n: 0 for n in self.names}

    def __iter__(self) -> "MixedSource":
        return self

    def __next__(self) -> Any:
        while True:
            live = [i for i, n in enumerate(self.names) if n not in self._exhausted]
            if not live:
                raise StopIteration
            u = np.random.default_rng([self.seed, self._draws]).random()
            self._draws += 1
            cum = np.cumsum(self.weights[live])
            pick = live[min(int(np.searchsorted(cum / cum[-1], u, side="right")), len(live) - 1)]
            name = self.names[pick]
            try:
                rec = next(self.sources[pick])
            except StopIteration:
                self._exhausted.add(name)
                continue
            self.counts[name] += 1
            if isinstance(rec, Record):
                rec = dataclasses.replace(rec, source=f"{name}/{rec.source}" if rec.source else name)
            return rec

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "mixed",
            "seed": self.seed,
            "names": list(self.names),
            "draws": self._draws,
            "exhausted": sorted(self._exhausted),
            "counts": dict(self.counts),
            "sources": {n: s.state_dict() for n, s in zip(self.names, self.sources)},
        }

    def load_state_dict(self, state: Mapping[str, Any], allow_new: bool = False) -> None:
        """`allow_new`: sources of this mix absent from `state` start fresh (the saved ones must all be here)."""
        if state.get("kind") != "mixed":
            raise ValueError(f"not a MixedSource state: kind={state.get('kind')!r}")
        saved = list(state["names"])
        same = saved == self.names or (allow_new and all(n in self.names for n in saved))
        if not same or state["seed"] != self.seed:
            raise ValueError(
                f"MixedSource state was saved for sources {state['names']} seed {state['seed']}, "
                f"this mix has {self.names} seed {self.seed}"
            )
        self._draws = int(state["draws"])
        self._exhausted = set(state["exhausted"])
        self.counts = {n: int(state["counts"].get(n, 0)) for n in self.names}
        for n, s in zip(self.names, self.sources):
            if n in saved:
                s.load_state_dict(state["sources"][n])
