"""Server fixtures: a real nextchar server on 127.0.0.1, port 0, over the exported test models.

The server runs in this process, on its own event loop in a background thread, so tests can read its
runner's counters (e.g. how many steps a cancelled generation took) without parsing logs. Readiness
comes from the health RPC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from server_harness import ServerThread, server_config


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[ServerThread]:
    """One server per test module over lstm/gru/rnn, with small limits so bad-input tests are cheap."""
    s = ServerThread(server_config(model_repo, max_prompt_chars=2000, max_new_chars=5000, grace_seconds=2.0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def make_server(model_repo: Path) -> Iterator[Callable[..., ServerThread]]:
    """Factory for servers with other settings (or another repository); all stopped at module end."""
    started: list[ServerThread] = []

    def make(repo: Path | None = None, **overrides: Any) -> ServerThread:
        s = ServerThread(server_config(repo or model_repo, **overrides))
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


