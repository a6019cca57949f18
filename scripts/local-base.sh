#!/usr/bin/env bash
# A Debian bookworm base image with Python, built from Debian's packages on this machine,
# for hosts that reach Debian's mirror and PyPI but no container registry. Built once:
# an existing image of that name is kept. The base trusts what this machine trusts (its
# CA bundle, and pip is told to use it), so builds on it reach PyPI as the host does.
#   scripts/local-base.sh [IMAGE]        (default convostore-base:bookworm)
set -euo pipefail
image="${1:-convostore-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export PATH="$PATH:/usr/sbin:/sbin"

if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
rootfs="$(mktemp -d)"
chmod 755 "$rootfs"  # the image's / , which mktemp makes private
trap 'rm -rf "$rootfs"' EXIT
echo "building the base image $image from $mirror (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
ln -sf python3 "$rootfs/usr/bin/python"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null
echo "built $image"
