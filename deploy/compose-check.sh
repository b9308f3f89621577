#!/usr/bin/env bash
# The compose stack run for real: build (or reuse) the images, bootstrap the shared volume once, bring up
# two replicas + nginx + Redis, and send bounded open-loop query loads to the load balancer on 127.0.0.1:
# A) api-1's process is SIGKILLed mid-load (a crash: the restart policy brings it back), B) api-2's container
# is killed mid-load and stays down, C) api-2 is started again and both replicas must serve. Counts the failed
# queries of each phase and tears everything down (trap, also on failure or Ctrl-C). Exit 0 only if no query
# failed and both replicas came back. Results and timings: docs/deploy.md.
#
#   deploy/compose-check.sh                       # as root, with a running Docker engine
#
# Knobs (environment): PC_LOCAL_IMAGES=1 (default: build the base, Redis and nginx images locally, no image
# registry needed; 0: python:3.11-slim, redis:7.4-alpine, nginx:1.27-alpine), PC_LB_PORT (18080),
# PC_CHECK_REQUESTS (300), PC_CHECK_RATE (10 queries/s), PC_CHECK_KILL_AT (10 s into the load),
# PC_CHECK_BOOTSTRAP=tiny|default (tiny: deploy/tiny_bootstrap.py, seconds; default: `prunecascade bootstrap`,
# minutes), PYTHON (runs the load generator; needs httpx and this repository: default .venv/bin/python),
# KEEP_LOGS=FILE (keep the stack's logs there), PC_PROJECT (compose project name, pccheck).
# Traffic goes to 127.0.0.1 only; every wait and the load itself are bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS

PROJECT=${PC_PROJECT:-pccheck}
export PC_LB_PORT=${PC_LB_PORT:-18080}
LOCAL=${PC_LOCAL_IMAGES:-1}
REQUESTS=${PC_CHECK_REQUESTS:-300}
RATE=${PC_CHECK_RATE:-10}
KILL_AT=${PC_CHECK_KILL_AT:-10}
BOOT=${PC_CHECK_BOOTSTRAP:-tiny}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
LB=http://127.0.0.1:$PC_LB_PORT

log() { printf '[compose-check %4ds] %s\n' $((SECONDS - START)) "$*" >&2; }
die() { log "FAILED: $*"; exit 2; }

# -- tools --------------------------------------------------------------------------------------------------
docker info >/dev/null 2>&1 || die "no Docker engine (as root: dockerd > /tmp/dockerd.log 2>&1 &)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    die "neither 'docker compose' nor 'docker-compose' (apt-get install docker-compose)"
fi
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo 'version unknown'))"
"$PYTHON" -c 'import httpx' 2>/dev/null \
    || die "$PYTHON cannot import httpx: run 'make install' first (it creates .venv), or set PYTHON to a venv of this repo"
FILES=(-f docker-compose.yml)
[[ $BOOT == tiny ]] && FILES+=(-f deploy/compose-check.override.yml)
dc() { "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" "$@"; }

# -- images (each step reuses what exists or is cached) ------------------------------------------------------
if [[ $LOCAL == 1 ]]; then
    export PC_BASE_IMAGE=prunecascade-base:bookworm PC_REDIS_IMAGE=prunecascade-redis:local \
        PC_NGINX_IMAGE=prunecascade-nginx:local
    bash deploy/base-image.sh "$PC_BASE_IMAGE" >&2
    # downloads only when pyproject.toml asks for something the wheelhouse lacks
    BASE_IMAGE=$PC_BASE_IMAGE PYTHON=${PYTHON_WHEELS:-python3} bash deploy/fetch-wheels.sh >&2
    for img in redis nginx; do
        var=PC_${img^^}_IMAGE
        docker image inspect "${!var}" >/dev/null 2>&1 \
            || docker build -q -f "deploy/local-images/$img.Dockerfile" --build-arg BASE_IMAGE="$PC_BASE_IMAGE" \
                -t "${!var}" deploy/local-images >&2
    done
fi
export PC_IMAGE=${PC_IMAGE:-prunecascade:latest}
log "building $PC_IMAGE on ${PC_BASE_IMAGE:-python:3.11-slim} (cached layers are reused)"
docker build -q -f deploy/Dockerfile --build-arg BASE_IMAGE="${PC_BASE_IMAGE:-python:3.11-slim}" -t "$PC_IMAGE" . >&2

