"""Packaging of the client: PEP 561 markers, so users' type checkers read nextchar's annotations."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_packages_carry_py_typed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir, package_data = config["package-dir"], config.get("package-data", {})
    for package in ("nextchar", "nextchar.client"):  # the top-level marker covers every subpackage
        assert package in config["packages"]
        assert "py.typed" in package_data.get(package, []), f"{package}: py.typed not in package-data"
        assert (ROOT / package_dir[package] / "py.typed").is_file(), f"{package_dir[package]}/py.typed"
