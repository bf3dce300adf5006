"""PyTorch eager step vs onnxruntime step: the same model, one decode step (T=1) at batch 1 and 64.

Usage: .venv/bin/python -m bench.bench_torch_vs_ort [--batches 1 64] [--repeats 7]

Each cell's untrained 2-layer 256 model is built in torch (seed 0, one thread, inference_mode), exported
with training.export.export_model, and loaded by server.engine.Engine (one onnxruntime thread); both
step from the same state and the logits are compared. Ratio = torch seconds / onnxruntime seconds.
torch is imported here on purpose: this bench measures it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench.common import CELLS, best_of, load_engine, machine, model_name


def run(repo: Path, batches: list[int], repeats: int) -> str:
    import torch

    from nextchar.training.config import ModelConfig
    from nextchar.training.corpora import build_vocab, load_corpus
    from nextchar.training.export import export_model
    from nextchar.training.model import CharModel

    torch.set_num_threads(1)
    vocab = build_vocab(load_corpus("anthem").text)
    lines = ["PyTorch eager vs onnxruntime, one decode step (T=1), 1 thread each; chars/s = batch / s per "
             "step; best of --repeats rounds.", "",
             "| model | batch | torch eager chars/s | onnxruntime chars/s | onnxruntime speed-up "
             "| max abs logit diff |",
             "|---|---|---|---|---|---|"]
    for cell in CELLS:
        torch.manual_seed(0)
        model = CharModel(ModelConfig(vocab_size=len(vocab), cell=cell, hidden_size=256, num_layers=2)).eval()
        export_model(model, vocab, repo, model_name(cell), version=1)
        engine = load_engine(repo, model_name(cell))
        for b in batches:
            tokens = np.random.default_rng(0).integers(0, len(vocab), (b, 1))
            state = engine.initial_state(b)
            t_tokens = torch.from_numpy(tokens)
            t_state = tuple(torch.from_numpy(s) for s in state)

            def torch_step(model=model, t_tokens=t_tokens, t_state=t_state):
                with torch.inference_mode():
                    return model(t_tokens, t_state)

            def ort_step(engine=engine, tokens=tokens, state=state):
                return engine.step(tokens, state)

            diff = float(np.abs(torch_step()[0].numpy() - ort_step()[0]).max())
            t_torch = best_of(torch_step, repeats)
            t_ort = best_of(ort_step, repeats)
            lines.append(f"| {cell.upper()}-256 x2 | {b} | {b / t_torch:,.0f} | {b / t_ort:,.0f} | "
                         f"{t_torch / t_ort:.2f}x | {diff:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-torch-ort-") as d:
        print(run(Path(d), a.batches, a.repeats))


if __name__ == "__main__":
    main()
