#!/usr/bin/env bash
# Build the separate virtual environment that bench/saebench_crosscheck.py runs in: SAEBench 0.6.0 with its own
# pins (numpy<2, TransformerLens, sae-lens 6.x), which csc's venv cannot hold. CPU torch.
#   bash bench/saebench_env.sh [DIR]     (default /tmp/saebench-venv)
# torch 2.13.0+cpu is the local wheel (pip's find-links on this machine); elsewhere use the PyTorch CPU index.
# PyPI's torchvision wheel is built for CUDA torch and breaks `import transformers` on CPU torch; SAEBench lists it
# for nnsight only and nothing the cross-check runs imports it, so it is removed.
set -euo pipefail
DIR="${1:-/tmp/saebench-venv}"
python3 -m venv "$DIR"
"$DIR/bin/pip" install --upgrade pip
"$DIR/bin/pip" install "sae-bench==0.6.0" "torch==2.13.0+cpu"
"$DIR/bin/pip" uninstall -y torchvision
JAXTYPING_DISABLE=1 "$DIR/bin/python" -c "import sae_bench.evals.core.main, sae_lens, transformer_lens, numpy; print('sae-lens', sae_lens.__version__, '| numpy', numpy.__version__)"
