#!/usr/bin/env bash
# Reproduce the embedded model from scratch: data -> stage 0 (VAE) -> joint stage -> continued joint stage (flat LR)
# -> its fp16 package -> second continued stage from that package -> its fp16 package -> stage 6 (latent-to-pixel
# decoder trainable, frame-filling single-object curriculum) -> its fp16 package -> stage 8 (a middle rung of the
# size ladder + the scene-description text twins) -> its fp16 package -> stage 9 (the text twins weighted up)
# -> its fp16 package -> stage 10 (picture twins of the yes/no and MCQ text twins) -> its fp16 package -> stage 12
# (shape-naming questions at three object sizes) -> its fp16 package -> stage 13 (more ShapesWorld-size shape names)
# -> the average of stage 12's and stage 13's exports -> its fp16 package -> stage 18 (flow times drawn near the
# noise) -> the fp16 package of its EMA -> stage 19 (nearer the noise) -> its fp16 package -> stage 20 (nearer
# still, 20 % uniform draws) -> the average of stage 19's export and stage 20's EMA -> its fp16 package -> stage 24
# (picture multiple-choice questions at ~30 % of the samples, generation share unchanged), stages 24b, 24c and 24d
# (the same from the same package, three more seeds) -> the average of the four EMAs -> stage 25 (only the
# generation head trained, on the generation and edit samples) -> stage 26 (the same, continued from stage 25's EMA)
# -> the fp16 package of its EMA into src/cheers/assets/cheers-shapes.
# Same seed -> same weights on the same machine (single process, fixed seeds everywhere).
# Resumable: re-running continues each stage from its latest checkpoint.
#   JOINT_STEPS: where the joint stage stops on its 4,000-step cosine schedule (the shipped model: all 4,000).
#   CONTINUE_STEPS: where the continued stage stops on its 5,000-step schedule (the shipped model: all 5,000).
#   CONTINUE2_STEPS: where the second continued stage stops on its 4,000-step schedule (the shipped model: all 4,000).
#   STAGE6_STEPS: where stage 6 (decoder trainable + frame-filling curriculum) stops on its 3,000-step schedule
#   (the shipped model: all 3,000).
#   STAGE8_STEPS: where stage 8 stops on its 2,800-step schedule (the shipped model: all 2,800).
#   STAGE9_STEPS: where stage 9 stops on its 1,800-step schedule (the shipped model: all 1,800).
#   STAGE10_STEPS: where stage 10 stops on its 2,800-step schedule (the shipped model: all 2,800).
#   STAGE12_STEPS: where stage 12 stops on its 4,200-step schedule (the shipped model: all 4,200).
#   STAGE13_STEPS: where stage 13 stops on its 3,600-step schedule (the shipped model: all 3,600).
#   STAGE18_STEPS: where stage 18 stops on its 3,000-step schedule (all 3,000; stage 19 starts from its EMA).
#   STAGE19_STEPS: where stage 19 stops on its 1,500-step schedule (the shipped model: all 1,500).
#   STAGE20_STEPS: where stage 20 stops on its 2,000-step schedule (the shipped model: all 2,000, its EMA).
#   STAGE24_STEPS: where stage 24 stops on its 2,000-step schedule (the shipped model: all 2,000, its EMA).
#   STAGE24B_STEPS: where stage 24b stops on its 2,000-step schedule (the shipped model: all 2,000, its EMA).
#   STAGE24C_STEPS: where stage 24c stops on its 2,000-step schedule (the shipped model: all 2,000, its EMA).
#   STAGE24D_STEPS: where stage 24d stops on its 2,000-step schedule (the shipped model: all 2,000, its EMA).
#   STAGE25_STEPS: where stage 25 (head only) stops on its 1,500-step schedule (all 1,500; stage 26 starts from its EMA).
#   STAGE26_STEPS: where stage 26 (head only) stops on its 3,000-step schedule (the shipped model: all 3,000, its EMA).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
CHEERS=.venv/bin/cheers
OUT=runs/embedded
JOINT_STEPS=${JOINT_STEPS:-4000}
CONTINUE_STEPS=${CONTINUE_STEPS:-5000}
CONTINUE2_STEPS=${CONTINUE2_STEPS:-4000}
STAGE6_STEPS=${STAGE6_STEPS:-3000}
STAGE8_STEPS=${STAGE8_STEPS:-2800}
STAGE9_STEPS=${STAGE9_STEPS:-1800}
STAGE10_STEPS=${STAGE10_STEPS:-2800}
STAGE12_STEPS=${STAGE12_STEPS:-4200}
STAGE13_STEPS=${STAGE13_STEPS:-3600}
STAGE18_STEPS=${STAGE18_STEPS:-3000}
STAGE19_STEPS=${STAGE19_STEPS:-1500}
STAGE20_STEPS=${STAGE20_STEPS:-2000}
STAGE24_STEPS=${STAGE24_STEPS:-2000}
STAGE24B_STEPS=${STAGE24B_STEPS:-2000}
STAGE24C_STEPS=${STAGE24C_STEPS:-2000}
STAGE24D_STEPS=${STAGE24D_STEPS:-2000}
STAGE25_STEPS=${STAGE25_STEPS:-1500}
STAGE26_STEPS=${STAGE26_STEPS:-3000}
[ -f $OUT/data/tokenizer/tokenizer.json ] || $PY scripts/embedded/make_data.py --out $OUT/data
[ -f $OUT/stage0_vae/export/config.json ] || $CHEERS train scripts/embedded/stage0_vae.yaml model.channels_last=true --resume "$@"
[ -d $OUT/joint/ckpt/step_$JOINT_STEPS ] || $CHEERS train scripts/embedded/stage2_joint.yaml model.channels_last=true \
  debug.max_steps_this_run=$JOINT_STEPS --resume "$@"
