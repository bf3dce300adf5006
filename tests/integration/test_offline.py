"""The offline runner: a bare model.onnx gives the server code's exact results, without torch or grpc."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nextchar.client.offline import OfflineModel, run_generate, run_predict
from nextchar.server.core.artifact import ArtifactError, load_artifact
from nextchar.server.core.engine import Engine
from nextchar.server.core.generation import GenerationRequest, TextChunk, generate
from nextchar.server.core.sampling import SamplingParams
from nextchar.server.core.scoring import predict


@pytest.fixture
def lone_file(model_repo, tmp_path) -> Path:
    """lstm v1's model.onnx copied alone: no manifest.json, no version directory."""
    path = tmp_path / "some-model.onnx"
    shutil.copy(model_repo / "lstm" / "1" / "model.onnx", path)
    return path


def server_text(model_repo, **kw) -> str:
    engine = Engine.load(load_artifact(model_repo / "lstm" / "1"))
    return "".join(e.text for e in generate(engine, GenerationRequest(**kw)) if isinstance(e, TextChunk))


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0), SamplingParams(0.8, top_k=5, top_p=0.9)])
def test_same_text_as_the_server_code(model_repo, lone_file, sampling):
    model = OfflineModel.from_file(lone_file)
    assert (model.name, model.version) == ("lstm", 1)
    result = model.generate("O say", 60, temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p, seed=42, echo=True)
    assert result.text == "O say" + server_text(model_repo, prompt="O say", max_new_chars=60,
                                                sampling=sampling, seed=42)
    assert result.finished.seed == 42 and result.finished.usage.generated_chars == 60


def test_unseeded_generation_reports_a_seed_that_replays_it(lone_file):
    model = OfflineModel.from_file(lone_file)
    first = model.generate("O say", 40)
    again = model.generate("O say", 40, seed=first.finished.seed)
    assert first.text == again.text


def test_run_generate_and_run_predict(model_repo, lone_file):
    finished = []
    chunks = list(run_generate(lone_file, "O say", 30, temperature=0, stop=["\n"],
                               on_finished=finished.append))
    assert "".join(chunks) == server_text(model_repo, prompt="O say", max_new_chars=30,
                                          sampling=SamplingParams(temperature=0), stop=("\n",))
    assert len(finished) == 1
    engine = Engine.load(load_artifact(model_repo / "lstm" / "1"))
    assert run_predict(lone_file, "O sa", 3) == predict(engine, "O sa", 3)


def test_not_a_nextchar_file(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError):
        OfflineModel.from_file(bad)


def test_needs_neither_torch_nor_grpc(lone_file):
    code = (
        "import sys, json\n"
        "from nextchar.client.offline import OfflineModel\n"
        f"m = OfflineModel.from_file({str(lone_file)!r})\n"
        "text = m.generate('O say', 20, temperature=0).text\n"
        "m.predict('O', 2); m.score('O say')\n"
        "print(json.dumps({'text': text, 'mods': sorted(k for k in sys.modules "
        "if k.split('.')[0] in ('torch', 'grpc', 'onnx'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["text"]) == 20
    assert report["mods"] == []
