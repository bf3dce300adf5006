#!/usr/bin/env bash
# The main job, start to finish: train the default model (the seminar's CharLSTM on the built-in
# anthem), export it into a model repository, serve it over gRPC on loopback, and stream a generation.
set -euo pipefail
cd "$(dirname "$0")/.."
NC=.venv/bin/nextchar
WORK=${NEXTCHAR_DEMO_DIR:-runs/demo}
PORT=${NEXTCHAR_DEMO_PORT:-50051}
SERVER=127.0.0.1:$PORT
RUN="$WORK/seed-lstm-$(date +%Y%m%d-%H%M%S)"   # a new run each time; export adds the next version

echo "== train: seed-lstm preset (CharLSTM, one-hot, hidden = vocab, 2 layers, 100 epochs on the anthem)"
$NC train --preset seed-lstm --seed 0 --out "$RUN"

echo "== export: ONNX + manifest into $WORK/models/anthem/<next version>/"
$NC export --checkpoint "$RUN/last.pt" --repo "$WORK/models" --name anthem --int8

echo "== serve on $SERVER (server log: $WORK/server.log)"
$NC serve --model-repo "$WORK/models" --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null || true' EXIT

# Readiness comes from the gRPC health service, never from log lines; bounded at 60 s.
for _ in $(seq 120); do
  if $NC health --server "$SERVER" --timeout 1 >/dev/null 2>&1; then break; fi
  kill -0 $server_pid 2>/dev/null || { echo "server exited before it was healthy:" >&2; cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.5
done
$NC health --server "$SERVER"

echo "== models"
$NC models --server "$SERVER"

echo "== generate (greedy, streamed as it arrives)"
$NC generate --server "$SERVER" --model anthem --prompt "O say" --max-chars 200 --temperature 0
echo
echo "== generate (temperature 0.8, seed 7)"
$NC generate --server "$SERVER" --model anthem --prompt "O say" --max-chars 200 --temperature 0.8 --seed 7
echo
