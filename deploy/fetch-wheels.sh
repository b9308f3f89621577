#!/usr/bin/env bash
# Fill deploy/wheels/ with every wheel the image needs, downloaded on the host with the host's pip settings,
# so `docker build` installs offline (no index needs to be reachable from inside a build container).
# The host's Python must match the image's (3.11 on x86_64 Linux); pass PIP_ARGS for an extra index, e.g.
#   PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" deploy/fetch-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=deploy/wheels

"$PYTHON" - <<'PY'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"the image runs Python 3.11; this is {sys.version.split()[0]}: set PYTHON=python3.11")
PY
mapfile -t DEPS < <("$PYTHON" -c '
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print(*project["project"]["dependencies"], *project["build-system"]["requires"], sep="\n")')
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --dest "$DEST" ${PIP_ARGS:-} "${DEPS[@]}"
echo "$(find "$DEST" -maxdepth 1 -name '*.whl' -o -maxdepth 1 -name '*.tar.gz' | wc -l) files, $(du -sh "$DEST" | cut -f1) in $DEST"
