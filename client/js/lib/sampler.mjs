// The portable seeded sampler of docs/sampling.md, in JavaScript: Philox4x32-10 uniforms, a portable
// exp and the float64 rule. The same seed and parameters give the same characters as the server and
// the Python offline runner (tests/e2e/test_edge.py holds them to it); nothing here is Node- or
// browser-specific.

/** A bad argument: the message names the field and the allowed range. */
export class InvalidArgumentError extends Error {
  constructor(field, message) {
    super(`${field}: ${message}`);
    this.name = 'InvalidArgumentError';
    this.field = field;
  }
}

export const MAX_TEMPERATURE = 100;
export const MAX_SEED = (1n << 64n) - 1n;

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011, Random123). All words are uint32 held in numbers.

const M0 = 0xd2511f53;
const M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9;
const W1 = 0xbb67ae85;
const TWO_M53 = 2 ** -53;

/** High 32 bits of the 64-bit product a * b (uint32s): 16-bit halves keep every partial exact. */
function mulhi32(a, b) {
  const ah = a >>> 16;
  const al = a & 0xffff;
  const bh = b >>> 16;
  const bl = b & 0xffff;
  const mid1 = ah * bl;
  const mid2 = al * bh;
  const carry = ((al * bl) >>> 16) + (mid1 & 0xffff) + (mid2 & 0xffff);
  return ah * bh + (mid1 >>> 16) + (mid2 >>> 16) + Math.floor(carry / 65536);
}

/**
 * One Philox4x32-10 block.
 * @param {number[]} counter four uint32 words, word 0 lowest
 * @param {number[]} key two uint32 words
 * @returns {number[]} four uint32 words
 */
export function philox4x32([c0, c1, c2, c3], [k0, k1]) {
  for (let r = 0; r < 10; r++) {
    if (r) {
      k0 = (k0 + W0) >>> 0;
      k1 = (k1 + W1) >>> 0;
    }
    const hi0 = mulhi32(M0, c0);
    const lo0 = Math.imul(M0, c0) >>> 0;
    const hi1 = mulhi32(M1, c2);
    const lo1 = Math.imul(M1, c2) >>> 0;
    [c0, c1, c2, c3] = [(hi1 ^ c1 ^ k0) >>> 0, lo1, (hi0 ^ c3 ^ k1) >>> 0, lo0];
  }
  return [c0, c1, c2, c3];
}

const MAX_SHOWN_CHARS = 40; // of a bad value quoted back in an error message, as the server

function shown(value) {
  if (typeof value === 'string') {
    return value.length > MAX_SHOWN_CHARS
      ? `${JSON.stringify(value.slice(0, MAX_SHOWN_CHARS))}... (${value.length} characters)` : JSON.stringify(value);
  }
  if (typeof value === 'bigint' || typeof value === 'number') return String(value);
  let text;
  try {
    text = String(value);
  } catch {
    text = '?';
  }
  return `${text.slice(0, MAX_SHOWN_CHARS)} (${value === null ? 'null' : typeof value})`;
}

/**
 * A uint64 seed as a BigInt. Accepted: a BigInt in [0, 2^64-1], a Number that is a safe integer >= 0,
 * or a string of decimal digits only (as a uint64 travels in JSON); anything else (an empty or blank
 * string, '0x10', '1e3', '1.5', true, 1.5, 2^53 as a Number, ...) is an InvalidArgumentError, as the
 * server refuses anything that is not an integer in range.
 */
export function seedValue(seed) {
  let s = -1n;
  if (typeof seed === 'bigint') s = seed;
  else if (typeof seed === 'number' && Number.isSafeInteger(seed)) s = BigInt(seed);
  else if (typeof seed === 'string' && /^[0-9]+$/.test(seed)) s = BigInt(seed);
  if (s < 0n || s > MAX_SEED) {
    throw new InvalidArgumentError('seed', `must be an integer in [0, 2^64-1], got ${shown(seed)}`);
  }
  return s;
}

/** A uint64 seed (see seedValue) as its key words [low, high]; InvalidArgumentError if it is not one. */
export function seedKey(seed) {
  const s = seedValue(seed);
  return [Number(s & 0xffffffffn), Number(s >> 32n)];
}

/**
 * The uniform of draw `index` (the index of the generated character) for a seed's key: float64 in [0, 1).
 * @param {number[]} key from seedKey
 * @param {number} index a non-negative safe integer
 */
export function uniform(key, index) {
  const [x0, x1] = philox4x32([index >>> 0, Math.floor(index / 2 ** 32) >>> 0, 0, 0], key);
  return (x1 * 2 ** 21 + (x0 >>> 11)) * TWO_M53; // the top 53 bits of x1:x0, exact
}