# the continued stage starts from runs/embedded/joint/export, the joint stage's export at its last step
[ -d $OUT/continue/ckpt/step_$CONTINUE_STEPS ] || $CHEERS train scripts/embedded/stage3_continue.yaml \
  model.channels_last=true debug.max_steps_this_run=$CONTINUE_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/continue/ckpt/step_$CONTINUE_STEPS $OUT/continue/export_step_$CONTINUE_STEPS
# the second continued stage starts from the fp16 package of the first (what shipped in between)
$PY scripts/embedded/package.py --export $OUT/continue/export_step_$CONTINUE_STEPS --dest $OUT/continue/package
[ -d $OUT/continue2/ckpt/step_$CONTINUE2_STEPS ] || $CHEERS train scripts/embedded/stage4_continue2.yaml \
  model.channels_last=true debug.max_steps_this_run=$CONTINUE2_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/continue2/ckpt/step_$CONTINUE2_STEPS $OUT/continue2/export_step_$CONTINUE2_STEPS
$PY scripts/embedded/vae_ceiling.py --model $OUT/stage0_vae/export --n 20 > $OUT/vae_ceiling.json
# stage 6 starts from the fp16 package of the second continued stage (what shipped before it)
$PY scripts/embedded/package.py --export $OUT/continue2/export_step_$CONTINUE2_STEPS --dest $OUT/continue2/package
[ -f $OUT/data/shapes_big_generation.jsonl ] || $PY scripts/embedded/make_big_objects.py --out $OUT/data
[ -d $OUT/big/ckpt/step_$STAGE6_STEPS ] || $CHEERS train scripts/embedded/p10/stage6_big.yaml model.channels_last=true \
  debug.max_steps_this_run=$STAGE6_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/big/ckpt/step_$STAGE6_STEPS $OUT/big/export_step_$STAGE6_STEPS
# stage 8 starts from the fp16 package of stage 6 (what shipped before it)
$PY scripts/embedded/package.py --export $OUT/big/export_step_$STAGE6_STEPS --dest $OUT/big/package
[ -f $OUT/data/shapes_mid_generation.jsonl ] || $PY scripts/embedded/make_big_objects.py --out $OUT/data --name mid \
  --min-size 0.34 --max-size 0.55 --jitter 0.2 --keep-texture
