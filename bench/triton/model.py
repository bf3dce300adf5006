"""Triton Python-backend peer of nextchar's server: execute() only queues; one engine thread steps them all.

Built the way Triton's vLLM backend is built (issue 10's peer): the model is decoupled, `execute` hands
each request to a queue and returns at once, and one engine thread owns the work: it prefills newly
arrived prompts, then steps every active stream in ONE onnxruntime call over nextchar's model.onnx per
char (K = 1), samples each row with nextchar's own portable seeded rule (`sample_rows` over
`philox_uniforms(seed, chars so far)`, so the texts equal nextchar's bit for bit), and streams text back
with nextchar's flush rule (the first char at once, then every flush_ms stretched past 4 streams, or
flush_chars). Runs inside Triton's Python stub (the triton venv: numpy + onnxruntime, no grpc); config
parameters: model_dir (a nextchar export `<repo>/<name>/<version>`), repo_root (this checkout, whose
sampling module is loaded without the rest of nextchar), intra_op_threads, flush_ms, flush_chars.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

STREAMS_PER_FLUSH = 4  # nextchar's runner: past this many streams, flushes come proportionally later


def _nextchar_sampling(repo_root: str) -> types.ModuleType:
    """nextchar.server.core.sampling from the checkout, without importing nextchar's grpc/protobuf side:
    bare package modules for `nextchar` and `nextchar.server` whose __path__ point into the checkout
    (pyproject maps nextchar.server to server/); core/ itself needs only numpy."""
    for name, sub in (("nextchar", "proto/nextchar"), ("nextchar.server", "server")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(repo_root, sub)]
            sys.modules[name] = pkg
    import nextchar.server.core.sampling as sampling

    return sampling


@dataclass
class Stream:
    sender: object           # the request's pb_utils response sender
    tokens: np.ndarray       # int64[T] prompt ids
    max_new: int
    seed: int
    params: object           # sampling.SamplingParams
    generated: int = 0
    pending: list[str] = field(default_factory=list)
    last_flush: float = 0.0
    flushed_any: bool = False


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.sampling = _nextchar_sampling(p["repo_root"])
        model_dir = Path(p["model_dir"])
        manifest = json.loads((model_dir / "manifest.json").read_text())
        self.vocab = manifest["vocab"]
        self.index = {c: i for i, c in enumerate(self.vocab)}
        io = manifest["io"]
        self.state_in = [io[k] for k in ("h0", "c0") if k in io]
        self.state_out = [io[k] for k in ("hn", "cn") if k in io]
        self.tokens_in, self.logits_out = io["tokens"], io["logits"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(p.get("intra_op_threads", "0")) or (os.cpu_count() or 1)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_dir / manifest.get("model_file", "model.onnx")), opts,
                                            providers=["CPUExecutionProvider"])
        arch = manifest["architecture"]
        self.state_shape = (int(arch["num_layers"]), int(arch["hidden_size"]))
        self.flush_s = float(p.get("flush_ms", "5")) / 1e3
        self.flush_chars = int(p.get("flush_chars", "128"))
        self.inbox: queue.Queue[Stream | None] = queue.Queue()
        self.engine = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self.engine.start()

    def execute(self, requests: list) -> None:
        """Only queue: the engine thread does all the work and answers through each request's sender."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                stream = self._stream(request, sender)
            except (ValueError, KeyError) as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.inbox.put(stream)
        return None

    def finalize(self) -> None:
        self.inbox.put(None)
        self.engine.join(10)

    def _stream(self, request: object, sender: object) -> Stream:
        def scalar(name: str) -> object:
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]

        prompt = scalar("PROMPT")
        prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
        tokens = np.array([self.index[c] for c in prompt], dtype=np.int64)
        if tokens.size == 0:
            raise ValueError("PROMPT: must be at least one character")
        params = self.sampling.SamplingParams(temperature=float(scalar("TEMPERATURE")))
        return Stream(sender, tokens, int(scalar("MAX_NEW_CHARS")), int(scalar("SEED")), params)

    # -------------------------------------------------------------------------------------------
    # The engine thread: one batched state, rows in the order of `active`.

    def _run(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {self.tokens_in: tokens, **dict(zip(self.state_in, state, strict=True))}
        logits, *new_state = self.session.run([self.logits_out, *self.state_out], feeds)
        return logits[:, -1], new_state

    def _engine_loop(self) -> None:
        layers, hidden = self.state_shape
        active: list[Stream] = []
        state = [np.zeros((layers, 0, hidden), np.float32) for _ in self.state_in]
        rows = np.zeros(0, dtype=np.int64)  # the next input token of each active row
        while True:
            arrived = []
            try:  # block only when idle
                item = self.inbox.get(block=not active)
                while True:
                    if item is None:
                        return
                    arrived.append(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            # Prefill each arrival on its own (prompts differ in length), then sample its first char.
            for s in arrived:
                init = [np.zeros((layers, 1, hidden), np.float32) for _ in self.state_in]
                last, s_state = self._run(s.tokens[None, :], init)
                token = self._sample(last, [s])[0]
                if self._emit(s, token, len(active) + 1):
                    continue
                active.append(s)
                state = [np.concatenate([a, b], axis=1) for a, b in zip(state, s_state, strict=True)]
                rows = np.append(rows, token)
            if not active:
                continue
            last, state = self._run(rows[:, None], state)
            tokens = self._sample(last, active)
            keep = [not self._emit(s, int(t), len(active)) for s, t in zip(active, tokens, strict=True)]
            if not all(keep):
                idx = np.flatnonzero(keep)
                active = [active[i] for i in idx]
                state = [a[:, idx] for a in state]
                tokens = tokens[idx]
            rows = tokens.astype(np.int64)

    def _sample(self, logits: np.ndarray, streams: list[Stream]) -> np.ndarray:
        """Draw `generated` of each stream's seed, as nextchar's Decoder numbers them."""
        seeds = np.array([s.seed for s in streams], dtype=np.uint64)
        counters = np.array([s.generated for s in streams], dtype=np.uint64)
        u = self.sampling.philox_uniforms(seeds, counters)[:, 0]
        return self.sampling.sample_rows(logits, [s.params for s in streams], u)

    def _emit(self, s: Stream, token: int, streams: int) -> bool:
        """Record one char; send what the flush rule releases. True when the stream is done."""
        s.generated += 1
        s.pending.append(self.vocab[token])
        done = s.generated >= s.max_new
        now = time.perf_counter()
        wait = self.flush_s * max(1.0, streams / STREAMS_PER_FLUSH)
        if done or not s.flushed_any or len(s.pending) >= self.flush_chars or now - s.last_flush >= wait:
            text = np.array(["".join(s.pending).encode()], dtype=np.object_)
            response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TEXT", text)])
            s.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if done else 0)
            s.pending.clear()
            s.last_flush, s.flushed_any = now, True
        return done
