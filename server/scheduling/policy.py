"""The scheduling rules as pure functions of counts and clocks: who is admitted, how prompts group, K.

BatchCore (batching.py) applies them every tick; tests drive them with a fake clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nextchar.server.core.limits import MAX_BATCH_SIZE, MAX_CHARS_PER_CALL


class BatchingConfigError(ValueError):
    """An invalid batching setting; the message names it and the allowed range."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64       # rows per engine call, decode and prefill alike
    max_wait_s: float = 0.0        # an arrival at an idle batcher waits this long for others to join
    max_active_streams: int = 256  # streams decoding at once; more arrivals wait in the queue
    max_queue: int = 256           # arrivals waiting for a free stream slot; beyond: CapacityError
    max_chars_per_call: int = 64   # K's ceiling: chars each stream advances per engine call (1 = per char)
    max_call_s: float = 0.03       # K is cut so one engine call lasts about this long (cancel latency)
    burst_gap_s: float = 0.0       # arrivals closer than this form a burst, admitted once it pauses (0 = off)

    def __post_init__(self) -> None:
        checks = {
            "max_batch_size": (self.max_batch_size, 1, MAX_BATCH_SIZE),
            "max_wait_s": (self.max_wait_s, 0.0, 10.0),
            "max_active_streams": (self.max_active_streams, 1, 1 << 20),
            "max_queue": (self.max_queue, 0, 1 << 20),
            "max_chars_per_call": (self.max_chars_per_call, 1, MAX_CHARS_PER_CALL),
            "max_call_s": (self.max_call_s, 0.0, 10.0),
            "burst_gap_s": (self.burst_gap_s, 0.0, 1.0),
        }
        for name, (value, lo, hi) in checks.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise BatchingConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def admit_count(arrivals: Sequence[float], active: int, now: float, config: BatchingConfig,
                previous: float | None = None) -> tuple[int, float | None]:
    """The collector: how many waiting arrivals (oldest first) to prefill now, and if none, how long to wait.

    Flush on size (a full batch is waiting, or every free slot would be filled), on time (the oldest
    has waited max_wait_s), or at once when streams are already active (the loop is running anyway).
    A burst waits for its end: when the newest arrival came within burst_gap_s of the one before it
    (`previous`: the newest already admitted, if none waits before it), nothing is admitted until
    arrivals pause for burst_gap_s, or the oldest has waited max_call_s; then the burst's prefills go
    in one call per prompt length and its streams decode together, rather than a call per arrival
    while the rest are still coming. A lone arrival is not a burst: it starts at once.
    Returns (n, None) or (0, seconds until the wait ends); (0, None) when there is no room
    or nobody is waiting.
    """
    free = config.max_active_streams - active
    if not arrivals or free <= 0:
        return 0, None
    n = min(len(arrivals), free)
    full = n >= config.max_batch_size or n == free
    gap = config.burst_gap_s
    if gap > 0 and not full:
        newest, before = arrivals[-1], arrivals[-2] if len(arrivals) > 1 else previous
        if before is not None and newest - before < gap and now - newest < gap \
                and now - arrivals[0] < config.max_call_s:
            return 0, min(newest + gap, arrivals[0] + config.max_call_s) - now
    waited = now - arrivals[0]
    if active > 0 or full or waited >= config.max_wait_s:
        return n, None
    return 0, config.max_wait_s - waited


def chars_per_call(previous: int, *, arrivals_waiting: bool, remaining: int, seconds_per_char: float,
                   until_deadline_s: float | None, config: BatchingConfig) -> int:
    """K for the next decode call: 1 while arrivals wait (their prefill is next), else double the
    previous K, capped by max_chars_per_call, by the chars the rows still need (`remaining`: the
    largest of them), by max_call_s / seconds_per_char (one call's iteration time, measured), and by
    the nearest deadline, so a cancel or a deadline is acted on within about one short call."""
    if arrivals_waiting:
        return 1
    k = min(config.max_chars_per_call, 2 * previous, remaining)
    if seconds_per_char > 0.0:
        k = min(k, int(config.max_call_s / seconds_per_char))
        if until_deadline_s is not None:
            k = min(k, int(until_deadline_s / seconds_per_char))
    return max(1, k)


def prefill_groups(lengths: Sequence[int], max_batch_size: int) -> list[list[int]]:
    """Indices grouped by equal prompt length (first-come order), each group at most max_batch_size."""
    by_length: dict[int, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, n in enumerate(lengths):
        groups = by_length.setdefault(n, [])
        if not groups or len(groups[-1]) >= max_batch_size:
            groups.append([])
            order.append(groups[-1])
        groups[-1].append(i)
    return order
