"""A free loopback TCP port, for tests, benchmarks and anything that starts local servers."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS may hand it out again later: use it at once)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
