"""``bench/vision_bench.py --smoke``: the GPU bench's code paths (per family) on the CPU, so a broken
harness shows here rather than in the first minutes of a GPU session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_bench_smoke(family: str, tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / "vision_bench.py"), "--smoke", "--family", family,
           "--workloads", "1x", "--skip", "eager,variants", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads((tmp_path / "vision_bench.json").read_text())["results"]
    by_peer = {r["peer"]: r for r in rows}
    assert {"ours[auto,auto]", "HF sdpa"} <= set(by_peer), rows
    ours = by_peer["ours[auto,auto]"]
    assert len(ours["rel_l2_parts"]) == (3 if family == "qwen3_vl" else 1)  # main (+ 2 DeepStack)
    assert ours["rel_l2_vs_fp32"] < 1e-5  # fp32 in the smoke run: the same function as HF
