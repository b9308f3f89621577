#!/usr/bin/env bash
# The README's first command from a fresh clone, timed: `make run` until /readyz answers 200, then one query by
# example (a held-out query) and one label query, then until the bootstrap's last steps (the pair models and their
# tuning, which run while the service answers) have ended, and the query by example again. Bounded: gives up after 40 minutes; stops the server at the end
# (its process group only). With `reader` as second argument it then waits (up to 3 hours) for the cluster reader
# that `make run` trains in the background, prints when its training ended and how, and queries again; with
# `first-reader`, only until the first (shorter) reader of that training is served.
#   bash benchmarks/first_run.sh [PORT] [reader|first-reader]   (clones this checkout's HEAD into a temporary directory)
set -euo pipefail
port=${1:-8765}
wait_reader=${2:-}
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=$(mktemp -d "${TMPDIR:-/tmp}/first-run.XXXXXX")
git clone -q "$repo" "$dir/clone"
cd "$dir/clone"
start=$(date +%s)
echo "start $(date -u) load $(cut -d' ' -f1-3 /proc/loadavg) commit $(git rev-parse --short HEAD)"
# its own process group (job control on: a background job leads a new group), so that the end stops make, the
# server it started and nothing else: never a pattern match that would also hit other users' servers
set -m
PRUNECASCADE_PORT=$port timeout $([ -n "$wait_reader" ] && echo 13200 || echo 2400) make run > "$dir/make-run.log" 2>&1 &
server=$!
set +m
trap 'kill -TERM -- -"$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
ready=0
for i in $(seq 1 2400); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "localhost:$port/readyz" || true)
  if [ "$code" = "200" ]; then ready=1; break; fi
  if [ $((i % 60)) = 0 ]; then echo "t=$(( $(date +%s) - start ))s healthz=$(curl -s "localhost:$port/healthz" || true)"; fi
  sleep 1
done
[ "$ready" = 1 ] || { echo "not ready after 40 minutes; log: $dir/make-run.log"; exit 1; }
echo "ready after $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/prunecascade queries --home var --limit 1 --body \
  | curl -s "localhost:$port/v1/query" -H 'content-type: application/json' -d @- | head -c 400; echo
curl -s "localhost:$port/v1/query" -H 'content-type: application/json' -d '{"target": {"label": 3}, "k": 3}' | head -c 300; echo
# it answers before the pair models are trained and tuned: wait for the rest of the bootstrap, then the reload
for i in $(seq 1 1800); do
  curl -s "localhost:$port/healthz" | grep -q '"bootstrap"' || break
  sleep 1
done
sleep 5
echo "bootstrap ended after $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/prunecascade queries --home var --limit 1 --body \
  | curl -s "localhost:$port/v1/query" -H 'content-type: application/json' -d @- | head -c 200; echo
[ -n "$wait_reader" ] || exit 0
training() { curl -s "localhost:$port/v1/space" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["reader_training"]["state"])'; }
served() { curl -s "localhost:$port/v1/space" | .venv/bin/python -c 'import json,sys; print(bool((json.load(sys.stdin)["reader"] or {}).get("served")))'; }
for i in $(seq 1 1080); do
  state=$(training || true)
  case "$state" in done*|failed*|not*) break ;; esac
  if [ "$wait_reader" = first-reader ] && [ "$(served || true)" = True ]; then state="a reader served; $state"; break; fi
  if [ $((i % 30)) = 0 ]; then echo "t=$(( $(date +%s) - start ))s reader training: $state; $(tail -c 200 var/reader-training.log | tail -n 1)"; fi
  sleep 10
done
echo "reader training ended after $(( $(date +%s) - start )) s: $state; load $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/prunecascade queries --home var --limit 1 --body \
  | curl -s "localhost:$port/v1/query" -H 'content-type: application/json' -d @- | head -c 400; echo
