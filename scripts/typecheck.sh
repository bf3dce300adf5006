#!/usr/bin/env bash
# mypy over server/, client/ and training/ as the `nextchar` package they install as.
# pyproject's package-dir maps the fixed top level (server/ training/ client/ proto/nextchar) into one
# import package; mypy cannot follow that mapping (nor the editable install's import hook), so it
# checks a tree of symlinks with the installed shape: build/typecheck/nextchar/{server,training,...}.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/nextchar
rm -rf build/typecheck && mkdir -p "$tree"
ln -s ../../../proto/nextchar/__init__.py "$tree/__init__.py"
for part in server training client; do ln -s "../../../$part" "$tree/$part"; done
ln -s ../../../proto/nextchar/v1 "$tree/v1"
MYPYPATH=build/typecheck exec .venv/bin/python -m mypy -p nextchar.server -p nextchar.client -p nextchar.training
