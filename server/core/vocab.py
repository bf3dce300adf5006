"""Text <-> token ids for a model's fixed vocabulary, with an explicit out-of-vocabulary policy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum

import numpy as np

from nextchar.server.core.limits import shown
from nextchar.server.core.sampling import InvalidParameterError

# How many offending characters an error message lists before it says "and N more".
_MESSAGE_LIMIT = 10


class OovPolicy(Enum):
    """What to do with characters the model has never seen."""

    ERROR = "error"      # refuse the text, naming every unknown character and where it is
    SKIP = "skip"        # drop unknown characters
    REPLACE = "replace"  # substitute a replacement character that is itself in the vocabulary


class OutOfVocabularyError(ValueError):
    """Text holds characters outside the model's vocabulary.

    chars: the distinct unknown characters in order of first appearance;
    positions: every (code-point index, char) of an unknown character.
    """

    def __init__(self, positions: list[tuple[int, str]], field: str = "text") -> None:
        self.positions = positions
        self.chars = tuple(dict.fromkeys(c for _, c in positions))
        self.field = field
        shown = ", ".join(f"{c!r} at {i}" for i, c in positions[:_MESSAGE_LIMIT])
        more = f" and {len(positions) - _MESSAGE_LIMIT} more" if len(positions) > _MESSAGE_LIMIT else ""
        super().__init__(
            f"{field}: {len(positions)} character(s) not in the model's vocabulary: {shown}{more} "
            "(use the skip or replace out-of-vocabulary policy to accept them)"
        )


def build_index(vocab: Sequence[str]) -> dict[str, int]:
    """vocab[i] is the character with id i -> {char: id}."""
    return {c: i for i, c in enumerate(vocab)}


def check_replacement(replacement: str | None, vocab_index: dict[str, int]) -> int:
    """The token id of a REPLACE policy's replacement, which must be one vocabulary character."""
    if replacement is None or len(replacement) != 1:
        raise InvalidParameterError(
            "oov_replacement",
            f"must be exactly one character for the replace policy, got {shown(replacement)}")
    if replacement not in vocab_index:
        raise InvalidParameterError(
            "oov_replacement", f"{replacement!r} is not in the model's vocabulary itself")
    return vocab_index[replacement]


def encode(
    text: str,
    vocab_index: dict[str, int],
    policy: OovPolicy = OovPolicy.ERROR,
    replacement: str | None = None,
    *,
    field: str = "text",
) -> np.ndarray:
    """text -> int64[T] token ids, one per code point, applying `policy` to unknown characters.

    `field` names the request field in error messages (e.g. "prompt").
    """
    replacement_id = check_replacement(replacement, vocab_index) if policy is OovPolicy.REPLACE else -1
    found = [vocab_index.get(c, -1) for c in text]
    ids = np.array(found, dtype=np.int64)
    if -1 not in found:  # the common case (a keystroke: one char) without an array scan
        return ids
    unknown = np.flatnonzero(ids < 0)
    if policy is OovPolicy.ERROR:
        raise OutOfVocabularyError([(int(i), text[i]) for i in unknown], field=field)
    if policy is OovPolicy.SKIP:
        return ids[ids >= 0]
    ids[unknown] = replacement_id
    return ids


def decode(ids: Iterable[int], vocab: Sequence[str]) -> str:
    """Token ids -> text."""
    return "".join(vocab[int(i)] for i in ids)
