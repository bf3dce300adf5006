// Unit tests of lib/nextchar.mjs without a model: `node --test client/js/test/` (also run by
// tests/e2e/test_edge.py). Real exported models are exercised end to end there.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { ModelFormatError, argmax, encode, modelInfo, readOnnxMetadata } from '../lib/nextchar.mjs';

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
