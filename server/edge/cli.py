"""`nextchar serve`: flags -> ServerConfig -> the gRPC server (nothing heavy is imported until it runs)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from nextchar.server.ops.config import add_arguments  # stdlib-only module: cheap

    parser = subparsers.add_parser(
        "serve", help="serve a model repository over gRPC (onnxruntime, no torch)",
        description="Serve every model of a repository over gRPC: nextchar.v1.NextChar, grpc.health.v1 and "
                    "server reflection. Each flag defaults to its NEXTCHAR_* environment variable.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from nextchar.server.core.artifact import ArtifactError
    from nextchar.server.ops.config import ConfigError, load_config

    try:
        config = load_config(vars(args))
    except ConfigError as e:
        print(f"nextchar serve: {e}", file=sys.stderr)
        return 2
    from nextchar.server.edge.app import serve  # grpc and numpy enter here; onnxruntime with the first model
    from nextchar.server.ops.reqlog import configure_logging
    from nextchar.server.ops.security import TokenError

    configure_logging(config.log_level, config.log_format)

    try:
        status = asyncio.run(serve(config))
    except TokenError as e:
        print(f"nextchar serve: {e}", file=sys.stderr)
        status = 2
    except ArtifactError as e:
        print(f"nextchar serve: cannot serve {config.model_repo}: {e}", file=sys.stderr)
        status = 1
    except OSError as e:
        print(f"nextchar serve: {e}", file=sys.stderr)
        status = 1
    except BaseException:  # a bug: its traceback as usual, unless it has to leave the quick way
        _leave_if_threads_in_onnxruntime(1, with_traceback=True)
        raise
    _leave_if_threads_in_onnxruntime(status)
    return status


def _leave_if_threads_in_onnxruntime(status: int, *, with_traceback: bool = False) -> None:
    """A model load abandoned at shutdown, or a batcher whose engine call outlasted its close, may still be
    inside onnxruntime: a normal exit would run C++ static destructors under it (SIGABRT). Leave without
    them, the logs flushed (and the exception being handled printed, `with_traceback`)."""
    from nextchar.server.scheduling.threads import detached_running

    if detached_running():
        import logging
        import os

        if with_traceback:
            import traceback

            traceback.print_exc()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
