// node run_cases.mjs < input.json > output.json: tests/e2e's cases (see cases.mjs) with onnxruntime-node.
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';

import { runCases } from './cases.mjs';

// onnxruntime-node lives in client/js/node_modules, which Node's resolution from here would not find.
const ort = createRequire(new URL('../../../client/js/package.json', import.meta.url))('onnxruntime-node');
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const out = await runCases(ort, async (path) => new Uint8Array(await readFile(path)),
  { intraOpNumThreads: 1, interOpNumThreads: 1 }, input);
process.stdout.write(JSON.stringify(out));
