// nextchar without Python: read a model.onnx's own vocab and manifest, then generate (greedy or
// seeded sampling with lib/sampler.mjs: the same text as the server for the same seed and parameters).
//
// Shared by the Node CLI (generate.mjs, onnxruntime-node) and the browser page (client/web,
// onnxruntime-web): every function takes the `ort` module it should use, and nothing here touches
// the file system, the DOM or Node-only APIs.

/** A model file that is not a nextchar export: the message names what is missing or wrong. */
export class ModelFormatError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ModelFormatError';
  }
}

import { InvalidArgumentError, sample, samplingParams, seedKey, seedValue, uniform } from './sampler.mjs';

export { InvalidArgumentError, argmax } from './sampler.mjs';

export const MAX_NEW_CHARS = 100_000;
export const MAX_STOP_SEQUENCES = 4;   // as the server (server/core/limits.py)
export const MAX_STOP_CHARS = 64;
/** Positions per model call for a prompt: the server's PREFILL_CHUNK (server/core/prefill.py). */
export const PREFILL_CHUNK = 256;
const MANIFEST_KEY = 'nextchar.manifest';
const VOCAB_KEY = 'nextchar.vocab';
const CELLS = { CELL_TYPE_RNN: 'rnn', CELL_TYPE_LSTM: 'lstm', CELL_TYPE_GRU: 'gru' };

// ---------------------------------------------------------------------------------------------
// ONNX metadata_props. No onnxruntime JS API exposes a model's custom metadata (only the inputs'
// and outputs' types), so we read it from the file. A ModelProto is a protobuf message whose
// field 14 is `repeated StringStringEntryProto metadata_props` (key = 1, value = 2); walking the
// top-level fields and skipping the rest (the graph is one length-delimited field) takes a few
// lines and no schema, so it works unchanged in Node and in the browser.

const WIRE_VARINT = 0;
const WIRE_I64 = 1;
const WIRE_LEN = 2;
const WIRE_I32 = 5;
const METADATA_PROPS = 14;

function readVarint(bytes, pos) {
  // Values here are field tags and lengths (< 2^53), so plain arithmetic is exact.
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    if (pos >= bytes.length) throw new ModelFormatError('not an ONNX model: truncated varint');
    const b = bytes[pos++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, pos];
    scale *= 128;
  }
  throw new ModelFormatError('not an ONNX model: varint longer than 10 bytes');
}

/** Yields [fieldNumber, wireType, start, end] for each field of a message in bytes[start, end). */
function* fields(bytes, start, end) {
  let pos = start;
  while (pos < end) {
    let tag;
    [tag, pos] = readVarint(bytes, pos);
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    let fieldStart = pos;
    if (wire === WIRE_VARINT) {
      [, pos] = readVarint(bytes, pos);
    } else if (wire === WIRE_I64) {
      pos += 8;
    } else if (wire === WIRE_I32) {
      pos += 4;
    } else if (wire === WIRE_LEN) {
      let len;
      [len, pos] = readVarint(bytes, pos);
      fieldStart = pos;
      pos += len;
    } else {
      throw new ModelFormatError(`not an ONNX model: unsupported protobuf wire type ${wire}`);
    }
    if (pos > end) throw new ModelFormatError('not an ONNX model: a field runs past the end of the file');
    yield [field, wire, fieldStart, pos];
  }
}

/**
 * The metadata_props of an ONNX ModelProto.
 * @param {Uint8Array} bytes the whole .onnx file
 * @returns {Map<string, string>}
 */
export function readOnnxMetadata(bytes) {
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  const props = new Map();
  for (const [field, wire, start, end] of fields(bytes, 0, bytes.length)) {
    if (field !== METADATA_PROPS || wire !== WIRE_LEN) continue;
    let key = '';
    let value = '';
    for (const [f, w, s, e] of fields(bytes, start, end)) {
      if (w !== WIRE_LEN) continue;
      if (f === 1) key = utf8.decode(bytes.subarray(s, e));
      else if (f === 2) value = utf8.decode(bytes.subarray(s, e));
    }
    props.set(key, value);
  }
  return props;
}

// ---------------------------------------------------------------------------------------------
// The model's description, from its metadata.

