"""The gRPC server: build_server(config) -> (server, port), kept apart from serve(config) and its signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from nextchar.inference import grpc_service_pb2_grpc
from nextchar.server.core.engine import available_cores
from nextchar.server.core.session import SessionLimits
from nextchar.server.edge import kserve, wire
from nextchar.server.edge.servicer import NextCharServicer
from nextchar.server.edge.session import SessionService
from nextchar.server.ops.config import ServerConfig
from nextchar.server.ops.health import HealthServicer
from nextchar.server.ops.metrics import Metrics
from nextchar.server.ops.operations import NO_REUSEPORT, Operations
from nextchar.server.ops.registry import Registry, engine_loader
from nextchar.server.ops.sessions import SessionTable
from nextchar.server.scheduling.budget import MemoryBudget
from nextchar.server.scheduling.clients import ClientSlots
from nextchar.server.scheduling.policy import BatchingConfig
from nextchar.server.scheduling.runner import Runner
from nextchar.server.scheduling.session_steps import StepCoalescer
from nextchar.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["NextChar"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# Time the gRPC layer gets to flush the last messages of calls that already finished their work.
_FLUSH_SECONDS = 1.0


class NextCharServer:
    """A built, bound server: start(), then shutdown() (health NOT_SERVING, drain, stop).

    Two listeners: the public one (NextChar, health, reflection) and Admin's own (`admin_address`)."""

    def __init__(self, grpc_server: grpc.aio.Server, servicer: NextCharServicer,
                 health: health_aio.HealthServicer, config: ServerConfig, ops: Operations) -> None:
        self.grpc_server, self.servicer, self.health, self.config = grpc_server, servicer, health, config
        self.ops = ops  # reload, metrics, auth, request log (server.operations)
        self.admin_server, self.admin_address = ops.admin_server()

    @property
    def runner(self) -> Runner:
        return self.servicer.runner

    async def start(self) -> None:
        """Start accepting calls; the models were validated and warmed up in build_server."""
        await self.ops.start()  # first: a busy metrics port fails start-up before any call is accepted
        # Before the port opens, as the health servicer starts out SERVING: an empty repository (allowed
        # with a watcher) is NOT_SERVING until the watcher or Admin serves a model (Operations.overall).
        names = self.servicer.registry.names()
        statuses = health_pb2.HealthCheckResponse
        for name in self.ops.overall:
            await self.health.set(name, statuses.SERVING if names else statuses.NOT_SERVING)
        for name in names:
            await self.health.set(name, statuses.SERVING)
        await self.admin_server.start()
        await self.grpc_server.start()

    async def shutdown(self, grace: float | None = None) -> bool:
        """Health NOT_SERVING at once, new calls and Admin changes UNAVAILABLE, running calls get what is
        left of `grace` s to finish; returns within about `grace` s, whatever a reload is doing.

        Returns True when every running call finished within the grace period.
        """
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.runner.draining = True      # new calls UNAVAILABLE from now on (drain() below waits)
        await self.ops.stop_changes()    # Admin refused; a watcher load in progress abandoned, not awaited
        if self.servicer.sessions is not None:
            self.servicer.sessions.table.close()  # sessions end at once (UNAVAILABLE), their state freed
        drained = await self.runner.drain(max(0.0, deadline - time.monotonic()))
        left = max(0.0, deadline - time.monotonic())
        await self.grpc_server.stop(min(_FLUSH_SECONDS, left) if drained else 0)
        await self.admin_server.stop(0)
        self.runner.close()
        self.ops.close()
        if not drained:
            log.warning("grace period of %.1fs over; cancelled the calls still running", grace)
        return drained


def build_server(config: ServerConfig) -> tuple[NextCharServer, int]:
    """Load and warm up every model (ArtifactError if one is broken), then build and bind the server.

    Call from inside a running event loop; port 0 picks a free port, which is returned.
    """
    metrics = Metrics()  # per server, so tests can run several in one process
    # Parallel engine calls, one thread each, beat one call on several threads here (BENCHMARKS.md 6c).
    instances = config.model_instances or available_cores()
    parallel = config.batching != "off" and instances > 1
    threads = config.intra_op_threads or (1 if parallel else 0)
    loader = metrics.metered(engine_loader(config.variant, threads))
    registry = Registry(config.model_repo, loader, config.max_loaded_versions)
    registry.load_latest(allow_empty=config.reload_interval > 0)
    batching = BatchingConfig(
        max_batch_size=config.max_batch_size, max_wait_s=config.max_wait_ms / 1e3,
        max_active_streams=config.max_active_streams, max_queue=config.max_queue,
        max_chars_per_call=config.max_chars_per_call, max_call_s=config.max_call_ms / 1e3,
        burst_gap_s=config.burst_gap_ms / 1e3,
    )
    runner = Runner(config.max_concurrent, config.flush_ms / 1e3, config.flush_chars,
                    batching=batching if config.batching != "off" else None,
                    batch_variant_engines=config.batching == "on", chars_per_call=batching,
                    instances=instances)
    limits = wire.Limits(config.max_prompt_chars, config.max_new_chars)
    servicer = NextCharServicer(registry, runner, limits, MemoryBudget(config.memory_budget_mb << 20),
                                ClientSlots(config.max_per_client))
    sessions = SessionTable(config.max_sessions, config.session_idle_ttl, metrics.registry)
    steps = StepCoalescer(runner.call, config.max_batch_size, runner.batches,
                          wait_s=config.session_wait_ms / 1e3, check=runner.ensure_open)
    servicer.sessions = SessionService(
        registry, sessions, steps, runner, servicer.limits,
        SessionLimits(config.session_max_chars, config.session_saved_states), servicer._model,
        servicer.clients, servicer.budget)
    health = HealthServicer()  # names and open Watch calls bounded: health needs no token
    ops = Operations(config, metrics, registry, runner, health, overall=("", SERVICE_NAME))
    grpc_server = grpc.aio.server(interceptors=ops.interceptors, options=[
        NO_REUSEPORT,  # a port in use (Admin's listener included) fails at bind, never shared
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ])
    inference_pb2_grpc.add_NextCharServicer_to_server(servicer, grpc_server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        # The Open Inference Protocol.
        kserve.InferenceServicer(servicer, health, config.max_message_bytes), grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    _add_reflection(grpc_server, (SERVICE_NAME, kserve.SERVICE_NAME,
                                  health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    port = ops.bind(grpc_server)  # TLS when configured; OSError if the address is busy or bad
    return NextCharServer(grpc_server, servicer, health, config, ops), port


def _add_reflection(grpc_server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Server reflection v1alpha and v1. grpcio-reflection (1.85) ships v1alpha only; v1's messages
    are v1alpha's under another package name, field for field, so the same servicer answers both."""
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, grpc_server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),))


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; the exit status (0)."""
    server, port = build_server(config)
    await server.start()
    log.info("serving %s on %s:%d, Admin on %s (models: %s)", SERVICE_NAME, config.host, port,
             server.admin_address, ", ".join(server.servicer.registry.names()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.1fs", config.grace_seconds)
    await server.shutdown()
    log.info("stopped")
    return 0
