#!/usr/bin/env bash
# Build the CPU image with podman and check that a container of it answers chat completions.
# No Docker engine and no image registry are needed (shared/DESIGN.md §3):
#
#   1. a Debian bookworm base from debootstrap + `podman import` (cached: deploy/build_base_image.sh)
#   2. `podman build --network host --format docker` of ./Dockerfile on that base
#   3. the container on the host network, on a free port, embedded store (SQLite) and fresh
#      volumes: the model is fetched at first start; wait for /health, run the image's
#      HEALTHCHECK, check the user is not root, send two turns of one session with curl
#   4. the same container again with REDIS_URL pointing at a private redis-server (the model is
#      in the cache volume now): one more session turn, and the session is in Redis
#   (vLLM's engine needs more shared memory than the default 64 MB: --shm-size 1g)
#   5. clean up (containers, volumes, redis-server; the images are kept as a build cache)
#
# Environment: IMAGE (default localhost/deltamem:test), BASE_IMAGE (default: the debootstrapped
# base; set python:3.11-slim-bookworm where a registry is reachable), TORCH_INDEX, WHEELS (a
# local wheel folder mounted into the build, default /opt/wheels when it holds torch+cpu),
# HOST_CA (a CA bundle pip must trust, default $PIP_CERT), SKIP_BUILD=1 (test an existing
# image), SKIP_REDIS=1, START_TIMEOUT (seconds, default 900), EXTRA_PIP_PACKAGES,
# EXTRA_BUILD_ARGS (space-separated NAME=VALUE, e.g. BAKE_MODEL=1).
# Needs root, podman, runc, debootstrap, curl, python3 (apt-get install -y podman runc debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/deltamem:test}
BASE_IMAGE=${BASE_IMAGE:-localhost/deltamem-base:bookworm}
START_TIMEOUT=${START_TIMEOUT:-900}
T0=$(date +%s)
log() { echo "[test-image +$(( $(date +%s) - T0 ))s] $*"; }
die() { log "FAIL: $*"; exit 1; }

for tool in podman runc curl python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y podman runc debootstrap curl)"
done

# Podman settings that work in this kind of machine (a container without systemd or a
# writable ulimit): runc, no default ulimits. A private containers.conf, nothing global edited.
CONF_DIR=$(mktemp -d /tmp/deltamem-test-image.XXXXXX)
cat >"$CONF_DIR/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$CONF_DIR/containers.conf"
PODMAN=(podman --runtime runc)

SUFFIX=$$
CTR=deltamem-test-$SUFFIX
VOL_DATA=deltamem-test-data-$SUFFIX
VOL_CACHE=deltamem-test-cache-$SUFFIX
REDIS_PID=
cleanup() {
    rc=$?
    if [[ $rc -ne 0 ]] && "${PODMAN[@]}" container exists "$CTR" 2>/dev/null; then
        echo "---- container log (tail) ----"
        "${PODMAN[@]}" logs --tail 60 "$CTR" 2>&1 || true
    fi
    "${PODMAN[@]}" rm -f -t 5 "$CTR" >/dev/null 2>&1 || true
    "${PODMAN[@]}" volume rm -f "$VOL_DATA" "$VOL_CACHE" >/dev/null 2>&1 || true
    if [[ -n "$REDIS_PID" ]]; then kill "$REDIS_PID" 2>/dev/null || true; fi
    rm -rf "$CONF_DIR"
    exit $rc
}
trap cleanup EXIT

# A CA bundle pip must trust (a TLS-intercepting proxy): mounted into the build and into the
# container (the first start downloads the model with pip). Default: the host's PIP_CERT.
HOST_CA=${HOST_CA-${PIP_CERT:-}}
[[ -z "$HOST_CA" || -f "$HOST_CA" ]] || HOST_CA=
run_ca=()
if [[ -n "$HOST_CA" ]]; then
    run_ca=(-v "$HOST_CA:/etc/ssl/certs/host-ca.crt:ro" -e PIP_CERT=/etc/ssl/certs/host-ca.crt)
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1-2: build -------------------------------------------------------------------------------
if [[ -z "${SKIP_BUILD:-}" ]]; then
    if [[ "$BASE_IMAGE" == localhost/deltamem-base:* ]]; then
        log "base image $BASE_IMAGE"
        deploy/build_base_image.sh "$BASE_IMAGE"
    fi
    build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    WHEELS=${WHEELS-/opt/wheels}
    if [[ -n "$WHEELS" ]] && compgen -G "$WHEELS/torch-2.13.0+cpu-*.whl" >/dev/null; then
        # torch==2.13.0+cpu lies on this machine: mount it into the build.
        build_args+=(-v "$WHEELS:/wheels:ro" --build-arg LOCAL_WHEELS=/wheels
                     --build-arg "TORCH_INDEX=${TORCH_INDEX-}")
    elif [[ -n "${TORCH_INDEX+x}" ]]; then
        build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
    fi
    if [[ -n "$HOST_CA" ]]; then
        build_args+=(-v "$HOST_CA:/etc/ssl/certs/build-ca.crt:ro"
                     --build-arg BUILD_CA_CERT=/etc/ssl/certs/build-ca.crt)
    fi
    for a in ${EXTRA_BUILD_ARGS:-}; do build_args+=(--build-arg "$a"); done
    if [[ -n "${EXTRA_PIP_PACKAGES:-}" ]]; then
        build_args+=(--build-arg "EXTRA_PIP_PACKAGES=$EXTRA_PIP_PACKAGES")
    fi
    log "building $IMAGE (${build_args[*]})"
    b0=$(date +%s)
    "${PODMAN[@]}" build --network host --format docker "${build_args[@]}" -t "$IMAGE" . \
        || die "image build failed"
    log "built $IMAGE in $(( $(date +%s) - b0 ))s"
