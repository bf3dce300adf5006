"""The nextchar.v1.NextChar RPCs, each thin: validate -> wire.from_pb -> domain -> wire.to_pb."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import grpc

from nextchar.server.core.scoring import predict, score
from nextchar.server.edge import wire
from nextchar.server.edge.errors import mapped
from nextchar.server.edge.session import SessionService
from nextchar.server.ops.registry import LoadedModel, ModelNotFoundError, Registry
from nextchar.server.scheduling.budget import MemoryBudget, call_bytes
from nextchar.server.scheduling.clients import ClientSlots, client_key
from nextchar.server.scheduling.runner import DeadlineError, Outcome, Runner
from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc


class NextCharServicer(inference_pb2_grpc.NextCharServicer):
    """Blocking model work runs in the runner's threads, never on the event loop."""

    def __init__(self, registry: Registry, runner: Runner, limits: wire.Limits,
                 budget: MemoryBudget | None = None, clients: ClientSlots | None = None) -> None:
        self.registry, self.runner, self.limits = registry, runner, limits
        self.budget = budget or MemoryBudget(1 << 62)  # None: no memory limit (tests of other things)
        self.clients = clients or ClientSlots(0)
        self.sessions: SessionService | None = None  # set by build_server (server.edge.session)

    def admit(self, model: LoadedModel, chars: int, context: grpc.aio.ServicerContext, *,
              pinned: bool) -> contextlib.AbstractContextManager[LoadedModel]:
        """`admit_bytes` for a call on `chars` characters (prompt and generated, context and text)."""
        return self._admit(model, lambda m: call_bytes(chars, len(m.artifact.vocab)), context, pinned)

    def admit_bytes(self, model: LoadedModel, nbytes: int, context: grpc.aio.ServicerContext, *,
                    pinned: bool) -> contextlib.AbstractContextManager[LoadedModel]:
        """Per-client cap, then memory (each RESOURCE_EXHAUSTED naming its flag) for a call estimated at
        `nbytes`; the runner's own --max-concurrent comes after. While admitted the call holds the
        exact model version it uses (Registry.acquire), so a version replaced by a hot reload unloads
        only once its last call has ended; that version is what the block gets. A call that named no
        version (`pinned` False) and whose lookup a reload overtook (the default it found was replaced
        and unloaded since) uses the new default; a pinned version unloaded since is NOT_FOUND."""
        return self._admit(model, lambda m: nbytes, context, pinned)

    @contextlib.contextmanager
    def _admit(self, model: LoadedModel, size: Callable[[LoadedModel], int],
               context: grpc.aio.ServicerContext, pinned: bool) -> Iterator[LoadedModel]:
        key = client_key(context.peer(), context.invocation_metadata() or ())
        with self.clients.hold(key):
            held = self.registry.acquire(model.name, model.version)
            if held is None and not pinned:
                held = self.registry.acquire(model.name, None)
            if held is None:  # unloaded between its lookup and now (an Admin UnloadModel)
                raise ModelNotFoundError("model.name", f"{model.name!r} version {model.version} was just "
                                                       "unloaded; retry for the current version")
            try:
                with self.budget.reserve(size(held)):  # sized by the version the call will use
                    yield held
            finally:
                self.registry.release(held)

    async def _model(self, ref: pb.ModelRef, context: grpc.aio.ServicerContext) -> LoadedModel:
        """The model a request names; first, refuse calls that are shutting out or already late."""
        self.runner.ensure_open()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineError("the call's deadline had passed when it arrived; nothing was computed")
        name, version = wire.model_ref(ref)
        loaded = self.registry.cached(name, version)
        if loaded is not None:
            return loaded
        # A load (read, hash, warm up) may outlast a shutdown: on a daemon thread, not the pool's.
        return await self.runner.call(self.registry.get, name, version, own_thread=True)

    @mapped
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        self.runner.ensure_open()
        latest = [self.registry.get(name) for name in self.registry.names()]  # loaded at start: no I/O
        infos = [wire.model_info(m, self.registry.versions(m.name), self.registry.load_errors(m.name))
                 for m in latest]
        return pb.ListModelsResponse(models=infos)

    @mapped
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext):
        model = await self._model(request.model, context)
        versions, errors = self.registry.versions(model.name), self.registry.load_errors(model.name)
        return pb.GetModelResponse(model=wire.model_info(model, versions, errors))

    @mapped
    async def PredictNext(self, request: pb.PredictNextRequest, context: grpc.aio.ServicerContext):
        model = await self._model(request.model, context)
        args = wire.predict_args(request, self.limits)
        with self.admit(model, len(request.context), context,
                        pinned=wire.pinned(request.model)) as model:
            best = await self.runner.call(functools.partial(predict, model.engine, **args))
        return wire.predict_response(best, model)

    @mapped
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        model = await self._model(request.model, context)
        gen = wire.generation_request(request, self.limits)
        with self.admit(model, len(request.prompt) + gen.max_new_chars, context,
                        pinned=wire.pinned(request.model)) as model:
            run = self.runner.generate(model.engine, gen, context.time_remaining(), live=False)
            items = [item async for item in run]
        outcome = items.pop()  # the runner always ends with exactly one Outcome
        assert isinstance(outcome, Outcome)
        return pb.GenerateResponse(text="".join(str(i) for i in items), summary=wire.summary(outcome, model))

    @mapped
    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        model = await self._model(request.model, context)
        gen = wire.generation_request(request, self.limits)
        with self.admit(model, len(request.prompt) + gen.max_new_chars, context,
                        pinned=wire.pinned(request.model)) as model:
            run = self.runner.generate(model.engine, gen, context.time_remaining())
            async with contextlib.aclosing(run) as items:
                async for item in items:
                    yield wire.stream_message(item, model)

    @mapped
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        model = await self._model(request.model, context)
        args = wire.score_args(request, self.limits)
        with self.admit(model, len(request.context) + len(request.text), context,
                        pinned=wire.pinned(request.model)) as model:
            result = await self.runner.call(functools.partial(score, model.engine, **args))
        return wire.score_response(result, model)

    @mapped
    async def Session(self, request_iterator, context: grpc.aio.ServicerContext):
        assert self.sessions is not None, "build_server sets the session service"
        async for message in self.sessions.serve(request_iterator, context):
            yield message
