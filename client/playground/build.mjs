// Build the playground: protobuf-es code from proto/ (protoc-gen-es, through grpc_tools' protoc), then
// one esbuild bundle of app.js and the Connect gRPC-Web client into dist/app.js. Generated code and the
// bundle are build outputs (gen/, dist/; not committed); `node build.mjs` makes both, in about a second.
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const python = process.env.PYTHON || join(root, ".venv", "bin", "python");
const include = execFileSync(python, ["-c", "import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), '_proto'))"]).toString().trim();

mkdirSync(join(here, "gen"), { recursive: true });
execFileSync(python, [
  "-m", "grpc_tools.protoc", `-I${join(root, "proto")}`, `-I${include}`,
  `--plugin=protoc-gen-es=${join(here, "node_modules", ".bin", "protoc-gen-es")}`,
  `--es_out=${join(here, "gen")}`, "--es_opt=target=js",
  "nextchar/v1/inference.proto", "nextchar/v1/manifest.proto",
], { stdio: "inherit" });

await esbuild.build({
  entryPoints: [join(here, "app.js")], bundle: true, format: "esm", target: "es2020",
  outfile: join(here, "dist", "app.js"), minify: true, sourcemap: false, logLevel: "warning",
});
console.log("built client/playground/dist/app.js");
