"""Typed nextchar.v1 client, sync and async: a deadline on every call, streams as iterators, typed errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextchar.client.credentials import Credentials, open_channel
from nextchar.client.errors import NotFound, from_rpc_error
from nextchar.client.session import AsyncTypingSession, TypingSession, options_message
from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc, manifest_pb2

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0
SESSION_TIMEOUT_S = 3600.0  # a typing session's deadline: the whole stream, not one keystroke
OOV_POLICIES: dict[str, pb.OovPolicy] = {
    "error": pb.OOV_POLICY_ERROR, "skip": pb.OOV_POLICY_SKIP, "replace": pb.OOV_POLICY_REPLACE}
_FINISH = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


# --- results --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    available_versions: tuple[int, ...]
    manifest: manifest_pb2.ModelManifest  # vocab, architecture, sizes, training metrics

    @property
    def cell(self) -> str:
        return manifest_pb2.CellType.Name(self.manifest.architecture.cell).removeprefix("CELL_TYPE_").lower()


@dataclass(frozen=True)
class Prediction:
    char: str
    token_id: int
    probability: float
    logprob: float


@dataclass(frozen=True)
class GenerationSummary:
    finish_reason: str       # "length" or "stop_sequence"
    prompt_chars: int
    generated_chars: int     # sampled, including a matched stop sequence
    seed: int                # replays the text
    time_to_first_char_ms: float
    total_ms: float          # server side, from the request's arrival
    model: str
    version: int
    stop_sequence: str | None


@dataclass(frozen=True)
class Generation:
    text: str
    summary: GenerationSummary


@dataclass(frozen=True)
class Score:
    total_logprob: float     # nats
    nats_per_char: float
    bits_per_char: float
    scored_chars: int
    per_char: tuple[tuple[str, float], ...]  # (char, logprob) when asked for
    model: str
    version: int


# --- conversions ----------------------------------------------------------------------------------

def _ref(model: str, version: int | None) -> pb.ModelRef:
    return pb.ModelRef(name=model) if version is None else pb.ModelRef(name=model, version=version)


def _oov(policy: str) -> pb.OovPolicy:
    if policy not in OOV_POLICIES:
        raise ValueError(f"oov_policy must be one of {', '.join(OOV_POLICIES)}, got {policy!r}")
    return OOV_POLICIES[policy]


def generate_request(model: str, prompt: str, max_new_chars: int, *, version: int | None = None,
                     temperature: float | None = None, top_k: int = 0, top_p: float | None = None,
                     seed: int | None = None, stop: Sequence[str] = (), echo: bool = False,
                     oov_policy: str = "error", oov_replacement: str = "") -> pb.GenerateRequest:
    """temperature 0 = greedy, None = the server's default (1); seed None = the server draws one."""
    req = pb.GenerateRequest(model=_ref(model, version), prompt=prompt, max_new_chars=max_new_chars,
                             temperature=temperature, top_k=top_k, stop=list(stop), echo=echo,
                             oov_policy=_oov(oov_policy), oov_replacement=oov_replacement)
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


def _model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(m.name, m.version, tuple(m.available_versions), m.manifest)


def _summary(s: pb.GenerationSummary) -> GenerationSummary:
    return GenerationSummary(
        finish_reason=_FINISH[s.finish_reason], prompt_chars=s.usage.prompt_chars,
        generated_chars=s.usage.generated_chars, seed=s.seed,
        time_to_first_char_ms=s.timings.time_to_first_char_ms, total_ms=s.timings.total_ms,
        model=s.model.name, version=s.model.version, stop_sequence=s.stop_sequence or None)


def _predictions(r: pb.PredictNextResponse) -> list[Prediction]:
    return [Prediction(p.char, p.token_id, p.probability, p.logprob) for p in r.predictions]


def _score(r: pb.ScoreResponse) -> Score:
    return Score(r.total_logprob, r.nats_per_char, r.bits_per_char, r.scored_chars,
                 tuple((c.char, c.logprob) for c in r.chars), r.model.name, r.model.version)


