#!/usr/bin/env bash
# Stage the CPU torch wheel into docker/wheels/ (gitignored) so the trainer image installs it offline.
#
# The trainer pins torch==2.13.0. On PyPI that version for linux x86_64 is the CUDA build (GBs of
# nvidia-* wheels); the CPU build (+cpu) is not on PyPI. Where the host has the CPU wheel in a local
# directory (pip's find-links, PIP_FIND_LINKS, /opt/wheels here), we hard-link it into the build context;
# pip inside the image then prefers it (2.13.0+cpu sorts above 2.13.0). Elsewhere pass
# --build-arg TORCH_INDEX_URL=<a CPU wheel index> instead; with neither, pip takes PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=docker/wheels
mkdir -p "$dest"
IFS=' ' read -r -a dirs <<<"${PIP_FIND_LINKS:-} /opt/wheels"
for dir in "${dirs[@]}"; do
  for whl in "$dir"/torch-2.13.0+cpu-cp311-*.whl; do
    [ -f "$whl" ] || continue
    [ -f "$dest/$(basename "$whl")" ] || ln "$whl" "$dest/" 2>/dev/null || cp "$whl" "$dest/"
    echo "staged $(basename "$whl")"
    exit 0
  done
done
echo "no local torch 2.13.0+cpu cp311 wheel found in: ${dirs[*]}; the trainer image will ask its index" >&2
