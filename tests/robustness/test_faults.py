"""Faults: Redis killed and restarted under load, a worker killed mid-batch, evicted, foreign and corrupt entries."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import torch
from safetensors.torch import load as load_safetensors

from service.store import checksum, latest_key, record_key

from . import Outcome, ServeProcess, assert_error, eventually, png, upload

# -- Redis killed and restarted under load ----------------------------------------------------------


@dataclass
class Load:
    url: str
    images: list[bytes]
    outcomes: list[Outcome] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        roll = rng.random()
        start = time.monotonic()
        try:
            if roll < 0.4 or not self.ids:
                kind = "upload"
                r = await client.post("/v1/images", content=rng.choice(self.images),
                                      headers={"Content-Type": "image/png"})
                if r.status_code == 200:
                    self.ids.append(r.json()["image_id"])
            elif roll < 0.8:
                kind = "question"
                r = await client.post("/v1/questions", json={"image_id": rng.choice(self.ids), "question": "what?",
                                                             "max_tokens": 3})
            else:
                kind = "metadata"
                r = await client.get(f"/v1/images/{rng.choice(self.ids)}")
        except httpx.HTTPError as exc:
            self.outcomes.append(Outcome.failed("?", start, exc))
            return
        self.outcomes.append(Outcome.of(kind, start, r))

    async def client_loop(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=self.url, timeout=20) as client:
            while time.monotonic() < until:
                await self.one(client, rng)
                await asyncio.sleep(rng.uniform(0, 0.02))


async def test_redis_killed_and_restarted_under_load(make_app, redis_server, tmp_path, live_server):
    own = type(redis_server)(tmp_path)  # our own server: this test kills it
    own.start()
    try:
        app = make_app("all", redis_url=own.url, redis_timeout_s=1.0, request_timeout_s=10, max_new_tokens=4)
        with live_server(app) as live:
            load = Load(live.url, [png(40 + 8 * i, 40, seed=200 + i) for i in range(6)])
            lonely = png(64, 48, seed=299)  # stored before the crash, not re-uploaded by the load
            async with httpx.AsyncClient(base_url=live.url, timeout=10) as probe:
                r = await probe.post("/v1/images", content=lonely, headers={"Content-Type": "image/png"})
                lonely_id = r.json()["image_id"]
            t0 = time.monotonic()
            clients = [asyncio.create_task(load.client_loop(i, until=t0 + 6.0)) for i in range(8)]
            await asyncio.sleep(1.5)
            killed = time.monotonic()
            own.stop()  # SIGKILL: a crash, not a shutdown
            async with httpx.AsyncClient(base_url=live.url, timeout=10) as probe:
                await asyncio.sleep(0.5)
                assert (await probe.get("/healthz")).status_code == 200  # the process is alive
                assert_error(await probe.get("/readyz"), 503)  # and says it cannot serve
                await asyncio.sleep(1.5)
                own.start()  # same port, empty: the features are gone
                restarted = time.monotonic()
                await asyncio.gather(*clients)
                # after the restart, without restarting the workers: lost features are a clear 404, re-upload works
                assert (await probe.get("/readyz")).status_code == 200
                q = {"image_id": lonely_id, "question": "hi", "max_tokens": 2}
                assert_error(await probe.post("/v1/questions", json=q), 404, "image_not_found")
                r = await probe.post("/v1/images", content=lonely, headers={"Content-Type": "image/png"})
                assert r.status_code == 200 and r.json()["cached"] is False, r.text
                r = await probe.post("/v1/questions", json=q)
                assert r.status_code == 200, r.text
    finally:
        own.stop()

    outcomes = load.outcomes
    lost = [o for o in outcomes if o.error]
    assert not lost, lost[:5]  # every request got an answer
    assert max(o.elapsed for o in outcomes) < 5.0  # nothing hung
    statuses = Counter(o.status for o in outcomes)
    assert set(statuses) <= {200, 404, 503}, statuses
    for o in outcomes:
        if o.status == 503:
            assert o.retry_after and int(o.retry_after) >= 1 and o.code == "redis_unavailable", o
        if o.status == 404:
            assert o.code == "image_not_found" and o.started > killed, o
    down = [o for o in outcomes if killed + 0.05 < o.started and o.started + o.elapsed < restarted]
    assert down and all(o.status == 503 for o in down), Counter((o.kind, o.status) for o in down)
    before = [o for o in outcomes if o.started + o.elapsed < killed]
    assert before and all(o.status == 200 for o in before), Counter((o.kind, o.status) for o in before)
    after = [o for o in outcomes if o.started > restarted + 0.5]
    assert after and Counter(o.status for o in after)[200] > 0, Counter((o.kind, o.status) for o in after)
    assert all(o.status in (200, 404) for o in after), Counter((o.kind, o.status) for o in after)
    print(f"\nredis fault: {len(outcomes)} requests, {statuses}, {len(down)} while down, all answered")


async def test_redis_frozen_then_thawed_serves_no_wrong_data(make_app, redis_server, tmp_path, live_server, encoder):
    """SIGSTOP Redis under load: requests time out into 503s; after SIGCONT no reply lands on the wrong request."""
    own = type(redis_server)(tmp_path)
    own.start()
    images = [png(56 + 28 * (i % 3), 56, seed=400 + i) for i in range(6)]
    expected = {hashlib.sha256(d).hexdigest(): encoder.forward([encoder.preprocess(d)])[0][0] for d in images}  # row 0 of [K, n, D]
    outcomes: Counter[tuple[str, int | None]] = Counter()
    slowest = 0.0
    try:
        app = make_app("vision", redis_url=own.url, redis_timeout_s=0.5, request_timeout_s=10)
        with live_server(app) as live:

            async def client_loop(seed: int, until: float) -> None:
                nonlocal slowest
                rng = random.Random(seed)
                async with httpx.AsyncClient(base_url=live.url, timeout=20) as client:
                    while time.monotonic() < until:
                        data = rng.choice(images)
                        image_id = hashlib.sha256(data).hexdigest()
                        start = time.monotonic()
                        if rng.random() < 0.5:
                            kind = "upload"
                            r = await client.post("/v1/images", content=data, headers={"Content-Type": "image/png"})
                            if r.status_code == 200:
                                assert r.json()["image_id"] == image_id
                        else:
                            kind = "embeddings"
                            r = await client.get(f"/v1/images/{image_id}/embeddings")
                            if r.status_code == 200:  # exactly this image's features, never another request's
                                got = load_safetensors(r.content)["image_embeds"]
                                # (batched forwards round a little differently; another image's differ wholly)
                                assert got.shape == expected[image_id].shape, image_id
                                assert torch.allclose(got, expected[image_id], atol=1e-4, rtol=1e-4), image_id
                        slowest = max(slowest, time.monotonic() - start)
                        outcomes[kind, r.status_code] += 1
                        if r.status_code == 503:
                            assert_error(r, 503, "redis_unavailable")

            t0 = time.monotonic()
            clients = [asyncio.create_task(client_loop(i, t0 + 5.0)) for i in range(8)]
            await asyncio.sleep(1.0)
            assert own.proc is not None
            own.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(2.0)
            finally:
                own.proc.send_signal(signal.SIGCONT)
            await asyncio.gather(*clients)
            async with httpx.AsyncClient(base_url=live.url, timeout=20) as client:
                for image_id, want in expected.items():
                    r = await client.get(f"/v1/images/{image_id}/embeddings")
                    if r.status_code == 200:
                        got = load_safetensors(r.content)["image_embeds"]
                        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    finally:
        own.stop()
    assert {status for _, status in outcomes} <= {200, 404, 503}, outcomes
    assert sum(n for (_, status), n in outcomes.items() if status == 503) > 0, outcomes
    assert slowest < 5.0, slowest
    print(f"\nredis frozen: {sum(outcomes.values())} requests, {dict(outcomes)}, slowest {slowest:.2f} s")


# -- a worker killed mid-batch -----------------------------------------------------------------------


@pytest.fixture
def doomed(tiny_checkpoint: Path, redis_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    """``splitvl serve vision`` as a child process, with a long batch window: uploads wait inside its batch."""
    worker = ServeProcess("vision", tiny_checkpoint, tmp_path / "vision.log", "--redis-url", redis_url,
                          "--max-batch-wait-ms", "1500", "--request-timeout-s", "30")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


async def test_worker_killed_mid_batch(doomed, make_app, redis_url, live_server):
    store = redis.Redis.from_url(redis_url)
    images = [png(50 + 4 * i, 50, seed=300 + i) for i in range(8)]

    async def post(client: httpx.AsyncClient, data: bytes) -> tuple[float, httpx.Response | Exception]:
        try:
            r = await client.post("/v1/images", content=data, headers={"Content-Type": "image/png"})
            return time.monotonic(), r
        except httpx.HTTPError as exc:
            return time.monotonic(), exc

    async with httpx.AsyncClient(base_url=doomed.url, timeout=30) as client:
        tasks = [asyncio.create_task(post(client, d)) for d in images]
        # wait until every upload holds its image's lock (then it is preprocessed and waits in the
        # batch, whose window is 1.5 s), and kill the worker inside that window
        deadline = time.monotonic() + 20
        while len(store.keys("splitvl:{*}:*:lock")) < len(images):
            assert time.monotonic() < deadline, store.keys("*")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in tasks)
        killed = time.monotonic()
        doomed.kill()
        results = await asyncio.gather(*tasks)
    for finished, outcome in results:
        assert isinstance(outcome, httpx.TransportError), outcome  # a connection error, not a hang
        assert finished - killed < 3.0
    # the clients retry on another worker of the same model and Redis: every one succeeds, though the
    # dead worker held their images' locks
    with live_server(make_app("vision", redis_url=redis_url, request_timeout_s=30)) as survivor:
        async with httpx.AsyncClient(base_url=survivor.url, timeout=30) as client:
            start = time.monotonic()
            retries = await asyncio.gather(*(client.post("/v1/images", content=d, headers={
                "Content-Type": "image/png"}) for d in images))
            took = time.monotonic() - start
    assert [r.status_code for r in retries] == [200] * len(images), [r.text for r in retries]
    assert took < 10.0, f"retries took {took:.1f} s: the dead worker's locks held them"
    store.close()
    print(f"\nworker kill: {len(images)} in-flight uploads failed fast, retried on the survivor in {took:.1f} s")


async def test_live_workers_lock_outlasts_its_lease(make_app, redis_url, live_server):
    """The lease is short (a dead worker frees the image soon) but renewed: a slow live worker still computes once."""
    from service.store import MAX_LOCK_LEASE_S as LOCK_LEASE_S

    slow_s = LOCK_LEASE_S + 1.5
    with live_server(make_app("vision", redis_url=redis_url)) as a, \
            live_server(make_app("vision", redis_url=redis_url)) as b:
        batcher_a = a.server.config.app.state.vision.batcher
        batcher_b = b.server.config.app.state.vision.batcher
        real = batcher_a._run_batch
        ran_on_b: list[int] = []
        ran_on_a: list[int] = []

        def slow(batch: list) -> list:
            ran_on_a.append(len(batch))
            time.sleep(slow_s)
            return real(batch)

        def counted(batch: list) -> list:
            ran_on_b.append(len(batch))
            return real(batch)

        batcher_a._run_batch, batcher_b._run_batch = slow, counted
        data = png(60, 60, seed=42)
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.create_task(client.post(f"{a.url}/v1/images", content=data,
                                                    headers={"Content-Type": "image/png"}))
            await eventually(lambda: bool(ran_on_a), "a computing the image (it holds the lock)")
            second = await client.post(f"{b.url}/v1/images", content=data, headers={"Content-Type": "image/png"})
            first_r = await first
    assert first_r.status_code == 200 and first_r.json()["cached"] is False
    assert second.status_code == 200 and second.json()["cached"] is True, second.text
    assert ran_on_b == []  # b waited for a's result instead of computing it again


# -- evicted, foreign and corrupt entries ---------------------------------------------------------------


@pytest.fixture
def served(make_app, redis_url, live_server) -> Iterator[tuple[httpx.Client, redis.Redis]]:
    app = make_app("all", redis_url=redis_url, max_new_tokens=4)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        r = redis.Redis.from_url(redis_url)
        yield client, r
        r.close()


def stored(client: httpx.Client, seed: int) -> tuple[bytes, str, str]:
    data = png(56, 56, seed=seed)
    meta = upload(client, data).json()
    return data, meta["image_id"], record_key(meta["fingerprint"], meta["image_id"])


def question(client: httpx.Client, image_id: str) -> httpx.Response:
    return client.post("/v1/questions", json={"image_id": image_id, "question": "what is it?", "max_tokens": 2})


def test_evicted_entry_is_404_then_reupload_works(served):
    client, r = served
    data, image_id, key = stored(client, 1)
    assert question(client, image_id).status_code == 200  # the engine now holds this image's prefix KV too
    r.delete(key)
    assert_error(client.get(f"/v1/images/{image_id}"), 404, "image_not_found")
    assert_error(client.get(f"/v1/images/{image_id}/embeddings"), 404, "image_not_found")
    assert_error(question(client, image_id), 404, "image_not_found")  # not answered from the prefix cache
    again = upload(client, data)
    assert again.status_code == 200 and again.json()["cached"] is False
    assert question(client, image_id).status_code == 200


def test_real_lru_eviction(make_app, redis_server, tmp_path, live_server):
    own = type(redis_server)(tmp_path)
    own.start()
    try:
        r = redis.Redis.from_url(own.url)
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used + 400_000)
        r.config_set("maxmemory-policy", "allkeys-lru")
        app = make_app("all", redis_url=own.url, max_new_tokens=2)
        with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
            images = [png(224, 224, seed=500 + i) for i in range(60)]  # 16 KB of features each: ~1 MB in all
            ids = []
            for data in images:
                res = upload(client, data)
                assert res.status_code == 200, res.text
                ids.append(res.json()["image_id"])
            gone = [i for i, image_id in enumerate(ids) if client.get(f"/v1/images/{image_id}").status_code == 404]
            assert gone, "nothing was evicted"
            first = gone[0]
            assert_error(question(client, ids[first]), 404, "image_not_found")
            assert upload(client, images[first]).status_code == 200
            assert question(client, ids[first]).status_code == 200
        r.close()
    finally:
        own.stop()


def test_a_model_name_in_another_script_reaches_the_headers_encoded(served):
    """A record's model name goes into X-Splitvl-Model: one Starlette cannot encode (not latin-1) was a 500."""
    client, r = served
    data, image_id, key = stored(client, 5)
    r.hset(key, "model", "模型 ü%")
    got = client.post("/v1/images", content=data, headers={"Content-Type": "image/png",
                                                           "Accept": "application/octet-stream"})
    assert got.status_code == 200, got.text
    assert got.headers["x-splitvl-model"] == "%E6%A8%A1%E5%9E%8B %C3%BC%25"
    assert client.get(f"/v1/images/{image_id}").json()["model"] == "模型 ü%"


