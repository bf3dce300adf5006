"""The nextchar.v1.Admin RPCs, thin over server.reload (access rules live in server.security)."""

from __future__ import annotations

import grpc

from nextchar.server.edge import wire
from nextchar.server.edge.errors import mapped
from nextchar.server.ops.registry import Registry
from nextchar.server.ops.reload import Change, Reloader
from nextchar.server.scheduling.threads import detached
from nextchar.v1 import admin_pb2 as pb
from nextchar.v1 import admin_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Each change runs on a thread of its own (a load validates and warms up an ONNX file)."""

    def __init__(self, registry: Registry, reloader: Reloader) -> None:
        self.registry, self.reloader = registry, reloader

    @mapped
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext):
        version = request.version if request.HasField("version") and request.version > 0 else None
        model = await detached(self.reloader.load, request.name, version)
        await self.reloader.apply_health([Change(model.name, "loaded", model.version)])
        name = model.name
        info = wire.model_info(model, self.registry.versions(name), self.registry.load_errors(name))
        return pb.LoadModelResponse(model=info)

    @mapped
    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext):
        await detached(self.reloader.unload, request.name)
        await self.reloader.apply_health([Change(request.name, "removed")])
        return pb.UnloadModelResponse()

    @mapped
    async def ReloadRepository(self, request: pb.ReloadRepositoryRequest, context: grpc.aio.ServicerContext):
        changes = await self.reloader.rescan_async()
        return pb.ReloadRepositoryResponse(changes=[
            pb.ModelChange(name=c.name, action=c.action, version=c.version, reason=c.reason)
            for c in changes])
