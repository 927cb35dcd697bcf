"""Shared fixtures: small random checkpoints and a real Redis server on a free port."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.embedded_redis import redis_binary
from service.ports import free_port
from service.tiny import make_tiny_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under CI (CI=true) every test that a CPU machine can run must run: a skip for any other reason (a tool
# that .ci/run failed to install, say) fails the session instead of hiding behind a green run.
CPU_MACHINE_SKIP = re.compile(r"CUDA|GPU")
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if not CPU_MACHINE_SKIP.search(reason):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _unexpected_skips and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if _unexpected_skips and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        terminalreporter.write_sep("=", "skipped under CI, where they must run", red=True)
        for line in _unexpected_skips:
            terminalreporter.write_line(line)


def random_image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """An image file of random RGB noise: the same bytes for the same arguments."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(width, height, seed, fmt="PNG")``: the bytes of a random-noise image file."""
    return random_image_bytes


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``family_checkpoint(family, **kwargs)``: a tiny checkpoint of that family (``make_tiny_checkpoint``'s
    keyword arguments), made once per session for each distinct call."""
    made: dict[tuple, Path] = {}

    def make(family: str, **kwargs: object) -> Path:
        key = (family, *sorted(kwargs.items()))
        if key not in made:
            made[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}"), family=family, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(family_checkpoint: Callable[..., Path]) -> Path:
    """Qwen2-VL, one ``model.safetensors``, untied embeddings."""
    return family_checkpoint("qwen2_vl", seed=0)


@pytest.fixture(scope="session")
def sharded_checkpoint(family_checkpoint: Callable[..., Path]) -> Path:
    """Qwen2-VL in many shards with ``model.safetensors.index.json``, tied embeddings, other weights."""
    return family_checkpoint("qwen2_vl", seed=1, shard_size="40KB", tie_word_embeddings=True)


class RedisServer:
    """A real redis-server process on a free loopback port; stop/start keep the port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's server, emptied before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


class LiveServer:
    """A FastAPI app served by a real uvicorn on a loopback port, in a background thread (``lifespan="off"``:
    without starting the workers, for what answers before they load)."""

    def __init__(self, app, *, lifespan: str = "on") -> None:  # noqa: ANN001
        import threading

        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan=lifespan)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start (see the log above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server() -> type[LiveServer]:
    """``with live_server(app) as live: live.url`` serves ``app`` through uvicorn on loopback."""
    return LiveServer
