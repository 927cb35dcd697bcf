"""Local servers, for tests, benchmarks and anything that starts them: a free loopback TCP port,
waiting until a started server answers ``/readyz``, or until anything else holds."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS may hand it out again later: use it at once)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float, log_tail: Callable[[], str], *,
                     also: Callable[[], bool] | None = None, poll_s: float = 0.2) -> None:
    """Poll ``url``/readyz until it answers 200 (and ``also()`` holds, when given) for the server
    ``process`` runs. RuntimeError with ``log_tail()`` when the process exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_tail()}")
        if also is None or also():
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout_s:g} s:\n{log_tail()}")
        time.sleep(poll_s)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, *,
               not_yet: tuple[type[Exception], ...] = (OSError,), poll_s: float = 0.05) -> None:
    """Poll ``condition()`` until it holds; an error of ``not_yet`` (a server still starting) counts as
    not yet. RuntimeError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except not_yet:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)