[ -f $OUT/data/scene_text.jsonl ] || $PY scripts/embedded/make_scene_text.py --out $OUT/data
[ -d $OUT/stage8/ckpt/step_$STAGE8_STEPS ] || $CHEERS train scripts/embedded/p12/stage8_ladder.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE8_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage8/ckpt/step_$STAGE8_STEPS $OUT/stage8/export_step_$STAGE8_STEPS
# stage 9 starts from the fp16 package of stage 8
$PY scripts/embedded/package.py --export $OUT/stage8/export_step_$STAGE8_STEPS --dest $OUT/stage8/package
[ -d $OUT/stage9/ckpt/step_$STAGE9_STEPS ] || $CHEERS train scripts/embedded/p12/stage9_text.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE9_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage9/ckpt/step_$STAGE9_STEPS $OUT/stage9/export_step_$STAGE9_STEPS
# stage 10 starts from the fp16 package of stage 9; its picture twins (scene_text.jsonl is rewritten byte-identical)
$PY scripts/embedded/package.py --export $OUT/stage9/export_step_$STAGE9_STEPS --dest $OUT/stage9/package
[ -f $OUT/data/scene_pictures.jsonl ] || $PY scripts/embedded/make_scene_text.py --out $OUT/data --pictures yesno,mcq
[ -d $OUT/stage10/ckpt/step_$STAGE10_STEPS ] || $CHEERS train scripts/embedded/p13/stage10_pictures.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE10_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage10/ckpt/step_$STAGE10_STEPS $OUT/stage10/export_step_$STAGE10_STEPS
# stage 12 starts from the fp16 package of stage 10 (stage 11 was measured and not shipped); shape-naming questions
$PY scripts/embedded/package.py --export $OUT/stage10/export_step_$STAGE10_STEPS --dest $OUT/stage10/package
[ -f $OUT/data/shape_names.jsonl ] || $PY scripts/embedded/make_shape_names.py --out $OUT/data
[ -d $OUT/stage12/ckpt/step_$STAGE12_STEPS ] || $CHEERS train scripts/embedded/p14/stage12_names.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE12_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage12/ckpt/step_$STAGE12_STEPS $OUT/stage12/export_step_$STAGE12_STEPS
# stage 13 starts from the fp16 package of stage 12; 6,000 more ShapesWorld-size naming questions
$PY scripts/embedded/package.py --export $OUT/stage12/export_step_$STAGE12_STEPS --dest $OUT/stage12/package
[ -f $OUT/data/shape_names_scenes.jsonl ] || $PY scripts/embedded/make_shape_names.py --out $OUT/data \
  --n 6000,0,0 --start 3000 --file shape_names_scenes.jsonl
[ -d $OUT/stage13/ckpt/step_$STAGE13_STEPS ] || $CHEERS train scripts/embedded/p15/stage13_scene_names.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE13_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage13/ckpt/step_$STAGE13_STEPS $OUT/stage13/export_step_$STAGE13_STEPS
# the midpoint of stage 12 and stage 13 (stage 13 alone draws worse; p15/RESULTS.md)
$PY scripts/embedded/average_exports.py --a $OUT/stage12/export_step_$STAGE12_STEPS \
  --b $OUT/stage13/export_step_$STAGE13_STEPS --alpha 0.5 --dest $OUT/soup50/export
$PY scripts/embedded/package.py --export $OUT/soup50/export --dest $OUT/soup50/package --cfg 5 --cfg-interval 0,0.4
# stage 18 starts from the midpoint's fp16 package; flow times drawn near the noise
[ -d $OUT/stage18/ckpt/step_$STAGE18_STEPS ] || $CHEERS train scripts/embedded/p18/stage18_near_noise.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE18_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage18/ckpt/step_$STAGE18_STEPS $OUT/stage18/export_ema_step_$STAGE18_STEPS --ema
$PY scripts/embedded/package.py --export $OUT/stage18/export_ema_step_$STAGE18_STEPS --dest $OUT/stage18/package_ema \
  --cfg 5 --cfg-interval 0,0.4
# stage 19 starts from the fp16 package of stage 18's EMA; flow times nearer the noise
[ -d $OUT/stage19/ckpt/step_$STAGE19_STEPS ] || $CHEERS train scripts/embedded/p18/stage19_nearer_noise.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE19_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage19/ckpt/step_$STAGE19_STEPS $OUT/stage19/export_step_$STAGE19_STEPS
$PY scripts/embedded/package.py --export $OUT/stage19/export_step_$STAGE19_STEPS --dest $OUT/stage19/package \
  --cfg 5 --cfg-interval 0,0.4
# stage 20 starts from stage 19's fp16 package; 80 % of flow times nearer still, 20 % uniform; its EMA is kept
[ -d $OUT/stage20/ckpt/step_$STAGE20_STEPS ] || $CHEERS train scripts/embedded/p20/stage20_mixture.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE20_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage20/ckpt/step_$STAGE20_STEPS $OUT/stage20/export_ema_step_$STAGE20_STEPS --ema
# the shipped weights: the midpoint of stage 19 and stage 20's EMA (each alone is worse at drawing or at answering;
# p20/RESULTS.md)
$PY scripts/embedded/average_exports.py --a $OUT/stage19/export_step_$STAGE19_STEPS \
  --b $OUT/stage20/export_ema_step_$STAGE20_STEPS --alpha 0.5 --dest $OUT/soup1920/export