def test_entry_of_another_model_is_refused(served):
    client, r = served
    data, image_id, key = stored(client, 2)
    r.rename(key, record_key("0123456789abcdef", image_id))
    r.set(latest_key(image_id), "0123456789abcdef")
    assert_error(question(client, image_id), 409, "fingerprint_mismatch")
    assert_error(client.get(f"/v1/images/{image_id}"), 404, "image_not_found")
    # uploading to this model's vision worker stores it under this model's fingerprint
    assert upload(client, data).json()["cached"] is False
    assert question(client, image_id).status_code == 200


def _flip_byte(r: redis.Redis, key: str) -> None:
    embeds = bytearray(r.hget(key, "embeds"))
    embeds[len(embeds) // 2] ^= 0x40
    r.hset(key, "embeds", bytes(embeds))


def _truncate_consistently(r: redis.Redis, key: str) -> None:
    embeds = r.hget(key, "embeds")[:-256]  # checksum updated: only the shape check can tell
    r.hset(key, mapping={"embeds": embeds, "checksum": checksum(embeds)})


def _replace_with_string(r: redis.Redis, key: str) -> None:
    r.delete(key)
    r.set(key, b"not a hash")


def _wrong_hidden_size(r: redis.Redis, key: str) -> None:
    shape = json.loads(r.hget(key, "shape"))
    r.hset(key, "shape", json.dumps([shape[0] * 2, shape[1] // 2]))  # same bytes, same checksum


def _grid_disagrees(r: redis.Redis, key: str) -> None:
    t, h, w = json.loads(r.hget(key, "grid_thw"))
    r.hset(key, "grid_thw", json.dumps([t, h, w + 2]))


def _non_finite(value: float) -> Callable[[redis.Redis, str], None]:
    """One element of the embeddings set to ``value``, the checksum updated: only a finiteness check tells."""
    def damage(r: redis.Redis, key: str) -> None:
        dtype = getattr(torch, r.hget(key, "dtype").decode())
        embeds = bytearray(r.hget(key, "embeds"))
        bad = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
        middle = len(embeds) // 2 // len(bad) * len(bad)
        embeds[middle : middle + len(bad)] = bad
        r.hset(key, mapping={"embeds": bytes(embeds), "checksum": checksum(bytes(embeds))})

    return damage


CORRUPTIONS: dict[str, Callable[[redis.Redis, str], object]] = {
    "flipped byte": _flip_byte,
    "truncated, checksum fixed": _truncate_consistently,
    "dtype int8": lambda r, k: r.hset(k, "dtype", "int8"),
    "dtype gibberish": lambda r, k: r.hset(k, "dtype", b"\xff\xfe"),
    "shape not json": lambda r, k: r.hset(k, "shape", "[[["),
    "shape rank 3": lambda r, k: r.hset(k, "shape", "[1, 16, 64]"),
    "grid two numbers": lambda r, k: r.hset(k, "grid_thw", "[1, 8]"),
    "grid strings": lambda r, k: r.hset(k, "grid_thw", '"abc"'),
    "grid zeros": lambda r, k: r.hset(k, "grid_thw", "[0, 0, 0]"),
    "grid disagrees with rows": _grid_disagrees,
    "hidden size of another model": _wrong_hidden_size,
    "checksum missing": lambda r, k: r.hdel(k, "checksum"),
    "model missing": lambda r, k: r.hdel(k, "model"),
    "model with a line break": lambda r, k: r.hset(k, "model", "tiny\r\nX-Injected: 1"),
    "embeds missing": lambda r, k: r.hdel(k, "embeds"),
    "not a hash": _replace_with_string,
    "a NaN, checksum fixed": _non_finite(float("nan")),
    "an infinity, checksum fixed": _non_finite(float("-inf")),
}
# what the metadata route reads: it does not fetch the bytes, so byte-level damage shows only with them
BYTES_ONLY = {"flipped byte", "checksum missing", "embeds missing", "truncated, checksum fixed", "a NaN, checksum fixed",
              "an infinity, checksum fixed"}


@pytest.mark.parametrize("name", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_entry_is_refused_not_served(served, name):
    client, r = served
    data, image_id, key = stored(client, 3)
    CORRUPTIONS[name](r, key)
    first = client.get(f"/v1/images/{image_id}/embeddings")
    assert_error(first, 409, "corrupt_features")
    assert not r.exists(key)  # dropped
    assert_error(client.get(f"/v1/images/{image_id}"), 404, "image_not_found")

    # again, seen first by the LLM worker (an image it holds no prefix KV for: it reads the bytes)
    fresh_id, fresh_key = stored(client, 1000 + list(CORRUPTIONS).index(name))[1:]
    CORRUPTIONS[name](r, fresh_key)
    assert_error(question(client, fresh_id), 409)

    CORRUPTIONS[name](r, stored(client, 3)[2])  # and by the metadata route
    meta = client.get(f"/v1/images/{image_id}")
    if name in BYTES_ONLY:
        assert meta.status_code == 200
    else:
        assert_error(meta, 409, "corrupt_features")

    # an upload of the same bytes recomputes instead of failing on the damaged copy
    if name not in BYTES_ONLY:  # (those are still damaged in Redis: the metadata route did not read the bytes)
        CORRUPTIONS[name](r, stored(client, 3)[2])
    again = upload(client, data)
    assert again.status_code == 200 and again.json()["cached"] is False, again.text
    assert question(client, image_id).status_code == 200

    # once the engine holds the image's prefix KV, a question reads only the record's metadata: damage
    # to the bytes is not read (the answer comes from the prefix, computed from intact bytes), damage to
    # the metadata still refuses it
    CORRUPTIONS[name](r, key)
    if name in BYTES_ONLY:
        assert question(client, image_id).status_code == 200
    else:
        assert_error(question(client, image_id), 409)
