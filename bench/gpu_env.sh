# Sourced by bench/gpu_qwen2_5_vl.sh and gpu_qwen3_vl.sh, with $OUT made: the repo (and /tmp/site) on
# PYTHONPATH; Liger-Kernel, a peer of the vision benches, installed to /tmp/site from a wheel in .whl/
# when the GPU image lacks it (else that peer is skipped); the GPU, the versions and the date into
# $OUT/env.txt. $PY is the python that holds torch (the GPU image's python3).
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! $PY -c "import liger_kernel" 2>/dev/null; then
  for whl in .whl/liger_kernel*.whl; do
    [ -e "$whl" ] && $PY -m pip install -q --no-index --no-deps --target /tmp/site "$whl" >"$OUT/liger_install.log" 2>&1
  done
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u +%Y-%m-%dT%H:%MZ
} | tee "$OUT/env.txt"
