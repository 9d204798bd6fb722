#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in stages that each fit a 10-minute slot:
#   benchmarks/gpu.sh tests     # GPU-marked tests (real Triton kernels, CUDA paths), environment report
#   benchmarks/gpu.sh step      # optimizer step time and refresh cost on CUDA
#   benchmarks/gpu.sh kernels   # fused kernels vs torch reference vs torch.compile, llama_1b vs fused AdamW
#   benchmarks/gpu.sh svd       # CUDA SVD drivers vs the Gram eigendecomposition at refresh shapes
#   benchmarks/gpu.sh memory    # peak CUDA memory per training step
#   benchmarks/gpu.sh fused     # whole-model amortized step against fused AdamW, bf16, llama_350m / llama_1b
# Results go to $OUT (default ./gpu-results). Extra Python wheels (bitsandbytes, galore-torch, fira) are
# installed from ./.whl when that folder exists (machines without internet access).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.:benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for stage in "$@"; do
  case "$stage" in
    tests)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
      TRITON_INTERPRET=0 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
      ;;
    step)
      python3 benchmarks/step_time.py --device cuda --dtype bfloat16 --models llama_60m llama_130m llama_350m \
        --json "$OUT/step_time_cuda.json" 2>&1 | tee "$OUT/step_time_cuda.log" | tail -20
      python3 benchmarks/bases.py --parts refresh --spectrum power:1 --device cuda --models llama_1b llama_7b --repeats 3 \
        --json "$OUT/bases_cuda.json" 2>&1 | tee "$OUT/bases_cuda.log" | tail -30
      ;;
    kernels)
      python3 benchmarks/kernel_bench.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -60
      ;;
    svd)
      python3 benchmarks/svd_drivers.py 2>&1 | tee "$OUT/svd_drivers.log" | tail -20
      ;;
    memory)
      python3 benchmarks/memory.py --device cuda --dtype bfloat16 --models llama_60m llama_130m --batch 8 --seq 256 \
        --json "$OUT/memory_cuda.json" --plot "$OUT/memory_cuda.png" 2>&1 | tee "$OUT/memory_cuda.log" | tail -30
      ;;
    fused)
      python3 benchmarks/step_vs_fused.py --device cuda --dtype bfloat16 --clock wall --threads 1 --repeats 9 \
        --models llama_350m llama_1b --variants default svd_aligned --json "$OUT/step_vs_fused_cuda.json" \
        2>&1 | tee "$OUT/step_vs_fused_cuda.log" | tail -20
      ;;
    *) echo "unknown stage $stage (tests, step, kernels, svd, memory, fused)"; exit 2 ;;
  esac
done