def _predict_request(model: str, context: str, n: int, version: int | None, temperature: float | None,
                     oov_policy: str, oov_replacement: str) -> pb.PredictNextRequest:
    req = pb.PredictNextRequest(model=_ref(model, version), context=context, n=n,
                                oov_policy=_oov(oov_policy), oov_replacement=oov_replacement)
    if temperature is not None:
        req.temperature = temperature
    return req


def _score_request(model: str, text: str, context: str, per_char: bool, version: int | None,
                   oov_policy: str, oov_replacement: str) -> pb.ScoreRequest:
    return pb.ScoreRequest(model=_ref(model, version), text=text, context=context, per_char=per_char,
                           oov_policy=_oov(oov_policy), oov_replacement=oov_replacement)


def _session_open(model: str, version: int | None, n: int, temperature: float | None, text: str,
                  oov_policy: str, oov_replacement: str) -> pb.SessionOpen:
    return pb.SessionOpen(model=_ref(model, version), text=text,
                          options=options_message(n, temperature, _oov(oov_policy), oov_replacement))


_HEALTH = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


# --- sync -----------------------------------------------------------------------------------------

class GenerationStream:
    """Text pieces as they arrive; after the last one, `summary` is set. `cancel()` stops the server."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.summary: GenerationSummary | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for message in self._call:
                if message.HasField("summary"):
                    self.summary = _summary(message.summary)
                else:
                    yield message.text
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._call.cancel()  # a no-op once the stream completed


class NextCharClient:
    """Blocking client. Every call has a deadline: `timeout` seconds, the client's default unless given."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S,
                 channel: grpc.Channel | None = None, credentials: Credentials | None = None) -> None:
        self.timeout = timeout
        self._channel = channel or open_channel(target, credentials)
        self._metadata = credentials.metadata() if credentials is not None else ()
        self._stub = inference_pb2_grpc.NextCharStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout,
                          metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_model_info(m) for m in reply.models]

    def get_model(self, model: str, version: int | None = None, *, timeout: float | None = None) -> ModelInfo:
        reply = self._call(self._stub.GetModel, pb.GetModelRequest(model=_ref(model, version)), timeout)
        return _model_info(reply.model)

    def predict_next(self, model: str, context: str, n: int = 5, *, version: int | None = None,
                     temperature: float | None = None, oov_policy: str = "error", oov_replacement: str = "",
                     timeout: float | None = None) -> list[Prediction]:
        req = _predict_request(model, context, n, version, temperature, oov_policy, oov_replacement)
        return _predictions(self._call(self._stub.PredictNext, req, timeout))

    def generate(self, model: str, prompt: str, max_new_chars: int, *, timeout: float | None = None,
                 **options: Any) -> Generation:
        """Options as `generate_request` (temperature, top_k, top_p, seed, stop, echo, oov_policy, ...)."""
        req = generate_request(model, prompt, max_new_chars, **options)
        reply = self._call(self._stub.Generate, req, timeout)
        return Generation(reply.text, _summary(reply.summary))

    def generate_stream(self, model: str, prompt: str, max_new_chars: int, *, timeout: float | None = None,
                        **options: Any) -> GenerationStream:
        req = generate_request(model, prompt, max_new_chars, **options)
        call = self._stub.GenerateStream(req, timeout=self.timeout if timeout is None else timeout,
                                         metadata=self._metadata)
        return GenerationStream(call)

    def score(self, model: str, text: str, *, context: str = "", per_char: bool = False,
              version: int | None = None, oov_policy: str = "error", oov_replacement: str = "",
              timeout: float | None = None) -> Score:
        req = _score_request(model, text, context, per_char, version, oov_policy, oov_replacement)
        return _score(self._call(self._stub.Score, req, timeout))

    def session(self, model: str, *, version: int | None = None, n: int = 5, temperature: float | None = None,
                text: str = "", oov_policy: str = "error", oov_replacement: str = "",
                timeout: float = SESSION_TIMEOUT_S) -> TypingSession:
        """Open a typing session: `n` predictions after every edit (0: only on `predict`)."""
        return TypingSession(self._stub, _session_open(model, version, n, temperature, text, oov_policy,
                                                       oov_replacement), timeout, self._metadata)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" (no such model or service) or "UNKNOWN" for
        `service` ("" = the server)."""
        try:
            reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        except NotFound:  # how Check says it: the protocol's SERVICE_UNKNOWN
            return "SERVICE_UNKNOWN"
        return _HEALTH[reply.status]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NextCharClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- async ----------------------------------------------------------------------------------------

class AsyncGenerationStream:
    """`async for text in stream`; after the last piece `summary` is set. `cancel()` stops the server, as
    leaving `async with stream:` does."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.summary: GenerationSummary | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for message in self._call:
                if message.HasField("summary"):
                    self.summary = _summary(message.summary)
                else:
                    yield message.text
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._call.cancel()  # a no-op once the stream completed; else the server stops generating


