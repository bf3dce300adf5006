// Unit tests of lib/nextchar.mjs without a model: `node --test client/js/test/` (also run by
// tests/e2e/test_edge.py). Real exported models are exercised end to end there.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  InvalidArgumentError, MAX_STOP_SEQUENCES, ModelFormatError, PREFILL_CHUNK, argmax, encode, generate, modelInfo,
  prefill, readOnnxMetadata,
} from '../lib/nextchar.mjs';

// --- a tiny protobuf writer, just enough to build ModelProto-shaped bytes --------------------------
const varint = (n) => {
  const out = [];
  while (n >= 128) {
    out.push((n % 128) | 128);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
};
const utf8 = (s) => [...new TextEncoder().encode(s)];
const len = (field, bytes) => [...varint(field * 8 + 2), ...varint(bytes.length), ...bytes];
const entry = (key, value) => len(14, [...len(1, utf8(key)), ...len(2, utf8(value))]);

const MANIFEST = {
  format: 'nextchar.v1', name: 'm', version: '3',
  architecture: { cell: 'CELL_TYPE_LSTM', vocab_size: 3, hidden_size: 4, num_layers: 2 },
  io: { tokens: 'tokens', h0: 'h0', c0: 'c0', logits: 'logits', hn: 'hn', cn: 'cn' },
};
const props = (manifest = MANIFEST, vocab = ['a', 'b', '😀']) => new Map([
  ['nextchar.manifest', JSON.stringify(manifest)], ['nextchar.vocab', JSON.stringify(vocab)],
]);

test('readOnnxMetadata finds metadata_props among the other field types', () => {
  const bytes = Uint8Array.from([
    ...varint(1 * 8 + 0), ...varint(8),          // ir_version: varint
    ...len(2, utf8('pytorch')),                   // producer_name
    ...len(7, new Array(300).fill(7)),            // graph: a long length-delimited field to skip
    ...entry('nextchar.vocab', '["a","😀"]'),
    ...varint(99 * 8 + 1), 1, 2, 3, 4, 5, 6, 7, 8, // an unknown fixed64
    ...varint(98 * 8 + 5), 1, 2, 3, 4,             // an unknown fixed32
    ...entry('other', 'x'),
  ]);
  assert.deepEqual([...readOnnxMetadata(bytes)], [['nextchar.vocab', '["a","😀"]'], ['other', 'x']]);
});

test('readOnnxMetadata rejects bytes that are not a protobuf', () => {
  assert.throws(() => readOnnxMetadata(utf8('{"not": "onnx"}')), ModelFormatError);
  assert.throws(() => readOnnxMetadata(Uint8Array.from(len(14, [1, 2, 3])).subarray(0, 3)), /runs past the end/);
});

test('modelInfo reads architecture and io names; camelCase proto3 JSON too', () => {
  const info = modelInfo(props());
  assert.equal(info.cell, 'lstm');
  assert.deepEqual([info.numLayers, info.hiddenSize, info.io.c0, info.io.cn], [2, 4, 'c0', 'cn']);
  const camel = { ...MANIFEST, architecture: { cell: 'CELL_TYPE_GRU', vocabSize: 3, hiddenSize: 5, numLayers: 1 } };
  const gru = modelInfo(props(camel));
  assert.deepEqual([gru.cell, gru.numLayers, gru.hiddenSize, gru.io.c0], ['gru', 1, 5, '']);
});

test('modelInfo names what is wrong', () => {
  assert.throws(() => modelInfo(new Map()), /not a nextchar model: ONNX metadata has no "nextchar.manifest"/);
  assert.throws(() => modelInfo(props(MANIFEST, ['a', 'bc', 'd'])), /vocab\[1\] must be exactly one Unicode code point/);
  assert.throws(() => modelInfo(props(MANIFEST, ['a', 'b'])), /vocab_size is 3 but the vocab has 2/);
  const bad = { ...MANIFEST, architecture: { ...MANIFEST.architecture, cell: 'CELL_TYPE_UNSPECIFIED' } };
  assert.throws(() => modelInfo(props(bad)), /architecture.cell must be one of CELL_TYPE_RNN/);
  const noLayers = { ...MANIFEST, architecture: { ...MANIFEST.architecture, num_layers: 0 } };
  assert.throws(() => modelInfo(props(noLayers)), /architecture.num_layers must be a positive integer, got 0/);
});

test('encode works on code points and lists unknown ones with their positions', () => {
  const info = modelInfo(props());
  assert.deepEqual([...encode(info, 'a😀b')], [0n, 2n, 1n]);
  assert.throws(() => encode(info, 'a😀x€'), /2 character\(s\) not in the model's vocabulary: "x" at 2, "€" at 3/);
});

test('argmax breaks ties towards the lowest index, as numpy does', () => {
  assert.equal(argmax(Float32Array.of(9, 1, 5, 5, 2), 1, 4), 1);
  assert.equal(argmax(Float32Array.of(0, 3, 3), 0, 3), 1);
});

// --- a fake onnxruntime: records each call's tokens; the logits of position p favour id (token + 1) % 3,
// and the state counts positions read, so carried state and kept rows can be checked -----------------
const fakeOrt = {
  Tensor: class {
    constructor(type, data, dims) {
      Object.assign(this, { type, data, dims });
    }
  },
};
function fakeModel() {
  const info = modelInfo(props()); // LSTM, 2 layers x 4, vocab of 3
  const calls = [];
  const session = {
    async run(feeds) {
      const tokens = Array.from(feeds.tokens.data, Number);
      const seen = feeds.h0.data[0];
      assert.equal(feeds.c0.data[0], seen, 'h and c travel together');
      calls.push({ tokens, seen });
      const logits = new Float32Array(tokens.length * 3);
      tokens.forEach((t, p) => { logits[p * 3 + ((t + 1) % 3)] = 1 + seen + p; });
      const state = () => new fakeOrt.Tensor('float32', new Float32Array(8).fill(seen + tokens.length), [2, 1, 4]);
      return { logits: { data: logits, dims: [1, tokens.length, 3] }, hn: state(), cn: state() };
    },
  };
  return { model: { session, info }, calls };
}

test("prefill runs the prompt in the server's chunks (server/core/prefill.py) and keeps the last row", async () => {
  assert.equal(PREFILL_CHUNK, 256);
  for (const [n, sizes] of [[1, [1]], [256, [256]], [257, [256, 1]], [300, [256, 44]], [600, [256, 256, 88]]]) {
    const { model, calls } = fakeModel();
    const tokens = BigInt64Array.from({ length: n }, (_, i) => BigInt(i % 3));
    const { logits, state } = await prefill(fakeOrt, model, tokens);
    assert.deepEqual(calls.map((c) => c.tokens.length), sizes, `${n} positions`);
    assert.deepEqual(calls.map((c) => c.seen), sizes.map((_, i) => i * 256), 'the state is carried');
    assert.deepEqual(calls.flatMap((c) => c.tokens), Array.from(tokens, Number), 'in order, none skipped');
    const last = (n - 1) % 3;
    assert.deepEqual(Array.from(logits), [0, 1, 2].map((id) => (id === (last + 1) % 3 ? n : 0)));
    assert.equal(state.h.data[0], n);
  }
});

test('generate: the prompt in chunks, then one call per char from the carried state', async () => {
  const { model, calls } = fakeModel();
  const info = model.info;
  const prompt = 'ab'.repeat(150); // 300 characters
  const r = await generate(fakeOrt, model, prompt, { maxChars: 3, temperature: 0 });
  assert.deepEqual(calls.map((c) => c.tokens.length), [256, 44, 1, 1]);
  assert.deepEqual(calls.map((c) => c.seen), [0, 256, 300, 301]);
  // greedy: after 'b' (1) comes id 2 ('😀'), after it 0 ('a'), then 1 ('b')
  assert.equal(r.text, `${info.vocab[2]}${info.vocab[0]}${info.vocab[1]}`);
});

test('generate refuses what the server refuses: more than 4 stop sequences, a seed that is not a uint64, top_k above the vocabulary', async () => {
  const { model, calls } = fakeModel();
  assert.equal(MAX_STOP_SEQUENCES, 4); // server/core/limits.py
  await generate(fakeOrt, model, 'a', { maxChars: 1, stop: ['a', 'b', 'ab', 'ba'] });
  await assert.rejects(generate(fakeOrt, model, 'a', { maxChars: 1, stop: ['a', 'b', 'ab', 'ba', 'bb'] }),
    (e) => e instanceof InvalidArgumentError && e.message === 'stop: must have at most 4 sequences, got 5');
  for (const seed of ['', ' ', '0x10', '1e3', '1.5', true, 1.5, -1]) {
    await assert.rejects(generate(fakeOrt, model, 'a', { maxChars: 1, seed }),
      /^InvalidArgumentError: seed: must be an integer in \[0, 2\^64-1\]/, JSON.stringify(seed));
  }
  await generate(fakeOrt, model, 'a', { maxChars: 1, topK: 3 });
  await assert.rejects(generate(fakeOrt, model, 'a', { maxChars: 1, topK: 4 }),
    (e) => e instanceof InvalidArgumentError
      && e.message === 'top_k: must be in [0, 3] (0 = off; the vocabulary size), got 4');
  assert.equal(calls.length, 2, 'refused before any model call');
  for (const [seed, want] of [[7, 7n], ['7', 7n], [7n, 7n]]) {
    assert.equal((await generate(fakeOrt, model, 'a', { maxChars: 1, seed })).seed, want);
  }
});
