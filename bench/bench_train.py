"""Training chars/s: nextchar's trainer against a plain PyTorch loop, same model, batch and sequence length.

Run: .venv/bin/python -m bench.bench_train [--hidden 128 --batch 32 --seq 64 --steps 40 --repeats 15]

Both loops train the same CharModel on the same text with truncated BPTT (state carried and detached),
Adam, cross-entropy and grad-norm clipping, on one thread. nextchar's figure is the training chars/s
its own trainer records (`chars_per_s` in metrics.jsonl: the steps before its evaluation); the plain
loop is timed over the same number of steps (a 1% validation split keeps the untimed evaluation
short). Both are timed by the same injected clock: by default this thread's CPU time, so that other
processes on a shared machine do not add their time to either side (--clock wall for wall time).
Repeats interleave the two, alternating which goes first, so a busy machine slows both
alike; the ratio is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from nextchar.training.config import TrainConfig
from nextchar.training.corpora import build_vocab, load_corpus
from nextchar.training.data import encode, split
from nextchar.training.model import CharModel
from nextchar.training.train import train

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def nextchar_chars_per_s(config: TrainConfig, clock: Callable[[], float]) -> float:
    with tempfile.TemporaryDirectory() as d:
        p = train(config, Path(d) / "run", progress=False, log=lambda _: None, clock=clock)
    return p.metrics[0]["chars_per_s"]


def plain_chars_per_s(config: TrainConfig, clock: Callable[[], float]) -> float:
    """The loop one writes from the PyTorch docs: slice contiguous streams, step, detach, clip."""
    text = load_corpus(config.corpus).text
    vocab = build_vocab(text)
    data, _ = split(encode(text, vocab), config.val_fraction)
    b, t = config.batch_size, config.seq_len
    length = data.numel() // b
    streams = data[: b * length].view(b, length)
    torch.manual_seed(config.seed)
    model = CharModel(config.model_config(len(vocab)))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    state = None
    start = clock()
    for step in range(config.max_steps):
        c = (step * t) % (length - t - 1)
        x, y = streams[:, c : c + t], streams[:, c + 1 : c + t + 1]
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        loss.item()  # both loops read the loss every step (progress bar / logging)
    return config.max_steps * b * t / (clock() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(SHAKESPEARE) if SHAKESPEARE.is_file() else "anthem")
    ap.add_argument("--cell", default="lstm")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embedding", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=CLOCKS, default="cpu",
                    help="cpu: this thread's CPU time (robust to other processes; needs --threads 1); wall")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = CLOCKS[a.clock]
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu counts one thread's CPU time; use it with --threads 1")
    config = TrainConfig(corpus=a.corpus, cell=a.cell, hidden_size=a.hidden, embedding_dim=a.embedding,
                         batch_size=a.batch, seq_len=a.seq, max_steps=a.steps, eval_every=a.steps,
                         schedule="constant", patience=0, sample_chars=0, val_fraction=0.01)
    print(f"corpus {Path(a.corpus).name}, {a.cell} {config.num_layers}x{a.hidden}, embedding {a.embedding}, "
          f"batch {a.batch}, seq {a.seq}, {a.steps} steps x {a.repeats} repeats, {a.threads} thread(s), "
          f"{a.clock} clock")
    print("| repeat | nextchar chars/s | plain PyTorch chars/s | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for r in range(a.repeats):
        if r % 2 == 0:
            ours, plain = nextchar_chars_per_s(config, clock), plain_chars_per_s(config, clock)
        else:
            plain, ours = plain_chars_per_s(config, clock), nextchar_chars_per_s(config, clock)
        ratios.append(ours / plain)
        print(f"| {r + 1} | {ours:,.0f} | {plain:,.0f} | {ours / plain:.3f} |", flush=True)
    print(f"\nmedian ratio nextchar / plain: {statistics.median(ratios):.3f}x "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
