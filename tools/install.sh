#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything mmseg_sera needs, including
# mmcv 2.1.0 compiled from source with its ops.  Idempotent: a second run with
# unchanged requirements returns in about a second.
#
# The compiled mmcv wheel is cached outside the checkout, keyed by the mmcv,
# torch and Python versions (and CUDA when a toolkit is present), under
#   ${MMSEG_SERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmseg_sera}/wheels
# so that reinstalls on the same machine skip the ~17 minute build.  Nothing
# depends on that cache existing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-$ROOT/.venv}"
MMCV_VERSION=2.1.0
CACHE="${MMSEG_SERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmseg_sera}"

log() { printf '[install %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# torch pulls in the newest setuptools, but mmcv's setup.py and mmengine's
# `mmseg::` config inheritance need pkg_resources (setuptools < 81): every
# install below runs under that constraint.
PIP=("$PY" -m pip --disable-pip-version-check)
export PIP_CONSTRAINT="$ROOT/requirements/constraints.txt"

# Everything that decides what gets installed goes into the stamp.
STAMP="$VENV/.mmseg_sera-installed"
want_stamp="$(cat requirements/build.txt requirements/torch.txt requirements/runtime.txt \
  requirements/tests.txt requirements/tests-nodeps.txt requirements/constraints.txt setup.py tools/install.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ]; then
  log "environment up to date ($VENV)"
  exit 0
fi

log "build tools"
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q -r requirements/build.txt

log "torch (large download on first install)"
"${PIP[@]}" install -q -r requirements/torch.txt

TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
CUDA_TAG=cpu
if command -v nvcc >/dev/null 2>&1 && "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  CUDA_TAG="cu$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')"
fi
WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PY_TAG-$CUDA_TAG"

if ! "$PY" -c "import mmcv, mmcv._ext, sys; sys.exit(0 if mmcv.__version__ == '$MMCV_VERSION' else 1)" 2>/dev/null; then
  if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    log "building mmcv $MMCV_VERSION with ops from source (about 17 min on 2 cores; cached in $WHEEL_DIR)"
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
    "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: \
      "mmcv==$MMCV_VERSION" -d "$BUILD/src"
    tar xzf "$BUILD/src/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD/src"
    # torch >= 2.10 headers need C++20.
    sed -i 's/-std=c++17/-std=c++20/g' "$BUILD/src/mmcv-$MMCV_VERSION/setup.py"
    if [ "$CUDA_TAG" = cpu ]; then export FORCE_CUDA=0; fi
    (cd "$BUILD" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$BUILD/wheels" "$BUILD/src/mmcv-$MMCV_VERSION")
    mkdir -p "$WHEEL_DIR"
    cp "$BUILD"/wheels/mmcv-"$MMCV_VERSION"-*.whl "$WHEEL_DIR"/
  else
    log "reusing cached mmcv wheel from $WHEEL_DIR"
  fi
  "${PIP[@]}" install -q "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl
fi

log "runtime and test requirements"
"${PIP[@]}" install -q -r requirements/runtime.txt -r requirements/tests.txt
"${PIP[@]}" install -q --no-deps -r requirements/tests-nodeps.txt
log "mmseg_sera (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .

# Smoke test from outside the source tree.
(cd / && "$PY" -c 'import mmseg.models, mmcv.ops, open_clip, pycocotools, mmseg_sera; print("mmseg_sera", mmseg_sera.__version__, "ready")')
echo "$want_stamp" > "$STAMP"
log "done"