// ---------------------------------------------------------------------------------------------
// exp for z <= 0 from + - * / and exact powers of two (fdlibm's e_exp.c), bit for bit as the Python one.

export const EXP_MIN = -708;
const INVLN2 = 1.44269504088896338700e+00;
const LN2_HI = 6.93147180369123816490e-01;
const LN2_LO = 1.90821492927058770002e-10;
const P1 = 1.66666666666666019037e-01;
const P2 = -2.77777777770155933842e-03;
const P3 = 6.61375632143793436117e-05;
const P4 = -1.65339022054652515390e-06;
const P5 = 4.13813679705723846039e-08;
const POW2_NEG = new Float64Array(1022); // POW2_NEG[j] = 2^-j, by exact halvings
POW2_NEG[0] = 1;
for (let j = 1; j < POW2_NEG.length; j++) POW2_NEG[j] = POW2_NEG[j - 1] / 2;

/** exp(z) for z <= 0, -Infinity or NaN, within 1 ulp of exp; 0 below EXP_MIN (never subnormal). */
export function portableExp(z) {
  if (Number.isNaN(z)) return NaN; // from a +Infinity logit: as in Python, every weight is then NaN
  if (z < EXP_MIN) return 0;
  const k = Math.trunc(z * INVLN2 - 0.5);
  const hi = z - k * LN2_HI;
  const lo = k * LN2_LO;
  const r = hi - lo;
  const t = r * r;
  const c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))));
  const y = 1 - ((lo - (r * c) / (2 - c)) - hi);
  return y * POW2_NEG[-k];
}

// ---------------------------------------------------------------------------------------------
// The rule.

/**
 * Sampling parameters, validated, with temperature and top_p rounded to float32 as the server's API
 * carries them (so the same numbers give the same text here and there).
 * @returns {{temperature: number, topK: number, topP: number}}
 */
export function samplingParams({ temperature = 1, topK = 0, topP = 1 } = {}) {
  const t = Math.fround(temperature);
  if (typeof temperature !== 'number' || !(t >= 0 && t <= MAX_TEMPERATURE)) {
    throw new InvalidArgumentError('temperature', `must be in [0, ${MAX_TEMPERATURE}] (0 = greedy), got ${temperature}`);
  }
  if (!Number.isInteger(topK) || topK < 0) {
    throw new InvalidArgumentError('top_k', `must be an integer >= 0 (0 = off), got ${topK}`);
  }
  const p = Math.fround(topP);
  if (typeof topP !== 'number' || !(p > 0 && p <= 1)) {
    throw new InvalidArgumentError('top_p', `must be in (0, 1] (1 = off), got ${topP}`);
  }
  return { temperature: t, topK, topP: p };
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
 * Pick one id from values[start, start+V) (float32 logits, read as float64) with uniform u.
 * A row that filters (top_k < V or top_p < 1) takes the ids in descending logit order, any other row in
 * id order; greedy rows and rows with an infinite maximum take the argmax (docs/sampling.md §4).
 * @param {{temperature: number, topK: number, topP: number}} params from samplingParams
 * @returns {number} the id; throws when the logits hold a NaN
 */
export function sample(values, start, V, params, u) {
  let top = -Infinity;
  for (let i = 0; i < V; i++) {
    const v = values[start + i];
    if (Number.isNaN(v)) throw new Error('logits contain NaN');
    if (v > top) top = v;
  }
  if (params.temperature === 0 || !Number.isFinite(top)) return argmax(values, start, V);
  const x = (i) => values[start + i];
  const ids = Array.from({ length: V }, (_, i) => i);
  const filters = (params.topK > 0 && params.topK < V) || params.topP < 1;
  const order = filters ? ids.sort((a, b) => (x(b) - x(a)) || (a - b)) : ids;
  const n = params.topK ? Math.min(params.topK, V) : V;
  const cum = new Float64Array(n);
  let sum = 0;
  for (let j = 0; j < n; j++) {
    sum += portableExp((x(order[j]) - top) / params.temperature);
    cum[j] = sum;
  }
  let last = n - 1;
  if (params.topP < 1) {
    const mass = params.topP * cum[n - 1];
    let reach = 0;
    for (let j = 0; j < n; j++) if (cum[j] < mass) reach++;
    last = Math.min(last, reach);
  }
  const target = u * cum[last];
  let below = 0;
  for (let j = 0; j <= last; j++) if (cum[j] <= target) below++;
  return order[Math.min(last, below)];
}
