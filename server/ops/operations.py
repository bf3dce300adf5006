"""The operations layer of one server, attached from outside: interceptors, Admin, reload, metrics, TLS."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from nextchar.server.edge.admin import AdminServicer
from nextchar.server.edge.malformed import MalformedRequestInterceptor
from nextchar.server.ops.config import ServerConfig
from nextchar.server.ops.metrics import Metrics, MetricsEndpoint
from nextchar.server.ops.registry import Registry
from nextchar.server.ops.reload import Reloader
from nextchar.server.ops.reqlog import ObservingInterceptor
from nextchar.server.ops.security import AuthInterceptor, read_token, server_credentials
from nextchar.server.scheduling.runner import Runner
from nextchar.v1 import admin_pb2_grpc

# grpc binds with SO_REUSEPORT unless told not to: two listeners on one port (Admin's and the public
# one, or another process's) would then both bind, and connections to the public port could reach Admin.
# Without it a port in use fails at bind (OSError from `_bind`).
NO_REUSEPORT = ("grpc.so_reuseport", 0)


class Operations:
    """Built with the server (build_server), started with it, stopped first on shutdown."""

    def __init__(self, config: ServerConfig, metrics: Metrics, registry: Registry, runner: Runner,
                 health: health_aio.HealthServicer, overall: tuple[str, ...] = ("",)) -> None:
        self.config, self.metrics, self.registry, self.health = config, metrics, registry, health
        self.overall = overall  # health names for the whole server: SERVING while any model is served
        token = config.auth_token
        if config.auth_token_file is not None:
            token = read_token(config.auth_token_file)
        self.auth_required = token is not None
        metrics.watch(registry, runner)
        # A version replaced by a reload unloads when its last call ends; its batcher goes with it.
        registry.on_unload = lambda model: runner.forget(model.engine)
        # Outermost first: a refused call (UNAUTHENTICATED, or bytes that do not parse) is still
        # logged and counted.
        self.interceptors = [ObservingInterceptor(metrics, registry, config.log_prompts),
                             AuthInterceptor(token), MalformedRequestInterceptor()]
        self.reloader = Reloader(registry, self._set_health, config.reload_interval)
        self.endpoint: MetricsEndpoint | None = None

    def admin_server(self) -> tuple[grpc.aio.Server, str]:
        """Admin on its own listener (--admin-address), with the same interceptors and transport
        security as the public port; never on the public port, so a proxy in front of that port
        cannot reach it. Returns the server and the address it bound (port 0 resolved)."""
        server = grpc.aio.server(interceptors=self.interceptors, options=[NO_REUSEPORT])
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.registry, self.reloader), server)
        address = self.config.admin_address
        port = self._bind(server, address)
        if not address.startswith("unix:"):
            address = f"{address.rpartition(':')[0]}:{port}"
        return server, address

    def bind(self, grpc_server: grpc.aio.Server) -> int:
        """Bind host:port, with TLS when a certificate is configured; the port (0 picks one)."""
        return self._bind(grpc_server, f"{self.config.host}:{self.config.port}")

    def _bind(self, grpc_server: grpc.aio.Server, address: str) -> int:
        c = self.config
        try:
            if c.tls_cert is not None and c.tls_key is not None:
                creds = server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
                return grpc_server.add_secure_port(address, creds)
            return grpc_server.add_insecure_port(address)
        except RuntimeError as e:  # grpc reports a busy or bad address this way
            raise OSError(f"cannot bind {address}: {e}") from None

    async def start(self) -> None:
        """The metrics endpoint and the repository watcher (each only when configured)."""
        if self.config.metrics_port:
            self.endpoint = MetricsEndpoint(self.metrics, self.config.host, self.config.metrics_port)
        self.reloader.start()

    async def stop_changes(self) -> None:
        """Shutdown: no more reloads or Admin changes while calls drain (refused as UNAVAILABLE). Returns
        at once: a rescan loading a model is abandoned, not awaited, and its model is never served."""
        await self.reloader.stop()

    def close(self) -> None:
        """Shutdown, last step: the metrics endpoint (it stays up while calls drain)."""
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None

    async def _set_health(self, name: str, serving: bool) -> None:
        """A model's health, and the whole server's: SERVING while any model is served (a server that
        started on an empty repository serves from its first model on), NOT_SERVING once the last one is
        removed or unloaded (every call would be NOT_FOUND)."""
        statuses = health_pb2.HealthCheckResponse
        await self.health.set(name, statuses.SERVING if serving else statuses.NOT_SERVING)
        overall = statuses.SERVING if self.registry.names() else statuses.NOT_SERVING
        for whole in self.overall:
            await self.health.set(whole, overall)
