#!/usr/bin/env bash
# Usage: bash scripts/embedded/p22/watch_checkpoints.sh 3500 4000 ...  (waits for each checkpoint of the running stage 22)
# stage 22 (16-token) checkpoints: export EMA at given steps, package (renoise 40, CFG 5 on [0, 0.4]), look,
# T2I seed 2, naming. Training is paused (SIGSTOP) while these run, so that neither slows the other.
set -x
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}; R=runs/embedded_p17/stage22; O=runs/embedded_p17/s22
mkdir -p $O
for S in "$@"; do
  while [ ! -d $R/ckpt/step_$S ]; do sleep 20; done
  sleep 20
  pkill -STOP -f "cheers train"
  $PY scripts/embedded/export_step.py $R/ckpt/step_$S $O/export_ema_$S --ema
  $PY scripts/embedded/package.py --export $O/export_ema_$S --dest $O/package_ema_$S --cfg 5 --cfg-interval 0,0.4 --sampler renoise --steps 40
  $PY scripts/embedded/look.py $O/package_ema_$S runs/look/p8_s22_$S.png
  $PY scripts/embedded/sampler_sweep.py --model $O/package_ema_$S --sampler renoise --steps 40 --cfg 5 --interval "0:0.4" --n 50 --seed 2 --out $O/t2i_ema_${S}_s2.jsonl
  $PY scripts/embedded/make_shape_names.py --out runs/embedded/names_eval --evaluate $O/package_ema_$S > $O/names_ema_$S.json
  pkill -CONT -f "cheers train"
  echo DONE $S
done
