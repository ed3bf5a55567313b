#!/usr/bin/env bash
# Reproduce the embedded model from scratch: data -> stage 0 (VAE) -> joint stage -> fp16 export into the package.
# Same seed -> same weights on the same machine (single process, fixed seeds everywhere).
# Resumable: re-running continues each stage from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
CHEERS=.venv/bin/cheers
OUT=runs/embedded
[ -f $OUT/data/tokenizer/tokenizer.json ] || $PY scripts/embedded/make_data.py --out $OUT/data
[ -f $OUT/stage0_vae/export/config.json ] || $CHEERS train scripts/embedded/stage0_vae.yaml model.channels_last=true --resume "$@"
[ -f $OUT/joint/export/config.json ] || $CHEERS train scripts/embedded/stage2_joint.yaml model.channels_last=true --resume "$@"
$PY scripts/embedded/package.py --export $OUT/joint/export --dest src/cheers/assets/cheers-shapes
