// Drives the playground in headless chromium over the DevTools protocol, as a person would: real key
// presses into the text box, a click on Complete, a bad temperature and seeds, an empty temperature. Prints what the page showed as
// JSON on stdout; tests/e2e/test_playground.py compares it with the server's own answers.
// Usage: node --experimental-websocket playground_driver.mjs CHROMIUM URL PROFILE_DIR TEXT
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

const [chromium, url, profile, text] = process.argv.slice(2);
const STEP_TIMEOUT_MS = 15000;
const browser = spawn(chromium, [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
  "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-port=0", `--user-data-dir=${profile}`, url,
], { stdio: ["ignore", "ignore", "pipe"], detached: true });
let browserLog = "";
browser.stderr.on("data", (d) => {  // without the noise of a machine that has no D-Bus
  const lines = String(d).split("\n").filter((line) => line && !line.includes("dbus"));
  if (lines.length) browserLog = (browserLog + lines.join("\n") + "\n").slice(-3000);
});

async function until(what, probe) {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

async function connect() {
  const portFile = join(profile, "DevToolsActivePort");
  await until("DevToolsActivePort", () => existsSync(portFile) && readFileSync(portFile, "utf8").includes("\n"));
  const port = readFileSync(portFile, "utf8").split("\n")[0];
  const page = await until("the page target", async () => {
    const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
    return targets.find((t) => t.type === "page" && t.url.startsWith(url));
  });
  const ws = new WebSocket(page.webSocketDebuggerUrl);
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
  let next = 0;
  const waiting = new Map();
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.id && waiting.has(msg.id)) {
      waiting.get(msg.id)(msg);
      waiting.delete(msg.id);
    }
  };
  const send = (method, params = {}) => new Promise((resolve, reject) => {
    const id = ++next;
    waiting.set(id, (msg) => (msg.error ? reject(new Error(JSON.stringify(msg.error))) : resolve(msg.result)));
    ws.send(JSON.stringify({ id, method, params }));
  });
  const evaluate = async (expression) => {
    const r = await send("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
    if (r.exceptionDetails) throw new Error(`page: ${JSON.stringify(r.exceptionDetails)}`);
    return r.result.value;
  };
  return { send, evaluate, close: () => ws.close() };
}

const BARS = `[...document.querySelectorAll('#bars .bar')].map((b) => [b.dataset.char, Number(b.dataset.probability)])`;

async function main() {
  const page = await connect();
  const out = { keystrokes: [] };
  await until("the model list", () => page.evaluate("document.body?.dataset.ready === '1'"));
  await page.evaluate("document.getElementById('text').focus()");
  let typed = "";
  for (const ch of text) {
    await page.send("Input.insertText", { text: ch });  // a key press: beforeinput + input events
    typed += ch;
    const want = JSON.stringify(typed);
    await until(`predictions for ${want}`, () => page.evaluate(`document.getElementById('status').dataset.context === ${want}`));
    out.keystrokes.push({ text: typed, bars: await page.evaluate(BARS) });
  }
  // A completion: count how the text grows while it streams, then read the end.
  await page.evaluate(`(() => {
    const set = (id, v) => { document.getElementById(id).value = v; };
    set('max', '300'); set('temperature', '0.8'); set('topk', '10'); set('topp', '0.95'); set('seed', '7');
    window.__lengths = [];
    new MutationObserver(() => window.__lengths.push(document.getElementById('completion').textContent.length))
      .observe(document.getElementById('completion'), { childList: true, characterData: true, subtree: true });
    document.getElementById('complete').click();
  })()`);
  await until("the completion's summary", () => page.evaluate("document.getElementById('summary').dataset.done === '1'"));
  out.completion = await page.evaluate("document.getElementById('completion').textContent");
  out.lengths = await page.evaluate("window.__lengths");
  out.summary = await page.evaluate("document.getElementById('summary').textContent");
  // A bad request: the server's INVALID_ARGUMENT shows on the page.
  await page.evaluate("document.getElementById('temperature').value = '-1'; document.getElementById('complete').click()");
  out.error = await until("the error", () => page.evaluate("document.getElementById('error').textContent"));
  // A seed that is not decimal digits: the page's own INVALID_ARGUMENT, before any request (and no
  // unhandled rejection: the message must show).
  out.seedErrors = [];
  for (const seed of ["1e3", "1.5", "0x10", "18446744073709551616"]) {
    await page.evaluate(`(() => {
      const set = (id, v) => { document.getElementById(id).value = v; };
      set('temperature', '0.8'); set('seed', ${JSON.stringify(seed)});
      document.getElementById('error').textContent = '';
      document.getElementById('complete').click();
    })()`);
    out.seedErrors.push(await until(`the error for seed ${seed}`,
      () => page.evaluate("document.getElementById('error').textContent")));
  }
  // An empty temperature is absent (the server's default, 1), not 0 (greedy).
  await page.evaluate(`(() => {
    document.getElementById('temperature').value = '';
    document.getElementById('seed').value = '7';
    document.getElementById('complete').click();
  })()`);
  await until("the default-temperature completion", () => page.evaluate("document.getElementById('summary').dataset.done === '1'"));
  out.defaultTemperature = await page.evaluate("document.getElementById('completion').textContent");
  page.close();
  return out;
}

let code = 0;
try {
  process.stdout.write(JSON.stringify(await main()) + "\n");
} catch (err) {
  process.stderr.write(`chromium said:\n${browserLog}\nplayground_driver: ${err.stack}\n`);
  code = 1;
} finally {
  try { process.kill(-browser.pid, "SIGTERM"); } catch { /* already gone */ }
}
process.exit(code);
