"""Build hook: generate the protobuf code from proto/ before packaging (pyproject.toml holds the metadata)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProto(build_py):
    def run(self) -> None:
        runpy.run_path(str(Path(__file__).parent / "scripts" / "gen_proto.py"))["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
