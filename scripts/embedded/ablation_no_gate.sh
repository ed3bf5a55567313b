#!/usr/bin/env bash
# The paper's central claim, tested at embedded scale: the joint stage with the high-frequency gate cut
# (Y = LN(S): no patch details injected), same data order, seed and schedule, stopped at the same step as the
# gate-on checkpoint it is compared with. Then both are evaluated with the same harness and seeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-500}
OUT=runs/embedded
.venv/bin/cheers train scripts/embedded/stage2_joint.yaml model.channels_last=true \
  model.high_frequency_gate=false output_dir=$OUT/joint_no_gate debug.max_steps_this_run=$STEPS --resume
.venv/bin/python scripts/embedded/export_step.py $OUT/joint_no_gate/ckpt/step_$STEPS $OUT/ablation/no_gate
.venv/bin/python scripts/embedded/export_step.py $OUT/joint/ckpt/step_$STEPS $OUT/ablation/gate
