"""ModelStreamInfer's bound on what a client that sends without reading makes the server hold."""

from __future__ import annotations

import asyncio

from nextchar.inference import grpc_service_pb2 as kpb
from nextchar.server.edge import kserve


def test_a_client_that_sends_without_reading_holds_a_bounded_number_of_answered_requests() -> None:
    """Each request here is answered at once; the client reads one response and then only sends. The
    server may run at most MAX_STREAM_REQUESTS requests whose responses the client has not taken:
    past that, reading the next request waits (it used to answer all 1,000 and queue their responses)."""
    answered: list[str] = []

    async def infer(request, context, streaming):
        answered.append(request.id)
        yield kpb.ModelInferResponse(id=request.id)

    servicer = object.__new__(kserve.InferenceServicer)  # only _infer is used by ModelStreamInfer
    servicer._infer = infer

    async def requests():
        for i in range(1000):
            yield kpb.ModelInferRequest(model_name="m", id=str(i))

    async def run() -> None:
        responses = servicer.ModelStreamInfer(requests(), None)
        first = await anext(responses)
        assert first.infer_response.id == "0"
        for _ in range(200):  # let the reader and the answers run as far as they can
            await asyncio.sleep(0)
        assert len(answered) <= kserve.MAX_STREAM_REQUESTS + 1, len(answered)
        rest = [r.infer_response.id async for r in responses]  # reading on lets every request through
        assert len(rest) == 999 and len(answered) == 1000

    asyncio.run(run())
