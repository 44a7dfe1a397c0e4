#!/usr/bin/env bash
# Attempt 21 on a lent GPU: rebuild the model, collect the inputs of N train chats (more
# templates) and the 32 held-out chats in parallel processes, then fit layers 16-23.
# The run of the record (H100, 2026-11-27), from the repository root with docs/ and
# deltamem/adapters/ moved out (the 64 MiB upload limit) and in .dev/ (ignored, carried):
# the scripts of attempts 18-21 in .dev/scripts, attempt 12's adapter in .dev/att12, and
# tools/offline_gpu/pack.py's output. Call 1 (carry .dev/meta, .dev/meta-part0):
#   mkdir -p /root/meta && cp .dev/meta/* /root/meta/ && cp .dev/meta-part0/blob /root/blob0
# call 2 (carry .dev/meta-part1, .dev/att12, .dev/scripts): BUDGET=560 .dev/scripts/gpu_run.sh
# $OUT/att21.fit.pt comes back; the adapter is built on the CPU with fit_address.py --from-fit.
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=.:.dev/scripts DELTAMEM_CACHE_DIR=/tmp/dmc
BLOCKS=${BLOCKS:-12}; N=${N:-$((80 * BLOCKS))}; BUDGET=${BUDGET:-560}
python3 tools/offline_gpu/unpack.py /root/meta /root/blob0,.dev/meta-part1/blob \
    $DELTAMEM_CACHE_DIR/models/SmolLM2-135M-Instruct > $OUT/fit.log 2>&1 || { cat $OUT/fit.log; exit 1; }
A="python3 .dev/scripts/fit_address.py .dev/att12 $OUT/att21 --chats $N --held ${HELD:-32} --more-templates --device ${DEVICE:-cuda} --cache /tmp/c"
for b in $(seq -1 $((BLOCKS - 1))); do
  ( OMP_NUM_THREADS=1 timeout $((BUDGET - 330)) $A --collect-block $b > /tmp/col$b.log 2>&1 && touch /tmp/done$b ) &
done
wait
echo "collection: $(( $(date +%s) - T0 )) s" | tee -a $OUT/fit.log
for b in $(seq -1 $((BLOCKS - 1))); do echo "block $b: $(ls /tmp/done$b 2>/dev/null) $(tail -c 300 /tmp/col$b.log | tr '\r' '\n' | tail -2)"; done >> $OUT/fit.log
[ -f /tmp/done-1 ] || { cat $OUT/fit.log; exit 1; }
n=0; while [ -f /tmp/done$n ]; do n=$((n+1)); done
[ $n -gt 0 ] || { cat $OUT/fit.log; exit 1; }
left=$(( BUDGET - ($(date +%s) - T0) ))
C=$(( 80 * n < N ? 80 * n : N ))
echo "fit on $C chats, $left s left" | tee -a $OUT/fit.log
nvidia-smi --query-gpu=name,memory.used --format=csv >> $OUT/fit.log 2>&1
$A --chats $C --batch ${BATCH:-32} --steps ${STEPS:-1200} --fit-only \
   --minutes $(python3 -c "print(($left - 15) / 60)") 2>&1 | grep -v Loading | tee -a $OUT/fit.log
