"""onnxruntime's own per-node profile of the generation graph: where one Loop iteration's time goes.

Usage: .venv/bin/python -m bench.profile_graph --repo DIR [--cells lstm rnn] [--batch 64] [--k 16] [--runs 20]

Builds the served generation graph (kstep.build_generation_graph) of `<repo>/<cell>256/1`, runs it with
onnxruntime profiling on (one thread; unfiltered rows at temperature 0.8) and sums each op type's kernel
time per Loop iteration. Profiling adds its own cost per node, so read the split, not the totals.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from bench.common import generation_feed, machine, model_name
from nextchar.server.core.artifact import load_artifact
from nextchar.server.core.kstep import build_generation_graph


def profile(version_dir: Path, batch: int, k: int, runs: int, out: Path) -> list[str]:
    art = load_artifact(version_dir)
    io = {f: getattr(art.manifest.io, f) for f in ("tokens", "h0", "c0", "logits", "hn", "cn")}
    graph = build_generation_graph(onnx.load(str(art.model_path)), io)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out / version_dir.parent.name)
    session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = art.manifest.architecture
    names = [i.name for i in session.get_inputs()]
    feed = generation_feed(names, a.num_layers, a.hidden_size, batch, k)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
    iterations = runs * k
    lines = [f"{version_dir.parent.name}, batch {batch}: us per Loop iteration by op type (nodes each)"]
    lines += [f"  {op:14s} {us / iterations:8.1f}  ({count[op] // iterations})"
              for op, us in per_op.most_common() if op != "Loop" and us / iterations >= 1.0]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, required=True, help="an export made with bench.common --shakespeare")
    p.add_argument("--cells", nargs="+", default=["lstm", "rnn"], choices=["lstm", "gru", "rnn"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--runs", type=int, default=20)
    a = p.parse_args()
    print(f"Machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="ortprof-") as d:
        for cell in a.cells:
            print("\n".join(profile(a.repo / model_name(cell) / "1", a.batch, a.k, a.runs, Path(d))))


if __name__ == "__main__":
    main()
