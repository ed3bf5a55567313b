"""What the benchmark scripts share: paths, the measured matmul peak, peak memory."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# ../shared (parity checkpoint, goldens, BASELINE.md), or wherever CHEERS_SHARED points (as the tests do)
SHARED = Path(os.environ.get("CHEERS_SHARED", REPO.parent / "shared"))


def matmul_peak(seconds: float = 2.0) -> float:
    """Measured fp32 GEMM throughput (GFLOP/s), best of a few 2048^3 products."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
