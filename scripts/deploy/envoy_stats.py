"""Envoy's view of the nextchar cluster from its admin port: hosts' health, requests, retries, ejections."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

ADMIN = "http://127.0.0.1:9901"
CLUSTER = "nextchar"
# Cluster counters worth showing after a replica kill (names as in Envoy's /stats).
COUNTERS = (
    "upstream_rq_total", "upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_overflow",
    "upstream_cx_connect_fail", "upstream_rq_rx_reset", "upstream_cx_destroy_remote_with_active_rq",
    "health_check.failure", "outlier_detection.ejections_enforced_total",
)


def _get(path: str) -> str:
    with urllib.request.urlopen(ADMIN + path, timeout=5) as r:
        return r.read().decode()


def hosts() -> dict[str, dict[str, str]]:
    """host:port -> {health_flags, rq_success, rq_error, rq_total, ...} from /clusters."""
    out: dict[str, dict[str, str]] = {}
    for line in _get("/clusters").splitlines():
        parts = line.split("::")
        # host:port rows only (the cluster's circuit-breaker and outlier rows share the prefix).
        if len(parts) == 4 and parts[0] == CLUSTER and ":" in parts[1]:
            out.setdefault(parts[1], {})[parts[2]] = parts[3]
    return out


def snapshot() -> dict[str, int]:
    """Cluster counters plus per-host request counts, as one flat dict."""
    stats: dict[str, int] = {}
    for line in _get(f"/stats?filter=^cluster\\.{CLUSTER}\\.").splitlines():
        name, _, value = line.partition(": ")
        key = name.removeprefix(f"cluster.{CLUSTER}.")
        if key in COUNTERS and value.strip().isdigit():
            stats[key] = int(value)
    for host, fields in hosts().items():
        for field in ("rq_success", "rq_error"):
            stats[f"{host} {field}"] = int(fields.get(field, 0))
    return stats


def show(delta_from: dict[str, int] | None = None) -> None:
    for host, fields in sorted(hosts().items()):
        print(f"  {host:<18} health {fields.get('health_flags', '?'):<28} "
              f"rq_success {fields.get('rq_success', '?'):>6} rq_error {fields.get('rq_error', '?'):>4}")
    now = snapshot()
    label = "counters (this load)" if delta_from is not None else "counters"
    shown = {k: v - (delta_from or {}).get(k, 0) for k, v in now.items()}
    print(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--snapshot", action="store_true", help="print the counters as JSON")
    p.add_argument("--since", type=Path, help="show counters as differences from a --snapshot file")
    p.add_argument("--wait-healthy", type=int, default=0, help="first wait up to 30 s for N healthy hosts")
    args = p.parse_args(argv)
    if args.snapshot:
        print(json.dumps(snapshot()))
        return 0
    if args.wait_healthy:
        deadline = time.monotonic() + 30
        while sum(f.get("health_flags") == "healthy" for f in hosts().values()) < args.wait_healthy:
            if time.monotonic() > deadline:
                show()
                print(f"Envoy: fewer than {args.wait_healthy} healthy hosts after 30 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
    show(json.loads(args.since.read_text()) if args.since else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
