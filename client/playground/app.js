// The playground page: PredictNext on every keystroke (bars), GenerateStream for completions, over
// gRPC-Web (Connect's transport) to Envoy, which forwards plain gRPC to the nextchar server.
// Browsers cannot stream requests over gRPC-Web, so the page uses the unary and server-streaming RPCs,
// not Session; its texts are short, so a keystroke's full re-read costs little here.
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { NextChar } from "./gen/nextchar/v1/inference_pb.js";

const TOP_N = 10;
const $ = (id) => document.getElementById(id);
const client = createClient(NextChar, createGrpcWebTransport({ baseUrl: window.location.origin }));

let latest = 0;         // the newest keystroke's number: older answers are dropped when they arrive late
let completion = null;  // the running completion's AbortController
let completed = "";     // the last completion's text, for Accept

function showError(err) {
  const e = ConnectError.from(err);
  const name = Code[e.code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();  // as gRPC spells it
  $("error").textContent = e.code === Code.Canceled ? "" : `${name}: ${e.rawMessage}`;
}

function drawBars(predictions) {
  const bars = $("bars");
  bars.replaceChildren(...predictions.map((p) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.char = p.char;
    row.dataset.probability = String(p.probability);
    const label = document.createElement("span");
    label.className = "char";
    label.textContent = p.char === "\n" ? "⏎" : p.char === " " ? "␠" : p.char;
    const track = document.createElement("div");
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * p.probability).toFixed(2)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "p";
    value.textContent = p.probability.toFixed(4);
    row.append(label, track, value);
    return row;
  }));
}

async function predict() {
  const number = ++latest;
  const context = $("text").value;
  if (!context) {
    drawBars([]);
    $("status").textContent = "";
    return;
  }
  try {
    const reply = await client.predictNext({ model: { name: $("model").value }, context, n: TOP_N });
    if (number !== latest) return;
    drawBars(reply.predictions);
    $("status").textContent = `${context.length} chars · ${reply.model.name} v${reply.model.version}`;
    $("status").dataset.context = context;
    $("error").textContent = "";
  } catch (err) {
    if (number === latest) showError(err);
  }
}

const MAX_SEED = (1n << 64n) - 1n;

// The request's optional fields from the form: an empty field is absent (the server's default: temperature
// 1, top-p 1, a fresh seed), never 0. A seed must be decimal digits only (no "1e3", "1.5", "0x10").
function optionalFloat(id, field, name) {
  if ($(id).validity.badInput) {  // a number field holding text that is not a number reads as ""
    throw new ConnectError(`${name}: must be a number (empty = the server's default)`, Code.InvalidArgument);
  }
  const text = $(id).value.trim();
  return text === "" ? {} : { [field]: Number(text) };
}

function optionalSeed() {
  const text = $("seed").value.trim();
  if (text === "") return {};
  if (!/^[0-9]+$/.test(text) || BigInt(text) > MAX_SEED) {
    throw new ConnectError(`seed: must be an integer in [0, 2^64-1] (empty = a fresh one), got ${JSON.stringify(text)}`,
      Code.InvalidArgument);
  }
  return { seed: BigInt(text) };
}

async function complete() {
  completion?.abort();
  completion = new AbortController();
  const { signal } = completion;
  $("completion").textContent = "";
  $("summary").textContent = "";
  delete $("summary").dataset.done;
  $("error").textContent = "";
  $("accept").disabled = true;
  completed = "";
  try {
    const request = {
      model: { name: $("model").value }, prompt: $("text").value, maxNewChars: Number($("max").value),
      topK: Number($("topk").value), ...optionalFloat("temperature", "temperature", "temperature"),
      ...optionalFloat("topp", "topP", "top_p"),
      ...optionalSeed(),
    };
    for await (const message of client.generateStream(request, { signal })) {
      if (message.event.case === "text") {
        completed += message.event.value;
        $("completion").textContent = completed;
      } else if (message.event.case === "summary") {
        const s = message.event.value;
        $("summary").textContent = `${s.usage.generatedChars} chars · seed ${s.seed} · ` +
          `${s.timings.totalMs.toFixed(1)} ms`;
        $("summary").dataset.done = "1";
        $("accept").disabled = !completed;
      }
    }
  } catch (err) {
    showError(err);
  }
}

async function loadModels() {
  try {
    const reply = await client.listModels({});
    $("model").replaceChildren(...reply.models.map((m) => new Option(`${m.name} (v${m.version})`, m.name)));
    const wanted = new URLSearchParams(window.location.search).get("model");
    if (wanted) $("model").value = wanted;
    document.body.dataset.ready = "1";
  } catch (err) {
    showError(err);
  }
}

$("text").addEventListener("input", predict);
$("model").addEventListener("change", predict);
$("complete").addEventListener("click", complete);
$("accept").addEventListener("click", () => {
  $("text").value += completed;
  $("accept").disabled = true;
  predict();
});
loadModels();
