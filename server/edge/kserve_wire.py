"""The two Open Inference Protocol faces of a model, as protobuf <-> domain conversions.

`<name>` is text generation in the convention of Triton's LLM backends (TensorRT-LLM's input names:
text_input, max_tokens, temperature, top_k, top_p, random_seed, stop_words, stream -> text_output);
`<name>.step` is the network's raw step (tokens, h0[, c0] -> logits, hn[, cn]; the manifest's names).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from nextchar.inference import grpc_service_pb2 as kpb
from nextchar.server.core.generation import GenerationRequest
from nextchar.server.core.limits import MAX_STOP_SEQUENCES
from nextchar.server.core.sampling import InvalidParameterError
from nextchar.server.core.vocab import OutOfVocabularyError
from nextchar.server.edge import wire
from nextchar.server.edge.errors import bounded
from nextchar.server.edge.tensors import declared, decode_inputs, encode_output
from nextchar.server.ops.registry import LoadedModel
from nextchar.server.scheduling.runner import Outcome
from nextchar.v1 import inference_pb2 as pb

STEP_SUFFIX = ".step"
FINAL = "triton_final_response"  # Triton's flag on the last response of a request in ModelStreamInfer
_UINT64 = (0, 2**64 - 1)
_INTS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
_FLOATS = ("FP32", "FP64")
# Generation inputs: name -> (datatype in the metadata, accepted datatypes); all [1] but stop_words.
TEXT_INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "text_input": ("BYTES", ("BYTES",)),
    "max_tokens": ("INT32", _INTS),
    "temperature": ("FP32", _FLOATS),
    "top_k": ("INT32", _INTS),
    "top_p": ("FP32", _FLOATS),
    "random_seed": ("UINT64", _INTS),
    "stop_words": ("BYTES", ("BYTES",)),
    "stream": ("BOOL", ("BOOL",)),
}
_TEXT_ACCEPTED = {name: accepted for name, (_, accepted) in TEXT_INPUTS.items()}
TEXT_OUTPUT = "text_output"
# nextchar.v1 field -> the generation face's input, so errors name what the client sent.
_RENAMED = {"prompt": "text_input", "max_new_chars": "max_tokens", "seed": "random_seed",
            "stop": "stop_words"}
TensorMeta = kpb.ModelMetadataResponse.TensorMetadata
_NONE = np.empty(0, dtype=object)


MAX_VERSION = 2**63 - 1  # nextchar.v1's ModelRef.version is an int64
MAX_ID_CHARS = 256  # a request id is echoed in every response of its request
_RESPONSE_FIELDS = 1024  # a step response's bytes besides its tensors and echoed strings, with margin


def model_version(text: str) -> int | None:
    """ModelInferRequest.model_version (a string) -> nextchar's version, None for the latest."""
    if not text:
        return None
    # "²".isdigit(), but int() refuses it; past 19 digits it is out of range (and int() of a string over
    # 4,300 digits raises), so the length is checked before the conversion.
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or not 1 <= int(text) <= MAX_VERSION:
        raise InvalidParameterError("model_version", f"must be an integer in [1, {MAX_VERSION}], or empty "
                                                     f"for the latest; got {bounded(repr(text), 40)}")
    return int(text)


def check_id(request: kpb.ModelInferRequest) -> None:
    """The request id comes back in every response of the request (each chunk of a stream): bounded."""
    if len(request.id) > MAX_ID_CHARS:
        raise InvalidParameterError("id", f"must be at most {MAX_ID_CHARS} characters, got {len(request.id)}")


def _state_names(model: LoadedModel) -> tuple[list[str], list[str]]:
    io = model.artifact.manifest.io
    lstm = model.engine.has_cell_state
    return [io.h0] + ([io.c0] if lstm else []), [io.hn] + ([io.cn] if lstm else [])


