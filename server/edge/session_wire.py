"""Every protobuf <-> domain conversion of the Session RPC (the other RPCs' live in wire)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from nextchar.server.core.generation import Finished
from nextchar.server.core.sampling import InvalidParameterError, SamplingParams
from nextchar.server.core.session import SessionOptions
from nextchar.server.edge import wire
from nextchar.server.edge.errors import bounded, status_code_for
from nextchar.server.ops.registry import LoadedModel
from nextchar.server.scheduling.runner import Outcome
from nextchar.v1 import inference_pb2 as pb

DEFAULT_PREDICT_N = 5  # a predict request with n = 0 while the options' n is 0 too


@dataclass(frozen=True)
class Completion:
    """A SessionComplete, validated with GenerateRequest's own rules."""

    max_new_chars: int
    sampling: SamplingParams
    seed: int
    stop: tuple[str, ...]


def options(o: pb.SessionOptions, model: LoadedModel) -> SessionOptions:
    """SessionOptions -> the domain's; InvalidParameterError names the field and its range."""
    vocab_size = len(model.artifact.vocab)
    if not 0 <= o.n <= vocab_size:
        raise InvalidParameterError("options.n", f"must be in [0, {vocab_size}] (0 = predictions only when "
                                                 f"asked; the vocabulary size), got {o.n}")
    temperature = float(o.temperature) if o.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and 0.0 < temperature <= 100.0):
        raise InvalidParameterError("options.temperature",
                                    f"must be in (0, 100] (absent = 1), got {temperature}")
    oov = wire._oov(o.oov_policy, o.oov_replacement)
    return SessionOptions(n=int(o.n), temperature=temperature, **oov)


def predict_n(p: pb.SessionPredict, opts: SessionOptions, model: LoadedModel) -> int:
    vocab_size = len(model.artifact.vocab)
    if not 0 <= p.n <= vocab_size:
        raise InvalidParameterError("predict.n",
                                    f"must be in [0, {vocab_size}] (0 = the options' n), got {p.n}")
    return p.n or opts.n or min(DEFAULT_PREDICT_N, vocab_size)


def completion(c: pb.SessionComplete, model: LoadedModel, limits: wire.Limits,
               draw_seed: Callable[[], int] = lambda: secrets.randbits(64)) -> Completion:
    """SessionComplete -> Completion, checked exactly as GenerateRequest (same fields, same limits)."""
    as_generate = pb.GenerateRequest(max_new_chars=c.max_new_chars, top_k=c.top_k,
                                     stop=list(c.stop), prompt="-")  # the prompt is the session's text
    if c.HasField("temperature"):  # absent: GenerateRequest's default, as there
        as_generate.temperature = c.temperature
    if c.HasField("top_p"):
        as_generate.top_p = c.top_p
    if c.HasField("seed"):
        as_generate.seed = c.seed
    gen = wire.generation_request(as_generate, limits, draw_seed)
    return Completion(gen.max_new_chars, gen.sampling, gen.seed, gen.stop)


def opened(rid: int, model: LoadedModel, max_chars: int) -> pb.SessionResponse:
    return pb.SessionResponse(id=rid, opened=pb.SessionOpened(model=wire.ref_of(model), max_chars=max_chars))


def predictions(rid: int, length: int, computed: int, vocab: tuple[str, ...],
                top: tuple[list[int], list[float], list[float]] | None = None) -> pb.SessionResponse:
    """An edit's or a predict's answer; `top`: scoring.top_entries (None: no predictions)."""
    chars = [] if top is None else [pb.CharProbability(char=vocab[i], token_id=i, probability=p, logprob=lp)
                                    for i, p, lp in zip(*top, strict=True)]
    return pb.SessionResponse(id=rid, text_chars=length, computed_chars=computed,
                              predictions=pb.SessionPredictions(predictions=chars))


def completion_text(rid: int, length: int, text: str) -> pb.SessionResponse:
    return pb.SessionResponse(id=rid, text_chars=length, completion_text=text)


def completion_summary(rid: int, length: int, computed: int, finished: Finished,
                       model: LoadedModel) -> pb.SessionResponse:
    return pb.SessionResponse(id=rid, text_chars=length, computed_chars=computed,
                              completion_summary=wire.summary(Outcome(finished, 0.0), model))


def error(rid: int, length: int, exc: BaseException) -> pb.SessionResponse | None:
    """A failed request as an answer on the stream, for the errors a session survives; else None."""
    code = status_code_for(exc)
    if code is None or code.name not in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
        return None
    field = getattr(exc, "field", "") or ""
    return pb.SessionResponse(id=rid, text_chars=length,
                              error=pb.SessionError(code=code.value[0], message=bounded(str(exc)),
                                                    field=bounded(field, 64)))
