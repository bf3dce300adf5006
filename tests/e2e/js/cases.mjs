// Runs a batch of sampler checks and seeded generations with client/js, in Node (run_cases.mjs) or
// in the browser (../web/cases.html), so tests/e2e can compare them with the Python side in one go.
import { encode, generate, loadModel, prefill } from '../../../client/js/lib/nextchar.mjs';
import { portableExp, sample, samplingParams, seedKey, uniform } from '../../../client/js/lib/sampler.mjs';

/**
 * @param {object} ort onnxruntime-node or onnxruntime-web
 * @param {(path: string) => Promise<Uint8Array>} readModel the bytes of a model, by the input's name for it
 * @param {object} sessionOptions for ort.InferenceSession.create
 * @param {{uniforms?: [string, number][], exp?: number[], rows?: object[], generations?: object[],
 *          prefills?: {model: string, prompt: string}[]}} input
 *   seeds as decimal strings (uint64); rows: {logits, temperature, topK, topP, u}; prefills: the last
 *   position's logits after the prompt (lib/nextchar.mjs prefill), as plain numbers
 */
export async function runCases(ort, readModel, sessionOptions, input) {
  const out = {
    uniforms: (input.uniforms ?? []).map(([seed, index]) => uniform(seedKey(BigInt(seed)), index)),
    exp: (input.exp ?? []).map(portableExp),
    tokens: (input.rows ?? []).map((r) => sample(Float32Array.from(r.logits), 0, r.logits.length, samplingParams(r), r.u)),
    generations: [],
    prefills: [],
  };
  const models = new Map();
  for (const p of input.prefills ?? []) {
    if (!models.has(p.model)) models.set(p.model, await loadModel(ort, await readModel(p.model), sessionOptions));
    const model = models.get(p.model);
    const { logits } = await prefill(ort, model, encode(model.info, p.prompt));
    out.prefills.push(Array.from(logits));
  }
  for (const g of input.generations ?? []) {
    if (!models.has(g.model)) models.set(g.model, await loadModel(ort, await readModel(g.model), sessionOptions));
    const r = await generate(ort, models.get(g.model), g.prompt, {
      maxChars: g.maxChars, temperature: g.temperature, topK: g.topK, topP: g.topP, seed: BigInt(g.seed), stop: g.stop,
    });
    out.generations.push({ text: r.text, finish_reason: r.finishReason, seed: String(r.seed) });
  }
  return out;
}
