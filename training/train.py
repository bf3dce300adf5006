"""char-rnn style training: contiguous streams, truncated BPTT, evaluation, checkpoints, exact resume."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from nextchar.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from nextchar.training.config import ConfigError, TrainConfig
from nextchar.training.corpora import CorpusError
from nextchar.training.data import Streams, Tokens, check_sizes, mix_seed, split
from nextchar.training.evaluation import evaluate, generate
from nextchar.training.metrics import bits, plot_losses, write_metrics
from nextchar.training.model import CharModel, State
from nextchar.training.runtime import Runtime
from nextchar.training.tokens import TokenCorpus, open_corpus

PLATEAU_PATIENCE = 2  # evaluations without a new best val loss before the plateau schedule halves lr
LAST, BEST = "last.pt", "best.pt"
CPU = Runtime(torch.device("cpu"))

__all__ = ["BEST", "LAST", "Progress", "evaluate", "generate", "lr_at", "train"]


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


def optimizer(model: CharModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay (decoupled) on matrices and embeddings only, as nanoGPT does."""
    params = list(model.parameters())
    groups: list[dict] = [{"params": params}]
    if config.weight_decay:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0, fused=True)


@dataclass
class Progress:
    """Everything besides weights and optimizer that an exact resume needs."""

    step: int = 0
    best_val: float = math.inf
    evals_since_best: int = 0
    lr_scale: float = 1.0
    train_seconds: float = 0.0
    metrics: list[dict] = field(default_factory=list)


def _cpu(obj: Any) -> Any:
    """`obj` (an optimizer state_dict) with every tensor copied to the CPU, so the file loads anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def weight_average(model: CharModel, decay: float) -> AveragedModel:
    """An exponential moving average of `model`'s weights (torch's AveragedModel): after each optimizer
    step, average <- decay * average + (1 - decay) * weights; the first update copies the weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def _record(model: CharModel, average: AveragedModel | None, opt: torch.optim.Optimizer, config: TrainConfig,
            corpus: TokenCorpus, p: Progress, state: State | None, epoch: int, rt: Runtime) -> Checkpoint:
    """The checkpoint of this moment; every process calls it (it gathers the streams' hidden rows)."""
    hidden = [rt.gather_rows(s).float().cpu() for s in state] if state is not None else []
    # Dropout's generators, every process's (data order needs none: it is f(seed, step)); "torch" /
    # "cuda" are rank 0's, as files from before per-process states were kept hold.
    mine = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(rt.device)
    ranks = rt.gather_objects(mine)
    rng: dict[str, Any] = {**ranks[0], "ranks": ranks} if rt.distributed else mine
    served = average.module if average is not None else model
    return Checkpoint(
        model_config=model.config, vocab=corpus.vocab, model_state=_cpu(served.state_dict()),
        train_state=_cpu(model.state_dict()) if average is not None else {},
        corpus=corpus.info(), train_config=config.to_dict(),
        seed=config.seed, step=p.step, epoch=epoch, train_seconds=p.train_seconds, metrics=p.metrics,
        best_val=p.best_val, optimizer=_cpu(opt.state_dict()),
        scheduler={"kind": config.schedule, "lr_scale": p.lr_scale, "evals_since_best": p.evals_since_best},
        rng=rng, hidden=hidden,
    )


def _check_resumable(ckpt: Checkpoint, config: TrainConfig, corpus: TokenCorpus, path: Path) -> None:
    if "preset" in ckpt.train_config:  # a seminar preset's run: a fixed recipe, not a TrainConfig
        raise ConfigError(f"--resume: {path} is a run of --preset {ckpt.train_config['preset']}, which is "
                          "not resumable; train it again, or start a --corpus run in another --out")
    try:
        saved = TrainConfig.from_dict(ckpt.train_config).to_dict()
    except (TypeError, ConfigError) as e:  # written by another version, or edited
        raise ConfigError(f"--resume: {path} records settings this trainer does not know: {e}") from None
    # A longer budget cannot alter what was already computed, unless it is the schedule's horizon
    # (--max-steps for cosine, --max-minutes for cosine-time: the lr would jump back up).
    horizon = {"cosine": "max_steps", "cosine-time": "max_minutes"}.get(config.schedule)
    budget = {"max_minutes", "max_steps"} - {horizon}
    diff = [k for k, v in config.to_dict().items() if k not in budget and saved[k] != v]
    if diff:
        shown = ", ".join(f"{k}={saved[k]!r} (now {config.to_dict()[k]!r})" for k in diff)
        raise ConfigError(f"--resume: {path} was trained with different settings: {shown}")
    if ckpt.corpus["sha256"] != corpus.sha256:
        raise CorpusError(f"--resume: the corpus {corpus.name!r} changed since {path} was written")