def metadata(model: LoadedModel, name: str, versions: list[int], step: bool) -> kpb.ModelMetadataResponse:
    """ModelMetadata of one face; -1 marks the batch and sequence dimensions."""
    if step:
        e, io = model.engine, model.artifact.manifest.io
        state = [e.num_layers, -1, e.hidden_size]
        ins, outs = _state_names(model)
        inputs = [TensorMeta(name=io.tokens, datatype="INT64", shape=[-1, -1]),
                  *(TensorMeta(name=n, datatype="FP32", shape=state) for n in ins)]
        outputs = [TensorMeta(name=io.logits, datatype="FP32", shape=[-1, -1, e.vocab_size]),
                   *(TensorMeta(name=n, datatype="FP32", shape=state) for n in outs)]
        platform = "onnxruntime_onnx"
    else:
        inputs = [TensorMeta(name=n, datatype=t, shape=[-1] if n == "stop_words" else [1])
                  for n, (t, _) in TEXT_INPUTS.items()]
        outputs = [TensorMeta(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])]
        platform = "nextchar"
    return kpb.ModelMetadataResponse(name=name, versions=[str(v) for v in versions], platform=platform,
                                     inputs=inputs, outputs=outputs)


def _checked_names(given: Mapping[str, Any], allowed: list[str], what: str, model: str) -> None:
    for name in given:
        if name not in allowed:
            raise InvalidParameterError(name, f"is not {what} of model {model!r}; use {', '.join(allowed)}")


def _requested(request: kpb.ModelInferRequest, allowed: list[str], model: str) -> list[str]:
    """The outputs to return, in the model's order: those asked for, or all."""
    if len(request.outputs) > len(allowed):  # before reading a million of them
        raise InvalidParameterError("outputs", f"must name at most {len(allowed)} outputs (those of model "
                                    f"{model!r}: {', '.join(allowed)}), got {len(request.outputs)}")
    asked = {o.name: None for o in request.outputs}
    _checked_names(asked, allowed, "an output", model)
    return [n for n in allowed if not asked or n in asked]


# --- text generation ------------------------------------------------------------------------------

def _one(inputs: Mapping[str, np.ndarray], name: str) -> Any:
    return inputs[name].reshape(-1)[0]  # one element: its declared shape was checked


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidParameterError(name, f"must be UTF-8 text: {e.reason} at byte {e.start}") from None


def _integer(value: Any, name: str, bounds: tuple[int, int]) -> int:
    """`value` as an int in `bounds`: the input's own range where a nextchar.v1 field could not carry
    the value to its own check (past int32), so both faces name the same range."""
    if not bounds[0] <= int(value) <= bounds[1]:
        raise InvalidParameterError(name, f"must be in [{bounds[0]}, {bounds[1]}], got {int(value)}")
    return int(value)


def generation_request(request: kpb.ModelInferRequest, model: LoadedModel, limits: wire.Limits,
                       ) -> tuple[GenerationRequest, bool]:
    """-> (the request as nextchar.v1's GenerateRequest would make it, stream?). Validation, limits and
    the seed drawn when none is given are nextchar.v1's own (wire.generation_request)."""
    shapes = declared(request, _TEXT_ACCEPTED)
    _requested(request, [TEXT_OUTPUT], request.model_name)
    for name, shape in shapes.items():  # before decoding: what it reads is bounded by these
        if name == "stop_words" and math.prod(shape) > MAX_STOP_SEQUENCES:
            raise InvalidParameterError(name, f"must have at most {MAX_STOP_SEQUENCES} sequences, got "
                                        f"{math.prod(shape)}")
        if name != "stop_words" and math.prod(shape) != 1:
            raise InvalidParameterError(name, f"must have exactly one element, got shape {list(shape)}")
    if "text_input" not in shapes:
        raise InvalidParameterError("text_input", "is required: a BYTES tensor of one UTF-8 string")
    if "max_tokens" not in shapes:
        raise InvalidParameterError("max_tokens", "is required: how many characters to generate at most")
    inputs = decode_inputs(request, shapes)
    fields: dict[str, Any] = {
        "prompt": _utf8(_one(inputs, "text_input"), "text_input"),
        "max_new_chars": _integer(_one(inputs, "max_tokens"), "max_tokens", (1, limits.max_new_chars)),
        "stop": [_utf8(s, f"stop_words[{i}]") for i, s in enumerate(inputs.get("stop_words", _NONE).flat)],
    }
    if "temperature" in inputs:
        fields["temperature"] = float(_one(inputs, "temperature"))
    if "top_k" in inputs:
        fields["top_k"] = _integer(_one(inputs, "top_k"), "top_k", (0, len(model.artifact.vocab)))
    if "top_p" in inputs:
        fields["top_p"] = float(_one(inputs, "top_p"))
    if "random_seed" in inputs:
        fields["seed"] = _integer(_one(inputs, "random_seed"), "random_seed", _UINT64)
    stream = bool(_one(inputs, "stream")) if "stream" in inputs else False
    v1 = pb.GenerateRequest(model=pb.ModelRef(name=model.name), **fields)
    return renaming_fields(wire.generation_request)(v1, limits), stream


