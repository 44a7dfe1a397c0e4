#!/usr/bin/env bash
# Train on a GPU machine with torch and transformers but no network and no install of this
# project: rebuild the default model from pack.py's output, then run the trainer from the
# checkout. Usage (from the repository root):
#   tools/offline_gpu/train.sh META_DIR BLOB,BLOB OUT_DIR [deltamem train options...]
# OUT_DIR gets the run; a tarball of it without optimizer states lands in $OUT if that is set.
set -euo pipefail
meta=$1 blobs=$2 out=$3
shift 3
export PYTHONUNBUFFERED=1 PYTHONPATH=. DELTAMEM_CACHE_DIR=${DELTAMEM_CACHE_DIR:-/tmp/deltamem-cache}
python3 tools/offline_gpu/unpack.py "$meta" "$blobs" "$DELTAMEM_CACHE_DIR/models/SmolLM2-135M-Instruct"
mkdir -p "$out"
# Not installed there, so the CLI runs from the checkout; `serve` shows as unavailable.
python3 -m deltamem.cli train "$@" --out-dir "$out"
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/run.tgz" --exclude=optimizer.pt -C "$(dirname "$out")" "$(basename "$out")"
fi
