"""Every protobuf <-> domain conversion of the inference API, with the API's own limits; nowhere else."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nextchar.server.core.artifact import public_manifest, validate_model_name
from nextchar.server.core.generation import FinishReason, GenerationRequest
from nextchar.server.core.limits import DEFAULT_TEMPERATURE, MAX_STOP_SEQUENCES
from nextchar.server.core.sampling import InvalidParameterError, SamplingParams
from nextchar.server.core.scoring import Prediction, ScoreResult
from nextchar.server.core.vocab import OovPolicy
from nextchar.server.ops.registry import LoadedModel
from nextchar.server.scheduling.runner import Outcome
from nextchar.v1 import inference_pb2 as pb

_OOV: dict[int, OovPolicy] = {
    pb.OOV_POLICY_UNSPECIFIED: OovPolicy.ERROR,
    pb.OOV_POLICY_ERROR: OovPolicy.ERROR,
    pb.OOV_POLICY_SKIP: OovPolicy.SKIP,
    pb.OOV_POLICY_REPLACE: OovPolicy.REPLACE,
}
_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
}


@dataclass(frozen=True)
class Limits:
    """The server's request limits (from ServerConfig)."""

    max_prompt_chars: int
    max_new_chars: int


# --- requests -------------------------------------------------------------------------------------

def model_ref(ref: pb.ModelRef) -> tuple[str, int | None]:
    """-> (name, version or None for the latest)."""
    if not ref.name:
        raise InvalidParameterError("model.name", "is required (ListModels shows the available names)")
    validate_model_name(ref.name)  # a malformed name is the caller's mistake, not a missing model
    if not ref.HasField("version") or ref.version == 0:
        return ref.name, None
    if ref.version < 0:
        raise InvalidParameterError("model.version", f"must be >= 1 (0/absent = latest), got {ref.version}")
    return ref.name, ref.version


def pinned(ref: pb.ModelRef) -> bool:
    """Does the request name a version (rather than the model's default)?"""
    return ref.HasField("version") and ref.version != 0


def _text(value: str, field: str, limit: int, minimum: int = 1) -> str:
    if not minimum <= len(value) <= limit:
        raise InvalidParameterError(field, f"must have {minimum} to {limit} characters, got {len(value)}")
    return value


def _oov(policy: int, replacement: str) -> dict[str, Any]:
    if policy not in _OOV:
        raise InvalidParameterError("oov_policy", f"unknown value {policy}; use ERROR, SKIP or REPLACE")
    return {"oov_policy": _OOV[policy], "oov_replacement": replacement or None}


def generation_request(req: pb.GenerateRequest, limits: Limits,
                       draw_seed: Callable[[], int] = lambda: secrets.randbits(64)) -> GenerationRequest:
    """GenerateRequest -> GenerationRequest; InvalidParameterError names the field and its range.

    Only the server's own caps are checked here; every other rule is the core's (GenerationRequest,
    Decoder), so the offline runner refuses exactly what the server refuses.
    """
    # In the core's order (sampling, then the request's own fields), so a request with several
    # faults is refused for the same field as by the offline runner.
    sampling = SamplingParams(
        temperature=float(req.temperature) if req.HasField("temperature") else DEFAULT_TEMPERATURE,
        top_k=int(req.top_k),
        top_p=float(req.top_p) if req.HasField("top_p") else 1.0,
    )
    _text(req.prompt, "prompt", limits.max_prompt_chars)
    if not 1 <= req.max_new_chars <= limits.max_new_chars:
        raise InvalidParameterError(
            "max_new_chars", f"must be in [1, {limits.max_new_chars}], got {req.max_new_chars}")
    if len(req.stop) > MAX_STOP_SEQUENCES:  # before copying a huge list into a tuple
        raise InvalidParameterError(
            "stop", f"must have at most {MAX_STOP_SEQUENCES} sequences, got {len(req.stop)}")
    return GenerationRequest(
        prompt=req.prompt,
        max_new_chars=int(req.max_new_chars),
        sampling=sampling,
        seed=int(req.seed) if req.HasField("seed") else draw_seed(),
        stop=tuple(req.stop),
        echo=req.echo,
        **_oov(req.oov_policy, req.oov_replacement),
    )


