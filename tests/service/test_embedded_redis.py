"""service.embedded_redis: a real redis-server child, on a unix socket or on a loopback port."""

from __future__ import annotations

import redis

from service.embedded_redis import EmbeddedRedis
from service.ports import free_port


def test_unix_socket_and_tcp_servers_answer_and_stop() -> None:
    for server in (EmbeddedRedis(), EmbeddedRedis(maxmemory="64mb", tcp_port=free_port())):
        with server:
            assert server.url.startswith("redis://127.0.0.1:" if server.tcp_port else "unix://")
            client = redis.Redis.from_url(server.url)
            assert client.ping()
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
            client.close()
            proc = server.proc
            assert proc is not None
        assert proc.poll() is not None and not server.dir.exists()
