#!/usr/bin/env bash
# The training data of the cheers-shapes recipe, written to runs/embedded/data (the path every stage config reads).
# Each file comes from fixed seeds; a file that exists is kept, so a re-run only writes what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
T=recipes/cheers-shapes/tools
PY=${PY:-.venv/bin/python}
D=runs/embedded/data
# ShapesWorld (generation, understanding, edit, text-only) and real handwritten digits, train split, seed 0; and the
# small tokenizer trained on their text
[ -f $D/tokenizer/tokenizer.json ] || $PY $T/make_data.py --out $D
# the size ladder: one object filling the frame on a plain background, and one of 0.34-0.55 of the side anywhere on
# ShapesWorld's backgrounds (stage 05 on / stage 06 on)
[ -f $D/shapes_big_generation.jsonl ] || $PY $T/make_big_objects.py --out $D
[ -f $D/shapes_mid_generation.jsonl ] || $PY $T/make_big_objects.py --out $D --name mid \
  --min-size 0.34 --max-size 0.55 --jitter 0.2 --keep-texture
# the scene questions asked about a description of the scene (scene_text.jsonl, stage 06 on) and the yes/no and
# multiple-choice ones also over the scene's picture (scene_pictures.jsonl, stage 08 on)
[ -f $D/scene_pictures.jsonl ] || $PY $T/make_scene_text.py --out $D --pictures yesno,mcq
# shape-naming questions at three object sizes (stage 09 on), then 6,000 more at ShapesWorld's size past the indices
# already written (stage 10 on)
[ -f $D/shape_names.jsonl ] || $PY $T/make_shape_names.py --out $D
[ -f $D/shape_names_scenes.jsonl ] || $PY $T/make_shape_names.py --out $D \
  --n 6000,0,0 --start 3000 --file shape_names_scenes.jsonl
# 8,000 fresh picture multiple-choice questions, another seed than the main data (stages 14-17)
[ -f $D/shapes_mcq_fresh.jsonl ] || $PY -c "from cheers.eval.shapes import make_dataset
make_dataset('$D', {'mcq': 8000}, 23, 'train', 64, meta='none', name='shapes_mcq_fresh')"
