"""What the generation graph's sampling costs per Loop iteration: the portable exp and the whole rule.

Usage: .venv/bin/python -m bench.bench_loop_body --repo DIR [--cells lstm rnn] [--rounds 40]

Builds three graphs from each one-step model (kstep.build_generation_graph): as served (the portable exp,
~33 ONNX nodes, bit-identical to docs/sampling.md); with onnxruntime's one Exp node instead (NOT the rule:
for measuring only); with the sampling replaced by an ArgMax (the model alone). Runs them interleaved, one
onnxruntime thread, best of `rounds`, at batch 1 (K=64) and batch 64 (K=16); prints µs per iteration.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnx
from onnx import helper

import nextchar.server.core.kstep as kstep
from bench.common import export_untrained, generation_feed, machine, model_name
from nextchar.server.core.engine import _session


def _variant(model: onnx.ModelProto, io: dict[str, str], kind: str) -> onnx.ModelProto:
    exp_nodes, sampling_nodes = kstep.exp_nodes, kstep._sampling_nodes
    if kind == "one Exp node":
        kstep.exp_nodes = lambda z, w, prefix="": [helper.make_node("Exp", [z], [w])]
    elif kind == "argmax only":
        def argmax(logits: str, step: str, tok_out: str, vocab_size: int) -> list[onnx.NodeProto]:
            return [kstep._const("bench/last", -1, kstep._I),
                    helper.make_node("Gather", [logits, "bench/last"], ["bench/row"], axis=1),
                    helper.make_node("ArgMax", ["bench/row"], [tok_out], axis=1, keepdims=1)]
        kstep._sampling_nodes = argmax
    try:
        return kstep.build_generation_graph(model, io)
    finally:
        kstep.exp_nodes, kstep._sampling_nodes = exp_nodes, sampling_nodes


def measure(version_dir: Path, rounds: int) -> list[str]:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    io = {k: manifest["io"].get(k, "") for k in ("tokens", "h0", "c0", "logits", "hn", "cn")}
    model = onnx.load(str(version_dir / "model.onnx"))
    kinds = ("as served (portable exp)", "one Exp node", "argmax only")
    sessions = {k: _session(_variant(model, io, k).SerializeToString(), 1, 1) for k in kinds}
    names = [i.name for i in sessions[kinds[0]].get_inputs()]
    layers, hidden = manifest["architecture"]["num_layers"], manifest["architecture"]["hidden_size"]
    lines = []
    for batch, k in ((1, 64), (64, 16)):
        feed = generation_feed(names, layers, hidden, batch, k)
        best = dict.fromkeys(kinds, float("inf"))
        for _ in range(rounds):
            for kind, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                best[kind] = min(best[kind], time.perf_counter() - t0)
        us = {kind: v / k * 1e6 for kind, v in best.items()}
        cells = " | ".join(f"{us[kind]:.1f}" for kind in kinds)
        lines.append(f"| {version_dir.parent.name} | {batch} | {cells}"
                     f" | {us[kinds[0]] - us[kinds[1]]:+.1f} ({us[kinds[0]] / us[kinds[1]] - 1:+.0%}) | "
                     f"{us[kinds[0]] - us[kinds[2]]:.1f} ({1 - us[kinds[2]] / us[kinds[0]]:.0%}) |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, required=True, help="a --shakespeare export, or an empty folder")
    p.add_argument("--cells", nargs="+", default=["lstm", "rnn"], choices=["lstm", "gru", "rnn"])
    p.add_argument("--rounds", type=int, default=40)
    a = p.parse_args()
    missing = [c for c in a.cells if not (a.repo / model_name(c)).exists()]
    if missing:
        export_untrained(a.repo, missing, shakespeare=True)
    print(f"Machine before: {machine()}")
    print("| model | batch | as served µs/iter | one Exp node (not the rule) | argmax only | "
          "portable exp costs | sampling costs |\n|---|---|---|---|---|---|---|")
    for cell in a.cells:
        print("\n".join(measure(a.repo / model_name(cell) / "1", a.rounds)), flush=True)
    print(f"Machine after: {machine()}")


if __name__ == "__main__":
    main()
