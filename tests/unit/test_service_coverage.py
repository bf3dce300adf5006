"""Every RPC declared in proto/nextchar has a servicer method of its own, never the UNIMPLEMENTED stub."""

from __future__ import annotations

import pytest

from nextchar.inference import grpc_service_pb2, grpc_service_pb2_grpc
from nextchar.server.edge.admin import AdminServicer
from nextchar.server.edge.kserve import InferenceServicer
from nextchar.server.edge.servicer import NextCharServicer
from nextchar.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

CASES = [
    (inference_pb2, "NextChar", NextCharServicer, inference_pb2_grpc.NextCharServicer),
    (admin_pb2, "Admin", AdminServicer, admin_pb2_grpc.AdminServicer),
    (grpc_service_pb2, "GRPCInferenceService", InferenceServicer,
     grpc_service_pb2_grpc.GRPCInferenceServiceServicer),
]


@pytest.mark.parametrize(("module", "service", "ours", "generated"), CASES,
                         ids=[c[1] for c in CASES])
def test_servicer_overrides_every_rpc(module, service, ours, generated) -> None:
    methods = [m.name for m in module.DESCRIPTOR.services_by_name[service].methods]
    assert methods, f"{service} declares no RPC"
    missing = [m for m in methods if getattr(ours, m, None) is getattr(generated, m)]
    assert not missing, f"{ours.__name__} leaves {missing} to the generated UNIMPLEMENTED stub"
