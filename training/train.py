"""char-rnn style training: contiguous streams, truncated BPTT, evaluation, checkpoints, exact resume."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from nextchar.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nextchar.training.config import ConfigError, TrainConfig
from nextchar.training.corpora import Corpus, CorpusError, build_vocab, load_corpus
from nextchar.training.data import Streams, check_trainable, encode, mix_seed, split
from nextchar.training.metrics import bits, plot_losses, write_metrics
from nextchar.training.model import CharModel, State

PLATEAU_PATIENCE = 2  # evaluations without a new best val loss before the plateau schedule halves lr
LAST, BEST = "last.pt", "best.pt"


def corpus_info(corpus: Corpus) -> dict:
    return {"name": corpus.name, "sha256": corpus.sha256, "bytes": corpus.num_bytes,
            "chars": len(corpus.text)}


def lr_at(config: TrainConfig, step: int, scale: float, elapsed_s: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule, times `scale`.

    `elapsed_s` (wall seconds so far) is the clock of the cosine-time schedule.
    """
    if step < config.warmup_steps:
        return config.lr * scale * (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        t = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    elif config.schedule == "cosine-time":
        t = elapsed_s / (config.max_minutes * 60.0)
    else:
        return config.lr * scale
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return config.lr * scale * ratio


@torch.no_grad()
def evaluate(model: CharModel, tokens: torch.Tensor, batch: int, seq_len: int) -> float:
    """Mean cross-entropy (nats/char) over all of `tokens`, read as contiguous streams with carried state."""
    n = tokens.numel() - 1
    batch = max(1, min(batch, n // seq_len))
    length = n // batch
    x = tokens[: batch * length].view(batch, length)
    y = tokens[1 : batch * length + 1].view(batch, length)
    was_training = model.training
    model.eval()
    total, state = 0.0, None
    for c in range(0, length, seq_len):
        logits, state = model(x[:, c : c + seq_len], state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, c : c + seq_len].reshape(-1),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (batch * length)


@torch.no_grad()
def generate(model: CharModel, vocab: list[str], prime: str, n: int, temperature: float | None,
             generator: torch.Generator | None = None) -> str:
    """`n` characters after `prime`: greedy when temperature is None, else sampled with `generator`."""
    index = {c: i for i, c in enumerate(vocab)}
    was_training = model.training
    model.eval()
    logits, state = model(torch.tensor([[index[c] for c in prime]]), None)
    out = []
    for _ in range(n):
        last = logits[0, -1]
        if temperature is None:
            t = int(last.argmax())
        else:
            t = int(torch.multinomial(F.softmax(last / temperature, -1), 1, generator=generator))
        out.append(vocab[t])
        logits, state = model(torch.tensor([[t]]), state)
    model.train(was_training)
    return "".join(out)


@dataclass
class Progress:
    """Everything besides weights and optimizer that an exact resume needs."""

    step: int = 0
    best_val: float = math.inf
    evals_since_best: int = 0
    lr_scale: float = 1.0
    train_seconds: float = 0.0
    metrics: list[dict] = field(default_factory=list)


def _payload(model: CharModel, opt: torch.optim.Optimizer, config: TrainConfig, vocab: list[str],
             corpus: Corpus, p: Progress, state: State | None, epoch: int) -> dict:
    return {
        "model_config": model.config.to_dict(), "vocab": vocab, "model_state": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": {"kind": config.schedule, "lr_scale": p.lr_scale,
                      "evals_since_best": p.evals_since_best},
        "rng": {"torch": torch.get_rng_state()},  # dropout; data order needs none: it is f(seed, step)
        "step": p.step, "epoch": epoch, "hidden": list(state) if state is not None else [],
        "best_val": p.best_val, "metrics": p.metrics, "corpus": corpus_info(corpus),
        "train_seconds": p.train_seconds, "seed": config.seed, "train_config": config.to_dict(),
    }


def _check_resumable(ckpt: dict, config: TrainConfig, corpus: Corpus, path: Path) -> None:
    saved = TrainConfig.from_dict(ckpt["train_config"]).to_dict()
    # A longer time budget is the one change that cannot alter what was already computed.
    diff = [k for k, v in config.to_dict().items() if k != "max_minutes" and saved[k] != v]
    if diff:
        shown = ", ".join(f"{k}={saved[k]!r} (now {config.to_dict()[k]!r})" for k in diff)
        raise ConfigError(f"--resume: {path} was trained with different settings: {shown}")
    if ckpt["corpus"]["sha256"] != corpus.sha256:
        raise CorpusError(f"--resume: the corpus {corpus.name!r} changed since {path} was written")


Log = Callable[[str], None]


def train(config: TrainConfig, out: Path, resume: bool = False, progress: bool = True,
          log: Log = print, clock: Callable[[], float] = time.perf_counter) -> Progress:
    """Train per `config` into run dir `out` (last.pt, best.pt, metrics.*, loss.png); returns the progress.

    Every problem with the corpus, the config or `out` is raised before anything is written. `clock`
    times steps, evaluations and the --max-minutes budget (a benchmark may pass time.thread_time).
    """
    corpus = load_corpus(config.corpus)
    check_trainable(corpus.text, corpus.name, config.seq_len)
    vocab = build_vocab(corpus.text)
    train_tokens, val_tokens = split(encode(corpus.text, vocab), config.val_fraction)
    if val_tokens.numel() <= config.seq_len:
        raise CorpusError(
            f"the validation split (--val-fraction {config.val_fraction} of {len(corpus.text)} characters) "
            f"has {val_tokens.numel()} characters; it needs more than --seq {config.seq_len}"
        )
    streams = Streams(train_tokens, config.batch_size, config.seq_len, config.seed)
    last = out / LAST
    if resume and not last.is_file():
        raise CheckpointError(f"--resume: there is no checkpoint {str(last)!r} to resume")
    if not resume and last.exists():
        raise ConfigError(f"--out {str(out)!r} already holds a run; pass --resume or choose another --out")

    torch.manual_seed(config.seed)  # the model's initial weights, then dropout, come from this seed
    model = CharModel(config.model_config(len(vocab)))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    p, state = Progress(), None
    if resume:
        ckpt = load_checkpoint(last)
        _check_resumable(ckpt, config, corpus, last)
        model.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        sched = ckpt["scheduler"]
        p = Progress(ckpt["step"], ckpt["best_val"], sched["evals_since_best"], sched["lr_scale"],
                     ckpt["train_seconds"], list(ckpt["metrics"]))
        state = tuple(ckpt["hidden"]) or None
        log(f"resuming {last} at step {p.step} ({p.train_seconds:.0f} s trained)")
    out.mkdir(parents=True, exist_ok=True)
    chars_per_step = config.batch_size * config.seq_len
    log(f"corpus {corpus.name!r}: {len(corpus.text):,} chars, vocab {len(vocab)}, train "
        f"{train_tokens.numel():,} / val {val_tokens.numel():,}; model {config.cell} "
        f"{sum(t.numel() for t in model.parameters()):,} params; {chars_per_step:,} chars/step")
    return _loop(config, model, opt, streams, val_tokens, vocab, corpus, out, p, state, progress, log, clock)


def _loop(config: TrainConfig, model: CharModel, opt: torch.optim.Optimizer, streams: Streams,
          val_tokens: torch.Tensor, vocab: list[str], corpus: Corpus, out: Path, p: Progress,
          state: State | None, progress: bool, log: Log, clock: Callable[[], float]) -> Progress:
    from tqdm import tqdm

    chars_per_step = config.batch_size * config.seq_len
    budget = config.max_minutes * 60.0
    bar = tqdm(total=config.max_steps or None, initial=p.step, disable=not progress, unit="step",
               dynamic_ncols=True, mininterval=0.5)
    model.train()
    loss_sum, loss_n, seg_start, seg_steps = 0.0, 0, clock(), 0
    eval_seconds, stop = 0.0, ""
    while not stop:
        epoch, k = streams.position(p.step)
        if k == 0:
            state = None  # a new epoch starts the streams at a new offset: no state to carry
        x, y = streams.batch_at(p.step)
        for g in opt.param_groups:
            g["lr"] = lr_at(config, p.step, p.lr_scale, p.train_seconds + clock() - seg_start)
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)  # truncated BPTT: keep the values, drop the graph
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
        opt.step()
        p.step += 1
        loss_sum += loss.item()
        loss_n += 1
        seg_steps += 1
        now = clock()
        elapsed = p.train_seconds + (now - seg_start)
        if seg_steps % 10 == 0 or seg_steps == 1:
            bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}",
                            chars_s=f"{seg_steps * chars_per_step / (now - seg_start):,.0f}", refresh=False)
        bar.update(1)
        if config.max_steps and p.step >= config.max_steps:
            stop = f"reached --max-steps {config.max_steps}"
        elif budget and elapsed + eval_seconds >= budget:
            stop = f"reached --max-minutes {config.max_minutes:g}"
        if stop or p.step % config.eval_every == 0:
            chars_s = seg_steps * chars_per_step / (now - seg_start)
            t0 = clock()
            val = evaluate(model, val_tokens, config.batch_size, config.seq_len)
            improved = val < p.best_val
            if improved:
                p.best_val, p.evals_since_best = val, 0
            else:
                p.evals_since_best += 1
                if config.schedule == "plateau" and p.evals_since_best % PLATEAU_PATIENCE == 0:
                    p.lr_scale *= 0.5
            if config.patience and p.evals_since_best >= config.patience and not stop:
                stop = f"no val improvement in {config.patience} evaluations (--patience)"
            train_loss = loss_sum / loss_n
            p.metrics.append({
                "step": p.step, "epoch": epoch, "chars_seen": p.step * chars_per_step,
                "train_loss": train_loss, "val_loss": val,
                "train_bpc": bits(train_loss), "val_bpc": bits(val),
                "lr": opt.param_groups[0]["lr"], "chars_per_s": chars_s, "elapsed_s": elapsed,
            })
            gen = torch.Generator().manual_seed(mix_seed(config.seed, p.step))
            prime = vocab[int(val_tokens[0])]
            greedy = generate(model, vocab, prime, config.sample_chars, None)
            sampled = generate(model, vocab, prime, config.sample_chars, config.temperature, gen)
            bar.clear()
            log(f"step {p.step} epoch {epoch}: "
                f"train {train_loss:.4f} nats/char ({bits(train_loss):.3f} bpc), "
                f"val {val:.4f} nats/char ({bits(val):.3f} bpc){' *' if improved else ''}; "
                f"lr {opt.param_groups[0]['lr']:.2e}; {chars_s:,.0f} chars/s")
            log(f"  greedy: {prime + greedy!r}")
            log(f"  T={config.temperature:g}: {prime + sampled!r}")
            p.train_seconds = elapsed
            payload = _payload(model, opt, config, vocab, corpus, p, state, epoch)
            save_checkpoint(out / LAST, payload)
            if improved:
                save_checkpoint(out / BEST, payload)
            write_metrics(out, p.metrics)
            plot_losses(out / "loss.png", p.metrics, "step", {"train_loss": "train", "val_loss": "val"},
                        f"{corpus.name}: {config.cell} {config.num_layers}x{config.hidden_size}")
            eval_seconds = clock() - t0
            loss_sum, loss_n, seg_steps = 0.0, 0, 0
            seg_start = clock()
            p.train_seconds += eval_seconds
            bar.refresh()
    bar.close()
    log(f"stopped: {stop}. best val {p.best_val:.4f} nats/char ({bits(p.best_val):.3f} bpc) after "
        f"{p.step} steps, {p.train_seconds / 60:.1f} min; checkpoints in {out}")
    return p