Log = Callable[[str], None]


def train(config: TrainConfig, out: Path, resume: bool = False, progress: bool = True, log: Log = print,
          clock: Callable[[], float] = time.perf_counter, runtime: Runtime = CPU) -> Progress:
    """Train per `config` into run dir `out` (last.pt, best.pt, metrics.*, loss.png); returns the progress.

    Every problem with the corpus, the config or `out` is raised before anything is written. `clock`
    times steps, evaluations and the --max-minutes budget (a benchmark may pass time.thread_time).
    Under torchrun every process calls this with its `runtime`; only the main one logs and writes.
    """
    rt = runtime
    log = log if rt.is_main else (lambda _: None)
    corpus = open_corpus(config.corpus)
    check_sizes(len(corpus.tokens), corpus.vocab, corpus.name, config.seq_len)
    train_tokens, val_tokens = split(corpus.tokens, config.val_fraction)
    if len(val_tokens) <= config.seq_len:
        raise CorpusError(
            f"the validation split (--val-fraction {config.val_fraction} of {len(corpus.tokens)} characters) "
            f"has {len(val_tokens)} characters; it needs more than --seq {config.seq_len}"
        )
    streams = Streams(train_tokens, config.batch_size, config.seq_len, config.seed, shard=rt.rank,
                      shards=rt.world)
    last = out / LAST
    if resume and not last.is_file():
        raise CheckpointError(f"--resume: there is no checkpoint {str(last)!r} to resume")
    if not resume and last.exists():
        raise ConfigError(f"--out {str(out)!r} already holds a run; pass --resume or choose another --out")

    torch.manual_seed(config.seed)  # the model's initial weights, then dropout, come from this seed
    model = CharModel(config.model_config(len(corpus.vocab))).to(rt.device)
    if rt.rank:
        torch.manual_seed(mix_seed(config.seed, rt.rank))  # each process its own dropout masks
    opt = optimizer(model, config)
    average = weight_average(model, config.ema) if config.ema else None
    p, state = Progress(), None
    if resume:
        ckpt = load_checkpoint(last)
        _check_resumable(ckpt, config, corpus, last)
        model.load_state_dict(ckpt.train_state or ckpt.model_state)
        if average is not None:
            average.module.load_state_dict(ckpt.model_state)
            average.n_averaged.fill_(ckpt.step)  # so the next step averages rather than copies
        opt.load_state_dict(ckpt.optimizer)
        rng: dict[str, Any] = dict(ckpt.rng)
        ranks = rng.get("ranks")
        saved: dict[str, Any] | None = ranks[rt.rank] if ranks is not None and len(ranks) == rt.world \
            else rng if rt.is_main else None
        if saved is not None:  # this process's dropout stream continues where it was
            torch.set_rng_state(saved["torch"])
            if rt.device.type == "cuda" and "cuda" in saved:
                torch.cuda.set_rng_state(saved["cuda"], rt.device)
        else:  # a checkpoint of another process count (or from before): a fresh stream per process
            torch.manual_seed(mix_seed(config.seed, rt.rank, ckpt.step))
        sched = ckpt.scheduler
        p = Progress(ckpt.step, ckpt.best_val, sched["evals_since_best"], sched["lr_scale"],
                     ckpt.train_seconds, list(ckpt.metrics))
        rows = config.batch_size // rt.world
        state = tuple(s[:, rt.rank * rows : (rt.rank + 1) * rows].to(rt.device) for s in ckpt.hidden) or None
        log(f"resuming {last} at step {p.step} ({p.train_seconds:.0f} s trained)")
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    chars_per_step = config.batch_size * config.seq_len
    log(f"corpus {corpus.name!r}: {len(corpus.tokens):,} chars, vocab {len(corpus.vocab)}, train "
        f"{len(train_tokens):,} / val {len(val_tokens):,}; model {config.cell} "
        f"{sum(t.numel() for t in model.parameters()):,} params; {chars_per_step:,} chars/step; "
        f"{rt.world} process(es) on {rt.device.type}{', bf16 autocast' if rt.mixed_precision else ''}")
    return _loop(config, model, average, opt, streams, val_tokens, corpus, out, p, state, progress, log,
                 clock, rt)


