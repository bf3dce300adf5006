// Test-only: one unary NextChar call through grpc-js; prints {code, details, trailerBytes} as JSON.
// usage: node probe.mjs ADDRESS PROTO_ROOT METHOD DEADLINE_MS < REQUEST_JSON
import { readFileSync } from "node:fs";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, protoRoot, method, deadlineMs] = process.argv.slice(2);
const requestJson = readFileSync(0, "utf8");  // stdin: a request may be larger than an argument
const definition = protoLoader.loadSync("nextchar/v1/inference.proto", {
  includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: true,
});
const NextChar = grpc.loadPackageDefinition(definition).nextchar.v1.NextChar;
const client = new NextChar(address, grpc.credentials.createInsecure());
const deadline = new Date(Date.now() + Number(deadlineMs));
client[method](JSON.parse(requestJson), { deadline }, (err) => {
  const trailers = err && err.metadata ? err.metadata.toHttp2Headers() : {};
  const trailerBytes = Object.entries(trailers)
    .reduce((n, [k, v]) => n + k.length + [].concat(v).join("").length, 0);
  console.log(JSON.stringify({
    code: err ? grpc.status[err.code] : "OK", details: err ? err.details : "", trailerBytes,
  }));
  client.close();
});
