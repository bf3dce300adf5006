"""`nextchar train` and `nextchar export`; torch is imported inside the commands, never at import time."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from nextchar.training.config import CELLS, FLAGS, RECIPES, SCHEDULES, ConfigError, TrainConfig

# argparse dest -> TrainConfig field, for the flags that build a TrainConfig (all default to None so
# that an unset flag takes TrainConfig's own default, and so --preset can refuse flags it would ignore).
_FIELDS = {flag.lstrip("-").replace("-", "_"): field for field, flag in FLAGS.items()}
_TYPES = {"lr": float, "dropout": float, "input_dropout": float, "weight_decay": float, "grad_clip": float,
          "min_lr_ratio": float, "ema": float,
          "max_minutes": float, "val_fraction": float, "temperature": float, "corpus": str, "cell": str,
          "schedule": str}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_HELP = {
    "corpus": "goethe, anthem or a UTF-8 file",
    "schedule": "default cosine over --max-steps, or cosine-time over --max-minutes when no --max-steps",
    "max_steps": "stop after this many steps (0 = no step limit)",
    "max_minutes": "stop after this much wall time, evaluations included (0 = no limit)",
    "ema": "evaluate, checkpoint and export an exponential moving average of the weights with this decay "
           "per step, e.g. 0.998 (default 0 = off: the weights as trained)",
    "patience": f"stop after this many evaluations without a new best val loss (default "
                f"{_DEFAULTS['patience']}; 0 = never)",
}


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a character model (a seminar preset, or char-rnn style)",
                       description="Train on a built-in corpus (goethe, anthem) or a UTF-8 file. With "
                       "--preset, reproduce the seminar's runs exactly; otherwise train on contiguous "
                       "streams with truncated BPTT, evaluation, checkpoints and --resume.")
    t.add_argument("--preset", help="seed-rnn (Goethe, RNN, 51 epochs) or seed-lstm (anthem, LSTM, 100): the "
                   "seminar's runs; or a char-rnn recipe (shakespeare) whose settings other flags override")
    for dest, field in _FIELDS.items():
        if field == "seed":
            continue
        flag = "--" + dest.replace("_", "-")
        t.add_argument(flag, dest=dest, type=_TYPES.get(field, int),
            choices={"schedule": SCHEDULES, "cell": CELLS}.get(field),
            help=_HELP.get(field, f"default {_DEFAULTS[field]}"))
    t.add_argument("--seed", type=int, default=0, help="torch seed: initial weights, dropout, data order")
    t.add_argument("--out", type=Path, help="run directory (default runs/<preset or corpus>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default): CUDA when present, else CPU; CUDA trains with bf16 autocast")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=train_command)

    pr = sub.add_parser("prepare", help="encode a UTF-8 file once into a memory-mapped token file",
                        description="Write DIR/tokens.bin (uint16, or uint32 for vocabularies over 65,536) "
                        "and DIR/meta.json (vocabulary, sha256) in streaming passes; `nextchar train "
                        "--corpus DIR` then reads the tokens from disk instead of holding the text.")
    pr.add_argument("--corpus", type=Path, required=True, help="a UTF-8 text file (any size)")
    pr.add_argument("--out", type=Path, required=True, help="directory for tokens.bin and meta.json")
    pr.set_defaults(func=prepare_command)

    e = sub.add_parser("export", help="export a checkpoint to <repo>/<name>/<version>/ (ONNX + manifest)")
    e.add_argument("--checkpoint", type=Path, required=True, help="a .pt written by `nextchar train`")
    e.add_argument("--repo", type=Path, required=True, help="model repository directory")
    e.add_argument("--name", required=True, help="model name in the repository")
    e.add_argument("--version", type=int, help="version number (default: latest + 1)")
    e.add_argument("--int8", action="store_true", help="also write a dynamically quantized int8 variant")
    e.set_defaults(func=export_command)


def _fail(command: str, message: str, code: int) -> int:
    print(f"nextchar {command}: error: {message}", file=sys.stderr)
    return code


def train_command(args: argparse.Namespace) -> int:
    given = {field: getattr(args, dest) for dest, field in _FIELDS.items()
             if field != "seed" and getattr(args, dest) is not None}
    if args.threads is not None and args.threads < 1:
        return _fail("train", f"--threads must be >= 1, got {args.threads}", 2)
    if args.preset in RECIPES:
        given = {**RECIPES[args.preset], **given}
    elif args.preset is not None:
        device = args.device not in ("auto", "cpu")  # the seminar's runs are CPU runs
        if given or args.resume or device:
            flags = [FLAGS[f] for f in given] + (["--resume"] if args.resume else []) + (
                [f"--device {args.device}"] if device else [])
            return _fail("train", f"--preset fixes corpus, model and schedule; drop {', '.join(flags)}", 2)
        return _run_preset(args)
    if "corpus" not in given:
        return _fail("train", "give --preset NAME or --corpus NAME|PATH", 2)
    if "schedule" not in given:
        # A time budget alone gives cosine no step horizon; decay over the budget's minutes instead.
        given["schedule"] = "cosine" if given.get("max_steps") else "cosine-time"
    try:
        config = TrainConfig(seed=args.seed, **given)
    except ConfigError as e:
        return _fail("train", str(e), 2)
    out = args.out or Path("runs") / (args.preset or Path(config.corpus).stem)

    import torch

    from nextchar.training import runtime
    from nextchar.training.checkpoint import CheckpointError
    from nextchar.training.corpora import CorpusError
    from nextchar.training.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rt = runtime.start(args.device)
    except ConfigError as e:
        return _fail("train", str(e), 2)
    finished, status = False, 0
    try:
        train(config, out, resume=args.resume, progress=not args.no_progress, runtime=rt)
        finished = True
    except ConfigError as e:
        status = _fail("train", str(e), 2)
    except (CorpusError, CheckpointError, OSError) as e:
        status = _fail("train", str(e), 1)
    except KeyboardInterrupt:
        # last.pt is always whole (atomic writes), so the run can continue from it
        status = _fail("train", f"interrupted; continue with the same flags and --resume (--out {out})", 130)
    finally:
        runtime.stop(rt, finished=finished)
    if rt.distributed:
        # The group is left and every file written: skip the interpreter's C++ teardown, where gloo's
        # threads still abort a process now and then ("terminate called without an active exception",
        # rank 1 of a clean-clone CI run, even after stop()'s barrier).
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def prepare_command(args: argparse.Namespace) -> int:
    from nextchar.training.corpora import CorpusError
    from nextchar.training.tokens import prepare

    try:
        c = prepare(args.corpus, args.out)
    except (CorpusError, OSError) as e:
        return _fail("prepare", str(e), 1)
    print(f"{args.out}: {len(c.tokens):,} tokens ({c.tokens.dtype.name}), vocab {len(c.vocab)}, "
          f"sha256 {c.sha256}")
    return 0


def _run_preset(args: argparse.Namespace) -> int:
    if args.seed < 0:
        return _fail("train", f"seed (--seed) must be >= 0, got {args.seed}", 2)
    import time

    import torch

    from nextchar.training.checkpoint import Checkpoint, save_checkpoint
    from nextchar.training.corpora import CorpusError
    from nextchar.training.metrics import plot_losses, write_metrics
    from nextchar.training.presets import get_preset, train_preset
    from nextchar.training.train import LAST

    try:
        preset = get_preset(args.preset)
    except ConfigError as e:
        return _fail("train", str(e), 2)
    out = args.out or Path("runs") / preset.name
    if (out / LAST).exists():
        return _fail("train", f"--out {str(out)!r} already holds a run; choose another --out", 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    def show(epoch: int, loss: float, text: str) -> None:
        if epoch % preset.print_every == 0 or epoch == preset.epochs:
            print(f"------ {epoch} ------")  # the seminar's format
            print(text)

    t0 = time.perf_counter()
    try:
        r = train_preset(preset, args.seed, show)
    except CorpusError as e:
        return _fail("train", str(e), 1)
    seconds = time.perf_counter() - t0
    history = [*r.history, {"epoch": preset.epochs, "loss": None, "accuracy": r.accuracy}]
    save_checkpoint(out / LAST, Checkpoint(
        model_config=r.model.config, vocab=r.vocab, model_state=r.model.state_dict(),
        step=preset.epochs, epoch=preset.epochs, metrics=history, corpus=r.corpus.info(),
        train_seconds=seconds, seed=args.seed, train_config={"preset": preset.name, **preset.to_dict()},
        reconstruction=r.reconstruction, accuracy=r.accuracy,
    ))
    write_metrics(out, history)
    plot_losses(out / "loss.png", history, "epoch", {"loss": "train (all windows)"},
                f"{preset.name} on {preset.corpus}, seed {args.seed}")
    print(f"reconstruction accuracy {r.accuracy:.2%} vs text[1:] after {preset.epochs} epochs; "
          f"checkpoint {out / LAST}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from nextchar.training.checkpoint import CheckpointError
    from nextchar.training.export import ExportError, export_checkpoint

    try:
        path = export_checkpoint(args.checkpoint, args.repo, args.name, version=args.version, int8=args.int8)
    except (ExportError, CheckpointError, OSError) as e:
        return _fail("export", str(e), 1)
    print(path)
    return 0