def _loop(config: TrainConfig, model: CharModel, average: AveragedModel | None, opt: torch.optim.Optimizer,
          streams: Streams, val_tokens: Tokens, corpus: TokenCorpus, out: Path, p: Progress,
          state: State | None, progress: bool, log: Log, clock: Callable[[], float], rt: Runtime) -> Progress:
    from tqdm import tqdm

    net: torch.nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    vocab = corpus.vocab
    chars_per_step = config.batch_size * config.seq_len  # the global batch, all processes together
    budget = config.max_minutes * 60.0
    bar = tqdm(total=config.max_steps or None, initial=p.step, disable=not (progress and rt.is_main),
               unit="step", dynamic_ncols=True, mininterval=0.5)
    model.train()
    loss_sum, loss_n, seg_start, seg_steps = 0.0, 0, clock(), 0
    eval_seconds, stop = 0.0, ""
    if config.max_steps and p.step >= config.max_steps:  # a resumed run that had already finished
        stop = f"reached --max-steps {config.max_steps}"
    elif budget and p.train_seconds >= budget:
        stop = f"reached --max-minutes {config.max_minutes:g}"
    elif config.patience and p.evals_since_best >= config.patience:
        stop = f"no val improvement in {config.patience} evaluations (--patience)"
    while not stop:
        epoch, k = streams.position(p.step)
        if k == 0:
            state = None  # a new epoch starts the streams at a new offset: no state to carry
        x, y = (t.to(rt.device, non_blocking=True) for t in streams.batch_at(p.step))
        # Every process must use the same lr: the main process's clock decides cosine-time's.
        now_s = rt.from_main(p.train_seconds + clock() - seg_start) if budget else 0.0
        for g in opt.param_groups:
            g["lr"] = lr_at(config, p.step, p.lr_scale, now_s)
        with rt.autocast():
            logits, state = net(x, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        state = tuple(s.detach() for s in state)  # truncated BPTT: keep the values, drop the graph
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
        opt.step()
        if average is not None:
            average.update_parameters(model)
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
        elif budget and rt.from_main(float(elapsed + eval_seconds >= budget)):
            stop = f"reached --max-minutes {config.max_minutes:g}"
        if stop or p.step % config.eval_every == 0:
            chars_s = seg_steps * chars_per_step / (now - seg_start)
            t0 = clock()
            # What a checkpoint exports: the weights as trained, or their average.
            evaluated = model if average is None else cast(CharModel, average.module)
            val = rt.from_main(evaluate(evaluated, val_tokens, config.batch_size, config.seq_len)
                               if rt.is_main else 0.0)
            improved = val < p.best_val
            if improved:
                p.best_val, p.evals_since_best = val, 0
            else:
                p.evals_since_best += 1
                if config.schedule == "plateau" and p.evals_since_best % PLATEAU_PATIENCE == 0:
                    p.lr_scale *= 0.5
            if config.patience and p.evals_since_best >= config.patience and not stop:
                stop = f"no val improvement in {config.patience} evaluations (--patience)"
            train_loss = rt.mean(loss_sum / loss_n)
            p.metrics.append({
                "step": p.step, "epoch": epoch, "chars_seen": p.step * chars_per_step,
                "train_loss": train_loss, "val_loss": val,
                "train_bpc": bits(train_loss), "val_bpc": bits(val),
                "lr": opt.param_groups[0]["lr"], "chars_per_s": chars_s, "elapsed_s": elapsed,
            })
            p.train_seconds = elapsed
            record = _record(model, average, opt, config, corpus, p, state, epoch, rt)
            if rt.is_main:
                _report(evaluated, config, vocab, val_tokens, p, epoch, improved, chars_s, bar, log)
                # best.pt first: a kill between the two leaves last.pt one evaluation behind, so a resume
                # redoes it and writes best.pt again. The other order left best.pt at an older model for
                # good, last.pt already recording the better val that no later evaluation may beat.
                if improved:
                    save_checkpoint(out / BEST, record)
                save_checkpoint(out / LAST, record)
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


def _report(model: CharModel, config: TrainConfig, vocab: list[str], val_tokens: Tokens, p: Progress,
            epoch: int, improved: bool, chars_s: float, bar: Any, log: Log) -> None:
    """The evaluation's log lines: losses, lr, speed, and a greedy and a sampled continuation."""
    r = p.metrics[-1]
    bar.clear()
    log(f"step {p.step} epoch {epoch}: "
        f"train {r['train_loss']:.4f} nats/char ({bits(r['train_loss']):.3f} bpc), "
        f"val {r['val_loss']:.4f} nats/char ({bits(r['val_loss']):.3f} bpc){' *' if improved else ''}; "
        f"lr {r['lr']:.2e}; {chars_s:,.0f} chars/s")
    if not config.sample_chars:  # --sample-chars 0: no continuations
        return
    gen = torch.Generator().manual_seed(mix_seed(config.seed, p.step))
    prime = vocab[int(val_tokens[0])]
    greedy = generate(model, vocab, prime, config.sample_chars, None)
    sampled = generate(model, vocab, prime, config.sample_chars, config.temperature, gen)
    log(f"  greedy: {prime + greedy!r}")
    log(f"  T={config.temperature:g}: {prime + sampled!r}")
