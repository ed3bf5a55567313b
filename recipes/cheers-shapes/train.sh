#!/usr/bin/env bash
# Rebuild the shipped model src/cheers/assets/cheers-shapes from nothing: the data (data.sh), the 19 stage configs of
# this folder in order, the weight averages between them and the fp16 package; then the measurements of the model
# card. Everything runs under runs/embedded (the path the stage configs name) from the repository root.
# One process and fixed seeds everywhere: the same machine gives the same weights. A re-run skips the finished
# stages and resumes an interrupted one from its latest checkpoint. Arguments are passed to every `cheers train`.
#   STEPS_NN: stop stage NN after that many steps of its schedule (default: all of them, as for the shipped model);
#   the exports between stages are taken at that step. PY / CHEERS: the interpreter and the `cheers` command.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=recipes/cheers-shapes
T=$R/tools
PY=${PY:-.venv/bin/python}
CHEERS=${CHEERS:-.venv/bin/cheers}
OUT=runs/embedded
ARGS=("$@")
STEPS_02=${STEPS_02:-4000}
STEPS_03=${STEPS_03:-5000}
STEPS_04=${STEPS_04:-4000}
STEPS_05=${STEPS_05:-3000}
STEPS_06=${STEPS_06:-2800}
STEPS_07=${STEPS_07:-1800}
STEPS_08=${STEPS_08:-2800}
STEPS_09=${STEPS_09:-4200}
STEPS_10=${STEPS_10:-3600}
STEPS_11=${STEPS_11:-3000}
STEPS_12=${STEPS_12:-1500}
STEPS_13=${STEPS_13:-2000}
STEPS_14=${STEPS_14:-2000}
STEPS_15=${STEPS_15:-2000}
STEPS_16=${STEPS_16:-2000}
STEPS_17=${STEPS_17:-2000}
STEPS_18=${STEPS_18:-1500}
STEPS_19=${STEPS_19:-3000}
# the sampling defaults written into every package (40 renoise steps, CFG 5 only for t <= 0.4, t = 0 the noise)
SAMPLING="--cfg 5 --cfg-interval 0,0.4 --sampler renoise --steps 40"

# train NN_NAME STEPS: stage NN_NAME.yaml (output_dir $OUT/NN_NAME) up to STEPS; skipped when that checkpoint exists,
# resumed otherwise
train() {
  [ -d $OUT/$1/ckpt/step_$2 ] || $CHEERS train $R/$1.yaml model.channels_last=true debug.max_steps_this_run=$2 \
    --resume ${ARGS[@]+"${ARGS[@]}"}
}

PY=$PY bash $R/data.sh
# 01: the autoencoder alone
[ -f $OUT/01_vae/export/config.json ] || $CHEERS train $R/01_vae.yaml model.channels_last=true --resume \
  ${ARGS[@]+"${ARGS[@]}"}
# 02: the joint stage from scratch; 03 continues from its export
train 02_joint $STEPS_02
train 03_continue $STEPS_03
$PY $T/export_step.py $OUT/03_continue/ckpt/step_$STEPS_03 $OUT/03_continue/export_step_$STEPS_03
# 04-10: each stage starts from the fp16 package of the one before
$PY $T/package.py --export $OUT/03_continue/export_step_$STEPS_03 --dest $OUT/03_continue/package
train 04_continue2 $STEPS_04
$PY $T/export_step.py $OUT/04_continue2/ckpt/step_$STEPS_04 $OUT/04_continue2/export_step_$STEPS_04
$PY $T/package.py --export $OUT/04_continue2/export_step_$STEPS_04 --dest $OUT/04_continue2/package
train 05_big_objects $STEPS_05
$PY $T/export_step.py $OUT/05_big_objects/ckpt/step_$STEPS_05 $OUT/05_big_objects/export_step_$STEPS_05
$PY $T/package.py --export $OUT/05_big_objects/export_step_$STEPS_05 --dest $OUT/05_big_objects/package
train 06_size_ladder $STEPS_06
$PY $T/export_step.py $OUT/06_size_ladder/ckpt/step_$STEPS_06 $OUT/06_size_ladder/export_step_$STEPS_06
$PY $T/package.py --export $OUT/06_size_ladder/export_step_$STEPS_06 --dest $OUT/06_size_ladder/package
train 07_scene_text $STEPS_07
$PY $T/export_step.py $OUT/07_scene_text/ckpt/step_$STEPS_07 $OUT/07_scene_text/export_step_$STEPS_07
$PY $T/package.py --export $OUT/07_scene_text/export_step_$STEPS_07 --dest $OUT/07_scene_text/package
train 08_scene_pictures $STEPS_08
$PY $T/export_step.py $OUT/08_scene_pictures/ckpt/step_$STEPS_08 $OUT/08_scene_pictures/export_step_$STEPS_08
$PY $T/package.py --export $OUT/08_scene_pictures/export_step_$STEPS_08 --dest $OUT/08_scene_pictures/package
train 09_shape_names $STEPS_09
$PY $T/export_step.py $OUT/09_shape_names/ckpt/step_$STEPS_09 $OUT/09_shape_names/export_step_$STEPS_09
$PY $T/package.py --export $OUT/09_shape_names/export_step_$STEPS_09 --dest $OUT/09_shape_names/package
train 10_scene_names $STEPS_10
$PY $T/export_step.py $OUT/10_scene_names/ckpt/step_$STEPS_10 $OUT/10_scene_names/export_step_$STEPS_10
# 11 starts from the midpoint of 09 and 10 (10 alone answers better but draws worse)
$PY $T/average_exports.py --a $OUT/09_shape_names/export_step_$STEPS_09 --b $OUT/10_scene_names/export_step_$STEPS_10 \
  --alpha 0.5 --dest $OUT/mean_09_10/export
