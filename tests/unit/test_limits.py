"""The documented limits are the defined ones (issue 13.11, 15.3), and error quoting stays bounded."""

from __future__ import annotations

import tomllib
from pathlib import Path

from nextchar.server.core.limits import MAX_SHOWN_CHARS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, shown

ROOT = Path(__file__).resolve().parents[2]


def test_the_stop_limits_are_documented_as_defined() -> None:
    wanted = f"{MAX_STOP_SEQUENCES} stop sequences of 1 to {MAX_STOP_CHARS} characters"
    assert wanted in (ROOT / "proto" / "nextchar" / "v1" / "inference.proto").read_text()
    assert wanted.replace("stop", "`stop`") in (ROOT / "docs" / "api.md").read_text()


def test_error_positions_are_documented_as_code_points() -> None:
    assert "count Unicode code points" in (ROOT / "docs" / "api.md").read_text()


def test_the_license_is_an_spdx_string() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


def test_shown_quotes_a_bounded_prefix() -> None:
    assert shown("abc") == "'abc'"
    long = shown("x" * 100_000)
    assert long.startswith("'" + "x" * MAX_SHOWN_CHARS + "'") and "100000 characters" in long
    assert len(shown(list(range(10_000)))) <= MAX_SHOWN_CHARS + 3


def test_flush_chars_is_documented_as_a_threshold() -> None:
    """Issue 13.7: a message carries everything buffered; the flag never promised a cap it cannot keep."""
    import argparse

    from nextchar.server.ops.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    [action] = [a for a in parser._actions if a.dest == "flush_chars"]
    assert "threshold, not a cap" in action.help and "most characters" not in action.help
    assert "`--flush-chars` is a threshold, not a cap" in (ROOT / "docs" / "api.md").read_text()
