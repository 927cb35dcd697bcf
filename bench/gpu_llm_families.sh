#!/usr/bin/env bash
# One GPU run for the later families' language models (issues 13 and 14), about 5 minutes on an H200:
#   1. the GPU tests of the language model's fused kernels and bucketed prefills in bf16 and fp16 with
#      CUDA graphs, Qwen3's q/k norms, head sizes that are not powers of two and DeepStack included;
#   2. where a Qwen3-VL-2B decode step spends its device time, kernel by kernel, with the o projection
#      by cuBLAS and split along K (decides model.SPLIT_O_PROJ);
#   3. bench/llm_families.py: Qwen2.5-VL-3B, Qwen3-VL-2B (with HF generate beside it), Qwen3-VL-8B.
# Logs and JSON go to $OUT; the benchmark's table comes last.
#
# Needs torch, Triton, transformers and pytest only (the device image has them): the engine, the
# tests it runs and the harness (bench/llm_harness.py) import neither the HTTP stack nor redis-py,
# so nothing needs to be carried.
#
#     bash bench/gpu_llm_families.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llm_families_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD
python3 -c "import torch, triton, transformers, pytest" || { echo "torch, triton, transformers and pytest are needed"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== 1. GPU tests (tests/service/llm: test_fused, test_prefill_buckets, test_fused_qwen3)"
timeout 180 python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 \
  tests/service/llm/test_fused.py tests/service/llm/test_prefill_buckets.py tests/service/llm/test_fused_qwen3.py \
  >"$OUT/gpu_tests.log" 2>&1
echo "pytest exit $? (log: gpu_tests.log)"
grep -E "passed|failed|error|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 15

echo "== 2. Qwen3-VL-2B decode step, kernel by kernel (batch 1 and 8, context 300); then with the o projection"
echo "      split along K into the norm after it (model.SPLIT_O_PROJ, off by default: this decides it)"
for variant in cublas_o split_o; do
  flag=""; [ "$variant" = split_o ] && flag="--o-parts"
  timeout 60 python3 bench/llm_decode_profile.py --model qwen3_vl_2b --batch 1,8 --top 14 $flag \
    --out "$OUT/decode_profile_$variant.json" >>"$OUT/decode_profile.log" 2>&1
  echo "profile $variant exit $?"
  python3 - "$OUT/decode_profile_$variant.json" <<'EOF' || true
import json, sys
for run in json.load(open(sys.argv[1]))["runs"]:
    print(f"batch {run['batch']}: {run['ms_per_step_median']} ms/step, {run['kernels_per_step']} kernels, "
          f"{run['kernel_ms_per_step']} ms in kernels, {run['between_kernels_ms_per_step']} ms between")
    for k in run["kernels"][:8]:
        print(f"   {k['ms_per_step']:8.4f} ms  {k['per_step']:6.1f} x {k['us_each']:7.2f} us  {k['name'][:70]}")
EOF
done

echo "== 3. bench/llm_families.py"
timeout 300 python3 bench/llm_families.py --out "$OUT" --budget-s 270 >"$OUT/llm_families.log" 2>&1
echo "bench exit $? (log: llm_families.log, results: llm_families.json)"
grep -q "==== the later families" "$OUT/llm_families.log" || tail -n 40 "$OUT/llm_families.log"
sed -n '/==== the later families/,$p' "$OUT/llm_families.log"
