"""grpc.health.v1 with bounds: service names no longer than a model name, and a cap on open Watch calls."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from nextchar.server.core.artifact import MAX_NAME_LENGTH

# Health needs no token (security.OPEN_PREFIXES), so nothing else bounds what a stranger can hold open:
# each Watch keeps its request, name included, until the caller leaves. With names capped at
# MAX_NAME_LENGTH this many open Watch calls hold well under a megabyte between them. Orchestrators
# probe with Check (Kubernetes grpc probes, Envoy health checks), which this cap never touches.
MAX_WATCHES = 1024


class HealthServicer(health_aio.HealthServicer):
    """The stock aio servicer (set, enter_graceful_shutdown, Check, Watch), refusing what cannot be a
    service of this server and Watch calls beyond `max_watches` open at once."""

    def __init__(self, max_watches: int = MAX_WATCHES) -> None:
        super().__init__()
        if max_watches < 1:
            raise ValueError(f"max_watches must be at least 1, got {max_watches}")
        self.max_watches = max_watches
        self.watches = 0  # open Watch calls; only touched on the event loop, so no lock

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await _check_name(request.service, context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        await _check_name(request.service, context)
        if self.watches >= self.max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {self.max_watches} health Watch calls may be open at once; "
                                "close one, or poll with Check")
        self.watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watches -= 1


async def _check_name(service: str, context: grpc.aio.ServicerContext) -> None:
    """Every service this server reports is "", the NextChar service's full name or a model name, none
    longer than MAX_NAME_LENGTH: a longer one cannot exist, so it is refused rather than looked up."""
    if len(service) > MAX_NAME_LENGTH:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"service: must be at most {MAX_NAME_LENGTH} characters, got {len(service)}")