function parseJson(props, key) {
  if (!props.has(key)) {
    const have = [...props.keys()].join(', ') || 'none';
    throw new ModelFormatError(`not a nextchar model: ONNX metadata has no "${key}" (keys: ${have})`);
  }
  try {
    return JSON.parse(props.get(key));
  } catch (e) {
    throw new ModelFormatError(`ONNX metadata "${key}" is not valid JSON: ${e.message}`);
  }
}

// Proto3 JSON writers may use the proto field name (num_layers) or lowerCamelCase (numLayers);
// parsers must accept both, and so do we.
function pick(obj, snake) {
  if (obj == null) return undefined;
  if (snake in obj) return obj[snake];
  return obj[snake.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase())];
}

function positiveInt(value, name) {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) {
    throw new ModelFormatError(`manifest ${name} must be a positive integer, got ${JSON.stringify(value)}`);
  }
  return n;
}

/**
 * What generation needs to know about a model, from its ONNX metadata.
 * @param {Map<string, string>} props from readOnnxMetadata
 * @returns {{vocab: string[], index: Map<string, number>, cell: string, numLayers: number,
 *            hiddenSize: number, io: {tokens: string, h0: string, c0: string, logits: string,
 *            hn: string, cn: string}, name: string, version: string}}
 */
export function modelInfo(props) {
  const manifest = parseJson(props, MANIFEST_KEY);
  const vocab = parseJson(props, VOCAB_KEY);
  if (!Array.isArray(vocab) || vocab.length < 2) {
    throw new ModelFormatError(`ONNX metadata "${VOCAB_KEY}" must be a JSON array of at least 2 characters`);
  }
  vocab.forEach((ch, i) => {
    if (typeof ch !== 'string' || Array.from(ch).length !== 1) {
      throw new ModelFormatError(`vocab[${i}] must be exactly one Unicode code point, got ${JSON.stringify(ch)}`);
    }
  });
  const index = new Map(vocab.map((ch, i) => [ch, i]));
  if (index.size !== vocab.length) throw new ModelFormatError('vocab has duplicate characters');
  const inManifest = pick(manifest, 'vocab');
  if (Array.isArray(inManifest) && inManifest.length > 0 && inManifest.join('\u0000') !== vocab.join('\u0000')) {
    throw new ModelFormatError(`the manifest's vocab and "${VOCAB_KEY}" differ`);
  }

  const arch = pick(manifest, 'architecture');
  if (arch == null) throw new ModelFormatError('manifest has no architecture');
  const cellName = pick(arch, 'cell');
  const cell = CELLS[cellName];
  if (!cell) {
    throw new ModelFormatError(`manifest architecture.cell must be one of ${Object.keys(CELLS).join(', ')}, ` +
      `got ${JSON.stringify(cellName)}`);
  }
  const vocabSize = positiveInt(pick(arch, 'vocab_size'), 'architecture.vocab_size');
  if (vocabSize !== vocab.length) {
    throw new ModelFormatError(`manifest architecture.vocab_size is ${vocabSize} but the vocab has ` +
      `${vocab.length} characters`);
  }
  const ioIn = pick(manifest, 'io') ?? {};
  const name = (key, dflt) => pick(ioIn, key) || dflt;
  const lstm = cell === 'lstm';
  const io = {
    tokens: name('tokens', 'tokens'), h0: name('h0', 'h0'), logits: name('logits', 'logits'), hn: name('hn', 'hn'),
    c0: lstm ? name('c0', 'c0') : '', cn: lstm ? name('cn', 'cn') : '',
  };
  return {
    vocab, index, cell, io,
    numLayers: positiveInt(pick(arch, 'num_layers'), 'architecture.num_layers'),
    hiddenSize: positiveInt(pick(arch, 'hidden_size'), 'architecture.hidden_size'),
    name: String(pick(manifest, 'name') ?? ''),
    version: String(pick(manifest, 'version') ?? ''),
  };
}

/**
 * Create an inference session and read the model's description from the same bytes.
 * @param {object} ort the onnxruntime-node or onnxruntime-web module
 * @param {Uint8Array} bytes the .onnx file
 */
