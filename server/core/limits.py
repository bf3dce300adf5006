"""Every limit and default of the inference API, defined once; the core, the edge, the config and the
offline runner import them from here, so the server and the offline runner refuse the same requests."""

from __future__ import annotations

MAX_NEW_CHARS = 100_000    # the core's ceiling on max_new_chars; the server's --max-new-chars may be lower
MAX_STOP_SEQUENCES = 4     # stop sequences per request (inference.proto)
MAX_STOP_CHARS = 64        # characters per stop sequence (inference.proto)
MAX_SEED = 2**64 - 1       # seeds are uint64 on the wire
# An upper bound that still means something: at T=100 every logit gap shrinks 100-fold, which is
# already indistinguishable from uniform for any trained model; larger values are almost surely typos.
MAX_TEMPERATURE = 100.0
DEFAULT_TEMPERATURE = 1.0  # PredictNext's absent temperature, the CLI's and the offline runner's default
MAX_BATCH_SIZE = 1024      # the batcher's largest decode batch (--max-batch-size)
MAX_CHARS_PER_CALL = 4096  # the ceiling of K, chars per stream per engine call (--max-chars-per-call)

# Error messages stay bounded whatever the request held: gRPC carries them in trailers, which
# clients cap (Python at 16 KiB; grpc-js hangs past ~64 KB), so a huge input must not grow them.
MAX_LISTED_VIOLATIONS = 20  # BadRequest field violations listed before one "and N more"
MAX_SHOWN_CHARS = 40        # characters of a request value quoted back in an error message
MAX_MESSAGE_CHARS = 1024    # the status message itself


def shown(value: object) -> str:
    """repr(value), cut to MAX_SHOWN_CHARS characters with the full length said, for error messages."""
    if isinstance(value, str) and len(value) > MAX_SHOWN_CHARS:
        return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS + 2 else text[:MAX_SHOWN_CHARS] + "..."