def renamed(exc: BaseException) -> BaseException:
    """A nextchar.v1 field error re-aimed at the generation face's input name; others unchanged."""
    field = getattr(exc, "field", "")
    base, _, rest = field.partition("[")
    if base not in _RENAMED:
        return exc
    new = _RENAMED[base] + (f"[{rest}" if rest else "")
    if isinstance(exc, OutOfVocabularyError):
        return OutOfVocabularyError(exc.positions, field=new)
    return InvalidParameterError(new, str(exc).removeprefix(f"{field}: "))


def renaming_fields(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with its InvalidParameterError / OutOfVocabularyError renamed (see `renamed`)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InvalidParameterError, OutOfVocabularyError) as e:
            raise renamed(e) from None
    return call


def text_response(request: kpb.ModelInferRequest, model: LoadedModel, text: str,
                  outcome: Outcome | None = None, final: bool | None = None) -> kpb.ModelInferResponse:
    """text_output [1] BYTES. The response that ends a request carries how it ended (finish_reason,
    seed, prompt_chars, generated_chars); in a stream every response carries triton_final_response."""
    tensor, raw = encode_output(TEXT_OUTPUT, np.array([text.encode()], dtype=object), "BYTES")
    response = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(model.version),
                                      id=request.id, outputs=[tensor], raw_output_contents=[raw])
    params = response.parameters
    if final is not None:
        params[FINAL].bool_param = final
    if outcome is not None:
        f = outcome.finished
        params["finish_reason"].string_param = f.reason.value
        params["seed"].uint64_param = f.seed
        params["prompt_chars"].int64_param = f.usage.prompt_chars
        params["generated_chars"].int64_param = f.usage.generated_chars
    return response


# --- the raw step ---------------------------------------------------------------------------------

