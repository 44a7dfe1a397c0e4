#!/usr/bin/env bash
# Build a Debian bookworm base image without any image registry (none is reachable on the
# project's build machines): debootstrap a minimal root file system and `podman import` it.
# Cached: does nothing when the image already exists (FORCE=1 rebuilds it).
#
#   deploy/build_base_image.sh [IMAGE]        default IMAGE: localhost/deltamem-base:bookworm
#
# Needs root, debootstrap and podman (apt-get install -y podman runc debootstrap).
# The Dockerfile works on this base (it installs python3.11 + venv with apt) as well as on
# python:3.11-slim-bookworm, its default.
set -euo pipefail

IMAGE=${1:-${BASE_IMAGE:-localhost/deltamem-base:bookworm}}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ -z "${FORCE:-}" ]] && podman image exists "$IMAGE"; then
    echo "base image $IMAGE exists (FORCE=1 to rebuild)"
    exit 0
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y podman runc debootstrap)" >&2; exit 1; }
done

ROOTFS=$(mktemp -d /tmp/deltamem-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap $SUITE into $ROOTFS ($MIRROR)"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# Same mirror and security updates as the official images; empty apt lists (smaller image).
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin
tar -C "$ROOTFS" --numeric-owner -c . | podman import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$IMAGE"
echo "built $IMAGE"
