#!/usr/bin/env bash
# Install what running a model without Python needs: client/js's npm packages and Debian's chromium. Safe to re-run.
#
# - npm: `npm ci` from the committed package-lock.json, with install scripts off. onnxruntime-node ships
#   its CPU binaries inside the npm package; its postinstall would only try to download CUDA files from
#   outside the registry, which we neither need nor can reach. Skipped when the lock file is unchanged.
# - chromium: headless browser for tests/e2e/test_edge.py's page test. Skipped when already installed.
# EDGE_SKIP_BROWSER=1 skips chromium (for a Node-only setup).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v npm >/dev/null; then
  echo "install_edge: npm not found; install Node.js >= 18 with npm (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
stamp=client/js/node_modules/.nextchar-lock.sha256
want=$(sha256sum client/js/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  (cd client/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  echo "$want" >"$stamp"
fi

if [ "${EDGE_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "install_edge: chromium not found and not root; run: apt-get install -y --no-install-recommends chromium" >&2
    exit 1
  fi
  # Another apt client may hold the lock for a while (a parallel install); wait for it instead of failing.
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium
fi
