// nextchar without Python: read a model.onnx's own vocab and manifest, then generate greedily.
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

/** A bad argument (prompt, max chars): the message names the field and the allowed range. */
export class InvalidArgumentError extends Error {
  constructor(field, message) {
    super(`${field}: ${message}`);
    this.name = 'InvalidArgumentError';
    this.field = field;
  }
}

export const MAX_NEW_CHARS = 100_000;
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

/** Index of the largest of values[start, start+n); ties go to the lowest index, as numpy's argmax. */
export function argmax(values, start, n) {
  let best = 0;
  let bestValue = values[start];
  for (let i = 1; i < n; i++) {
    if (values[start + i] > bestValue) {
      bestValue = values[start + i];
      best = i;
    }
  }
  return best;
}

/**
 * Greedy generation: the whole prompt in ONE run, then one run per new char, state carried.
 * @param {object} ort the onnxruntime module the session came from (for ort.Tensor)
 * @param {{session: object, info: object}} model from loadModel
 * @param {string} prompt at least one character, all in the model's vocabulary
 * @param {number} maxChars characters to generate, 1..MAX_NEW_CHARS
 * @param {(ch: string) => void} [onChar] called with each generated char as it is chosen
 * @returns {Promise<string>} the generated characters (without the prompt)
 */
export async function generateGreedy(ort, { session, info }, prompt, maxChars, onChar) {
  if (typeof prompt !== 'string' || prompt.length === 0) {
    throw new InvalidArgumentError('prompt', 'must be at least one character (the model has no start-of-text token)');
  }
  if (!Number.isInteger(maxChars) || maxChars < 1 || maxChars > MAX_NEW_CHARS) {
    throw new InvalidArgumentError('max chars', `must be an integer in [1, ${MAX_NEW_CHARS}], got ${maxChars}`);
  }
  const { io, vocab } = info;
  const V = vocab.length;
  const stateDims = [info.numLayers, 1, info.hiddenSize];
  const zeros = () => new ort.Tensor('float32', new Float32Array(info.numLayers * info.hiddenSize), stateDims);
  let h = zeros();
  let c = io.c0 ? zeros() : null;
  let tokens = encode(info, prompt);
  const out = [];
  for (let step = 0; step < maxChars; step++) {
    const feeds = { [io.tokens]: new ort.Tensor('int64', tokens, [1, tokens.length]), [io.h0]: h };
    if (c) feeds[io.c0] = c;
    const result = await session.run(feeds);
    const logits = result[io.logits];
    const T = logits.dims[1];
    const next = argmax(logits.data, (T - 1) * V, V);
    h = result[io.hn];
    if (c) c = result[io.cn];
    out.push(vocab[next]);
    if (onChar) onChar(vocab[next]);
    tokens = BigInt64Array.of(BigInt(next));
  }
  return out.join('');
}
