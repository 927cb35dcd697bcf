"""The split deployment: compose.yaml checked by docker-compose, and the same topology run as processes
on loopback (password-protected redis-server, two vision workers, two LLM workers, nginx rendered
from the gateway template) on a tiny generated checkpoint."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service import ports
from service.embedded_redis import redis_binary
from service.ports import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "docker" / "gateway" / "gateway.conf.template"
PASSWORD = "s3cret-pw"



# -- compose.yaml ---------------------------------------------------------------------------------


def test_compose_file_is_valid():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPLITVL_", "REDIS_", "GATEWAY_"))}
    run = subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    import yaml

    services = yaml.safe_load(run.stdout)["services"]
    assert set(services) == {"redis", "vision", "llm", "gateway"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    for name in ("vision", "llm"):
        service = services[name]
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices), name
        assert "ports" not in service and "container_name" not in service, f"{name} must scale (--scale)"
        assert ":change-me@redis:6379" in service["environment"]["SPLITVL_REDIS_URL"]
    assert services["gateway"]["depends_on"] == {"vision": {"condition": "service_healthy"},
                                                 "llm": {"condition": "service_healthy"}}
    assert services["llm"]["environment"]["SPLITVL_VISION_URL"] == "http://gateway:8000"
    # several processes per GPU: the vision worker only (one engine, one KV cache per LLM GPU)
    assert str(services["vision"]["environment"]["SPLITVL_WORKERS"]) == "1"
    assert "SPLITVL_WORKERS" not in services["llm"]["environment"]
    redis_cmd = services["redis"]["command"]
    redis_cmd = redis_cmd if isinstance(redis_cmd, str) else " ".join(redis_cmd)
    assert "--requirepass" in redis_cmd and "--maxmemory-policy allkeys-lru" in redis_cmd


# -- the gateway, rendered from the compose template for Debian's nginx -----------------------------


def render_gateway(template: str, values: dict[str, str | list[str]]) -> str:
    """The template as the nginx image's envsubst step renders it, adapted to nginx 1.22 on loopback:
    no ``resolver`` (no compose DNS), no ``resolve`` parameter (nginx >= 1.27.3), and one
    ``server`` line per worker where compose has one service name answering for all replicas."""
    text = "\n".join(line for line in template.splitlines() if not line.strip().startswith("resolver "))

    def servers(m: re.Match[str]) -> str:
        value = values[m.group(1)]
        extra = m.group(2) or ""
        return " ".join(f"server {v}{extra};" for v in (value if isinstance(value, list) else [value]))

    text = re.sub(r"server \$\{(\w+)\}(?: resolve)?((?: \w+=\w+)*);", servers, text)
    text = re.sub(r"\$\{(\w+)\}", lambda m: str(values[m.group(1)]), text)
    assert "${" not in text and " resolve;" not in text
    return text


def nginx_main_conf(workdir: Path, site: Path) -> str:
    """nginx.conf for an unprivileged run: every path in ``workdir``; the site goes in ``http {}``
    as conf.d/ files do in the nginx image."""
    temp = " ".join(f"{kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                         "uwsgi", "scgi"))
    user = "user root;" if os.geteuid() == 0 else ""  # as root, workers would otherwise run as nobody
    return (f"{user}\nworker_processes 1;\npid {workdir / 'nginx.pid'};\nerror_log {workdir / 'error.log'} warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{ access_log {workdir / 'access.log'}; {temp}\ninclude {site}; }}\n")


# -- the topology as processes --------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-3000:]

    def access_lines(self) -> list[dict]:
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("logger") == "splitvl.access":
                    lines.append(record)
        return lines


@dataclass
class Topology:
    gateway: str
    vision: list[Proc]
    llm: list[Proc]
    procs: list[Proc] = field(default_factory=list)


def start(name: str, argv: list[str], tmp: Path, port: int = 0, env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    return Proc(name, popen, log, port)


def wait_ready(procs: list[Proc], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:  # they start in parallel: the first waits longest, the rest are ready by then
        wait_until_ready(proc.url, proc.popen, max(deadline - time.monotonic(), 0.0), proc.tail)


@pytest.fixture(scope="module")
def topology(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed")
    tmp = tmp_path_factory.mktemp("deploy")
    procs: list[Proc] = []
    try:
        redis_port, gateway_port = free_port(), free_port()
        procs.append(start("redis", [redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                     "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                                     "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", "--dir", str(tmp)],
                           tmp))
        redis_url = f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0"
        env = {"SPLITVL_DEVICE": "cpu", "SPLITVL_LOG_FORMAT": "json", "SPLITVL_MAX_NEW_TOKENS": "32",
               "SPLITVL_VISION_URL": f"http://127.0.0.1:{gateway_port}", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1"}
        workers: dict[str, list[Proc]] = {"vision": [], "llm": []}
        for role in ("vision", "llm"):
            for i in range(2):
                port = free_port()
                proc = start(f"{role}{i}", [sys.executable, "-m", "service.cli", "serve", role, "--model",
                                            str(tiny_checkpoint), "--redis-url", redis_url, "--port", str(port)],
                             tmp, port, env)
                workers[role].append(proc)
                procs.append(proc)

        site = tmp / "gateway.conf"
        site.write_text(render_gateway(TEMPLATE.read_text(), {
            "GATEWAY_PORT": f"127.0.0.1:{gateway_port}", "GATEWAY_MAX_BODY": "32m",
            "VISION_UPSTREAM": [p.url.removeprefix("http://") for p in workers["vision"]],
            "LLM_UPSTREAM": [p.url.removeprefix("http://") for p in workers["llm"]],
        }))
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_main_conf(tmp, site))
        check = subprocess.run([nginx, "-t", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr + site.read_text()
        gateway = start("nginx", [nginx, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf),
                                  "-g", "daemon off;"], tmp, gateway_port)
        procs.append(gateway)
        wait_ready(workers["vision"] + workers["llm"], timeout_s=75)
        wait_until(lambda: httpx.get(gateway.url + "/healthz", timeout=1).status_code == 200, 10,
                   "the gateway's /healthz")
        yield Topology(gateway.url, workers["vision"], workers["llm"], procs)
    finally:
        for proc in reversed(procs):
            proc.popen.terminate()
        for proc in procs:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)


def wait_until(condition, timeout_s: float, what: str) -> None:  # noqa: ANN001
    """``service.ports.wait_until``, where a server that does not answer yet is not an error."""
    ports.wait_until(condition, timeout_s, what, not_yet=(httpx.HTTPError, OSError), poll_s=0.1)


def served_by(procs: list[Proc], request_id: str) -> list[str]:
    """Which of these workers logged a request with this id (their access lines are JSON)."""
    wait_until(lambda: any(r["request_id"] == request_id for p in procs for r in p.access_lines()), 5,
               f"an access line of request {request_id}")
    return [p.name for p in procs if any(r["request_id"] == request_id for r in p.access_lines())]


@pytest.fixture
def gw(topology: Topology) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=topology.gateway, timeout=60) as client:
        yield client


def test_gateway_routes_to_every_worker(topology: Topology, gw: httpx.Client, image_bytes):
    data = image_bytes(84, 56, 1)
    r = gw.post("/v1/images", content=data, headers={"Content-Type": "image/png", "X-Request-Id": "upload-1"})
    assert r.status_code == 200, r.text
    image_id = r.json()["image_id"]
    assert r.headers["x-request-id"] == "upload-1"  # the caller's id survives the gateway
    assert len(served_by(topology.vision, "upload-1")) == 1  # encoded by one vision worker
    assert gw.get(f"/v1/images/{image_id}").json()["num_tokens"] == r.json()["num_tokens"]

    question = {"image_id": image_id, "question": "What is in the picture?", "max_tokens": 8}
    direct = [httpx.post(p.url + "/v1/questions", json=question, timeout=60).json() for p in topology.llm]
    assert direct[0] == direct[1]  # either LLM worker: the same greedy answer from the same features

    answered_by = set()
    for i in range(4):  # round robin over both LLM workers
        rid = f"ask-{i}-{uuid.uuid4().hex[:8]}"
        r = gw.post("/v1/questions", json=question, headers={"X-Request-Id": rid})
        assert r.status_code == 200 and r.json() == direct[0], r.text
        answered_by.update(served_by(topology.llm, rid))
    assert answered_by == {"llm0", "llm1"}

    with gw.stream("POST", "/v1/questions", json={**question, "stream": True}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["answer"] == direct[0]["answer"]


def test_chat_completions_through_the_gateway(topology: Topology, gw: httpx.Client, image_bytes):
    import openai

    data = image_bytes(84, 56, 2)  # never uploaded: the LLM worker has a vision worker encode it, through the gateway
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe it."}]}]
    with openai.OpenAI(base_url=topology.gateway + "/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, extra_headers={"X-Request-Id": "chat-1"})
        out = raw.parse()
    image_id = out.model_extra["image_id"]
    assert len(served_by(topology.llm, "chat-1")) == 1
    assert len(served_by(topology.vision, "chat-1")) == 1  # the same request id on the vision worker's line
    expected = gw.post("/v1/questions", json={"image_id": image_id, "question": "Describe it.", "max_tokens": 8})
    assert out.choices[0].message.content == expected.json()["answer"]

    for path in ("/", "/v2/images", "/v1/imagesX", "/v1/questions/extra", "/metrics"):
        r = gw.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
