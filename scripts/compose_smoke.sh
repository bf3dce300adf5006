#!/usr/bin/env bash
# The deployment, for real, with podman: build the images, compose up, generate, scale out, kill a replica
# under load, compose down. Prints the build context sizes, image sizes, the containers' hardening, time to
# healthy, the generated text and the load figures; removes the build stages it made.
#
#   make compose-smoke        (or: bash scripts/compose_smoke.sh)
# Needs root on a Debian machine (it apt-installs podman, runc, debootstrap on first use) and the project's
# .venv (`make install`) for the client side. All traffic goes to 127.0.0.1; all containers use the host's
# network (deploy/compose.podman.yml). A first run takes ~10 min (debootstrap + builds), later ones less.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s.%N)
PY=.venv/bin/python
NEXTCHAR=.venv/bin/nextchar
PROJECT=nextchar-smoke
MODEL=${SMOKE_MODEL:-anthem}
PROMPT=${SMOKE_PROMPT:-O say can you see}

now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }  # seconds since $1
step() { printf '\n== [%6ss] %s\n' "$(since "$START")" "$*"; }

step "setup: podman, compose, containers.conf, API socket, debootstrap base"
bash scripts/podman-setup.sh
# shellcheck source=deploy/env.sh
source scripts/deploy/env.sh
export NEXTCHAR_BASE_IMAGE
# The CPU torch wheel for the trainer build, served on 127.0.0.1 (never part of a build context).
wheels=$(bash scripts/deploy/stage-wheels.sh start)
if [ -n "$wheels" ]; then export "${wheels?}"; fi
docker-compose version
podman --version
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml -f deploy/compose.podman.yml --profile scale)

# Build stages are labelled io.nextchar.stage=build (docker/*.Dockerfile); once the images are built they
# are dangling. Removing one can leave its parent layer dangling, hence the (bounded) loop.
build_stages() { podman images -a -q --filter label=io.nextchar.stage=build | sort -u; }
prune_build_stages() {
  local before
  before=$(build_stages | wc -l)
  for _ in $(seq 30); do
    podman image prune -f --filter label=io.nextchar.stage=build >/dev/null
    [ -z "$(podman images -a -q --filter dangling=true --filter label=io.nextchar.stage=build)" ] && break
  done
  local id
  for id in ${previous_images:-}; do
    if [ "$(podman image inspect "$id" --format '{{len .RepoTags}}' 2>/dev/null)" = 0 ]; then
      podman rmi "$id" >/dev/null 2>&1 || true
    fi
  done
  echo "build stage images: $before before the prune, $(build_stages | wc -l) left;" \
    "dangling images left: $(podman images -a -q --filter dangling=true | sort -u | wc -l);" \
    "containers left (build or run): $(podman ps -a --external -q | wc -l)"
}

cleanup() {
  local rc=$?
  step "compose down, prune the build stages"
  "${COMPOSE[@]}" down -v --timeout 20 || true
  prune_build_stages || true
  bash scripts/deploy/stage-wheels.sh stop
  bash scripts/podman-setup.sh stop
  printf '\n== total %ss, exit %d\n' "$(since "$START")" "$rc"
}

for port in 50050 50051 50052 50053 50061 50062 50063 9090 9901 8080 9902; do
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use; stop what listens there first" >&2
    exit 1
  fi
done
"${COMPOSE[@]}" down -v --timeout 5 >/dev/null 2>&1 || true
trap cleanup EXIT

step "build images (base: $NEXTCHAR_BASE_IMAGE)"
t=$(now)
# The images a previous run built: once this build retags them they are dangling, and removed at the end.
previous_images=$(podman images -q --filter 'reference=nextchar-*' | sort -u)
BUILD_LOG=$NEXTCHAR_DEPLOY_CACHE/build.log
if ! nice -n 10 "${COMPOSE[@]}" build >"$BUILD_LOG" 2>&1; then
  tail -n 40 "$BUILD_LOG"
  exit 1
