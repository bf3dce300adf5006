"""Generate the Python protobuf and gRPC code from proto/ (the one way it is made; never edit the output)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate() -> None:
    from grpc_tools import protoc  # a build requirement; imported late so this file loads without it

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    # nextchar.v1, and the Open Inference Protocol (package inference) served beside it.
    sources = sorted(str(p.relative_to(PROTO_DIR)) for d in ("v1", "inference")
                     for p in (PROTO_DIR / "nextchar" / d).glob("*.proto"))
    args = [
        "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={PROTO_DIR}", f"--pyi_out={PROTO_DIR}", f"--grpc_python_out={PROTO_DIR}", *sources,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed on " + " ".join(sources))


if __name__ == "__main__":
    generate()