$PY $T/package.py --export $OUT/mean_09_10/export --dest $OUT/mean_09_10/package --cfg 5 --cfg-interval 0,0.4
train 11_near_noise $STEPS_11
$PY $T/export_step.py $OUT/11_near_noise/ckpt/step_$STEPS_11 $OUT/11_near_noise/export_ema_step_$STEPS_11 --ema
$PY $T/package.py --export $OUT/11_near_noise/export_ema_step_$STEPS_11 --dest $OUT/11_near_noise/package_ema \
  --cfg 5 --cfg-interval 0,0.4
train 12_nearer_noise $STEPS_12
$PY $T/export_step.py $OUT/12_nearer_noise/ckpt/step_$STEPS_12 $OUT/12_nearer_noise/export_step_$STEPS_12
$PY $T/package.py --export $OUT/12_nearer_noise/export_step_$STEPS_12 --dest $OUT/12_nearer_noise/package \
  --cfg 5 --cfg-interval 0,0.4
train 13_noise_mixture $STEPS_13
$PY $T/export_step.py $OUT/13_noise_mixture/ckpt/step_$STEPS_13 $OUT/13_noise_mixture/export_ema_step_$STEPS_13 --ema
# 14-17 start from the midpoint of 12 and 13's EMA (each alone is worse at drawing or at answering)
$PY $T/average_exports.py --a $OUT/12_nearer_noise/export_step_$STEPS_12 \
  --b $OUT/13_noise_mixture/export_ema_step_$STEPS_13 --alpha 0.5 --dest $OUT/mean_12_13/export
$PY $T/package.py --export $OUT/mean_12_13/export --dest $OUT/mean_12_13/package $SAMPLING
# 14-17: one stage run four times with four seeds; the mean of their EMAs keeps the skill they share while the noise
# of each run partly cancels. Kept as a running mean: mean of k = (k - 1)/k of the mean of k - 1 + 1/k of the new EMA,
# written to mean_14_NN (NN: the last member in it).
MEMBERS="14_mcq_seed240 15_mcq_seed241 16_mcq_seed242 17_mcq_seed243"
k=0
MEAN=
for cfg in $MEMBERS; do
  steps_var=STEPS_${cfg%%_*}
  steps=${!steps_var}
  train $cfg $steps
  $PY $T/export_step.py $OUT/$cfg/ckpt/step_$steps $OUT/$cfg/export_ema_step_$steps --ema
  k=$((k + 1))
  if [ $k -eq 1 ]; then
    MEAN=$OUT/$cfg/export_ema_step_$steps
  else
    $PY $T/average_exports.py --a $MEAN --b $OUT/$cfg/export_ema_step_$steps \
      --alpha "$($PY -c "print(1 / $k)")" --dest $OUT/mean_14_${cfg%%_*}/export
    MEAN=$OUT/mean_14_${cfg%%_*}/export
  fi
done
# 18-19: from the mean of four, only the generation head trains; 19 continues 18's EMA
train 18_head_only $STEPS_18
$PY $T/export_step.py $OUT/18_head_only/ckpt/step_$STEPS_18 $OUT/18_head_only/export_ema_step_$STEPS_18 --ema
train 19_head_only_more $STEPS_19
$PY $T/export_step.py $OUT/19_head_only_more/ckpt/step_$STEPS_19 $OUT/19_head_only_more/export_ema_step_$STEPS_19 --ema
# the shipped package: stage 19's EMA in fp16 (the model card, README.md, is kept as it is)
$PY $T/package.py --export $OUT/19_head_only_more/export_ema_step_$STEPS_19 --dest src/cheers/assets/cheers-shapes \
  $SAMPLING
# the measurements of the model card (held-out evaluation split, seed 1) and the autoencoder's ceiling
$PY $T/evaluate.py --model src/cheers/assets/cheers-shapes --out $OUT/eval --n 20 --n-digits 100 --compare-samplers
$PY $T/vae_ceiling.py --model $OUT/01_vae/export --n 20 > $OUT/vae_ceiling.json
