#!/usr/bin/env bash
# Qwen3-VL vision tower on the GPU (issue 14), one command: the GPU tests of its kernels, then
# bench/vision_bench.py --family qwen3_vl; logs and JSON under $OUT, a short table last.
#
#     OUT=/some/dir bash bench/gpu_qwen3_vl.sh        # ~4 minutes on an H200
#                                     [COMPILE_LIMIT_S=60: HF + torch.compile, in all]
#
# Liger-Kernel (a peer of the bench): bench/gpu_env.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_qwen3_vl}
mkdir -p "$OUT"
. bench/gpu_env.sh

# 1. tests: every test of the new kernels and the patched tower on the GPU (bf16/fp16/fp32 at real
#    shapes, CUDA graphs), and the head_dim-72 attention backends
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider \
  tests/kernels/test_kernels_qwen3_vl.py tests/kernels/test_kernels_pos_embed.py \
  "tests/kernels/test_kernels_rope_attention.py::test_attention_gpu_head_dim_72" -s >"$OUT/tests.log" 2>&1
echo "tests: rc=$? $(tail -n 1 "$OUT/tests.log")" | tee "$OUT/tests_summary.txt"

# 2. the bench: ours (default, cuDNN and FA2 attention; each also under CUDA graphs) against HF
#    sdpa, HF + Liger LayerNorm and HF + torch.compile on 32 x 448^2, 1 x 448^2 and 8 mixed sizes
timeout 330 $PY bench/vision_bench.py --family qwen3_vl --skip eager \
  --compile-limit-s "${COMPILE_LIMIT_S:-60}" --out "$OUT" >"$OUT/bench.log" 2>&1
echo "bench: rc=$?" | tee -a "$OUT/tests_summary.txt"

# 3. the short table (from vision_bench.jsonl, written row by row), against the issue's goals
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(open(out / "env.txt").read().strip())
print(open(out / "tests_summary.txt").read().strip())
for line in open(out / "tests.log"):
    if line.startswith("bf16 patched vs fp32 HF"):
        print(" ", line.strip())
jsonl = out / "vision_bench.jsonl"
if not jsonl.exists():
    sys.exit("no vision_bench.jsonl: see bench.log")
lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
info = next((r["info"] for r in lines if "info" in r), {})
rows = [r for r in lines if "ms" in r]
print(f"{info.get('model')}, {info.get('gpu')}, GEMM peak {info.get('gemm_peak_tflops', 0):.0f} TFLOP/s")
goals = {"32x448": ("img_per_s", 600, ">="), "1x448": ("ms", 3.5, "<="), "mixed8": ("ms", 40, "<=")}
print(f"{'workload':<8} {'peer':<34} {'ms':>8} {'img/s':>7} {'MFU':>6} {'relL2 max':>9}")
for wl, (key, goal, op) in goals.items():
    mine = [r for r in rows if r["workload"] == wl]
    best = {}
    for r in mine:
        kind = r["peer"].split("[")[0]
        if kind not in best or r["ms"] < best[kind]["ms"]:
            best[kind] = r
    for kind in ("ours+graphs", "ours", "HF sdpa", "HF sdpa + Liger LayerNorm", "HF sdpa + torch.compile"):
        r = best.get(kind)
        if r:
            print(f"{wl:<8} {r['peer']:<34} {r['ms']:8.2f} {r['img_per_s']:7.1f} {r.get('mfu', 0):6.1%} "
                  f"{r['rel_l2_vs_fp32']:9.2e}")
    top = min((r for k, r in best.items() if k.startswith("ours")), key=lambda r: r["ms"], default=None)
    if top:
        ok = top[key] >= goal if op == ">=" else top[key] <= goal
        worst = max(r["rel_l2_vs_fp32"] for r in mine if r["peer"].startswith("ours"))
        print(f"{wl:<8} goal {key} {op} {goal}: {'MET' if ok else 'MISSED'} ({top[key]:.2f}); "
              f"rel L2 <= 1e-2 for every output of ours: {'MET' if worst <= 1e-2 else 'MISSED'} ({worst:.2e})")
EOF
