// Test-only: one unary NextChar call through grpc-js; prints {code, details, trailerBytes} as JSON.
// usage: node probe.mjs ADDRESS PROTO_ROOT METHOD REQUEST_JSON DEADLINE_MS
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, protoRoot, method, requestJson, deadlineMs] = process.argv.slice(2);
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
