"""Triton streaming clients for bench_triton, run by the triton venv's Python (tritonclient: protobuf<7).

Usage: <triton venv>/bin/python bench/triton/client.py ADDRESS
Reads one JSON job per stdin line, prints one JSON reply line:
  {"ready": [models]} -> {"ready": bool};
  {"model", "prompts" (one per stream), "chars", "temperature", "seeds"} -> {"wall": seconds, "texts",
  "messages", "ttfc": [seconds per stream]}: one gRPC ModelStreamInfer call per stream, all at once on
  one channel.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException


def _inputs(prompt: str, chars: int, temperature: float, seed: int) -> list[InferInput]:
    values = (("PROMPT", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
              ("MAX_NEW_CHARS", "INT32", np.array([chars], dtype=np.int32)),
              ("TEMPERATURE", "FP32", np.array([temperature], dtype=np.float32)),
              ("SEED", "UINT64", np.array([seed], dtype=np.uint64)))
    out = []
    for name, dtype, value in values:
        x = InferInput(name, [1], dtype)
        x.set_data_from_numpy(value)
        out.append(x)
    return out


async def one(client: grpcclient.InferenceServerClient, model: str, prompt: str, chars: int,
              temperature: float, seed: int, i: int) -> tuple[str, int, float]:
    async def requests():
        yield {"model_name": model, "inputs": _inputs(prompt, chars, temperature, seed),
               "request_id": str(i)}

    t0 = time.perf_counter()
    ttfc = None
    pieces: list[str] = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise SystemExit(f"stream {i}: {error}")
        text = result.as_numpy("TEXT")
        if text is not None and text.size:
            if ttfc is None:
                ttfc = time.perf_counter() - t0
            pieces.append(text.reshape(-1)[0].decode())
        if sum(map(len, pieces)) >= chars:  # the model sends its last piece with the final flag
            break
    return "".join(pieces), len(pieces), ttfc or 0.0


async def job(client: grpcclient.InferenceServerClient, spec: dict) -> dict:
    t0 = time.perf_counter()
    pairs = enumerate(zip(spec["prompts"], spec["seeds"], strict=True))
    done = await asyncio.gather(*(one(client, spec["model"], p, spec["chars"], spec["temperature"], s, i)
                                  for i, (p, s) in pairs))
    wall = time.perf_counter() - t0
    return {"wall": wall, "texts": [d[0] for d in done], "messages": sum(d[1] for d in done),
            "ttfc": [d[2] for d in done]}


async def ready(client: grpcclient.InferenceServerClient, models: list[str]) -> bool:
    try:
        return all([await client.is_model_ready(m) for m in models])
    except InferenceServerException:  # not listening yet
        return False


async def main(address: str) -> None:
    client = grpcclient.InferenceServerClient(address)
    try:
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            spec = json.loads(line)
            if "ready" in spec:
                reply = {"ready": await ready(client, spec["ready"])}
            else:
                reply = await job(client, spec)
            print(json.dumps(reply), flush=True)
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