def predict_args(req: pb.PredictNextRequest, limits: Limits) -> dict[str, Any]:
    """PredictNextRequest -> keyword arguments of scoring.predict (minus the engine), which checks n
    and temperature."""
    _text(req.context, "context", limits.max_prompt_chars)
    temperature = float(req.temperature) if req.HasField("temperature") else DEFAULT_TEMPERATURE
    return {"context": req.context, "n": int(req.n), "temperature": temperature,
            **_oov(req.oov_policy, req.oov_replacement)}


def score_args(req: pb.ScoreRequest, limits: Limits) -> dict[str, Any]:
    """ScoreRequest -> keyword arguments of scoring.score (minus the engine), which refuses texts too
    short to score (after the context's and the text's vocabulary checks, as offline)."""
    _text(req.context, "context", limits.max_prompt_chars, minimum=0)
    _text(req.text, "text", limits.max_prompt_chars, minimum=0)
    if len(req.context) + len(req.text) > limits.max_prompt_chars:
        raise InvalidParameterError(
            "text", f"context + text must have at most {limits.max_prompt_chars} characters, "
                    f"got {len(req.context) + len(req.text)}")
    return {"text": req.text, "context": req.context, "per_char": req.per_char,
            **_oov(req.oov_policy, req.oov_replacement)}


# --- responses ------------------------------------------------------------------------------------

def ref_of(model: LoadedModel) -> pb.ModelRef:
    return pb.ModelRef(name=model.name, version=model.version)


def model_info(model: LoadedModel, versions: list[int],
               load_errors: Mapping[int, str] | None = None) -> pb.ModelInfo:
    """`load_errors`: versions the server refused to load -> why (Registry.load_errors)."""
    errors = [pb.VersionLoadError(version=v, reason=r) for v, r in sorted((load_errors or {}).items())]
    return pb.ModelInfo(name=model.name, version=model.version, available_versions=versions,
                        manifest=public_manifest(model.artifact.manifest), load_errors=errors)


def predict_response(best: list[Prediction], model: LoadedModel) -> pb.PredictNextResponse:
    return pb.PredictNextResponse(
        predictions=[pb.CharProbability(char=p.char, token_id=p.token_id, probability=p.probability,
                                        logprob=p.logprob) for p in best],
        model=ref_of(model),
    )


def summary(outcome: Outcome, model: LoadedModel) -> pb.GenerationSummary:
    """The core's Finished event; timings count from the request's arrival, so queueing is included."""
    f = outcome.finished
    ttfc = f.timings.time_to_first_char_s
    return pb.GenerationSummary(
        finish_reason=_FINISH[f.reason],
        usage=pb.Usage(prompt_chars=f.usage.prompt_chars, generated_chars=f.usage.generated_chars),
        seed=f.seed,
        timings=pb.Timings(
            time_to_first_char_ms=0.0 if ttfc is None else (outcome.queued_s + ttfc) * 1e3,
            total_ms=(outcome.queued_s + f.timings.total_s) * 1e3,
        ),
        model=ref_of(model),
        stop_sequence=f.stop_sequence or "",
    )


def stream_message(item: str | Outcome, model: LoadedModel) -> pb.GenerateStreamResponse:
    if isinstance(item, str):
        return pb.GenerateStreamResponse(text=item)
    return pb.GenerateStreamResponse(summary=summary(item, model))


def score_response(result: ScoreResult, model: LoadedModel) -> pb.ScoreResponse:
    chars = [pb.CharLogprob(char=c, logprob=lp) for c, lp in result.per_char or ()]
    return pb.ScoreResponse(
        total_logprob=result.log_likelihood_nats,
        nats_per_char=result.nats_per_char,
        bits_per_char=result.bits_per_char,
        scored_chars=result.scored_chars,
        chars=chars,
        model=ref_of(model),
    )
