#!/usr/bin/env bash
# Build the local base image without any image registry: a Debian root filesystem from apt's own mirror
# (debootstrap), with Python and a virtualenv at /opt/venv on PATH, imported with `docker import`.
# Its interface matches python:3.11-slim for our Dockerfiles: `python` and `pip` on PATH, apt inside.
#   deploy/base-image.sh [IMAGE]        (default prunecascade-base:bookworm; reused if it exists)
# Needs root, debootstrap and a running Docker engine. Takes about 2-4 minutes once.
set -euo pipefail

IMAGE=${1:-prunecascade-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
# apt's configured mirror (deb822 or one-line format), else Debian's default one.
MIRROR=${DEBIAN_MIRROR:-$(
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security; } | head -n1 || true
)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE exists: reused"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

ROOTFS=$(mktemp -d /var/tmp/prunecascade-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR"
chroot "$ROOTFS" python3 -m venv /opt/venv
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/*

tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    --message "debootstrap $SUITE from $MIRROR, python venv at /opt/venv" \
    - "$IMAGE"
docker run --rm "$IMAGE" python -c 'import sys; print("base image ready:", sys.version.split()[0])'
