"""Where a run executes: the device, CUDA mixed precision, and the torchrun process group (DDP)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nextchar.training.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> CUDA when present, else CPU; cuda without a GPU is a ConfigError, not a silent fallback."""
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this torch build or machine has no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """One process of a run: its device, and its rank among `world` processes (1 = no process group)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, metrics and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def mixed_precision(self) -> bool:
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on CUDA (no loss scaler needed, unlike fp16); full float32 on the CPU."""
        if self.mixed_precision:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    def mean(self, value: float) -> float:
        """The mean of `value` over all processes."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t) / self.world

    def from_main(self, value: float) -> float:
        """The main process's `value`, on every process (a stop decision, a validation loss)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.broadcast(t, 0)
        return float(t)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """t: [L, rows, H] of this process -> [L, rows * world, H], the processes' rows in rank order."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=1)

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every process, in rank order (picklable objects; e.g. each one's RNG state)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def start(device: str) -> Runtime:
    """The runtime of this process: under torchrun (WORLD_SIZE > 1) join its process group, gloo on the
    CPU and NCCL on CUDA; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(pick_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Runtime(dev, rank, world)


def stop(runtime: Runtime, *, finished: bool = False) -> None:
    """Leave the process group. After a finished run every process first meets the others at a barrier:
    tearing gloo down while a peer is still inside a collective (or already gone) can abort the process
    ("terminate called without an active exception", seen once in 4 CI runs). A failed run skips the
    barrier, which would wait for a peer that may never come."""
    if runtime.distributed and dist.is_initialized():
        if finished:
            runtime.barrier()
        dist.destroy_process_group()
