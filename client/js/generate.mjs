#!/usr/bin/env node
// Text from a nextchar model.onnx with onnxruntime-node: no Python, no server. The same seed and
// parameters give the same text as the server and `nextchar generate --model-file` (docs/sampling.md).
//
//   node client/js/generate.mjs --model models/lstm/1/model.onnx --prompt "O say" --max-chars 100 \
//        --temperature 0.8 --top-k 10 --seed 42 --stop "\n"
//
// Prints the generated characters (with --echo: prompt first). --json prints one JSON object
// {model, prompt, text, seed, finish_reason, stop_sequence, generated_chars} instead (seed as a
// decimal string: it is a uint64), for scripts and tests.
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';

import ort from 'onnxruntime-node';

import {
  InvalidArgumentError, MAX_NEW_CHARS, MAX_STOP_SEQUENCES, ModelFormatError, generate, loadModel,
} from './lib/nextchar.mjs';

const USAGE = `usage: node generate.mjs --model PATH --prompt TEXT [--max-chars N] [--temperature T]
                        [--top-k K] [--top-p P] [--seed S] [--stop SEQ]... [--echo] [--json]
  --model PATH       an exported nextchar model.onnx (or model.int8.onnx)
  --prompt TEXT      at least one character, all in the model's vocabulary
  --max-chars N      characters to generate, 1..${MAX_NEW_CHARS} (default 200, as the Python CLI)
  --temperature T    0 = greedy, up to 100 (default 1.0)
  --top-k K          keep the K most likely characters (default 0 = off)
  --top-p P          nucleus sampling mass in (0, 1] (default 1 = off)
  --seed S           replay a generation: an integer in [0, 2^64-1] (default: a fresh seed)
  --stop SEQ         stop before this sequence (repeatable, up to ${MAX_STOP_SEQUENCES})
  --echo             print the prompt before the generated text
  --json             print one JSON line (text, seed, finish reason, ...)`;

class UsageError extends Error {}

function number(values, flag, dflt, integer = false) {
  const raw = values[flag];
  if (raw === undefined) return dflt;
  const n = (integer ? /^\d+$/ : /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/).test(raw) ? Number(raw) : NaN;
  if (Number.isNaN(n)) throw new UsageError(`--${flag} must be ${integer ? 'an integer' : 'a number'}, got ${JSON.stringify(raw)}`);
  return n;
}

function parse(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        model: { type: 'string' },
        prompt: { type: 'string' },
        'max-chars': { type: 'string' },
        temperature: { type: 'string' },
        'top-k': { type: 'string' },
        'top-p': { type: 'string' },
        seed: { type: 'string' },
        stop: { type: 'string', multiple: true, default: [] },
        echo: { type: 'boolean', default: false },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (e) {
    throw new UsageError(e.message);
  }
  if (values.help) return null;
  if (!values.model) throw new UsageError('--model is required');
  if (values.prompt === undefined) throw new UsageError('--prompt is required');
  const maxChars = number(values, 'max-chars', 200, true);
  if (!(maxChars >= 1 && maxChars <= MAX_NEW_CHARS)) {
    throw new UsageError(`--max-chars must be an integer in [1, ${MAX_NEW_CHARS}], got ${JSON.stringify(values['max-chars'])}`);
  }
  if (values.seed !== undefined && !/^\d+$/.test(values.seed)) {
    throw new UsageError(`--seed must be an integer in [0, 2^64-1], got ${JSON.stringify(values.seed)}`);
  }
  return {
    ...values,
    options: {
      maxChars,
      temperature: number(values, 'temperature', 1.0),
      topK: number(values, 'top-k', 0, true),
      topP: number(values, 'top-p', 1.0),
      seed: values.seed === undefined ? null : BigInt(values.seed),
      stop: values.stop,
    },
  };
}

async function main(argv) {
  const args = parse(argv);
  if (args === null) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  let bytes;
  try {
    bytes = new Uint8Array(await readFile(args.model));
  } catch (e) {
    throw new UsageError(`--model ${args.model}: cannot read it (${e.code ?? e.message})`);
  }
  // One thread: generation is one small matrix step per char, where thread hand-offs cost more
  // than they save, and the CLI then behaves the same on any machine.
  const model = await loadModel(ort, bytes, { intraOpNumThreads: 1, interOpNumThreads: 1 });
  const result = await generate(ort, model, args.prompt, args.options);
  if (args.json) {
    const { name, version, cell } = model.info;
    process.stdout.write(`${JSON.stringify({
      model: { name, version, cell }, prompt: args.prompt, text: result.text, seed: String(result.seed),
      finish_reason: result.finishReason, stop_sequence: result.stopSequence, generated_chars: result.generatedChars,
    })}\n`);
  } else {
    process.stdout.write(`${args.echo ? args.prompt : ''}${result.text}\n`);
  }
}

main(process.argv.slice(2)).catch((e) => {
  const known = e instanceof UsageError || e instanceof InvalidArgumentError || e instanceof ModelFormatError;
  process.stderr.write(`generate.mjs: error: ${known ? e.message : e.stack ?? e}\n`);
  if (e instanceof UsageError) process.stderr.write(`${USAGE}\n`);
  process.exitCode = known ? 2 : 1;
});