# -- the stack; torn down whatever happens --------------------------------------------------------------------
TMP=$(mktemp -d)
cleanup() {
    log "tearing down project $PROJECT"
    dc logs --no-color > "$TMP/compose.log" 2>&1 || true
    [[ -n ${KEEP_LOGS:-} ]] && cp "$TMP/compose.log" "$KEEP_LOGS" && log "logs kept in $KEEP_LOGS"
    dc down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
(umask 022; openssl rand -hex 32 > "$TMP/admin_token")
export PC_ADMIN_TOKEN_FILE=$TMP/admin_token

log "compose up (bootstrap: $BOOT, then api-1, api-2, lb on 127.0.0.1:$PC_LB_PORT)"
timeout 1200 "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" up -d --no-build >&2 || die "compose up"
boot_id=$(dc ps -q bootstrap)
[[ $(docker inspect -f '{{.State.ExitCode}}' "$boot_id") == 0 ]] || die "bootstrap exited non-zero"
for _ in $(seq 1 120); do
    curl -fsS -m 3 "$LB/readyz" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS -m 3 "$LB/readyz" >/dev/null || die "$LB/readyz never answered 200"
log "ready: $(curl -fsS -m 3 "$LB/v1/cascade" | head -c 300)"

# -- load phases -------------------------------------------------------------------------------------------
# phase NAME REQUESTS [FAULT_CMD]: one bounded load run; its JSON summary goes to stdout and $TMP/NAME.json.
phase() {
    local name=$1 n=$2 fault=${3:-} rc
    local args=(--url "$LB" --requests "$n" --rate "$RATE" --seed "$((${#name} * 100000 + n))")
    [[ -n $fault ]] && args+=(--fault-at "$KILL_AT" --fault-cmd "$fault")
    set +e
    PYTHONPATH=$ROOT "$PYTHON" deploy/compose_load.py "${args[@]}" > "$TMP/$name.json"
    rc=$?
    set -e
    [[ $rc -le 1 ]] || die "load generator $name exited $rc"
    printf '"%s": ' "$name"; cat "$TMP/$name.json"
}
failed() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["failed"])' "$TMP/$1.json"; }
health() { docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null || echo gone; }
wait_healthy() {  # bounded: 180 s
    for _ in $(seq 1 90); do [[ $(health "$1") == healthy ]] && return 0; sleep 2; done
    return 1
}
state() { docker inspect -f 'status={{.State.Status}} restarts={{.RestartCount}} health={{.State.Health.Status}}' "$1"; }
queries_since() { docker logs --since "$2" "$1" 2>&1 | grep -c 'POST /v1/query' || true; }

api1=$(dc ps -q api-1)
api2=$(dc ps -q api-2)

# A: api-1 crashes (its main process gets SIGKILL, as from the OOM killer); the restart policy brings it back.
pid1=$(docker inspect -f '{{.State.Pid}}' "$api1")
log "A: $REQUESTS queries at $RATE/s; api-1 crashes at ${KILL_AT}s (kill -KILL $pid1, its uvicorn process)"
phase crash "$REQUESTS" "kill -KILL $pid1"
t=$SECONDS; wait_healthy "$api1" && a_back="healthy again $((SECONDS - t)) s after the load" || a_back="NOT back"
log "A: $(failed crash) of $REQUESTS failed; api-1 $a_back ($(state "$api1"))"

# B: api-2's container is killed and stays down (docker kill: no restart); nginx must route around a dead address.
log "B: $REQUESTS queries at $RATE/s; api-2 killed for good at ${KILL_AT}s (docker kill)"
phase down "$REQUESTS" "docker kill -s KILL $api2"
log "B: $(failed down) of $REQUESTS failed"

# C: api-2 started again; both replicas serve.
docker start "$api2" >/dev/null
t=$SECONDS; wait_healthy "$api2" && c_back="healthy after $((SECONDS - t)) s" || c_back="NOT healthy"
since=$(date -u +%Y-%m-%dT%H:%M:%S)
phase rejoin 100
n1=$(queries_since "$api1" "$since"); n2=$(queries_since "$api2" "$since")
log "C: api-2 started again, $c_back; 100 queries, $(failed rejoin) failed; served by api-1: $n1, api-2: $n2"

total=$(( $(failed crash) + $(failed down) + $(failed rejoin) ))
log "RESULT: failed queries: crash $(failed crash)/$REQUESTS, down $(failed down)/$REQUESTS, rejoin $(failed rejoin)/100;" \
    "api-1 $a_back; api-2 $c_back; total $((SECONDS - START)) s"
[[ $total == 0 && $n1 -gt 0 && $n2 -gt 0 && $a_back == healthy* && $c_back == healthy* ]]
