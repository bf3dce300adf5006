"""Device plumbing, checked on the CPU (CUDA itself is not exercised here): choice, errors, autocast."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nextchar.client.cli import main  # noqa: E402
from nextchar.training.config import ConfigError  # noqa: E402
from nextchar.training.runtime import Runtime, pick_device, start  # noqa: E402


def test_auto_picks_cuda_only_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device cuda: .* no CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", local_rank=3) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK picks the GPU
    assert pick_device("cpu") == torch.device("cpu")


def test_mixed_precision_is_cuda_only_and_cpu_stays_float32() -> None:
    assert Runtime(torch.device("cuda", 0)).mixed_precision
    cpu = Runtime(torch.device("cpu"))
    assert not cpu.mixed_precision and cpu.is_main and not cpu.distributed
    with cpu.autocast():
        y = torch.nn.Linear(4, 4)(torch.ones(1, 4))
    assert y.dtype == torch.float32
    assert cpu.mean(1.5) == 1.5 and cpu.from_main(2.0) == 2.0
    assert cpu.gather_rows(torch.ones(2, 3, 4)).shape == (2, 3, 4)


def test_a_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = start("cpu")
    assert (rt.rank, rt.world, rt.device) == (0, 1, torch.device("cpu"))


def test_cli_refuses_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r"
    argv = ["train", "--corpus", "anthem", "--max-steps", "2", "--device", "cuda", "--out", str(out)]
    assert main(argv) == 2
    assert "--device cuda" in capsys.readouterr().err and not out.exists()
