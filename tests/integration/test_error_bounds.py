"""Error statuses stay small whatever the request held (issue 13.1): Python and grpc-js both get the
INVALID_ARGUMENT, not a 'metadata size exceeds limit' or a hang."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from nextchar.server.core.limits import MAX_LISTED_VIOLATIONS
from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROBE_DIR = ROOT / "tests" / "e2e" / "grpcjs"
TRAILER_BUDGET = 8 * 1024  # bytes: well under Python's 16 KiB hard limit and grpc-js's

# 500 characters, 400 of them unknown; a 100k-character stop; a 100k-character replacement.
OOV_PROMPT = "O say" * 20 + "#" * 400
HUGE = "x" * 100_000
CASES = {
    "oov_prompt": ("Generate", pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt=OOV_PROMPT,
                                                  max_new_chars=5), "prompt"),
    "astral_oov_prompt": ("Generate", pb.GenerateRequest(model=pb.ModelRef(name="lstm"),
                                                         prompt="\U0001F600" * 500, max_new_chars=5),
                          "prompt"),
    "huge_astral_stop": ("Generate", pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                                        max_new_chars=5, stop=["\U0001F600" * 100_000]),
                         "stop[0]"),
    "huge_stop": ("Generate", pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                                 max_new_chars=5, stop=[HUGE]), "stop[0]"),
    "huge_replacement": ("Score", pb.ScoreRequest(model=pb.ModelRef(name="lstm"), text="O sé",
                                                  oov_policy=pb.OOV_POLICY_REPLACE, oov_replacement=HUGE),
                         "oov_replacement"),
    "huge_name": ("PredictNext", pb.PredictNextRequest(model=pb.ModelRef(name=HUGE), context="O", n=1),
                  "model.name"),
}


def _trailer_bytes(metadata) -> int:
    return sum(len(k) + len(v) for k, v in metadata)


@pytest.mark.parametrize("case", sorted(CASES))
def test_python_client_gets_a_bounded_invalid_argument(server, case: str) -> None:
    method, request, field = CASES[case]
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            getattr(stub, method)(request, timeout=30)
    err = e.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}: "), err.details()[:200]
    assert _trailer_bytes(err.trailing_metadata()) < TRAILER_BUDGET
    [raw] = [v for k, v in err.trailing_metadata() if k == "grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(bad)
    assert {v.field for v in bad.field_violations} == {field}
    if case == "oov_prompt":  # 400 unknown characters: the first ones listed, then how many more
        assert len(bad.field_violations) == MAX_LISTED_VIOLATIONS + 1
        assert bad.field_violations[-1].description.startswith(f"and {400 - MAX_LISTED_VIOLATIONS} more")


@pytest.fixture(scope="module")
def grpcjs_probe() -> Path:
    """node with @grpc/grpc-js installed in tests/e2e/grpcjs (test-only packages, from its lock file)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js with npm is not installed (needed for the grpc-js check)")
    if not (PROBE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm_ci = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
        done = subprocess.run(npm_ci, cwd=PROBE_DIR, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    return PROBE_DIR / "probe.mjs"


@pytest.mark.parametrize("case", sorted(CASES))
def test_grpcjs_client_gets_the_invalid_argument_without_hanging(server, grpcjs_probe: Path,
                                                                  case: str) -> None:
    method, request, field = CASES[case]
    body = json_format.MessageToDict(request, preserving_proto_field_name=True)
    done = subprocess.run(["node", str(grpcjs_probe), server.address, str(ROOT / "proto"), method, "20000"],
                          input=json.dumps(body), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    reply = json.loads(done.stdout)
    assert reply["code"] == "INVALID_ARGUMENT", reply
    assert reply["details"].startswith(f"{field}: "), reply["details"][:200]
    assert reply["trailerBytes"] < TRAILER_BUDGET
