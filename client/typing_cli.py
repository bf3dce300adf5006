"""`nextchar type`: the likely next characters as you type, over a Session (on a terminal, or from a pipe)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any, TextIO

ERASE = ("\x7f", "\b")  # backspace / delete: remove the last character
ACCEPT = "\t"           # in a terminal: append the most likely next character
QUIT = ("\x04", "\x03")  # Ctrl-D, Ctrl-C


def run(client: Any, args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """One line per keystroke on a pipe (`<length>\\t<char> <p> ...`); a live status line on a terminal."""
    from nextchar.client.errors import InvalidArgument, ResourceExhausted

    live = stdin.isatty()
    opened = client.session(args.model, version=args.model_version, n=args.n, temperature=args.temperature,
                            oov_policy=args.oov, oov_replacement=args.oov_replacement, timeout=args.timeout)
    with opened as session, _raw(stdin, live):
        text, best = "", list[Any]()
        for key in _keys(stdin):
            if live and key in QUIT:
                break
            try:
                if key in ERASE:
                    if not text:
                        continue
                    update, text = session.delete(1), text[:-1]
                else:
                    key = best[0].char if live and key == ACCEPT and best else key
                    update = session.append(key)
                    if update.text_chars > len(text):  # not a key --oov skip left out
                        text += key
            except (InvalidArgument, ResourceExhausted) as e:  # the session goes on without the key
                print(f"nextchar type: {e}", file=sys.stderr)
                continue
            best = update.predictions
            shown = "  ".join(f"{p.char!r} {p.probability:.4f}" for p in best)
            if live:
                tail = text[-40:].replace("\n", "⏎")
                stdout.write(f"\r\033[K{tail}  │ {shown}")
            else:
                stdout.write(f"{update.text_chars}\t{shown}\n")
            stdout.flush()
        if live:
            stdout.write("\n")
    return 0


def _keys(stdin: TextIO) -> Iterator[str]:
    while True:
        key = stdin.read(1)
        if not key:
            return
        yield key


@contextlib.contextmanager
def _raw(stdin: TextIO, live: bool) -> Iterator[None]:
    """A terminal sends each key as it is pressed, unechoed (cbreak), until the block ends."""
    if not live:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(stdin.fileno())
    try:
        tty.setcbreak(stdin.fileno())
        new = termios.tcgetattr(stdin.fileno())
        new[3] &= ~termios.ECHO
        termios.tcsetattr(stdin.fileno(), termios.TCSADRAIN, new)
        yield
    finally:
        termios.tcsetattr(stdin.fileno(), termios.TCSADRAIN, saved)
