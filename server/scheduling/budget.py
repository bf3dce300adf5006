"""Admission by memory: every model call reserves an estimate of its peak bytes from one budget, so
what callers send cannot take the server past what its configuration allows."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from nextchar.server.core.prefill import PREFILL_CHUNK

# Bytes per logit of one engine call at its peak: the float32 logits (x2: a single row is padded to two
# for batch invariance) and scoring's float64 log-softmax with its temporaries (3 x 8).
_BYTES_PER_LOGIT = 2 * 4 + 3 * 8
# Bytes per request character held for the whole call: its token id, scored log-prob, the Python
# objects of a per-char answer and the protobuf message (measured ~100; rounded up).
_BYTES_PER_CHAR = 160


class MemoryBudgetError(RuntimeError):
    """The call would take the server past --memory-budget-mb; retry later or send less."""


def call_bytes(chars: int, vocab_size: int, rows: int = 1, chunk: int = PREFILL_CHUNK) -> int:
    """Estimated peak bytes of one call on `chars` characters (prompt, context + text): the logits of
    one engine call of at most `chunk` positions (server.core.prefill) plus per-character storage."""
    return rows * (min(max(chars, 1), chunk) * vocab_size * _BYTES_PER_LOGIT + chars * _BYTES_PER_CHAR)


class MemoryBudget:
    """`limit_bytes` shared by all calls in flight; `reserve` refuses (MemoryBudgetError) a call whose
    estimate does not fit beside the others'. Thread-safe; a reservation ends with its call."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.reserved = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._lock:
            if self.reserved + nbytes > self.limit_bytes:
                mib = 1 << 20
                raise MemoryBudgetError(
                    f"memory budget: this call needs ~{nbytes / mib:.1f} MiB and "
                    f"{self.reserved / mib:.1f} of {self.limit_bytes / mib:.0f} MiB are reserved by calls "
                    "in flight (--memory-budget-mb); retry later or send a shorter text")
            self.reserved += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.reserved -= nbytes
