"""inference.GRPCInferenceService (Open Inference Protocol / KServe v2, with Triton's ModelStreamInfer).

Each model shows two faces (server/edge/kserve_wire.py): `<name>` generates text through the same
runner, validation, limits and error table as nextchar.v1; `<name>.step` runs the network's raw step.
A model whose own name ends in ".step" keeps it for its text face: real names win.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from nextchar import __version__
from nextchar.inference import grpc_service_pb2 as kpb
from nextchar.inference import grpc_service_pb2_grpc
from nextchar.server.core.artifact import ModelNameError, validate_model_name
from nextchar.server.core.sampling import InvalidParameterError
from nextchar.server.edge import kserve_wire as kw
from nextchar.server.edge.errors import bounded, mapped, status_code_for
from nextchar.server.edge.servicer import NextCharServicer
from nextchar.server.ops.config import ServerConfig
from nextchar.server.ops.registry import LoadedModel, ModelNotFoundError
from nextchar.server.scheduling.runner import Outcome
from nextchar.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING

# ModelStreamInfer: requests of one stream answered at once; past this, reading waits until the client
# has read every response of an earlier request. A response not yet sent keeps its request's admission
# (memory budget), so this bounds the requests and error responses a client that does not read makes
# the server hold. Echoed names and ids are cut.
MAX_STREAM_REQUESTS = 64
MAX_ECHO_CHARS = 256


def _protocol_fields(method: Callable[..., Any]) -> Callable[..., Any]:
    """Errors name the protocol's fields (model_name, max_tokens, ...), not nextchar.v1's."""
    @functools.wraps(method)
    async def call(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as e:
            raise _renamed(e) from None
    return call


def _renamed(exc: BaseException) -> BaseException:
    if isinstance(exc, ModelNameError):
        return InvalidParameterError("model_name", str(exc))
    if isinstance(exc, ModelNotFoundError):
        field = exc.field.replace("model.", "model_")
        return ModelNotFoundError(field, str(exc).removeprefix(f"{exc.field}: "))
    return kw.renamed(exc)


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Model lookup, admission and deadlines are nextchar.v1's (`v1`); readiness is the health service's."""

    def __init__(self, v1: NextCharServicer, health: health_aio.HealthServicer,
                 max_message_bytes: int = ServerConfig.max_message_bytes) -> None:
        """`max_message_bytes`: the server's gRPC send limit (--max-message-bytes), which a step's
        response must fit: a larger one is refused before the model runs."""
        self.v1, self.health = v1, health
        self.registry, self.runner, self.limits = v1.registry, v1.runner, v1.limits
        self.max_message_bytes = max_message_bytes

    def _face(self, name: str) -> tuple[str, bool]:
        """-> (model name, step face?)"""
        validate_model_name(name)
        if name in self.registry.names() or not name.endswith(kw.STEP_SUFFIX):
            return name, False
        return name.removesuffix(kw.STEP_SUFFIX), True

    async def _model(self, name: str, version: str, context: grpc.aio.ServicerContext,
                     ) -> tuple[LoadedModel, bool]:
        model_name, step = self._face(name)
        ref = pb.ModelRef(name=model_name, version=kw.model_version(version) or 0)
        return await self.v1._model(ref, context), step

    async def _serving(self, service: str, context: grpc.aio.ServicerContext) -> bool:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service), context)
        return reply.status == _SERVING

    async def ServerLive(self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return kpb.ServerLiveResponse(live=True)  # it answered; draining is "not ready", not "dead"

    async def ServerReady(self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return kpb.ServerReadyResponse(ready=await self._serving("", context))

    @mapped
    @_protocol_fields
    async def ModelReady(self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        name, _ = self._face(request.name)
        version = kw.model_version(request.version)
        self.registry.cached(name)  # ModelNotFoundError for an unknown name, without loading anything
        known = version is None or version in self.registry.versions(name)
        return kpb.ModelReadyResponse(ready=known and await self._serving(name, context))

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return kpb.ServerMetadataResponse(name="nextchar", version=__version__, extensions=[])

    @mapped
    @_protocol_fields
    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        model, step = await self._model(request.name, request.version, context)
        return kw.metadata(model, request.name, self.registry.versions(model.name), step)

    @mapped
    @_protocol_fields
    async def ModelInfer(self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext):
        async with contextlib.aclosing(self._infer(request, context, streaming=False)) as responses:
            async for response in responses:
                return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[kpb.ModelInferRequest],
                               context: grpc.aio.ServicerContext):
        """Requests are answered concurrently, each in order; a failed request gets one response with
        error_message and the stream goes on. Cancelling the call stops every generation on it."""
        # A response is queued with a future the writer sets once gRPC has sent it, and its request goes
        # on only then: it keeps its admission (memory budget, per-client slot, model version) until
        # the client has taken its responses, so what a client that does not read makes the server hold
        # stays inside --memory-budget-mb. Error responses are small, bounded, and queued without one.
        queue: asyncio.Queue[tuple[kpb.ModelStreamInferResponse, asyncio.Future[None] | None] | bool]
        queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()  # running ones only: a finished answer leaves at once
        # Reading waits while this many requests have responses not yet taken by the client: a slot is
        # freed when the request's end marker (True) is taken off the queue, not when it is put.
        slots = asyncio.Semaphore(MAX_STREAM_REQUESTS)
        started = 1  # the reader, then one per request; each puts one end marker (reader: False)

        async def answer(request: kpb.ModelInferRequest) -> None:
            # aclosing: a cancel that lands while a response waits to be sent ends the generation, and
            # its admission, at once rather than whenever the suspended generator is collected.
            try:
                async with contextlib.aclosing(self._infer(request, context, streaming=True)) as responses:
                    async for response in responses:
                        sent = asyncio.get_running_loop().create_future()
                        queue.put_nowait((kpb.ModelStreamInferResponse(infer_response=response), sent))
                        del response  # the queued message is a copy
                        await sent
            except Exception as e:  # the request's id and model go with its error, to tell requests apart
                queue.put_nowait((kpb.ModelStreamInferResponse(
                    error_message=bounded(_message(_renamed(e))),
                    infer_response=kpb.ModelInferResponse(model_name=request.model_name[:MAX_ECHO_CHARS],
                                                          id=request.id[:MAX_ECHO_CHARS])), None))
            finally:
                queue.put_nowait(True)

        def spawn(coroutine: Any) -> None:
            task = asyncio.create_task(coroutine)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def read() -> None:
            nonlocal started
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    started += 1
                    spawn(answer(request))
            finally:
                queue.put_nowait(False)

        spawn(read())
        try:
            finished = 0
            while finished < started:
                item = await queue.get()
                if isinstance(item, bool):
                    finished += 1
                    if item:  # a request's last response was taken (yielded to gRPC) before this
                        slots.release()
                    continue
                response, sent = item
                del item
                yield response  # returns once gRPC has sent it: the client's flow control holds it
                del response  # not kept while the next one is awaited
                if sent is not None:
                    sent.set_result(None)
        finally:
            for task in list(tasks):
                task.cancel()

    async def _infer(self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext,
                     streaming: bool) -> AsyncGenerator[kpb.ModelInferResponse, None]:
        """One request's responses: one, or (a streamed generation) one per text chunk, then the end."""
        kw.check_id(request)
        model, step = await self._model(request.model_name, request.model_version, context)
        final = True if streaming else None
        if step:
            tokens, state, wanted = kw.step_args(request, model, self.limits, self.max_message_bytes)
            # The same per-client and memory caps. A step holds its whole logits [B, T, V] (the client
            # asked for them) about three times over (engine, reply tensor, serialised), and its states.
            state_bytes = sum(s.nbytes for s in state) if state else 0
            nbytes = 3 * 4 * tokens.size * len(model.artifact.vocab) + 4 * max(state_bytes, 1)
            # Token ids mean something in this version's vocabulary only: it stays pinned.
            # Yielded while admitted: ModelStreamInfer keeps the admission until the response is sent,
            # and this frame holds no other copy of the logits meanwhile.
            with self.v1.admit_bytes(model, nbytes, context, pinned=True) as model:  # the object held
                yield await self._step(request, model, tokens, state, wanted, final)
            return
        gen, stream = kw.generation_request(request, model, self.limits)
        live = streaming and stream
        with self.v1.admit(model, len(gen.prompt) + gen.max_new_chars, context,
                           pinned=bool(request.model_version)) as model:
            run = self.runner.generate(model.engine, gen, context.time_remaining(), live=live)
            if live:
                async for item in run:
                    if isinstance(item, Outcome):
                        yield kw.text_response(request, model, "", item, final=True)
                    else:
                        yield kw.text_response(request, model, item, final=False)
                return
            items = [item async for item in run]
            outcome = items.pop()  # the runner always ends with exactly one Outcome
            assert isinstance(outcome, Outcome)
            yield kw.text_response(request, model, "".join(str(i) for i in items), outcome, final=final)

    async def _step(self, request: kpb.ModelInferRequest, model: LoadedModel, tokens: np.ndarray,
                    state: tuple[np.ndarray, ...], wanted: list[str], final: bool | None,
                    ) -> kpb.ModelInferResponse:
        """The raw step's response: `wanted` of logits float32[B, T, V] and the new states."""
        logits, new_state = await self.runner.call(model.engine.step, tokens, state)
        return kw.step_response(request, model, logits, new_state, wanted, final)


def _message(exc: BaseException) -> str:
    """ModelStreamInferResponse.error_message: the status code's name and the error table's message."""
    code = status_code_for(exc)
    if code is None:
        log.error("bug in ModelStreamInfer", exc_info=exc)
        return "INTERNAL: internal error in ModelStreamInfer (logged on the server)"
    return f"{code.name}: {exc}"