class AsyncNextCharClient:
    """The same calls as NextCharClient, awaitable, on a grpc.aio channel."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S,
                 channel: grpc.aio.Channel | None = None, credentials: Credentials | None = None) -> None:
        self.timeout = timeout
        self._channel = channel or open_channel(target, credentials, aio=True)
        self._metadata = credentials.metadata() if credentials is not None else ()
        self._stub = inference_pb2_grpc.NextCharStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout,
                                metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_model_info(m) for m in reply.models]

    async def get_model(self, model: str, version: int | None = None, *,
                        timeout: float | None = None) -> ModelInfo:
        reply = await self._call(self._stub.GetModel, pb.GetModelRequest(model=_ref(model, version)), timeout)
        return _model_info(reply.model)

    async def predict_next(self, model: str, context: str, n: int = 5, *, version: int | None = None,
                           temperature: float | None = None, oov_policy: str = "error",
                           oov_replacement: str = "", timeout: float | None = None) -> list[Prediction]:
        req = _predict_request(model, context, n, version, temperature, oov_policy, oov_replacement)
        return _predictions(await self._call(self._stub.PredictNext, req, timeout))

    async def generate(self, model: str, prompt: str, max_new_chars: int, *, timeout: float | None = None,
                       **options: Any) -> Generation:
        req = generate_request(model, prompt, max_new_chars, **options)
        reply = await self._call(self._stub.Generate, req, timeout)
        return Generation(reply.text, _summary(reply.summary))

    def generate_stream(self, model: str, prompt: str, max_new_chars: int, *, timeout: float | None = None,
                        **options: Any) -> AsyncGenerationStream:
        req = generate_request(model, prompt, max_new_chars, **options)
        call = self._stub.GenerateStream(req, timeout=self.timeout if timeout is None else timeout,
                                         metadata=self._metadata)
        return AsyncGenerationStream(call)

    async def score(self, model: str, text: str, *, context: str = "", per_char: bool = False,
                    version: int | None = None, oov_policy: str = "error", oov_replacement: str = "",
                    timeout: float | None = None) -> Score:
        req = _score_request(model, text, context, per_char, version, oov_policy, oov_replacement)
        return _score(await self._call(self._stub.Score, req, timeout))

    async def session(self, model: str, *, version: int | None = None, n: int = 5,
                      temperature: float | None = None, text: str = "", oov_policy: str = "error",
                      oov_replacement: str = "", timeout: float = SESSION_TIMEOUT_S) -> AsyncTypingSession:
        """Open a typing session (see NextCharClient.session)."""
        opening = _session_open(model, version, n, temperature, text, oov_policy, oov_replacement)
        return await AsyncTypingSession(self._stub, timeout, self._metadata)._open(opening)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await self._call(self._health.Check, request, timeout)
        except NotFound:
            return "SERVICE_UNKNOWN"
        return _HEALTH[reply.status]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncNextCharClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
