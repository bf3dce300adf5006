"""Run a model.onnx file in-process, no server: same sampling, same seeded text; no torch, no grpc."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nextchar.server.core.engine import Engine
from nextchar.server.core.generation import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    TextChunk,
    generate,
)
from nextchar.server.core.limits import DEFAULT_TEMPERATURE
from nextchar.server.core.sampling import SamplingParams
from nextchar.server.core.scoring import Prediction, ScoreResult, predict, score
from nextchar.server.core.vocab import OovPolicy


@dataclass(frozen=True)
class OfflineResult:
    text: str          # the echoed prompt (when asked) followed by the generated text
    finished: Finished


def draw_seed() -> int:
    """A fresh seed in [0, 2^64), as the server draws one when a request has none."""
    return secrets.randbits(64)


class OfflineModel:
    """A self-describing ONNX file (vocab and manifest in its metadata) run with the server's own code."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_file(cls, path: Path, *, threads: int = 1) -> OfflineModel:
        """Load `path`; ArtifactError when it is not a nextchar export. `threads`: onnxruntime intra-op."""
        engine = Engine.from_file(Path(path), intra_op_threads=threads)
        engine.warmup()
        return cls(engine)

    @property
    def name(self) -> str:
        return self.engine.artifact.name

    @property
    def version(self) -> int:
        return self.engine.artifact.version

    @property
    def vocab(self) -> tuple[str, ...]:
        return self.engine.vocab

    def stream(self, prompt: str, max_new_chars: int = 200, *, temperature: float = DEFAULT_TEMPERATURE,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: tuple[str, ...] | list[str] = (), echo: bool = False,
               oov_policy: OovPolicy = OovPolicy.ERROR,
               oov_replacement: str | None = None) -> Iterator[GenerationEvent]:
        """TextChunk events, then one Finished (its `seed` replays the text). Parameters as the server's."""
        request = GenerationRequest(
            prompt=prompt, max_new_chars=max_new_chars,
            sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
            seed=draw_seed() if seed is None else seed, stop=tuple(stop), echo=echo,
            oov_policy=oov_policy, oov_replacement=oov_replacement,
        )
        return generate(self.engine, request)

    def generate(self, prompt: str, max_new_chars: int = 200, **kwargs) -> OfflineResult:
        """The whole text at once; keyword arguments as `stream`."""
        parts: list[str] = []
        for event in self.stream(prompt, max_new_chars, **kwargs):
            if isinstance(event, TextChunk):
                parts.append(event.text)
            else:
                return OfflineResult("".join(parts), event)
        raise AssertionError("generate() ended without a Finished event")

    def predict(self, context: str, n: int = 5, *, temperature: float = DEFAULT_TEMPERATURE,
                oov_policy: OovPolicy = OovPolicy.ERROR,
                oov_replacement: str | None = None) -> list[Prediction]:
        """The n most likely next characters with probabilities, most likely first."""
        return predict(self.engine, context, n, temperature=temperature, oov_policy=oov_policy,
                       oov_replacement=oov_replacement)

    def score(self, text: str, *, context: str = "", per_char: bool = False,
              oov_policy: OovPolicy = OovPolicy.ERROR, oov_replacement: str | None = None) -> ScoreResult:
        """Log-likelihood of `text` (see nextchar.server.core.scoring.score for the convention)."""
        return score(self.engine, text, context=context, per_char=per_char, oov_policy=oov_policy,
                     oov_replacement=oov_replacement)


def run_generate(path: Path, prompt: str, max_new_chars: int = 200, temperature: float = DEFAULT_TEMPERATURE,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] | list[str] = (), echo: bool = False,
                 oov_policy: OovPolicy = OovPolicy.ERROR, oov_replacement: str | None = None,
                 on_finished: Callable[[Finished], None] | None = None) -> Iterator[str]:
    """For `nextchar generate --model-file PATH`: text chunks to print as they come.

    `on_finished` receives the summary (finish reason, usage, the seed that replays the text).
    """
    model = OfflineModel.from_file(path)
    for event in model.stream(prompt, max_new_chars, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=stop, echo=echo, oov_policy=oov_policy,
                              oov_replacement=oov_replacement):
        if isinstance(event, TextChunk):
            yield event.text
        elif on_finished is not None:
            on_finished(event)


def run_predict(path: Path, context: str, n: int = 5, temperature: float = DEFAULT_TEMPERATURE,
                oov_policy: OovPolicy = OovPolicy.ERROR, oov_replacement: str | None = None,
                ) -> list[Prediction]:
    """For `nextchar predict --model-file PATH`."""
    return OfflineModel.from_file(path).predict(context, n, temperature=temperature, oov_policy=oov_policy,
                                                oov_replacement=oov_replacement)
