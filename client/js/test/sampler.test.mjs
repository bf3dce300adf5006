// Unit tests of lib/sampler.mjs: the same known answers and boundaries as tests/unit/test_sampling.py.
// Python against JavaScript on thousands of random cases and whole generations: tests/e2e.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  EXP_MIN, InvalidArgumentError, philox4x32, portableExp, sample, samplingParams, seedKey, seedValue, uniform,
} from '../lib/sampler.mjs';

// Random123's kat_vectors for philox4x32_10, checked against PyPI randomgen 2.5.1.
const PHILOX_KAT = [
  [[0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]],
  [[0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff],
    [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]],
  [[0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
    [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]],
];
// (seed, draw index) -> uniform, from randomgen's Philox; the same table is in docs/sampling.md.
const UNIFORM_KAT = [
  [0n, 0, 0.8805201978886142],
  [0n, 1, 0.36209111566940344],
  [42n, 0, 0.4685865183391049],
  [42n, 1, 0.32706338120338474],
  [42n, 2, 0.6583155272123093],
  [0xffffffffffffffffn, 2 ** 32, 0.9410730820433714],
  [7n, 1000, 0.8029626021371045],
];

test('Philox4x32-10 gives the known answers', () => {
  for (const [counter, key, want] of PHILOX_KAT) assert.deepEqual(philox4x32(counter, key), want);
});

test('uniforms give the known answers; seeds are uint64 (BigInt or decimal string)', () => {
  for (const [seed, index, want] of UNIFORM_KAT) assert.equal(uniform(seedKey(seed), index), want);
  assert.equal(uniform(seedKey('42'), 0), 0.4685865183391049);
  assert.throws(() => seedKey(-1n), InvalidArgumentError);
  assert.throws(() => seedKey(1n << 64n), /seed: must be an integer in \[0, 2\^64-1\]/);
  assert.throws(() => seedKey('x'), InvalidArgumentError);
});

test('seeds: only integers in [0, 2^64-1] (BigInt, safe-integer Number, decimal digits), as Python', () => {
  for (const [seed, want] of [[42n, 42n], [42, 42n], ['42', 42n], [0, 0n], ['007', 7n],
    [Number.MAX_SAFE_INTEGER, 2n ** 53n - 1n], ['18446744073709551615', 2n ** 64n - 1n]]) {
    assert.equal(seedValue(seed), want, String(seed));
  }
  assert.deepEqual(seedKey('18446744073709551615'), [0xffffffff, 0xffffffff]);
  // BigInt() would take every one of these (or round them): '' and ' ' as 0, '0x10' as 16, true as 1.
  for (const bad of ['', ' ', ' 1', '1 ', '0x10', '0b1', '1e3', '1.5', '-1', '+1', '18446744073709551616',
    true, false, 1.5, -1, 2 ** 53, NaN, Infinity, null, undefined, [], [1], {}, -1n]) {
    assert.throws(() => seedValue(bad), (e) => e instanceof InvalidArgumentError &&
      /^seed: must be an integer in \[0, 2\^64-1\], got /.test(e.message), String(bad));
  }
  assert.throws(() => seedKey(''), /got ""$/);
  assert.throws(() => seedKey(true), /got true \(boolean\)$/);
  assert.throws(() => seedKey('9'.repeat(100)), /got "9{40}"\.\.\. \(100 characters\)$/);
});

test('portableExp: exact known values, 0 below EXP_MIN, 1 at 0', () => {
  // The same values as tests/unit/test_sampling.py (exp(-10) is 1 ulp below the correctly rounded value).
  assert.deepEqual([-1, -0.5, -10, -700].map(portableExp),
    [0.36787944117144233, 0.6065306597126334, 4.539992976248485e-05, 9.85967654375977e-305]);
  assert.equal(portableExp(0), 1);
  assert.equal(portableExp(-0), 1);
  assert.equal(portableExp(-Infinity), 0);
  assert.equal(portableExp(EXP_MIN - 1e-13), 0);
  assert.ok(portableExp(EXP_MIN) > 2 ** -1022);
});

test('samplingParams: float32 as the wire carries them, named errors', () => {
  const p = samplingParams({ temperature: 0.8, topP: 0.9 });
  assert.equal(p.temperature, Math.fround(0.8));
  assert.equal(p.topP, Math.fround(0.9));
  assert.throws(() => samplingParams({ temperature: -0.1 }), /^InvalidArgumentError: temperature: must be in \[0, 100\]/);
  assert.throws(() => samplingParams({ temperature: NaN }), /temperature/);
  assert.throws(() => samplingParams({ topK: 1.5 }), /top_k: must be an integer >= 0/);
  assert.throws(() => samplingParams({ topP: 0 }), /top_p: must be in \(0, 1\]/);
  assert.throws(() => samplingParams({ topP: 1e-50 }), /top_p/); // 0 as a float32, as the server sees it
});

test('the rule at its boundaries (the examples of docs/sampling.md)', () => {
  const flat = new Float32Array(4); // four equal logits: cum = [1, 2, 3, 4] exactly
  const p = samplingParams();
  const at = (values, params, u) => sample(values, 0, values.length, params, u);
  assert.deepEqual([0, 0.25 - 2 ** -54, 0.25, 0.5, 0.75, 1 - 2 ** -53].map((u) => at(flat, p, u)), [0, 0, 1, 2, 3, 3]);
  assert.equal(at(flat, samplingParams({ topP: 0.5 }), 1 - 2 ** -53), 1);
  assert.equal(at(flat, samplingParams({ topP: 0.5000001 }), 1 - 2 ** -53), 2);
  assert.equal(at(flat, samplingParams({ topP: 1e-6 }), 0.99), 0);
  assert.equal(at(flat, samplingParams({ topK: 2 }), 0.99), 1);
  assert.equal(at(flat, samplingParams({ topK: 100 }), 0.99), 3);
  const tied = Float64Array.of(1, 3, 3, -Infinity); // unfiltered: id order, cum = [0.135, 1.135, 2.135, 2.135]
  assert.deepEqual([0, 0.06, 0.07, 0.53, 0.54, 0.99].map((u) => at(tied, p, u)), [0, 0, 1, 1, 2, 2]);
  for (const topK of [0, 4, 5]) assert.equal(at(tied, samplingParams({ topK }), 1 - 2 ** -53), 2);
  // filtering rows: descending order [1, 2, 0, 3]
  assert.deepEqual([0, 0.46, 0.47, 0.99].map((u) => at(tied, samplingParams({ topK: 3 }), u)), [1, 1, 2, 0]);
  assert.deepEqual([0, 0.46, 0.47, 0.99].map((u) => at(tied, samplingParams({ topP: 0.99 }), u)), [1, 1, 2, 0]);
  assert.equal(at(Float64Array.of(-Infinity, 1), p, 0), 1);
  assert.equal(at(Float32Array.of(1, 3, 3), samplingParams({ temperature: 0 }), 0.99), 1);
  assert.throws(() => at(Float64Array.of(0, NaN), p, 0.5), /logits contain NaN/);
  const qs = [p, samplingParams({ temperature: 0 }), samplingParams({ topK: 2 }), samplingParams({ topP: 0.5 })];
  for (const q of qs) { // an infinite maximum: the argmax
    assert.equal(at(Float64Array.of(0, Infinity, Infinity), q, 0.99), 1);
    assert.equal(at(Float64Array.of(-Infinity, -Infinity), q, 0.99), 0);
  }
});