# sampling default: 40 renoise steps, CFG 5 only for t <= 0.4 (session 20, p22/RESULTS.md); this package shipped
# in sessions 19-23
$PY scripts/embedded/package.py --export $OUT/soup1920/export --dest $OUT/soup1920/package \
  --cfg 5 --cfg-interval 0,0.4 --sampler renoise --steps 40
# stage 24 starts from that package: 8,000 fresh picture MCQs at ~30 % of the samples, taken from the text twins'
# share, not from generation's (p24/RESULTS.md)
[ -f $OUT/data/shapes_mcq_fresh.jsonl ] || $PY -c "from cheers.eval.shapes import make_dataset; \
make_dataset('$OUT/data', {'mcq': 8000}, 23, 'train', 64, meta='none', name='shapes_mcq_fresh')"
# stage 24 and its re-runs from the same package with other seeds (24b, 24c: p25/RESULTS.md; 24d: p26/RESULTS.md).
# Each EMA alone draws worse than the package; the running mean of the EMAs does not, and keeps the MCQ skill they
# share: soup24b = the midpoint of 24 and 24b (shipped in session 25), soup24c = the mean of three, soup24d = the
# mean of four (shipped in session 26). Session 24 shipped the package + stage 24 EMA midpoint.
MEMBERS="24:p24/stage24_mcq_same_generation.yaml 24b:p25/stage24b_seed241.yaml 24c:p25/stage24c_seed242.yaml
  24d:p26/stage24d_seed243.yaml"
k=0
MEAN=
for member in $MEMBERS; do
  tag=${member%%:*}
  steps_var=STAGE$(echo "$tag" | tr a-z A-Z)_STEPS
  steps=${!steps_var}
  [ -d $OUT/stage$tag/ckpt/step_$steps ] || $CHEERS train scripts/embedded/${member#*:} \
    model.channels_last=true debug.max_steps_this_run=$steps --resume "$@"
  $PY scripts/embedded/export_step.py $OUT/stage$tag/ckpt/step_$steps $OUT/stage$tag/export_ema_step_$steps --ema
  k=$((k + 1))
  if [ $k -eq 1 ]; then
    MEAN=$OUT/stage$tag/export_ema_step_$steps
  else  # mean of k = (k - 1)/k of the mean of k - 1 + 1/k of the new EMA
    $PY scripts/embedded/average_exports.py --a $MEAN --b $OUT/stage$tag/export_ema_step_$steps \
      --alpha "$($PY -c "print(1 / $k)")" --dest $OUT/soup$tag/export
    MEAN=$OUT/soup$tag/export
  fi
done
# stage 25 starts from the mean of four and trains only the generation head (gen_projector, hi_gate, hi_projector,
# time_embed) on the generation and edit sources; understanding reads none of those, so it is unchanged; stage 26
# continues it from its EMA (p27/RESULTS.md). Stage 26's EMA is shipped (session 27).
[ -d $OUT/stage25/ckpt/step_$STAGE25_STEPS ] || $CHEERS train scripts/embedded/p27/stage25_head_only.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE25_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage25/ckpt/step_$STAGE25_STEPS $OUT/stage25/export_ema_step_$STAGE25_STEPS --ema
[ -d $OUT/stage26/ckpt/step_$STAGE26_STEPS ] || $CHEERS train scripts/embedded/p27/stage26_head_only_more.yaml \
  model.channels_last=true debug.max_steps_this_run=$STAGE26_STEPS --resume "$@"
$PY scripts/embedded/export_step.py $OUT/stage26/ckpt/step_$STAGE26_STEPS $OUT/stage26/export_ema_step_$STAGE26_STEPS --ema
$PY scripts/embedded/package.py --export $OUT/stage26/export_ema_step_$STAGE26_STEPS \
  --dest src/cheers/assets/cheers-shapes --cfg 5 --cfg-interval 0,0.4 --sampler renoise --steps 40
# measurements for the model card (held-out evaluation split, seed 1)
$PY scripts/embedded/evaluate.py --model src/cheers/assets/cheers-shapes --out $OUT/eval --n 20 --n-digits 100 --compare-samplers
