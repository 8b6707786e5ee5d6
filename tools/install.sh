#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything mmseg_sera needs, including
# mmcv 2.1.0 compiled from source with its ops.  Idempotent: a second run with
# unchanged requirements returns in about a second.
#
# The terminal gets one line per step, a progress line every 30 s during long
# steps, and the time each step took; everything the tools print goes to the
# log (.venv/install.log, or $INSTALL_LOG).  On failure the script prints the
# failing step, the tail of the log and the log's path.
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
HEARTBEAT="${INSTALL_HEARTBEAT:-30}"
T0=$SECONDS

log() { printf '[install %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
elapsed() { local s=$(($1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# step TITLE [--progress FUNC] CMD...: runs CMD with its output in $LOG, prints
# a line every $HEARTBEAT seconds (with FUNC's progress text, if given) and the
# time taken; on failure the tail of the log, and exits.
step() {
  local title="$1" progress=""
  shift
  if [ "${1:-}" = --progress ]; then progress="$2"; shift 2; fi
  log "$title"
  printf '\n=== %s: %s\n' "$(date +%H:%M:%S)" "$title" >>"$LOG"
  local start=$SECONDS
  "$@" >>"$LOG" 2>&1 &
  local pid=$! rc=0 next=$((SECONDS + HEARTBEAT))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ "$SECONDS" -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
      local text=""
      if [ -n "$progress" ]; then text="$($progress 2>/dev/null || true)"; fi
      log "  ... $(elapsed $((SECONDS - start)))${text:+, $text}"
      next=$((SECONDS + HEARTBEAT))
    fi
  done
  wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then
    log "FAILED: $title (exit $rc after $(elapsed $((SECONDS - start)))). Last lines of $LOG:"
    tail -n 40 "$LOG" | sed 's/^/  | /'
    log "full log: $LOG"
    exit "$rc"
  fi
  log "  done in $(elapsed $((SECONDS - start)))"
}

command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
LOG="${INSTALL_LOG:-$VENV/install.log}"
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
: >"$LOG"
log "installing into $VENV; tool output goes to $LOG"

step "build tools (pip, setuptools<81, wheel, ninja)" \
  "${PIP[@]}" install --upgrade pip -r requirements/build.txt

# Progress of the torch download: the size of pip's download cache so far.
pip_cache_size() { du -sh "$("$PY" -m pip cache dir 2>/dev/null)" 2>/dev/null | cut -f1 | sed 's/$/ in the pip cache/'; }
step "torch and torchvision (a large download on the first install)" --progress pip_cache_size \
  "${PIP[@]}" install -r requirements/torch.txt

TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
CUDA_TAG=cpu
if command -v nvcc >/dev/null 2>&1 && "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  CUDA_TAG="cu$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')"
fi
WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PY_TAG-$CUDA_TAG"

build_mmcv() {
  local src="$BUILD/src/mmcv-$MMCV_VERSION"
  "${PIP[@]}" download --no-deps --no-build-isolation --no-binary :all: \
    "mmcv==$MMCV_VERSION" -d "$BUILD/src"
  tar xzf "$BUILD/src/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD/src"
  # torch >= 2.10 headers need C++20.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  if [ "$CUDA_TAG" = cpu ]; then export FORCE_CUDA=0; fi
  (cd "$BUILD" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$BUILD/wheels" "$src")
}
# Progress of the mmcv build: object files compiled so far, of the C++ (and
# CUDA) sources of its ops.
mmcv_progress() {
  local src="$BUILD/src/mmcv-$MMCV_VERSION" done total
  [ -d "$src/mmcv/ops/csrc" ] || { echo "fetching the source"; return; }
  done=$(find "$src/build" -name '*.o' 2>/dev/null | wc -l)
  if [ "$CUDA_TAG" = cpu ]; then
    total=$(find "$src/mmcv/ops/csrc/pytorch" -maxdepth 2 -name '*.cpp' ! -path '*/cuda/*' ! -path '*/mlu/*' ! -path '*/npu/*' ! -path '*/mps/*' | wc -l)
  else
    total=$(find "$src/mmcv/ops/csrc/pytorch" -maxdepth 2 \( -name '*.cpp' -o -name '*.cu' \) ! -path '*/mlu/*' ! -path '*/npu/*' ! -path '*/mps/*' | wc -l)
  fi
  echo "$done of about $total files compiled"
}

if ! "$PY" -c "import mmcv, mmcv._ext, sys; sys.exit(0 if mmcv.__version__ == '$MMCV_VERSION' else 1)" 2>/dev/null; then
  if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
    step "building mmcv $MMCV_VERSION with ops from source (about 17 min on 2 cores; cached in $WHEEL_DIR)" \
      --progress mmcv_progress build_mmcv
    mkdir -p "$WHEEL_DIR"
    cp "$BUILD"/wheels/mmcv-"$MMCV_VERSION"-*.whl "$WHEEL_DIR"/
  else
    log "reusing the cached mmcv wheel from $WHEEL_DIR"
  fi
  step "installing the mmcv wheel" "${PIP[@]}" install "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl
fi

step "runtime and test requirements (mmengine, mmsegmentation, open_clip, ...)" \
  "${PIP[@]}" install -r requirements/runtime.txt -r requirements/tests.txt
step "reference code for the tests (installed without dependencies)" \
  "${PIP[@]}" install --no-deps -r requirements/tests-nodeps.txt
step "mmseg_sera (editable)" \
  "${PIP[@]}" install --no-build-isolation --no-deps -e .

# Smoke test from outside the source tree.
smoke() { (cd / && "$PY" -c 'import mmseg.models, mmcv.ops, open_clip, pycocotools, mmseg_sera; print("mmseg_sera", mmseg_sera.__version__, "ready")'); }
step "smoke test (import mmseg.models, mmcv.ops, open_clip, mmseg_sera)" smoke
echo "$want_stamp" > "$STAMP"
log "done in $(elapsed $((SECONDS - T0))); log: $LOG"
