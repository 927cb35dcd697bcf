"""The README's commands as a user runs them: make-tiny, then `splitvl serve all` with its embedded Redis."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.ports import free_port


def children_named(pid: int, name: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and name in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_make_tiny_then_serve_all(tmp_path):
    model = tmp_path / "tiny"
    cli = [sys.executable, "-m", "service.cli"]
    subprocess.run([*cli, "make-tiny", str(model)], check=True, capture_output=True, timeout=120)
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([*cli, "serve", "all", "--model", str(model), "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        redis_children = children_named(proc.pid, "redis-server")
        assert len(redis_children) == 1

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(buf, "PNG")
        with httpx.Client(base_url=base, timeout=60) as client:
            image = client.post("/v1/images", files={"file": ("x.png", buf.getvalue(), "image/png")}).json()
            answer = client.post("/v1/questions", json={"image_id": image["image_id"], "question": "What is it?",
                                                        "max_tokens": 5})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
    # the embedded Redis went with it
    for pid in redis_children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