fi
echo "build took $(since "$t")s (log: $BUILD_LOG)"
bash scripts/deploy/stage-wheels.sh stop  # only the trainer build needed it
# What each build sent: compose's classic builder logs the context it uploads, per build.
tr '\r' '\n' <"$BUILD_LOG" | grep -aE 'Sending build context|Successfully tagged (docker.io/library/)?nextchar' \
  | awk '/Sending build context/ { size = $NF; next }
         size { sub(/.*\//, "", $NF); printf "build context of %-28s %s\n", $NF, size; size = "" }' || true
printf '%-34s %8s\n' IMAGE SIZE
for image in "$NEXTCHAR_BASE_IMAGE" nextchar-server:latest nextchar-trainer:latest nextchar-envoy:latest \
  nextchar-envoy-json:latest; do
  printf '%-34s %5.0f MB\n' "$image" "$(podman image inspect "$image" --format '{{.Size}}' | awk '{print $1/1e6}')"
done

wait_healthy() {  # address, timeout: poll the gRPC health service (never log lines) until SERVING
  local deadline=$(($(date +%s) + $2))
  until "$NEXTCHAR" health --server "$1" --timeout 2 >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "$1 not SERVING after $2s" >&2
      return 1
    fi
    sleep 0.2
  done
}
state_time() {  # container, StartedAt|FinishedAt -> seconds since the epoch
  date -d "$(podman inspect "$1" --format "{{.State.$2}}" | sed 's/ UTC$//')" +%s.%N
}
load() {  # extra load.py flags: bounded greedy Generate calls through Envoy; the figures print as JSON
  "$PY" scripts/deploy/envoy_stats.py --snapshot >"$NEXTCHAR_DEPLOY_CACHE/envoy-before.json"
  local rc=0
  "$PY" scripts/deploy/load.py --server 127.0.0.1:50050 --model "$MODEL" --prompt "$PROMPT" \
    --concurrency 8 --max-chars 200 "$@" || rc=$?
  "$PY" scripts/deploy/envoy_stats.py --since "$NEXTCHAR_DEPLOY_CACHE/envoy-before.json"
  return "$rc"
}

step "compose up server (the one-shot trainer runs first and must succeed)"
t=$(now)
"${COMPOSE[@]}" up -d server
wait_healthy 127.0.0.1:50051 300
up_to_healthy=$(since "$t")
trainer_s=$(awk -v a="$(state_time "$PROJECT-trainer-1" FinishedAt)" \
  -v b="$(state_time "$PROJECT-trainer-1" StartedAt)" 'BEGIN { printf "%.1f", a - b }')
echo "time to healthy: ${up_to_healthy}s from \`compose up\` (of which the trainer ran ${trainer_s}s)," \
  "$(since "$(state_time "$PROJECT-server-1" StartedAt)")s from the server container's start"
"${COMPOSE[@]}" logs --no-log-prefix trainer | grep -E '^(==|reconstruction)'
# The image's own HEALTHCHECK (nextchar health inside the container); podman runs it on demand here,
# as there is no systemd timer to run it periodically.
podman healthcheck run "$PROJECT-server-1" && echo "image HEALTHCHECK: healthy"
echo "server runs as: $(podman exec "$PROJECT-server-1" id)"
for c in trainer-1 server-1; do
  podman inspect "$PROJECT-$c" --format "$c: read-only root {{.HostConfig.ReadonlyRootfs}}, cap_drop \
{{.HostConfig.CapDrop}}, security_opt {{.HostConfig.SecurityOpt}}, memory {{.HostConfig.Memory}} B, \
cpus {{.HostConfig.NanoCpus}} n, pids {{.HostConfig.PidsLimit}}"
done
if podman exec "$PROJECT-server-1" touch /opt/venv/probe 2>/dev/null; then
  echo "server's root filesystem is writable" >&2
  exit 1
fi
echo "server: writing to its root filesystem fails (read-only), as it should"
"${COMPOSE[@]}" ps -a --format 'table {{.Service}}\t{{.Status}}'

step "generate through the client"
"$NEXTCHAR" models --server 127.0.0.1:50051
"$NEXTCHAR" generate --server 127.0.0.1:50051 --model "$MODEL" --prompt "$PROMPT" --max-chars 120 \
  --temperature 0 --echo
"$NEXTCHAR" generate --server 127.0.0.1:50051 --model goethe --prompt "Knowing" --max-chars 80 \
  --temperature 0 --echo

step "scale out: two more replicas, Envoy and the HTTP/JSON transcoder"
t=$(now)
"${COMPOSE[@]}" up -d
for addr in 127.0.0.1:50052 127.0.0.1:50053 127.0.0.1:50050; do wait_healthy "$addr" 120; done
echo "replicas and Envoy healthy $(since "$t")s after \`compose up\`"
"$PY" scripts/deploy/envoy_stats.py --wait-healthy 3
podman exec "$PROJECT-lb-1" sh -c 'echo x >/etc/envoy/probe' 2>/dev/null && exit 1
echo "lb: read-only root, runs as $(podman exec "$PROJECT-lb-1" id -u)"

step "HTTP/JSON: POST to the transcoder (json -> lb -> a replica)"
MODEL=$MODEL PROMPT=$PROMPT "$PY" - <<'PYEOF'
import json, os, time, urllib.error, urllib.request
body = {"model": {"name": os.environ["MODEL"]}, "prompt": os.environ["PROMPT"], "max_new_chars": 40,
        "temperature": 0}
request = urllib.request.Request("http://127.0.0.1:8080/nextchar.v1.NextChar/Generate",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            print(f"HTTP {reply.status}: {reply.read().decode()[:300]}")
        break
    except (urllib.error.URLError, ConnectionError) as e:
        if time.monotonic() > deadline:
            raise SystemExit(f"json transcoder did not answer within 60 s: {e}")
        time.sleep(0.5)
PYEOF

step "load through Envoy, no failure (baseline)"
load --requests 150

step "load through Envoy; server-2 crashes (SIGKILL to its process) after 100 of 450 calls"
pid=$(podman inspect "$PROJECT-server-2-1" --format '{{.State.Pid}}')
killed_at=$NEXTCHAR_DEPLOY_CACHE/killed_at
load --requests 450 --kill-after 100 --kill-cmd "date +%s.%N >$killed_at && kill -KILL $pid"

step "the crashed replica comes back (restart: unless-stopped) and rejoins"
wait_healthy 127.0.0.1:50052 120
echo "server-2 restarted $(awk -v a="$(state_time "$PROJECT-server-2-1" StartedAt)" -v b="$(cat "$killed_at")" \
  'BEGIN { printf "%.1f", a - b }')s after the crash (restarts: $(podman inspect "$PROJECT-server-2-1" \
  --format '{{.RestartCount}}')) and answers SERVING again"
"$PY" scripts/deploy/envoy_stats.py --wait-healthy 3

step "load through Envoy; server-3 is stopped (SIGTERM: NOT_SERVING, drain) after 100 of 300 calls"
load --requests 300 --kill-after 100 --kill-cmd "podman stop --time 20 $PROJECT-server-3-1 >/dev/null"
"${COMPOSE[@]}" ps -a --format 'table {{.Service}}\t{{.Status}}'
