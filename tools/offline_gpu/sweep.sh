#!/usr/bin/env bash
# Several training runs at once on one GPU machine: the default model at batch 32 leaves an
# H100 idle between kernel launches most of the time, so runs side by side cost little more
# wall clock than one. Rebuilds the model once, then runs train.sh for each line of SPEC_FILE,
# "NAME option...", all at the same time. Options after SPEC_FILE go to every run, then the
# line's own (which win where both give one), to `deltamem train` as in train.sh.
# Usage (from the repository root):
#   tools/offline_gpu/sweep.sh META_DIR BLOB,BLOB OUT_ROOT SPEC_FILE [options for every run...]
# Run NAME trains in OUT_ROOT/NAME, logs to OUT_ROOT/NAME.log and, if $OUT is set, brings back
# $OUT/NAME/run.tgz (or its pieces; the machine returns at most 8 files, so three runs of a
# five-head adapter is the most one call brings back). TRAIN_TIMEOUT_S applies to each run.
set -uo pipefail
meta=$1 blobs=$2 root=$3 spec=$4
shift 4
export PYTHONUNBUFFERED=1 PYTHONPATH=. DELTAMEM_CACHE_DIR=${DELTAMEM_CACHE_DIR:-/tmp/deltamem-cache}
python3 tools/offline_gpu/unpack.py "$meta" "$blobs" "$DELTAMEM_CACHE_DIR/models/SmolLM2-135M-Instruct" \
    || exit 1
mkdir -p "$root"
pids=() names=()
while read -r name opts; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    run_out=${OUT:+$OUT/$name}  # empty without $OUT: train.sh then packs nothing
    [ -z "$run_out" ] || mkdir -p "$run_out"
    # shellcheck disable=SC2086  # the options are words on purpose
    OUT=$run_out SKIP_UNPACK=1 tools/offline_gpu/train.sh "$meta" "$blobs" "$root/$name" \
        "$@" $opts > "$root/$name.log" 2>&1 &
    pids+=($!) names+=("$name")
done < "$spec"
rc=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; r=$?
    echo "sweep: ${names[$i]} exited $r"
    tail -n 3 "$root/${names[$i]}.log"
    [ $r -eq 0 ] || rc=$r
done
exit $rc
