// The "try it" page: load a model.onnx (file picker or URL), generate with onnxruntime-web: greedy or
// seeded sampling, the same text as the server for the same seed and settings (docs/sampling.md).
//
// Query parameters, for links and automated checks:
//   ?model=URL&prompt=TEXT&max=N   fill in the form (and load the model from URL)
//   &temperature=T&top_k=K&top_p=P&seed=S&stop=SEQ (stop repeatable)   the sampling settings
//   &auto=1                        generate as soon as the model is loaded
//   &report=URL                    POST {state, text | error, seed, ...} as JSON to URL when done or failed
import * as ort from 'onnxruntime-web';

import { InvalidArgumentError, MAX_NEW_CHARS, generate, loadModel } from '../js/lib/nextchar.mjs';

// One thread needs no SharedArrayBuffer, so the page works without cross-origin isolation headers
// from any static file server. The wasm files sit beside the ort module that the import map names.
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL('../js/node_modules/onnxruntime-web/dist/', import.meta.url).href;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let model = null;

function setStatus(state, message) {
  $('status').dataset.state = state;
  $('status').textContent = message;
}

async function report(body) {
  const url = params.get('report');
  if (!url) return;
  await fetch(url, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
}

async function fail(error) {
  setStatus('error', `Error: ${error.message ?? error}`);
  await report({ state: 'error', error: String(error.message ?? error) });
}

async function load(bytes, source) {
  model = null;
  $('generate').disabled = true;
  setStatus('loading', `Loading ${source} …`);
  model = await loadModel(ort, bytes, { executionProviders: ['wasm'] });
  const { info } = model;
  $('model-info').textContent = `${source}: ${info.name || '(unnamed)'} v${info.version || '?'}, ` +
    `${info.cell.toUpperCase()}, ${info.numLayers} × ${info.hiddenSize}, ${info.vocab.length} characters`;
  $('generate').disabled = false;
  setStatus('ready', 'Model loaded.');
}

async function loadUrl(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  await load(new Uint8Array(await response.arrayBuffer()), url);
}

// Stop sequences, one per line; `\n` stands for a newline and `\\` for a backslash.
const unescapeStop = (line) => line.replace(/\\(n|\\)/g, (_, c) => (c === 'n' ? '\n' : '\\'));
const escapeStop = (seq) => seq.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');

function options() {
  const seed = $('seed').value.trim();
  if (seed && !/^\d+$/.test(seed)) throw new InvalidArgumentError('seed', `must be an integer in [0, 2^64-1], got ${seed}`);
  return {
    maxChars: Number($('max').value),
    temperature: Number($('temperature').value),
    topK: Number($('top-k').value),
    topP: Number($('top-p').value),
    seed: seed ? BigInt(seed) : null,
    stop: $('stop').value.split('\n').filter((line) => line !== '').map(unescapeStop),
  };
}

async function run() {
  const prompt = $('prompt').value;
  const opts = options();
  $('generate').disabled = true;
  const out = $('output');
  out.replaceChildren();
  const promptSpan = document.createElement('span');
  promptSpan.className = 'prompt';
  promptSpan.textContent = prompt;
  const generated = document.createElement('span');
  generated.id = 'generated';
  out.append(promptSpan, generated);
  setStatus('generating', 'Generating …');
  try {
    const started = performance.now();
    const result = await generate(ort, model, prompt, opts, (text) => generated.append(text));
    const seconds = (performance.now() - started) / 1000;
    setStatus('done', `Generated ${result.generatedChars} characters in ${seconds.toFixed(2)} s ` +
      `(${result.finishReason.replace('_', ' ')}; seed ${result.seed}).`);
    const { name, version, cell } = model.info;
    await report({
      state: 'done', model: { name, version, cell }, prompt, text: result.text, seed: String(result.seed),
      finish_reason: result.finishReason, stop_sequence: result.stopSequence,
    });
  } finally {
    $('generate').disabled = false;
  }
}

$('file').addEventListener('change', async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    await load(new Uint8Array(await file.arrayBuffer()), file.name);
  } catch (e) {
    await fail(e);
  }
});
$('load-url').addEventListener('click', () => loadUrl($('url').value).catch(fail));
$('generate').addEventListener('click', () => run().catch(fail));
$('max').max = String(MAX_NEW_CHARS);

async function start() {
  if (params.has('prompt')) $('prompt').value = params.get('prompt');
  if (params.has('max')) $('max').value = params.get('max');
  for (const [param, id] of [['temperature', 'temperature'], ['top_k', 'top-k'], ['top_p', 'top-p'], ['seed', 'seed']]) {
    if (params.has(param)) $(id).value = params.get(param);
  }
  if (params.has('stop')) $('stop').value = params.getAll('stop').map(escapeStop).join('\n');
  if (!params.has('model')) return;
  $('url').value = params.get('model');
  await loadUrl(params.get('model'));
  if (params.get('auto') === '1') await run();
}

start().catch(fail);
