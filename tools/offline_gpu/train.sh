#!/usr/bin/env bash
# Train on a GPU machine with torch and transformers but no network and no install of this
# project: rebuild the default model from pack.py's output, then run the trainer from the
# checkout. Usage (from the repository root):
#   tools/offline_gpu/train.sh META_DIR BLOB,BLOB OUT_DIR [deltamem train options...]
# OUT_DIR gets the run. If $OUT is set, $OUT/run.tgz brings back the trained adapter folder and
# the run's logs, or the last checkpoint when the trainer did not end well (one adapter, not
# both: the machine returns at most 8 files of 16 MiB). A tarball over 15 MiB (an adapter with
# five or more state heads) comes back in pieces, run.tgz.part00, part01, ...:
# `cat run.tgz.part* > run.tgz`.
# TRAIN_TIMEOUT_S=N stops the trainer after N seconds and still writes the tarball.
# SKIP_UNPACK=1 uses the model already rebuilt in $DELTAMEM_CACHE_DIR (sweep.sh's runs).
set -uo pipefail
meta=$1 blobs=$2 out=$3
shift 3
export PYTHONUNBUFFERED=1 PYTHONPATH=. DELTAMEM_CACHE_DIR=${DELTAMEM_CACHE_DIR:-/tmp/deltamem-cache}
if [ -z "${SKIP_UNPACK:-}" ]; then
    python3 tools/offline_gpu/unpack.py "$meta" "$blobs" \
        "$DELTAMEM_CACHE_DIR/models/SmolLM2-135M-Instruct" || exit 1
fi
mkdir -p "$out"
# Not installed there, so the CLI runs from the checkout; `serve` shows as unavailable.
${TRAIN_TIMEOUT_S:+timeout "$TRAIN_TIMEOUT_S"} python3 -m deltamem.cli train "$@" --out-dir "$out"
rc=$?
if [ -n "${OUT:-}" ]; then
    logs=$(cd "$out" && ls -d metrics.jsonl log.txt loss.png final_eval.json 2>/dev/null)
    # adapter/ is written at the run's end: after a stop it may be an earlier run's.
    if [ $rc -eq 0 ] && [ -f "$out/adapter/adapter.safetensors" ]; then
        tar czf "$OUT/run.tgz" -C "$out" adapter $logs
    elif [ -d "$out/last" ]; then
        tar czf "$OUT/run.tgz" -C "$out" --exclude=optimizer.pt last $logs
    fi
    if [ -f "$OUT/run.tgz" ] && [ "$(stat -c %s "$OUT/run.tgz")" -gt $((15 * 1024 * 1024)) ]; then
        split -b 15M -d "$OUT/run.tgz" "$OUT/run.tgz.part" && rm "$OUT/run.tgz"
    fi
fi
exit $rc
