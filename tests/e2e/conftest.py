"""Edge fixtures: node with client/js's packages, Debian's chromium, and the page's HTTP server.

scripts/install_edge.sh installs what is missing; the fixtures skip only when node or chromium cannot
be had on this machine.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from edge_harness import PageServer, install_edge, serve_page


@pytest.fixture(scope="session")
def node() -> str:
    """Path of `node`, with client/js's npm packages installed."""
    exe = shutil.which("node")
    if exe is None or shutil.which("npm") is None:
        pytest.skip("Node.js with npm is not installed on this machine (needed for client/js)")
    done = install_edge(skip_browser=True)
    if done.returncode != 0:
        # node and npm are here, so a failed `npm ci` is a real problem (lock file, registry), not a skip.
        pytest.fail(f"scripts/install_edge.sh failed ({done.returncode}):\n{done.stdout[-2000:]}"
                    f"{done.stderr[-3000:]}")
    return exe


@pytest.fixture(scope="session")
def chromium(node: str) -> str:
    """Path of Debian's chromium, installed by scripts/install_edge.sh when missing."""
    done = install_edge(skip_browser=False)
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip(f"chromium cannot be installed here (scripts/install_edge.sh exit {done.returncode}): "
                    f"{done.stderr.strip()[-500:]}")
    return exe


@pytest.fixture(scope="session")
def page_server(model_repo: Path) -> Iterator[PageServer]:
    with serve_page(model_repo) as server:
        yield server
