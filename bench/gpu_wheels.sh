#!/usr/bin/env bash
# Download the wheels that the offline GPU host lacks into .whl/ (`make gpu-wheels`).
#
# The GPU host has no network and no package index. Its python3 (3.12, torch 2.11 + CUDA)
# already holds numpy, pandas, scipy, scikit-learn, matplotlib, seaborn, h5py, tqdm, pytest,
# pyyaml, jinja2, packaging, psutil, requests, aiohttp, click, attrs, python-dateutil,
# pygments, numba, joblib, msgpack, lazy-loader, typing-extensions (see the device notes,
# "Python packages already there"). What it lacks, and this script fetches, is: audio decoding
# (soundfile, which bundles libsndfile with mp3 support, and soxr), the notebook stack that
# papermill runs the book with (papermill, nbclient, nbformat, jupyter_client, ipykernel,
# IPython and their dependencies) and librosa (bench/data_speed.py's baseline). Each wheel is
# fetched without its dependencies, at the version pinned in constraints.txt, so the list
# below must name every missing dependency itself.
#
# Usage (from the repository root):
#   bench/gpu_wheels.sh [--python-version 3.12] [--dest .whl]
#   PY_VERSION=3.11 WHEEL_DIR=/tmp/whl-cp311 bench/gpu_wheels.sh   # same, through the environment
# On the host:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# (absolute: papermill starts its kernels in book/notebooks, where "." would not find
# resemul_core; ipykernel's own "python3" kernel needs no registration, it runs sys.executable)
#
# The destination ends up holding exactly these wheels, one version each (any other *.whl
# there is removed, since two versions of one package stop the whole install); the total must
# stay within the 60 MB budget of the device's 64 MiB working-tree limit.
set -euo pipefail

PY_VERSION=${PY_VERSION:-3.12}
WHEEL_DIR=${WHEEL_DIR:-.whl}
PYTHON=${PYTHON:-python3}
MAX_MB=${MAX_MB:-60}
CONSTRAINTS=constraints.txt

while [ $# -gt 0 ]; do
    case $1 in
        --python-version) PY_VERSION=$2; shift 2 ;;
        --python-version=*) PY_VERSION=${1#*=}; shift ;;
        --dest) WHEEL_DIR=$2; shift 2 ;;
        --dest=*) WHEEL_DIR=${1#*=}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

[ -f "$CONSTRAINTS" ] || { echo "gpu_wheels.sh: run from the repository root" >&2; exit 2; }

PACKAGES=(
    # audio decoding (resemul_core.data.audio, resemul_core.data.synth)
    soundfile soxr cffi pycparser
    # librosa: only bench/data_speed.py imports it (lazily); the library never does
    librosa audioread pooch decorator platformdirs
    # papermill and the notebook format and client
    papermill nbclient nbformat jupyter_client jupyter_core entrypoints tenacity
    fastjsonschema jsonschema jsonschema-specifications referencing rpds-py traitlets
    # the kernel and IPython (IPython.display, %matplotlib inline). Not debugpy: ipykernel
    # imports it only for its debugger, in a try block, and its wheel (4 MB) needs glibc 2.34.
    ipykernel comm nest-asyncio2 pyzmq tornado matplotlib-inline
    ipython ipython_pygments_lexers jedi parso pexpect ptyprocess prompt_toolkit wcwidth
    stack_data asttokens executing pure_eval
)

normalize() { tr '[:upper:]' '[:lower:]' <<<"$1" | sed -E 's/[-_.]+/-/g'; }

pin() {  # the name==version line of constraints.txt for one package
    local want line
    want=$(normalize "$1")
    while IFS= read -r line; do
        line=${line%%#*}
        [[ $line == *==* ]] || continue
        if [ "$(normalize "${line%%==*}")" = "$want" ]; then
            echo "${line%%==*}==${line#*==}" | tr -d '[:space:]'
            return 0
        fi
    done <"$CONSTRAINTS"
    echo "gpu_wheels.sh: $1 is not pinned in $CONSTRAINTS" >&2
    return 1
}

SPECS=()
for p in "${PACKAGES[@]}"; do SPECS+=("$(pin "$p")"); done

PLATFORMS=(manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64)
for n in $(seq 17 39); do PLATFORMS+=("manylinux_2_${n}_x86_64"); done
PLATFORM_ARGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done

mkdir -p "$WHEEL_DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "gpu_wheels.sh: ${#SPECS[@]} wheels for CPython $PY_VERSION (manylinux x86-64) into $WHEEL_DIR"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 \
    --abi none "${PLATFORM_ARGS[@]}" -d "$TMP" "${SPECS[@]}"

# exactly one wheel per package, and no other wheel in the destination
count=$(find "$TMP" -name '*.whl' | wc -l)
if [ "$count" -ne "${#SPECS[@]}" ]; then
    echo "gpu_wheels.sh: expected ${#SPECS[@]} wheels, got $count" >&2
    ls "$TMP" >&2
    exit 1
fi
for old in "$WHEEL_DIR"/*.whl; do
    [ -e "$old" ] || continue
    [ -e "$TMP/$(basename "$old")" ] || { echo "  removing $(basename "$old")"; rm -f "$old"; }
done
cp -p "$TMP"/*.whl "$WHEEL_DIR"/

# soundfile's manylinux wheel must bundle libsndfile (the host has no system copy)
sf_wheel=$(ls "$WHEEL_DIR"/soundfile-*.whl)
if ! "$PYTHON" -m zipfile -l "$sf_wheel" | grep 'libsndfile.*\.so' >/dev/null; then
    echo "gpu_wheels.sh: $sf_wheel bundles no libsndfile" >&2
    exit 1
fi

ls -l "$WHEEL_DIR"/*.whl | awk '{printf "  %8.1f kB  %s\n", $5 / 1000, $NF}'
total=$(cat "$WHEEL_DIR"/*.whl | wc -c)
echo "gpu_wheels.sh: $count wheels, $(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1e6}') MB in total"
if [ "$total" -gt $((MAX_MB * 1000000)) ]; then
    echo "gpu_wheels.sh: over the ${MAX_MB} MB budget" >&2
    exit 1
fi
