"""`nextchar generate | predict | score | models | health`: the gRPC client (or --model-file, offline)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from nextchar.server.core.limits import DEFAULT_TEMPERATURE, MAX_STOP_CHARS, MAX_STOP_SEQUENCES

SERVER_ENV = "NEXTCHAR_SERVER"
TOKEN_ENV = "NEXTCHAR_TOKEN"
DEFAULT_SERVER = "localhost:50051"
OOV_CHOICES = ("error", "skip", "replace")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = _add(subparsers, "generate", "generate text, streamed to the terminal as it arrives", _generate)
    _model_args(p, offline=True)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-chars", type=int, default=200, help="characters to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"0 = greedy (default {DEFAULT_TEMPERATURE:g})")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely characters (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default off)")
    p.add_argument("--seed", type=int, default=None, help="replay a generation (default: a fresh seed)")
    p.add_argument("--stop", action="append", default=[],
                   help=f"stop sequence (repeatable, up to {MAX_STOP_SEQUENCES}, each 1 to {MAX_STOP_CHARS} "
                        "characters)")
    p.add_argument("--echo", action="store_true", help="print the prompt first")
    p.add_argument("--no-newline", action="store_true",
                   help="print the text exactly as generated; by default a newline (not part of the "
                        "generated text) ends the output")
    _oov_args(p)
    p.add_argument("--quiet", action="store_true", help="no summary line on stderr")

    p = _add(subparsers, "predict", "the most likely next characters after a context", _predict)
    _model_args(p, offline=True)
    p.add_argument("--context", required=True, help="the text so far")
    p.add_argument("-n", type=int, default=5, help="how many candidates (default 5)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"softmax temperature (default {DEFAULT_TEMPERATURE:g})")
    _oov_args(p)

    p = _add(subparsers, "score", "log-likelihood of a text (nats and bits per character)", _score)
    _model_args(p, offline=True)
    p.add_argument("--text", required=True, help="the text to score")
    p.add_argument("--context", default="", help="conditioning text, not scored")
    p.add_argument("--per-char", action="store_true", help="also print each character's log-probability")
    _oov_args(p)

    p = _add(subparsers, "type", "the likely next characters as you type (a typing session; "
             "reads a pipe too: one line per character)", _type)
    _model_args(p, offline=False, timeout=3600.0)  # the whole session's deadline (client.SESSION_TIMEOUT_S)
    p.add_argument("-n", type=int, default=5, help="how many candidates (default 5)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default 1)")
    _oov_args(p)

    p = _add(subparsers, "models", "list the server's models, or show one model's manifest", _models)
    _server_args(p)
    p.add_argument("name", nargs="?", help="show this model's manifest as JSON")
    p.add_argument("--model-version", type=int, default=None,
                   help="with NAME: this version (default: the server's default)")

    p = _add(subparsers, "health", "exit 0 iff the server (or one model) is SERVING", _health)
    _server_args(p, timeout=3.0)
    p.add_argument("--service", default="", help="a model name, or '' for the whole server (default)")


def _add(subparsers: argparse._SubParsersAction, name: str, help: str,
         func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=help)
    p.set_defaults(func=lambda args: _run(name, func, args))
    return p


def _server_args(p: argparse.ArgumentParser, timeout: float = 30.0) -> None:
    p.add_argument("--server", default=None,
                   help=f"host:port (default ${SERVER_ENV}, else {DEFAULT_SERVER})")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"deadline in seconds (default {timeout:g})")
    p.add_argument("--token", default=None, help=f"bearer token for the server (default ${TOKEN_ENV})")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this PEM CA certificate")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS; with --tls-key")
    p.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")


def _model_args(p: argparse.ArgumentParser, offline: bool, timeout: float = 30.0) -> None:
    _server_args(p, timeout)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model name on the server")
    if offline:
        which.add_argument("--model-file", help="run this model.onnx in-process instead (no server)")
    p.add_argument("--model-version", type=int, default=None,
                   help="model version (default: the server's default)")


def _oov_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oov", choices=OOV_CHOICES, default="error",
                   help="characters outside the vocabulary: error (default), skip or replace")
    p.add_argument("--oov-replacement", default="", help="with --oov replace: the replacement character")


def _run(name: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Errors as one line on stderr: exit 2 for bad input, 1 for anything else the server said."""
    from nextchar.client.errors import InvalidArgument, NextCharError
    from nextchar.server.core.artifact import ArtifactError

    try:
        return func(args)
    except ArtifactError as e:  # --model-file: missing, unreadable, not ONNX, not a nextchar export
        message = " ".join(str(e).split("\n"))
        model_file = getattr(args, "model_file", None)
        if model_file and model_file not in message:
            message = f"{model_file}: {message}"
        print(f"nextchar {name}: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head -c1`): stop quietly, as `yes | head` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again
        return 141  # 128 + SIGPIPE
    except InvalidArgument as e:
        print(f"nextchar {name}: {e}", file=sys.stderr)
        return 2
    except NextCharError as e:
        print(f"nextchar {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # offline mode: the inference core's InvalidParameterError / OOV errors
        print(f"nextchar {name}: {e}", file=sys.stderr)
        return 2


def _client(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from nextchar.client.client import NextCharClient
    from nextchar.client.credentials import Credentials

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    credentials = Credentials(token=args.token or os.environ.get(TOKEN_ENV) or None, tls=args.tls,
                              tls_ca=path(args.tls_ca), tls_cert=path(args.tls_cert),
                              tls_key=path(args.tls_key))
    return NextCharClient(args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER, timeout=args.timeout,
                          credentials=credentials)


def _oov_offline(args: argparse.Namespace) -> dict[str, Any]:
    from nextchar.server.core.vocab import OovPolicy

    return {"oov_policy": OovPolicy(args.oov), "oov_replacement": args.oov_replacement or None}


def _generate(args: argparse.Namespace) -> int:
    options = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed, stop=args.stop,
                   echo=args.echo)
    if args.model_file:
        from nextchar.client.offline import run_generate

        finished: list[Any] = []
        top_p = 1.0 if args.top_p is None else args.top_p
        pieces = run_generate(args.model_file, args.prompt, args.max_chars, top_p=top_p, **options,
                              **_oov_offline(args), on_finished=finished.append)
        _print_stream(pieces, newline=not args.no_newline)
        if not args.quiet and finished:
            f = finished[0]
            print(f"[{args.model_file}] finish={f.reason.value} prompt={f.usage.prompt_chars} "
                  f"generated={f.usage.generated_chars} seed={f.seed}", file=sys.stderr)
        return 0
    with _client(args) as client:
        stream = client.generate_stream(args.model, args.prompt, args.max_chars, version=args.model_version,
                                        top_p=args.top_p, oov_policy=args.oov,
                                        oov_replacement=args.oov_replacement, **options)
        with stream:
            _print_stream(stream, newline=not args.no_newline)
        s = stream.summary
        if not args.quiet and s is not None:
            print(f"[{s.model} v{s.version}] finish={s.finish_reason} prompt={s.prompt_chars} "
                  f"generated={s.generated_chars} seed={s.seed} ttfc={s.time_to_first_char_ms:.1f}ms "
                  f"total={s.total_ms:.1f}ms", file=sys.stderr)
    return 0


def _print_stream(pieces: Any, newline: bool) -> None:
    for text in pieces:
        sys.stdout.write(text)
        sys.stdout.flush()  # show each piece as it arrives
    if newline:  # so the shell prompt starts on its own line; --no-newline for byte-exact output
        sys.stdout.write("\n")
        sys.stdout.flush()


def _predict(args: argparse.Namespace) -> int:
    if args.model_file:
        from nextchar.client.offline import run_predict

        temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
        best = run_predict(args.model_file, args.context, args.n, temperature, **_oov_offline(args))
    else:
        with _client(args) as client:
            best = client.predict_next(args.model, args.context, args.n, version=args.model_version,
                                       temperature=args.temperature, oov_policy=args.oov,
                                       oov_replacement=args.oov_replacement)
    for p in best:
        print(f"{p.char!r:>6}  {p.probability:.4f}  logprob {p.logprob:.4f}")
    return 0


def _score(args: argparse.Namespace) -> int:
    if args.model_file:
        from nextchar.client.offline import OfflineModel

        r = OfflineModel.from_file(args.model_file).score(args.text, context=args.context,
                                                          per_char=args.per_char, **_oov_offline(args))
        total, per_char = r.log_likelihood_nats, r.per_char or ()
    else:
        with _client(args) as client:
            r = client.score(args.model, args.text, context=args.context, per_char=args.per_char,
                             version=args.model_version, oov_policy=args.oov,
                             oov_replacement=args.oov_replacement)
        total, per_char = r.total_logprob, r.per_char
    print(f"chars={r.scored_chars} total_logprob={total:.4f} nats_per_char={r.nats_per_char:.4f} "
          f"bits_per_char={r.bits_per_char:.4f}")
    for char, logprob in per_char:
        print(f"{char!r:>6}  {logprob:.4f}")
    return 0


def _type(args: argparse.Namespace) -> int:
    from nextchar.client.typing_cli import run

    with _client(args) as client:
        return run(client, args)


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.name:
            from google.protobuf import json_format

            info = client.get_model(args.name, args.model_version)
            print(json_format.MessageToJson(info.manifest, preserving_proto_field_name=True, indent=2))
            return 0
        models = client.list_models()
    print(f"{'NAME':<16} {'VERSION':>7}  {'VERSIONS':<10} {'CELL':<5} {'LAYERS×HIDDEN':>13} {'VOCAB':>5} "
          f"{'PARAMS':>9} {'VAL_LOSS':>8}")
    for m in models:
        a, t = m.manifest.architecture, m.manifest.training
        versions = ",".join(map(str, m.available_versions))
        shape = f"{a.num_layers}×{a.hidden_size}"
        # NaN when the run had no validation split (the teaching presets train on all of their text).
        val_loss = "-" if math.isnan(t.final_val_loss) else f"{t.final_val_loss:.4f}"
        print(f"{m.name:<16} {m.version:>7}  {versions:<10} {m.cell:<5} {shape:>13} "
              f"{a.vocab_size:>5} {a.parameter_count:>9} {val_loss:>8}")
    return 0


def _health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1