export async function loadModel(ort, bytes, sessionOptions = {}) {
  const info = modelInfo(readOnnxMetadata(bytes));
  const session = await ort.InferenceSession.create(bytes, sessionOptions);
  const want = [info.io.tokens, info.io.h0, info.io.c0].filter(Boolean);
  const missing = want.filter((n) => !session.inputNames.includes(n));
  if (missing.length) {
    throw new ModelFormatError(`the graph lacks the manifest's inputs ${missing.join(', ')} ` +
      `(graph inputs: ${session.inputNames.join(', ')})`);
  }
  return { session, info };
}

// ---------------------------------------------------------------------------------------------
// Generation.

/**
 * Prompt -> token ids, by Unicode code point (not UTF-16 unit).
 * @returns {BigInt64Array} int64[T]
 */
export function encode(info, text) {
  const chars = Array.from(text);
  const unknown = [];
  const ids = new BigInt64Array(chars.length);
  chars.forEach((ch, i) => {
    const id = info.index.get(ch);
    if (id === undefined) unknown.push(`${JSON.stringify(ch)} at ${i}`);
    else ids[i] = BigInt(id);
  });
  if (unknown.length) {
    const shown = unknown.slice(0, 10).join(', ') + (unknown.length > 10 ? ` and ${unknown.length - 10} more` : '');
    throw new InvalidArgumentError('prompt', `${unknown.length} character(s) not in the model's vocabulary: ${shown}`);
  }
  return ids;
}


/** A fresh uint64 seed, as the server draws one when a request has none. */
export function drawSeed() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return (BigInt(words[1]) << 32n) | BigInt(words[0]);
}

function checkStops(stop) {
  if (!Array.isArray(stop)) {
    throw new InvalidArgumentError('stop', `must be a list of strings, got ${typeof stop}`);
  }
  if (stop.length > MAX_STOP_SEQUENCES) {
    throw new InvalidArgumentError('stop', `must have at most ${MAX_STOP_SEQUENCES} sequences, got ${stop.length}`);
  }
  stop.forEach((seq, i) => {
    const n = typeof seq === 'string' ? Array.from(seq).length : 0;
    if (n < 1 || n > MAX_STOP_CHARS) {
      throw new InvalidArgumentError(`stop[${i}]`, `must be a string of 1 to ${MAX_STOP_CHARS} characters, ` +
        `got ${JSON.stringify(seq)}`);
    }
  });
}

/** Length of the longest suffix of `text` that is a proper prefix of a stop sequence (held back). */
function heldSuffix(text, stop) {
  let held = 0;
  for (const seq of stop) {
    for (let k = Math.min(seq.length - 1, text.length); k > held; k--) {
      if (text.endsWith(seq.slice(0, k))) {
        held = k;
        break;
      }
    }
  }
  return held;
}

/**
 * Tokens through the model as the server reads a prompt (server/core/prefill.py): calls of at most
 * PREFILL_CHUNK positions, [0, 256), [256, 512), ..., the state carried from one to the next, and only
 * the last position's logits kept. For fp32 the chunks change nothing; an int8 model quantizes each call
 * over all of its positions, so only the server's chunks give the server's logits (and text).
 * @param {object} ort the onnxruntime module the session came from (for ort.Tensor)
 * @param {{session: object, info: object}} model from loadModel
 * @param {BigInt64Array} tokens int64[T], T >= 1
 * @param {{h: object, c: object|null}|null} state from an earlier call; null = zeros
 * @returns {Promise<{logits: Float32Array, state: {h: object, c: object|null}}>} logits float32[V] of
 *   the last position, and the state after it
 */
export async function prefill(ort, { session, info }, tokens, state = null) {
  if (!(tokens instanceof BigInt64Array) || tokens.length === 0) {
    throw new InvalidArgumentError('tokens', 'must be a non-empty BigInt64Array');
  }
  const { io } = info;
  const V = info.vocab.length;
  let h;
  let c;
  if (state) {
    ({ h, c } = state);
  } else {
    const dims = [info.numLayers, 1, info.hiddenSize];
    const zeros = () => new ort.Tensor('float32', new Float32Array(info.numLayers * info.hiddenSize), dims);
    h = zeros();
    c = io.c0 ? zeros() : null;
  }
  let last = null;
  for (let start = 0; start < tokens.length; start += PREFILL_CHUNK) {
    const chunk = tokens.slice(start, start + PREFILL_CHUNK);
    const feeds = { [io.tokens]: new ort.Tensor('int64', chunk, [1, chunk.length]), [io.h0]: h };
    if (io.c0) feeds[io.c0] = c;
    const result = await session.run(feeds);
    const logits = result[io.logits];
    const T = logits.dims[1];
    last = logits.data.slice((T - 1) * V, T * V); // a copy: the chunk's other rows are not kept
    h = result[io.hn];
    if (io.c0) c = result[io.cn];
  }
  return { logits: last, state: { h, c: io.c0 ? c : null } };
}

