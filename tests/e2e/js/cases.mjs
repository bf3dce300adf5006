// Runs a batch of sampler checks and seeded generations with client/js, in Node (run_cases.mjs) or
// in the browser (../web/cases.html), so tests/e2e can compare them with the Python side in one go.
import { generate, loadModel } from '../../../client/js/lib/nextchar.mjs';
import { portableExp, sample, samplingParams, seedKey, uniform } from '../../../client/js/lib/sampler.mjs';

/**
 * @param {object} ort onnxruntime-node or onnxruntime-web
 * @param {(path: string) => Promise<Uint8Array>} readModel the bytes of a model, by the input's name for it
 * @param {object} sessionOptions for ort.InferenceSession.create
 * @param {{uniforms?: [string, number][], exp?: number[], rows?: object[], generations?: object[]}} input
 *   seeds as decimal strings (uint64); rows: {logits, temperature, topK, topP, u}
 */
export async function runCases(ort, readModel, sessionOptions, input) {
  const out = {
    uniforms: (input.uniforms ?? []).map(([seed, index]) => uniform(seedKey(BigInt(seed)), index)),
    exp: (input.exp ?? []).map(portableExp),
    tokens: (input.rows ?? []).map((r) => sample(Float32Array.from(r.logits), 0, r.logits.length, samplingParams(r), r.u)),
    generations: [],
  };
  const models = new Map();
  for (const g of input.generations ?? []) {
    if (!models.has(g.model)) models.set(g.model, await loadModel(ort, await readModel(g.model), sessionOptions));
    const r = await generate(ort, models.get(g.model), g.prompt, {
      maxChars: g.maxChars, temperature: g.temperature, topK: g.topK, topP: g.topP, seed: BigInt(g.seed), stop: g.stop,
    });
    out.generations.push({ text: r.text, finish_reason: r.finishReason, seed: String(r.seed) });
  }
  return out;
}