def step_args(request: kpb.ModelInferRequest, model: LoadedModel, limits: wire.Limits,
              max_response_bytes: int) -> tuple[np.ndarray, tuple[np.ndarray, ...], list[str]]:
    """-> (tokens int64[B, T], state float32[L, B, H] each (zeros where not given), outputs wanted).
    The outputs wanted must fit in `max_response_bytes` (the server's gRPC send limit)."""
    e, io = model.engine, model.artifact.manifest.io
    state_in, state_out = _state_names(model)
    accepted = {io.tokens: ("INT64",), **{name: ("FP32",) for name in state_in}}
    shapes = declared(request, accepted)
    wanted = _requested(request, [io.logits, *state_out], request.model_name)
    # Declared shapes first: decoding then reads at most what these bounds allow.
    if io.tokens not in shapes:
        raise InvalidParameterError(io.tokens, "is required: INT64 token ids of shape [batch, seq]")
    shape = shapes[io.tokens]
    if len(shape) != 2 or 0 in shape:
        raise InvalidParameterError(io.tokens, f"must be INT64 of shape [batch, seq], both >= 1; got "
                                    f"{list(shape)}")
    if math.prod(shape) > limits.max_prompt_chars:
        raise InvalidParameterError(io.tokens, f"must have at most {limits.max_prompt_chars} elements "
                                    f"(batch x seq, the server's prompt limit), got {math.prod(shape)}")
    _check_response_size(request, model, shape, wanted, max_response_bytes)
    want = (e.num_layers, shape[0], e.hidden_size)
    for name in state_in:
        if name in shapes and shapes[name] != want:
            raise InvalidParameterError(name, f"must be FP32 of shape {list(want)} [num_layers, batch, "
                                        f"hidden_size]; got {list(shapes[name])}")
    inputs = decode_inputs(request, shapes)
    tokens = inputs[io.tokens]
    if tokens.min() < 0 or tokens.max() >= e.vocab_size:
        raise InvalidParameterError(io.tokens, f"ids must be in [0, {e.vocab_size}) (the vocabulary), got "
                                    f"[{tokens.min()}, {tokens.max()}]")
    state = []
    for name, zero in zip(state_in, e.initial_state(shape[0]), strict=True):
        given = inputs.get(name)
        if given is not None and not np.isfinite(given).all():
            raise InvalidParameterError(name, "must hold finite numbers (a state with NaN or Inf makes "
                                              "NaN logits)")
        state.append(zero if given is None else given)
    return tokens, tuple(state), wanted


def _check_response_size(request: kpb.ModelInferRequest, model: LoadedModel, shape: tuple[int, ...],
                         wanted: list[str], limit: int) -> None:
    """Refuse tokens of `shape` [B, T] whose outputs (FP32 logits [B, T, V] and states [L, B, H]) would
    not fit in one message of `limit` bytes: gRPC would fail the call (and a whole ModelStreamInfer
    stream) with RESOURCE_EXHAUSTED after the model had run."""
    e, io = model.engine, model.artifact.manifest.io
    per_position = 4 * e.vocab_size if io.logits in wanted else 0
    per_row = 4 * e.num_layers * e.hidden_size * sum(n != io.logits for n in wanted)
    # Everything but the tensors' bytes: echoed names, shapes, parameters, framing (a few hundred bytes).
    room = limit - (_RESPONSE_FIELDS + len(request.model_name) + len(request.id) + sum(map(len, wanted)))
    batch, seq = shape
    size = batch * (seq * per_position + per_row)
    if size <= room:
        return
    most_seq = (room - batch * per_row) // (batch * per_position) if per_position else 0
    most_batch = max(room // (per_position + per_row), 0)
    allowed = (f"with batch {batch}, seq must be in [1, {most_seq}]" if most_seq >= 1 else
               f"batch must be in [1, {most_batch}]" + (" (at seq 1)" if per_position else ""))
    raise InvalidParameterError(io.tokens, f"shape {list(shape)} asks for {size} bytes of outputs "
                                f"({', '.join(wanted)}, FP32), more than one response may carry ({room} "
                                f"of the server's {limit}-byte message limit, --max-message-bytes); "
                                f"{allowed}" + (", or ask for fewer outputs" if len(wanted) > 1 else ""))


def step_response(request: kpb.ModelInferRequest, model: LoadedModel, logits: np.ndarray,
                  state: tuple[np.ndarray, ...], wanted: list[str], final: bool | None = None,
                  ) -> kpb.ModelInferResponse:
    """The `wanted` outputs, FP32; `final` as in text_response (in a stream, always True)."""
    io = model.artifact.manifest.io
    arrays = dict(zip([io.logits, *_state_names(model)[1]], (logits, *state), strict=True))
    encoded = [encode_output(name, arrays[name], "FP32") for name in wanted]
    response = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(model.version),
                                      id=request.id, outputs=[t for t, _ in encoded],
                                      raw_output_contents=[raw for _, raw in encoded])
    if final is not None:
        response.parameters[FINAL].bool_param = final
    return response