/**
 * Generation as the server does it: the prompt in calls of at most PREFILL_CHUNK positions (prefill),
 * then one run per new char, state carried; char i is sampled with the uniform of draw i of the seed
 * (docs/sampling.md). A stop sequence ends generation and is not part of the text; text that may start
 * one is held back.
 * @param {object} ort the onnxruntime module the session came from (for ort.Tensor)
 * @param {{session: object, info: object}} model from loadModel
 * @param {string} prompt at least one character, all in the model's vocabulary
 * @param {{maxChars?: number, temperature?: number, topK?: number, topP?: number,
 *          seed?: bigint|number|string|null, stop?: string[]}} options temperature 0 = greedy; seed: a
 *          uint64 as a BigInt, a safe integer Number or a string of decimal digits; null = a fresh one
 * @param {(text: string) => (void|Promise<void>)} [onText] called with each piece of text as it is released;
 *   when it returns a promise, generation waits for it (a page yields to the event loop there: onnxruntime-web's
 *   single-threaded runs never do, so without that the page could neither paint nor take a click until the end)
 * @returns {Promise<{text: string, seed: bigint, finishReason: 'length'|'stop_sequence',
 *                    stopSequence: string|null, generatedChars: number}>}
 */
export async function generate(ort, model, prompt, options = {}, onText = undefined) {
  const { maxChars = 100, stop = [], seed = null, ...sampling } = options;
  if (typeof prompt !== 'string' || prompt.length === 0) {
    throw new InvalidArgumentError('prompt', 'must be at least one character (the model has no start-of-text token)');
  }
  if (!Number.isInteger(maxChars) || maxChars < 1 || maxChars > MAX_NEW_CHARS) {
    throw new InvalidArgumentError('max chars', `must be an integer in [1, ${MAX_NEW_CHARS}], got ${maxChars}`);
  }
  const params = samplingParams(sampling);
  checkStops(stop);
  const used = seedValue(seed ?? drawSeed());
  const key = seedKey(used);
  const { vocab } = model.info;
  const V = vocab.length;
  if (params.topK > V) { // as the server (server/core/generation.py)
    throw new InvalidArgumentError('top_k', `must be in [0, ${V}] (0 = off; the vocabulary size), got ${params.topK}`);
  }
  let tokens = encode(model.info, prompt);
  let state = null;
  let text = '';     // released
  let pending = '';  // generated, not yet released: a possible start of a stop sequence
  for (let i = 0; i < maxChars; i++) {
    let logits;
    ({ logits, state } = await prefill(ort, model, tokens, state));
    const u = params.temperature === 0 ? 0 : uniform(key, i); // greedy ignores its draw
    const next = sample(logits, 0, V, params, u);
    pending += vocab[next];
    // Checked after every char, so a match ends at the last one; among stops completing together
    // the longest (earliest start) wins, as in the server.
    const hit = stop.filter((seq) => pending.endsWith(seq)).sort((a, b) => b.length - a.length)[0];
    if (hit !== undefined) {
      const out = pending.slice(0, pending.length - hit.length);
      if (out && onText) await onText(out);
      return { text: text + out, seed: used, finishReason: 'stop_sequence', stopSequence: hit,
        generatedChars: i + 1 };
    }
    const held = heldSuffix(pending, stop);
    const out = pending.slice(0, pending.length - held);
    pending = pending.slice(pending.length - held);
    if (out) {
      text += out;
      if (onText) await onText(out);
    }
    tokens = BigInt64Array.of(BigInt(next));
  }
  if (pending && onText) await onText(pending);
  return { text: text + pending, seed: used, finishReason: 'length', stopSequence: null,
    generatedChars: maxChars };
}
