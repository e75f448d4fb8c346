#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image (python:3.11-slim) without a registry:
# debootstrap a minimal Debian, add python3, pip and venv, and `docker import` it.
#
#   sudo scripts/make-base-image.sh                # -> image hearth-base:bookworm
#   docker build --build-arg BASE_IMAGE=hearth-base:bookworm .
#
# Use it where Docker Hub cannot be reached (air-gapped or registry-less machines); with a
# registry, the Dockerfile's default base is better (smaller, patched upstream).
# Needs root, debootstrap and a Debian mirror (MIRROR=...); takes a few minutes.
set -euo pipefail

IMAGE=${IMAGE:-hearth-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-pip,python3-venv,ca-certificates

if [[ $EUID -ne 0 ]]; then
    echo "error: debootstrap needs root (run with sudo)" >&2
    exit 1
fi
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y debootstrap docker.io)" >&2; exit 1; }
done

rootfs=$(mktemp -d /tmp/hearth-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap $SUITE into $rootfs (minbase + $PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"

# Slim it the way the official slim images are: no apt lists, docs or caches.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/var/cache/debconf/*-old
# Debian marks its system Python as externally managed (PEP 668); the image installs into a
# venv anyway, but `python3 -m venv` must work, and that is all the Dockerfile needs.

echo "importing as $IMAGE"
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE"
docker run --rm "$IMAGE" python3 -c 'import sys, venv, ensurepip; print("python", sys.version.split()[0], "ok")'
echo "built $IMAGE; use it with: docker build --build-arg BASE_IMAGE=$IMAGE ."
