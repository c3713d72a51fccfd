#!/usr/bin/env bash
# Makes the debian:bookworm-slim base image locally when no image registry is reachable:
# debootstrap (minbase) from the same Debian mirror this host's apt uses, then docker import.
# Does nothing when the image exists already.
set -euo pipefail
IMAGE=debian:bookworm-slim
docker image inspect "$IMAGE" >/dev/null 2>&1 && exit 0
docker pull -q "$IMAGE" >/dev/null 2>&1 && exit 0
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "base-image: no Debian mirror found in this host's apt sources" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
tar -C "$root" -c . | docker import - "$IMAGE" >/dev/null
echo "base-image: $IMAGE imported"
