"""The README's quick start, pasted into bash as a newcomer would: from nothing to a first answer, and a
clean stop (no traceback, no redis-server or directory left behind)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from service.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def readme_script(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```bash\n", text.index(title)) + len("```bash\n")
    return text[start:text.index("```", start)]


def test_quick_start_as_pasted(tmp_path):
    port = free_port()  # the one change: a free port instead of 8000, which may be taken on this machine
    script = readme_script("### A first answer").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    script = script.replace("splitvl serve all --model ./tiny-qwen2vl &",
                            f"splitvl serve all --model ./tiny-qwen2vl --port {port} &")
    assert f"--port {port} &" in script
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVL_")}
    env.update(SPLITVL_URL=f"http://127.0.0.1:{port}", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # make-tiny prints the checkpoint; `splitvl ask` streams its answer; curl prints the JSON answer
    assert done.stdout.startswith("tiny-qwen2vl\n")
    body = json.loads(done.stdout.splitlines()[-1])
    assert body["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1
    assert done.stdout.removeprefix("tiny-qwen2vl\n").removesuffix(done.stdout.splitlines()[-1] + "\n").strip()
    assert "Traceback" not in done.stderr and "uvicorn.error" not in done.stderr
    redis_dir = Path(re.search(r"embedded Redis at unix://(\S+)/redis\.sock", done.stderr)[1])
    assert not redis_dir.exists()
    for proc in Path("/proc").iterdir():  # no redis-server of this run survives it
        try:
            assert str(redis_dir) not in (proc / "cmdline").read_text(), f"redis-server {proc.name} left running"
        except OSError:
            continue
