#!/usr/bin/env bash
# Fill deploy/wheels/ with every wheel the image needs, downloaded on the host with the host's pip settings,
# so `docker build` installs offline (no index needs to be reachable from inside a build container).
# The host's Python must match the image's (3.11 on x86_64 Linux); pass PIP_ARGS for an extra index, e.g.
#   PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" deploy/fetch-wheels.sh
# With BASE_IMAGE set (and Docker running), the set is then resolved offline inside that image, and whatever
# its Python still lacks is added: markers such as `python_full_version < "3.11.3"` (redis -> async-timeout
# on Debian's 3.11.2) are evaluated by the host's pip for the host's Python, not the image's. A wheelhouse
# that already satisfies pyproject.toml inside that image is left as it is (seconds, nothing downloaded).
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
printf '%s\n' "${DEPS[@]}" > "$DEST/.requirements.txt"
trap 'rm -f "$DEST/.requirements.txt"' EXIT

# image_lacks: resolve the requirements offline inside $BASE_IMAGE; prints nothing when the wheelhouse is
# complete, else the first requirement it cannot satisfy (and fails if pip fails for another reason).
image_lacks() {
    local out rc=0
    out=$(docker run --rm --network none -v "$PWD/$DEST:/wheels:ro" "$BASE_IMAGE" \
        pip install --dry-run --quiet --no-index --find-links /wheels -r /wheels/.requirements.txt 2>&1) || rc=$?
    [[ $rc == 0 ]] && return 0
    missing=$(sed -n 's/.*No matching distribution found for \([^; ]*\).*/\1/p' <<< "$out" | head -n1)
    [[ -n $missing ]] || { echo "$out" >&2; return 1; }
    echo "$missing"
}

download() {
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --quiet --dest "$DEST" ${PIP_ARGS:-} "$@"
}

if [[ -n ${BASE_IMAGE:-} ]] && lacks=$(image_lacks) && [[ -z $lacks ]]; then
    echo "wheelhouse complete for $BASE_IMAGE: nothing downloaded"
else
    download "${DEPS[@]}"
    if [[ -n ${BASE_IMAGE:-} ]]; then
        for _ in 1 2 3 4 5; do
            missing=$(image_lacks)
            [[ -z $missing ]] && break
            echo "the image's Python also needs $missing: downloading it"
            download "$missing"
        done
        [[ -z $missing ]] || { echo "still unresolved in $BASE_IMAGE: $missing" >&2; exit 1; }
    fi
fi
echo "$(find "$DEST" -maxdepth 1 -name '*.whl' -o -maxdepth 1 -name '*.tar.gz' | wc -l) files, $(du -sh "$DEST" | cut -f1) in $DEST"
