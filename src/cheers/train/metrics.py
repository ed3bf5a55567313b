"""Run log: JSON lines (`<output_dir>/log.jsonl`, appended across resumes), console lines and a tqdm bar on rank 0,
and TensorBoard scalars when `log.tensorboard` is set and the tensorboard package is importable.

Every record has `event` and `time`; step records (`event: "step"`) carry loss, ce_loss, flow_loss, per-task
losses (`ce/<row kind>`, `flow/<image role>`), grad_norm, lr, samples_per_s, tokens_per_s, step_time_s.
Other events: start, resume, checkpoint_staged, checkpoint, export, bad_sample, nonfinite, end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


class MetricLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = False, progress: bool = True,
                 total: int | None = None):
        self.enabled = enabled
        self._want_bar = False
        self.path = Path(out_dir) / "log.jsonl"
        self._fh = None
        self._bar = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._want_bar = progress
        self._total = total
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception as err:  # tensorboard not installed: the jsonl log is enough
                self._print(f"tensorboard unavailable ({err.__class__.__name__}: {err}); logging to {self.path} only")

    def _print(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(_clean(record)) + "\n")
        self._fh.flush()

    def event(self, name: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": name, "time": time.time(), **fields}
        self._write(rec)
        if name not in ("checkpoint_staged",):
            brief = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("counters",))
            self._print(f"[{name}] {brief}")

    def step(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"event": "step", "time": time.time(), **metrics})
        main = ("loss", "ce_loss", "flow_loss", "grad_norm", "lr", "samples_per_s")
        parts = [f"step {metrics['step']}"]
        for k in main:
            if k in metrics:
                parts.append(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}")
        extra = [f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k and isinstance(v, float)]
        self._print(" ".join(parts + extra))
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, metrics["step"])

    def progress_to(self, step: int, loss: float | None = None) -> None:
        if self._bar is None and self.enabled and self._want_bar:
            self._want_bar = False  # created once, when training starts (not for runs that fail to set up)
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self._total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                                 file=sys.stderr, mininterval=1.0)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self._bar = None
        if self._bar is None:
            return
        self._bar.n = step
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
