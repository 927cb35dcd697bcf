#!/usr/bin/env bash
# Qwen2.5-VL's vision tower on one GPU, in one command (about 4 minutes on an H200):
#   1. the GPU tests of its kernels (and of the shared GEMM paths they changed),
#   2. kernel_bench: attention within the 112-px windows, the SwiGLU MLP with I = 3420 (padded
#      rows vs not, our two MLP modes vs HF's three Linear calls),
#   3. vision_bench --family qwen2_5_vl: ours vs HF sdpa, HF + Liger RMSNorm, HF + torch.compile
#      on 32 x 448^2, one 448^2 image (ours with CUDA graphs) and the 8 mixed sizes,
# then a short table against the goals. Logs and JSON under $OUT.
#
#   OUT=/tmp/out bash bench/gpu_qwen2_5_vl.sh      [COMPILE_LIMIT_S=60: HF + torch.compile, in all]
#
# Liger-Kernel (a peer of the bench): bench/gpu_env.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/splitvl-qwen2_5_vl}
mkdir -p "$OUT"
. bench/gpu_env.sh

echo "== 1/3 GPU tests" | tee "$OUT/steps.log"
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider \
  tests/kernels/test_kernels_qwen2_5_vl.py \
  "tests/kernels/test_kernels_gemm.py::test_linear_glu_gpu" \
  "tests/kernels/test_kernels_gemm.py::test_linear_act_gpu_both_impls" \
  "tests/kernels/test_kernels_patch.py::test_cuda_graphs_match_eager" \
  > "$OUT/tests.log" 2>&1
echo "tests: exit $? -- $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/steps.log"
grep "rel L2" "$OUT/tests.log" | tee -a "$OUT/steps.log"

echo "== 2/3 kernel_bench (windows, mlp25)" | tee -a "$OUT/steps.log"
timeout 100 $PY bench/kernel_bench.py --only windows,mlp25 --out "$OUT" > "$OUT/kernel_bench.log" 2>&1
echo "kernel_bench: exit $?" | tee -a "$OUT/steps.log"

echo "== 3/3 vision_bench --family qwen2_5_vl" | tee -a "$OUT/steps.log"
timeout 330 $PY bench/vision_bench.py --family qwen2_5_vl --skip eager \
  --compile-limit-s "${COMPILE_LIMIT_S:-60}" --out "$OUT" > "$OUT/vision_bench.log" 2>&1
echo "vision_bench: exit $?" | tee -a "$OUT/steps.log"

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n== kernels (median ms, kernel_bench.json)")
kb = out / "kernel_bench.json"
if kb.exists():
    for r in json.loads(kb.read_text())["rows"]:
        if "MLP" in r["name"] or "down:" in r["name"] or "windows attn+rope" in r["name"]:
            extra = f"{r['TFLOPs']:5.0f} TFLOP/s" if "TFLOPs" in r else ""
            print(f"  {r['name']:<58s} {r.get('ms', float('nan')):8.3f} {extra}")
vb = out / "vision_bench.jsonl"
if not vb.exists():
    sys.exit("no vision_bench.jsonl: see vision_bench.log")
rows = [json.loads(line) for line in vb.read_text().splitlines() if line.strip()]
info = next((r["info"] for r in rows if "info" in r), {})
if (out / "vision_bench.json").exists():  # written at the end: also says what Liger's entry point did
    info = json.loads((out / "vision_bench.json").read_text())["info"]
rows = [r for r in rows if "ms" in r]
print(f"\n== Qwen2.5-VL-7B vision tower, {info.get('gpu')}, GEMM peak {info.get('gemm_peak_tflops', 0):.0f} TFLOP/s"
      f"; Liger entry point: {info.get('liger_entry_point', '-')}")
goals = {"32x448": "goal >= 350 img/s", "1x448": "goal <= 4 ms (graphs)", "mixed8": "goal <= 90 ms"}
for w, goal in goals.items():
    sel = sorted((r for r in rows if r["workload"] == w), key=lambda r: r["ms"])
    print(f"\n[{w}] {goal}; rel L2 goal <= 1e-2")
    for r in sel:
        print(f"  {r['peer']:<32s} {r['ms']:9.2f} ms {r['img_per_s']:8.1f} img/s  MFU {r.get('mfu', 0):5.1%}"
              f"  relL2 {r['rel_l2_vs_fp32']:.1e}  peak {r['peak_act_gib']:.2f} GiB")
EOF