fi
SIZE=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $(( SIZE / 1000000 )) MB"

# --- 3: run on the embedded store -------------------------------------------------------------
"${PODMAN[@]}" volume create "$VOL_DATA" >/dev/null
"${PODMAN[@]}" volume create "$VOL_CACHE" >/dev/null

start_container() {  # extra `podman run` arguments
    PORT=$(free_port)
    URL="http://127.0.0.1:$PORT"
    "${PODMAN[@]}" rm -f -t 5 "$CTR" >/dev/null 2>&1 || true
    "${PODMAN[@]}" run -d --name "$CTR" --network host --shm-size 1g \
        -v "$VOL_DATA:/data" -v "$VOL_CACHE:/cache" \
        -e DELTAMEM_PORT="$PORT" -e DELTAMEM_KV_CACHE_GIB=1 -e DELTAMEM_MAX_NUM_SEQS=8 \
        -e DELTAMEM_DEFAULT_MAX_TOKENS=32 -e DELTAMEM_ALLOW_OPEN=true "${run_ca[@]}" "$@" "$IMAGE" >/dev/null
    local s0 deadline
    s0=$(date +%s)
    deadline=$(( s0 + START_TIMEOUT ))
    until curl -sf "$URL/health" >/dev/null 2>&1; do
        [[ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$CTR")" == true ]] \
            || die "container exited before /health answered"
        (( $(date +%s) < deadline )) || die "no /health after ${START_TIMEOUT}s"
        sleep 3
    done
    log "healthy on $URL after $(( $(date +%s) - s0 ))s: $(curl -s "$URL/health")"
}

chat() {  # session_id message -> prints the response body; fails unless well formed
    local body
    body=$(python3 -c 'import json, sys; print(json.dumps({"model": "SmolLM2-135M-Instruct", "session_id": sys.argv[1], "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": sys.argv[2]}]}))' "$1" "$2")
    curl -sf -m 120 "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "$body" \
        || die "chat completion failed"
}

check_turn() {  # response expected_version
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
text = r["choices"][0]["message"]["content"]
assert isinstance(text, str) and text.strip(), "empty answer"
assert r["usage"]["completion_tokens"] > 0, r["usage"]
assert r["session"]["version"] == int(sys.argv[2]), r["session"]
print("  answer (v%d): %r" % (r["session"]["version"], text))
' "$1" "$2" || die "malformed answer: $1"
}

log "run 1: embedded store, fresh volumes (fetches the model at first start)"
start_container
"${PODMAN[@]}" healthcheck run "$CTR" >/dev/null || die "the image's HEALTHCHECK failed"
log "HEALTHCHECK ok"
uid=$("${PODMAN[@]}" exec "$CTR" id -u)
[[ "$uid" != 0 ]] || die "the server runs as root"
log "runs as uid $uid"
curl -sf "$URL/v1/models" | python3 -c 'import json, sys; m = json.load(sys.stdin); print("  model:", m["data"][0]["id"])' \
    || die "/v1/models failed"
check_turn "$(chat image-test "My name is Alice and I live in Lisbon.")" 1
check_turn "$(chat image-test "Where do I live?")" 2

# --- 4: the same image on Redis ---------------------------------------------------------------
if [[ -z "${SKIP_REDIS:-}" ]] && command -v redis-server >/dev/null; then
    RPORT=$(free_port)
    redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    log "run 2: REDIS_URL=redis://127.0.0.1:$RPORT/0 (model already in the cache volume)"
    start_container -e REDIS_URL="redis://127.0.0.1:$RPORT/0"
    check_turn "$(chat image-redis "Remember: the code is 4417.")" 1
    check_turn "$(chat image-redis "What is the code?")" 2
    keys=$(redis-cli -p "$RPORT" dbsize)
    (( keys > 0 )) || die "no keys in Redis after two committed turns"
    log "redis holds $keys keys"
fi

log "PASS: image $IMAGE ($(( SIZE / 1000000 )) MB) answers chat completions"
