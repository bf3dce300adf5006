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
let running = false; // a generation is under way: Generate stays disabled, whatever loads meanwhile
const YIELD_EVERY_MS = 50;

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
  // The running generation goes on with the model it started with; this one is for the next.
  $('generate').disabled = running;
  if (running) setStatus('generating', 'Generating … (the model just loaded is for the next generation)');
  else setStatus('ready', 'Model loaded.');
}

async function loadUrl(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  await load(new Uint8Array(await response.arrayBuffer()), url);
}

// Stop sequences, one per line; `\n` stands for a newline and `\\` for a backslash.
const unescapeStop = (line) => line.replace(/\\(n|\\)/g, (_, c) => (c === 'n' ? '\n' : '\\'));
const escapeStop = (seq) => seq.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');

// A number field; empty = absent (undefined: the default, as the server's absent field), never 0.
function optionalNumber(id, name) {
  if ($(id).validity.badInput) throw new InvalidArgumentError(name, 'must be a number (empty = the default)');
  const text = $(id).value.trim();
  return text === '' ? undefined : Number(text);
}

function options() {
  const seed = $('seed').value.trim();
  if (seed && !/^[0-9]+$/.test(seed)) {
    throw new InvalidArgumentError('seed', `must be an integer in [0, 2^64-1] (empty = a fresh one), got ${JSON.stringify(seed)}`);
  }
  return {
    maxChars: Number($('max').value),
    temperature: optionalNumber('temperature', 'temperature'), // empty: 1, as the server's default
    topK: optionalNumber('top-k', 'top_k'),
    topP: optionalNumber('top-p', 'top_p'),
    seed: seed || null, // decimal digits: generate checks the range
    stop: $('stop').value.split('\n').filter((line) => line !== '').map(unescapeStop),
  };
}

async function run() {
  if (running || !model) return;
  const current = model; // a model loaded meanwhile is for the next generation
  const prompt = $('prompt').value;
  const opts = options();
  running = true;
  $('generate').disabled = true;
  let lastYield = performance.now();
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
    const result = await generate(ort, current, prompt, opts, (text) => {
      generated.append(text);
      // onnxruntime-web's runs never yield to the event loop: a task now and then lets the page paint
      // the text so far and take clicks (a model loaded meanwhile is for the next generation).
      if (performance.now() - lastYield < YIELD_EVERY_MS) return undefined;
      return new Promise((resolve) => setTimeout(() => { lastYield = performance.now(); resolve(); }, 0));
    });
    const seconds = (performance.now() - started) / 1000;
    setStatus('done', `Generated ${result.generatedChars} characters in ${seconds.toFixed(2)} s ` +
      `(${result.finishReason.replace('_', ' ')}; seed ${result.seed}).`);
    const { name, version, cell } = current.info;
    await report({
      state: 'done', model: { name, version, cell }, prompt, text: result.text, seed: String(result.seed),
      finish_reason: result.finishReason, stop_sequence: result.stopSequence,
    });
  } finally {
    running = false;
    $('generate').disabled = !model; // still disabled while a model loads
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
