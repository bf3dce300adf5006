"""The `nextchar` command line: one entry point; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import sys

from nextchar.client import admin_commands, commands
from nextchar.server.edge import cli as serve_cli
from nextchar.training import cli as train_cli

# Modules that expose `register(subparsers)`. They must be cheap to import: anything heavy (torch,
# onnxruntime, grpc) is imported inside the command functions, so `nextchar serve` never loads torch.
COMMAND_MODULES = (
    train_cli,       # train, export
    serve_cli,       # serve
    commands,        # generate, predict, score, models, health
    admin_commands,  # admin reload | load | unload
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextchar",
        description="Train, export and serve character-level recurrent language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
