"""Write one training checkpoint (<run>/ckpt/step_N) as an official-format model directory (fp32), with the
tokenizer saved beside it: how an intermediate step is evaluated (e.g. the gate ablation's matched step); `--ema`
writes the run's moving average of the weights at that step instead."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from cheers.checkpoint import save_model
from cheers.train.ckpt import load_checkpoint_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("step_dir", help="a training checkpoint directory, e.g. runs/embedded/joint/ckpt/step_1000")
    ap.add_argument("out", help="model directory to write")
    ap.add_argument("--ema", action="store_true", help="write the checkpoint's averaged (EMA) weights (ema.decay > 0)")
    a = ap.parse_args()
    step, out = Path(a.step_dir), Path(a.out)
    save_model(load_checkpoint_model(step, ema=a.ema).eval(), out)
    for f in (step / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    print(out)


if __name__ == "__main__":
    main()
