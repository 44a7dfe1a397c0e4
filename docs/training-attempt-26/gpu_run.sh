#!/usr/bin/env bash
# Attempt 26 on a lent GPU: rebuild the model, collect the served inputs of train chats
# (attempt 21's templates) and the 32 held-out chats in parallel processes until a deadline,
# then fit role_keys.py's copy heads (--fit-only, its defaults: run B) at each gate in $BETAS,
# side by side. $OUT/rk_beta*.fit.pt come back (~2 MB each); the adapters are built on the CPU
# with --from-fit. Tested on the CPU (DEVICE=cpu PROCS=2 BS=4 HELD=2 SKIP_UNPACK=1); not yet
# run on a GPU: the one lease of 2026-11-28 was refused at its first call.
# From the repository root with docs/ and deltamem/adapters/ moved out (the 64 MiB upload
# limit) and in .dev/ (ignored, carried): the scripts of attempts 18-26 in .dev/scripts, the
# shipped adapter's four base heads in .dev/base4 (role_keys.py SHIPPED .dev/base4 --narrow-base;
# the inputs depend on them alone: the copy heads are silent while collecting), tools/offline_gpu/pack.py's output. Call 1 (carry
# .dev/meta, .dev/meta-part0):
#   mkdir -p /root/meta && cp .dev/meta/* /root/meta/ && cp .dev/meta-part0/blob /root/blob0
# call 2 (carry .dev/meta-part1, .dev/base4, .dev/scripts): BUDGET=540 .dev/scripts/gpu_run.sh
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=.:.dev/scripts DELTAMEM_CACHE_DIR=${DELTAMEM_CACHE_DIR:-/tmp/dmc}
BUDGET=${BUDGET:-540}        # seconds for the whole script
COLLECT=${COLLECT:-300}      # no new block starts after this many seconds
PROCS=${PROCS:-14}           # train collectors (one more collects the held-out chats)
BS=${BS:-12}                 # chats a block
BETAS=${BETAS:-"0.2 0.1"}
DEVICE=${DEVICE:-cuda}
META=${META:-/root/meta} BLOBS=${BLOBS:-/root/blob0,.dev/meta-part1/blob}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
log=$OUT/run.log
if [ -z "${SKIP_UNPACK:-}" ]; then
  python3 tools/offline_gpu/unpack.py $META $BLOBS $DELTAMEM_CACHE_DIR/models/SmolLM2-135M-Instruct \
      > $log 2>&1 || { cat $log; exit 1; }
fi
A="python3 .dev/scripts/fit_gates.py .dev/base4 /tmp/x --cache /tmp/c26 --answer-tokens 3 \
   --chats 100000 --held ${HELD:-32} --more-templates --device $DEVICE --block-size $BS"
( OMP_NUM_THREADS=1 $A --collect-block -1 > /tmp/col-held.log 2>&1 && touch /tmp/done-held ) &
for p in $(seq 0 $((PROCS - 1))); do
  ( b=$p
    while [ $(( $(date +%s) - T0 )) -lt $COLLECT ]; do
      OMP_NUM_THREADS=1 $A --collect-block $b >> /tmp/col$p.log 2>&1 || break
      b=$((b + PROCS))
    done ) &
done
wait
echo "collection: $(( $(date +%s) - T0 )) s, $(ls /tmp/c26_*_train_* 2>/dev/null | wc -l) train blocks" | tee -a $log
nvidia-smi --query-gpu=name,memory.used --format=csv >> $log 2>&1
[ -f /tmp/done-held ] || { tail -5 /tmp/col-held.log >> $log; cat $log; exit 1; }
tail -c 400 /tmp/col0.log | tr '\r' '\n' | tail -3 >> $log
left=$(( BUDGET - ($(date +%s) - T0) ))
echo "fits with $left s left" | tee -a $log
for beta in $BETAS; do
  ( OMP_NUM_THREADS=$(( 16 / $(echo $BETAS | wc -w) )) timeout $((left - 10)) \
      python3 .dev/scripts/role_keys.py .dev/base4 $OUT/rk_beta$beta --cache /tmp/c26 \
      --chats 100000 --beta $beta --fit-only > $OUT/fit_beta$beta.log 2>&1 ) &
done
wait
grep -hv "Warn\|Loading\|Consider\|return" $OUT/fit_beta*.log | tee -a $log
echo "done: $(( $(date +%s) - T0 )) s" | tee -a $log
