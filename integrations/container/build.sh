#!/usr/bin/env bash
# Builds the mtckpt image where no base image can be pulled, from Debian's packages and
# PyPI only: mmdebstrap makes the base (Debian bookworm, minbase as debian:bookworm-slim),
# buildah packs it as an image, then builds integrations/container/Containerfile on it,
# the same recipe `docker build` takes.
#
#   integrations/container/build.sh [IMAGE]     default ghcr.io/mtckpt/mtckpt:<version>
#
# Needs: apt-get install mmdebstrap buildah (podman to run the image). Environment:
# MTCKPT_DEBIAN_MIRROR (default http://deb.debian.org/debian); MTCKPT_REBUILD_BASE=1 makes
# the base again (it is kept as localhost/mtckpt-base:bookworm between builds).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml")
image=${1:-ghcr.io/mtckpt/mtckpt:$version}
suite=bookworm
mirror=${MTCKPT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/mtckpt-base:$suite

for tool in mmdebstrap buildah; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install $tool)" >&2; exit 2; }
done

if [[ ${MTCKPT_REBUILD_BASE:-0} == 1 ]] || ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "build.sh: making $base from $mirror" >&2
    mmdebstrap --quiet --variant=minbase \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        "$suite" "$work/rootfs.tar" "$mirror"
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$work/rootfs.tar" /
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash --label "org.opencontainers.image.base.name=debian:$suite-slim (mmdebstrap)" \
        "$container"
    buildah commit --quiet --rm "$container" "$base" >/dev/null
fi

args=(--layers --format docker --isolation chroot --network host
      --build-arg "BASE=$base" --build-arg "VERSION=$version"
      --file "$repo/integrations/container/Containerfile" --tag "$image")
# pip in the build stage trusts what this host trusts (a TLS-intercepting proxy's CA).
bundle=/etc/ssl/certs/ca-certificates.crt
if [[ -r $bundle ]]; then
    args+=(--volume "$bundle:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
buildah build "${args[@]}" "$repo"
echo "build.sh: built $image" >&2
