#!/usr/bin/env bash
# Reproduce the 16-token embedded candidate (`cheers-small-p8`) from scratch: data -> stage 0 (VAE, factor 4) ->
# joint stage (WSD) -> fp32 export -> fp16 package in runs/embedded_p8/package -> held-out evaluation.
# Same seed -> same weights on the same machine (single process, fixed seeds everywhere). Resumable: re-running
# continues each stage from its latest checkpoint. JOINT_STEPS: where the joint stage stops (all 2,300 by default).
# VISION=1: pretrain the ViT first (stage0b_vision.yaml, SigLIP-style) and run the joint stage from its export with
# the ViT frozen (stage1_joint_vision.yaml) into $OUT/joint_vfrozen (the default run without it lives in $OUT/joint).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
CHEERS=.venv/bin/cheers
OUT=runs/embedded_p8
JOINT_STEPS=${JOINT_STEPS:-2300}
[ -f $OUT/data/tokenizer/tokenizer.json ] || $PY scripts/embedded/make_data.py --out $OUT/data \
  --n-gen 2500 --n-und 2500 --n-edit 1000 --n-text 2000
[ -f $OUT/stage0_vae/export/config.json ] || $CHEERS train scripts/embedded/p8/stage0_vae.yaml model.channels_last=true --resume "$@"
$PY scripts/embedded/vae_ceiling.py --model $OUT/stage0_vae/export --n 20 > $OUT/vae_ceiling.json
J=joint; INIT=$OUT/stage0_vae/export; JOINT=scripts/embedded/p8/stage1_joint.yaml
CONT=scripts/embedded/p8/stage2_continue.yaml; CONT_DIR=$OUT/continue_joint
if [ "${VISION:-0}" = 1 ]; then
  [ -f $OUT/vision/export/config.json ] || $CHEERS train scripts/embedded/p8/stage0b_vision.yaml --resume "$@"
  J=joint_vfrozen; INIT=$OUT/vision/export; JOINT=scripts/embedded/p8/stage1_joint_vision.yaml
  CONT=scripts/embedded/p8/stage2_continue_vision.yaml; CONT_DIR=$OUT/continue_vfrozen
fi
[ -d $OUT/$J/ckpt/step_$JOINT_STEPS ] || $CHEERS train $JOINT model.channels_last=true \
  model.init=$INIT output_dir=$OUT/$J debug.max_steps_this_run=$JOINT_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/$J/ckpt/step_$JOINT_STEPS $OUT/$J/export_step_$JOINT_STEPS
$PY scripts/embedded/package.py --export $OUT/$J/export_step_$JOINT_STEPS --dest $OUT/package_$J
$PY scripts/embedded/evaluate.py --model $OUT/package_$J --out $OUT/eval_$J --n 20 --n-digits 100 --compare-samplers
# continued stage (in progress across sessions): CONTINUE_STEPS=N trains it to step N of its 5,000-step schedule,
# starting from the joint export this script just wrote
CONTINUE_STEPS=${CONTINUE_STEPS:-0}
if [ "$CONTINUE_STEPS" -gt 0 ] && [ ! -d $CONT_DIR/ckpt/step_$CONTINUE_STEPS ]; then
  $CHEERS train $CONT model.channels_last=true \
    model.init=$OUT/$J/export_step_$JOINT_STEPS output_dir=$CONT_DIR debug.max_steps_this_run=$CONTINUE_STEPS --resume "$@"
fi
