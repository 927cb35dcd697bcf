"""The README's commands as a user runs them: make-tiny, then `splitvl serve all` with its embedded Redis."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.ports import free_port, wait_until_ready


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
        wait_until_ready(base, proc, 120, (tmp_path / "serve.log").read_text)
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


def test_settings_travel_to_worker_processes_through_the_environment(monkeypatch):
    from service.config import Settings

    given = Settings(model="/models/x y", redis_url="redis://:p@h:6379/0", port=8123, workers=3, device="cpu",
                     dtype="bfloat16", api_keys=["k1", "k,2"], use_kernels=False, max_batch_wait_ms=2.5,
                     vision_url="http://gw:8000", log_level="WARNING", log_format="json")
    env = given.to_env()
    assert env["SPLITVL_API_KEYS"] == '["k1", "k,2"]'  # pydantic-settings parses lists as JSON
    assert env["SPLITVL_MODEL"] == "/models/x y" and env["SPLITVL_USE_KERNELS"] == "false"
    for key in list(os.environ):
        if key.startswith("SPLITVL_"):
            monkeypatch.delenv(key)
    defaults = Settings(model="m")
    assert defaults.to_env()["SPLITVL_VISION_URL"] is None  # unset, not the string "None"
    assert defaults.workers == 1 and defaults.log_level == "info"

    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    assert Settings() == given


@pytest.mark.parametrize("role", ["llm", "all"])
def test_several_processes_are_for_the_vision_worker_only(role, capsys):
    from service.cli import main

    code = main(["serve", role, "--workers", "2", "--model", "unused", "--redis-url", "redis://127.0.0.1:1/0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--workers 2: only `serve vision` runs several processes" in err
    assert "KV cache" in err
