#!/usr/bin/env node
// Greedy text from a nextchar model.onnx with onnxruntime-node: no Python, no server.
//
//   node client/js/generate.mjs --model models/lstm/1/model.onnx --prompt "O say" --max-chars 100
//
// Prints the generated characters (with --echo: prompt first). --json prints one JSON object
// {model, cell, prompt, text} instead, for scripts and tests.
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';

import ort from 'onnxruntime-node';

import { InvalidArgumentError, MAX_NEW_CHARS, ModelFormatError, generateGreedy, loadModel } from './lib/nextchar.mjs';

const USAGE = `usage: node generate.mjs --model PATH --prompt TEXT [--max-chars N] [--echo] [--json]
  --model PATH     an exported nextchar model.onnx (or model.int8.onnx)
  --prompt TEXT    at least one character, all in the model's vocabulary
  --max-chars N    characters to generate, 1..${MAX_NEW_CHARS} (default 100)
  --echo           print the prompt before the generated text
  --json           print {"model", "cell", "prompt", "text"} as one JSON line`;

class UsageError extends Error {}

function parse(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        model: { type: 'string' },
        prompt: { type: 'string' },
        'max-chars': { type: 'string', default: '100' },
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
  const raw = values['max-chars'];
  const maxChars = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!(maxChars >= 1 && maxChars <= MAX_NEW_CHARS)) {
    throw new UsageError(`--max-chars must be an integer in [1, ${MAX_NEW_CHARS}], got ${JSON.stringify(raw)}`);
  }
  return { ...values, maxChars };
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
  const text = await generateGreedy(ort, model, args.prompt, args.maxChars);
  if (args.json) {
    const { name, version, cell } = model.info;
    process.stdout.write(`${JSON.stringify({ model: { name, version, cell }, prompt: args.prompt, text })}\n`);
  } else {
    process.stdout.write(`${args.echo ? args.prompt : ''}${text}\n`);
  }
}

main(process.argv.slice(2)).catch((e) => {
  const known = e instanceof UsageError || e instanceof InvalidArgumentError || e instanceof ModelFormatError;
  process.stderr.write(`generate.mjs: error: ${known ? e.message : e.stack ?? e}\n`);
  if (e instanceof UsageError) process.stderr.write(`${USAGE}\n`);
  process.exitCode = known ? 2 : 1;
});
