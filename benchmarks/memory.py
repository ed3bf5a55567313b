"""Peak memory of loading the released-size model, per dtype.

Writes a random-weight `cheers-1.5b` as a real sharded bfloat16 checkpoint (official layout: config.json with
torch_dtype bfloat16, 2 GB shards + index, the released tokenizer files), then, in a fresh process per dtype, runs
`Cheers.from_pretrained(dir, dtype=...)` (loading and building the whole pipeline) and reports its peak RSS over
the bytes of the weights it holds. Target: <= 1.15x for float32 and bfloat16.

    python benchmarks/memory.py [--dir /tmp/cheers-1.5b-bf16] [--keep]

The JSON last line has `load_peak_over_weights_float32` and `load_peak_over_weights_bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import REPO, SHARED, peak_rss_gb  # noqa: E402  (puts src/ on the path)
from cheers.checkpoint import save_model  # noqa: E402
from cheers.config import preset  # noqa: E402
from cheers.model.cheers import CheersModel  # noqa: E402

TARGET = 1.15

# Runs in a fresh interpreter so each dtype's peak is its own.
CHILD = """
import json, resource, sys, time
import torch
from cheers import Cheers
t0 = time.perf_counter()
pipe = Cheers.from_pretrained(sys.argv[1], dtype=sys.argv[2])
seconds = time.perf_counter() - t0
tensors = {t.data_ptr(): t for t in list(pipe.model.parameters()) + list(pipe.model.buffers())}
weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
print(json.dumps({"dtype": str(pipe.dtype), "weight_bytes": weight_bytes, "load_s": seconds,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_checkpoint(directory: Path) -> None:
    """Random N(0, 0.02) bf16 weights (values do not matter for memory), saved as the release is laid out."""
    torch.set_default_dtype(torch.bfloat16)  # materialize in bf16 directly: no float32 copy of 10 GB
    try:
        with torch.device("meta"):
            model = CheersModel(preset("cheers-1.5b"))
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the tied head its own storage
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.fill_(1.0 if "var" in name else 0.0)
    save_model(model, directory, dtype=torch.bfloat16, include_tied_head=True)
    tok = SHARED / "reference" / "tokenizer"
    for f in tok.iterdir():
        shutil.copy(f, directory / f.name)
    for name in ("generation_config.json", "preprocessor_config.json"):
        if (SHARED / "reference" / name).exists():
            shutil.copy(SHARED / "reference" / name, directory / name)


def measure(directory: Path, dtype: str) -> dict:
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(directory), dtype], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode:
        raise SystemExit(f"loading in {dtype} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["peak_over_weights"] = row["peak_rss_bytes"] / row["weight_bytes"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (reused by a later --dir run)")
    args = ap.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="cheers-1.5b-bf16-"))
    try:
        if not (directory / "config.json").exists():
            t0 = time.perf_counter()
            directory.mkdir(parents=True, exist_ok=True)
            write_checkpoint(directory)
            print(f"wrote {directory} in {time.perf_counter() - t0:.0f} s "
                  f"(writer peak RSS {peak_rss_gb():.1f} GB)", flush=True)
        on_disk = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        result = {"checkpoint_bytes": on_disk, "target": TARGET}
        print(f"{'dtype':>9} {'weights GB':>11} {'peak RSS GB':>12} {'peak/weights':>13} {'load s':>7}")
        for dtype in ("bfloat16", "float32"):
            row = measure(directory, dtype)
            print(f"{dtype:>9} {row['weight_bytes'] / 1e9:>11.2f} {row['peak_rss_bytes'] / 1e9:>12.2f} "
                  f"{row['peak_over_weights']:>13.3f} {row['load_s']:>7.1f}", flush=True)
            result[f"load_peak_over_weights_{dtype}"] = round(row["peak_over_weights"], 4)
            result[f"weights_gb_{dtype}"] = round(row["weight_bytes"] / 1e9, 3)
            result[f"peak_rss_gb_{dtype}"] = round(row["peak_rss_bytes"] / 1e9, 3)
            result[f"load_s_{dtype}"] = round(row["load_s"], 1)
        result["meets_target"] = all(result[f"load_peak_over_weights_{d}"] <= TARGET for d in ("float32", "bfloat16"))
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
