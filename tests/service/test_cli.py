"""The README's commands as a user runs them: make-tiny, then `splitvl serve all` with its embedded Redis."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.ports import free_port, wait_until_ready

CLI = [sys.executable, "-m", "service.cli"]


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


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("cli") / "tiny"
    subprocess.run([*CLI, "make-tiny", str(model)], check=True, capture_output=True, timeout=120)
    return model


def test_make_tiny_writes_files_others_can_read(cli_checkpoint):
    """The images run as a non-root user reading the models mount: 0600 files would be unreadable."""
    mask = os.umask(0)
    os.umask(mask)
    assert (cli_checkpoint / "config.json").is_file() and (cli_checkpoint / "tokenizer.json").is_file()
    for item in [cli_checkpoint, *cli_checkpoint.iterdir()]:
        want = (0o777 if item.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(item.stat().st_mode) == want, item


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_serve_all_answers_then_stops_cleanly(cli_checkpoint, tmp_path, stop):
    """Ctrl+C, a process manager's SIGTERM or a closed terminal's SIGHUP: a clean exit that takes the
    embedded redis-server and its directory with it."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen([*CLI, "serve", "all", "--model", str(cli_checkpoint), "--port", str(port),
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, proc, 120, log_path.read_text)
        redis_children = children_named(proc.pid, "redis-server")
        assert len(redis_children) == 1
        redis_dir = Path(re.search(r"embedded Redis at unix://(\S+)/redis\.sock", log_path.read_text())[1])
        assert redis_dir.is_dir()

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(buf, "PNG")
        with httpx.Client(base_url=base, timeout=60) as client:
            image = client.post("/v1/images", files={"file": ("x.png", buf.getvalue(), "image/png")}).json()
            answer = client.post("/v1/questions", json={"image_id": image["image_id"], "question": "What is it?",
                                                        "max_tokens": 5})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
        assert image["model"] == "tiny"  # the directory's name, not the server's path
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            log.close()
    text = log_path.read_text()
    assert proc.returncode == 0, text
    assert not any(Path(f"/proc/{pid}").exists() for pid in redis_children), "redis-server outlived splitvl"
    assert not redis_dir.exists()
    # the start, in a few lines: what was loaded, how, how long it took, where it listens
    assert re.search(r"serve all: model tiny \(Qwen2-VL\) from \S+/tiny, cpu float32, loaded in [0-9.]+ s", text)
    assert f"Uvicorn running on http://127.0.0.1:{port}" in text
    assert "uvicorn.error" not in text and "Traceback" not in text


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
def test_several_processes_are_for_the_vision_worker_only(role, capsys, monkeypatch):
    code = main(["serve", role, "--workers", "2", "--model", "unused", "--redis-url", "redis://127.0.0.1:1/0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--workers 2: only `serve vision` runs several processes" in err
    assert "KV cache" in err
    monkeypatch.setenv("SPLITVL_WORKERS", "2")  # the environment too (compose sets it for every worker)
    assert main(["serve", role, "--model", "unused", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert "SPLITVL_WORKERS=2: only `serve vision` runs several processes" in capsys.readouterr().err


@pytest.fixture
def nothing_heavy_starts(monkeypatch):
    """Fail the test if the CLI gets as far as a Redis or an app (whose start loads the model)."""
    from service.embedded_redis import EmbeddedRedis

    def refuse(*args, **kwargs):
        raise AssertionError("started before the mistake was reported")

    monkeypatch.setattr(EmbeddedRedis, "start", refuse)
    monkeypatch.setattr("service.app.create_app", refuse)
    for key in list(os.environ):
        if key.startswith("SPLITVL_"):
            monkeypatch.delenv(key)


def _without_vision_config(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    del config["vision_config"]
    (path / "config.json").write_text(json.dumps(config))


BROKEN = {
    "listconfig": lambda p: (p / "config.json").write_text("[1, 2]"),
    "notokenizer": lambda p: (p / "tokenizer.json").unlink(),
    "noweights": lambda p: (p / "model.safetensors").unlink(),
    "novision": _without_vision_config,
}

MISTAKES = {
    "model-missing-dir": (["serve", "all", "--model", "./does-not-exist"], {}, "'./does-not-exist' does not exist"),
    "model-not-cached": (["serve", "all", "--model", "no-such-org/no-such-model"], {}, "splitvl never downloads"),
    "model-not-given": (["serve", "all"], {}, "--model is required (or set SPLITVL_MODEL)"),
    "model-without-config": (["serve", "all", "--model", "{empty}"], {}, "config.json is missing"),
    "api-keys-plain-string": (["serve", "all", "--model", "{tiny}"], {"SPLITVL_API_KEYS": "secret"},
                              "SPLITVL_API_KEYS='secret': must be a JSON list"),
    "redis-url-no-scheme": (["serve", "all", "--model", "{tiny}", "--redis-url", "localhost:6379"], {},
                            "--redis-url localhost:6379: must start with redis://"),
    "port-out-of-range": (["serve", "all", "--model", "{tiny}", "--port", "80000"], {},
                          "--port 80000: Input should be less than or equal to 65535"),
    "port-from-env": (["serve", "all", "--model", "{tiny}"], {"SPLITVL_PORT": "-1"}, "SPLITVL_PORT='-1'"),
    "other-role's-flag": (["serve", "vision", "--model", "{tiny}", "--redis-url", "redis://h:1/0",
                           "--max-new-tokens", "5"], {}, "--max-new-tokens does not apply to `serve vision`"),
    "llm-without-redis": (["serve", "llm", "--model", "{tiny}"], {}, "--redis-url (or SPLITVL_REDIS_URL) is required"),
    "served-model-name-with-a-newline": (["serve", "all", "--model", "{tiny}", "--served-model-name", "qwen\n"], {},
                                         "must be printable text"),
    "config-not-an-object": (["serve", "all", "--model", "{listconfig}"], {}, "must each hold a JSON object"),
    "llm-without-tokenizer": (["serve", "llm", "--model", "{notokenizer}", "--redis-url", "redis://h:1/0"], {},
                              "tokenizer.json is missing"),
    "no-weights": (["serve", "vision", "--model", "{noweights}", "--redis-url", "redis://h:1/0"], {},
                   "holds neither model.safetensors.index.json nor model.safetensors"),
    "not-this-family's-config": (["serve", "vision", "--model", "{novision}", "--redis-url", "redis://h:1/0"], {},
                                 "config.json has no vision_config"),
    "make-tiny-onto-a-file": (["make-tiny", "{file}"], {}, "is a file"),
    "make-tiny-into-a-checkpoint": (["make-tiny", "{tiny}"], {}, "is not empty"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_before_anything_starts(case, tiny_checkpoint, tmp_path, capsys, monkeypatch,
                                                      nothing_heavy_starts):
    argv, env, expected = MISTAKES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    names = {"tiny": str(tiny_checkpoint), "empty": str(tmp_path / "empty"), "file": str(tmp_path / "file")}
    for name, damage in BROKEN.items():  # copies of the checkpoint, each broken one way
        copy = tmp_path / name
        shutil.copytree(tiny_checkpoint, copy)
        damage(copy)
        names[name] = str(copy)
    assert main([arg.format(**names) for arg in argv]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert expected in out.err
    assert "local_files_only" not in out.err and "pydantic" not in out.err


def test_a_mistake_from_the_shell_has_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVL_")}
    done = subprocess.run([*CLI, "serve", "all", "--model", "./does-not-exist"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --model ./does-not-exist"), done.stderr


@pytest.mark.parametrize("role", ["vision", "llm", "all"])
def test_each_role_shows_its_own_settings_with_help_and_defaults(role, capsys):
    from service.config import Settings, flag_of, roles_of

    with pytest.raises(SystemExit):
        main(["serve", role, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in Settings.model_fields:
        shown = f" {flag_of(name)} " in text or f" {flag_of(name)}, " in text
        assert shown == (role in roles_of(name)), (role, name)
    assert text.count("(default: ") == sum(role in roles_of(n) for n in Settings.model_fields) - 1  # all but --model
    assert "required: --model PATH_OR_HUB_ID" in text
    assert ("--workers" in text) == (role == "vision") and ("--max-new-tokens" in text) == (role != "vision")
