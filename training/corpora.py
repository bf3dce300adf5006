"""Built-in corpora, exactly as the teaching material has them, and UTF-8 file loading."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# Johann Wolfgang von Goethe, as in the seminar: one line, no final period.
GOETHE = "Knowing is not enough; we must apply. Willing is not enough; we must do"

# The first verse of the US anthem, as in the seminar: 8 lines, typographic apostrophes (’).
ANTHEM = (
    "O say can you see, by the dawn’s early light,\n"
    "What so proudly we hail’d at the twilight’s last gleaming,\n"
    "Whose broad stripes and bright stars through the perilous fight\n"
    "O’er the ramparts we watch’d were so gallantly streaming?\n"
    "And the rocket’s red glare, the bombs bursting in air,\n"
    "Gave proof through the night that our flag was still there,\n"
    "O say does that star-spangled banner yet wave\n"
    "O’er the land of the free and the home of the brave?"
)

BUILTIN: dict[str, str] = {"goethe": GOETHE, "anthem": ANTHEM}


class CorpusError(ValueError):
    """A corpus that cannot be trained on; the message says why."""


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def info(self) -> dict:
        """The provenance a checkpoint records (tokens.TokenCorpus.info has the same keys)."""
        return {"name": self.name, "sha256": self.sha256, "bytes": self.num_bytes, "chars": len(self.text)}


def load_corpus(name_or_path: str) -> Corpus:
    """A built-in corpus by name, or a UTF-8 text file by path."""
    if name_or_path in BUILTIN:
        return Corpus(name_or_path, BUILTIN[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise CorpusError(
            f"unknown corpus {name_or_path!r}: not a built-in corpus ({', '.join(sorted(BUILTIN))}) "
            "and not a file"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"corpus {str(path)!r} is not UTF-8: invalid byte 0x{data[e.start]:02x} at byte offset {e.start}"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a BOM is an encoding marker, not a character of the text
    return Corpus(path.name, text)


def build_vocab(text: str) -> list[str]:
    """Sorted distinct characters: the same vocabulary in every process (unlike list(set(text)))."""
    return sorted(set(text))
