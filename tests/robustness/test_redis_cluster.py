"""The split deployment on a real Redis Cluster (three masters, three replicas on loopback): the store's
guarantees as on one Redis, a master killed under load, and a resharding under load."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import torch
from redis.crc import key_slot
from safetensors.torch import load as load_safetensors

from service.errors import ApiError
from service.fingerprint import REGISTRY
from service.store import MAX_LOCK_LEASE_S, FeatureStore, ImageRecord, latest_key, lock_key, record_key

from . import Outcome, junk, png
from .redis_cluster import RedisClusterProcesses, wait_until


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    nodes = RedisClusterProcesses(tmp_path).start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def split_workers(make_app, cluster, live_server):
    """A vision worker and an LLM worker on the cluster, each given a different node's URL."""
    masters = cluster.masters()
    vision_app = make_app("vision", redis_url=cluster.url(masters[0]), max_new_tokens=8)
    llm_app = make_app("llm", redis_url=cluster.url(cluster.replica_of(masters[1])), max_new_tokens=8)
    with live_server(vision_app) as vision, live_server(llm_app) as llm:
        yield vision, llm


def upload(client: httpx.Client, url: str, data: bytes) -> httpx.Response:
    return client.post(f"{url}/v1/images", content=data, headers={"Content-Type": "image/png"})


def ask(client: httpx.Client, url: str, image_id: str, question: str = "What is it?") -> httpx.Response:
    return client.post(f"{url}/v1/questions", json={"image_id": image_id, "question": question, "max_tokens": 6})


async def test_store_on_a_cluster_keeps_an_image_in_one_slot(cluster):
    store = FeatureStore(cluster.url(cluster.ports[-1]), ttl_s=100)  # any node's URL, a replica's too
    ids = [f"{i:064x}" for i in range(12)]
    try:
        assert await store.ping() and store.cluster
        for image_id in ids:
            assert await store.lock_unless_stored("fp", image_id, ttl_s=5) is True
            rec = ImageRecord(image_id, "fp", "tiny", (1, 2, 2), torch.randn(1, 8))
            await store.put(rec, model_key="mk", release_lock=True)
            assert torch.equal((await store.get("fp", image_id)).embeds, rec.embeds)
            assert await store.lock_unless_stored("fp", image_id, ttl_s=5) is None  # stored: no lock
            assert await store.other_fingerprint("other", image_id) == "fp"
        assert await store.registered_fingerprint("mk") == "fp"
    finally:
        await store.close()
    for image_id in ids:
        assert len({key_slot(k.encode()) for k in (record_key("fp", image_id), lock_key("fp", image_id),
                                                    latest_key(image_id))}) == 1
    r = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    assert 0 < r.ttl(record_key("fp", ids[0])) <= 100 and 0 < r.ttl(latest_key(ids[0])) <= 100
    assert not r.exists(lock_key("fp", ids[0]))
    r.close()


async def test_junk_on_a_cluster_is_read_and_replaced_as_on_one_redis(cluster):
    """The cluster's write path (a script, and the registry written beside it) meets junk as the
    single server's transaction does: replaced, never a 503 that lasts or a lock that never ends."""
    store = FeatureStore(cluster.url(cluster.ports[0]))
    r = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    image_id = "cd" * 32
    try:
        assert await store.ping() and store.cluster
        junk(r, REGISTRY, "list")
        junk(r, latest_key(image_id), "hash")
        junk(r, record_key("fp", image_id), "list")
        junk(r, lock_key("fp", image_id), "zset")
        assert await store.registered_fingerprint("mk") is None
        assert await store.other_fingerprint("fp2", image_id) is None
        assert await store.lock_unless_stored("fp", image_id, ttl_s=1) is None  # the junk record "exists" ...
        with pytest.raises(ApiError) as err:  # ... and is refused and dropped when read
            await store.get("fp", image_id)
        assert err.value.code == "corrupt_features" and not r.exists(record_key("fp", image_id))
        assert await store.lock("fp", image_id, ttl_s=1)  # a lock key of another type is no lock
        await store.put(ImageRecord(image_id, "fp", "tiny", (1, 2, 2), torch.randn(1, 8)), model_key="mk",
                        release_lock=True)
        assert (await store.get("fp", image_id)) is not None and await store.registered_fingerprint("mk") == "fp"
        r.set(lock_key("fp2", image_id), "no one", px=None)  # no TTL: one lease, then it is gone
        assert not await store.lock("fp2", image_id, ttl_s=1)
        assert 0 < r.pttl(lock_key("fp2", image_id)) <= MAX_LOCK_LEASE_S * 1000
    finally:
        r.close()
        await store.close()


def test_split_workers_on_a_cluster_answer_as_on_one_redis(make_app, redis_url, cluster, split_workers,
                                                           live_server):
    vision, llm = split_workers
    images = [png(40 + 4 * i, 44, seed=700 + i) for i in range(16)]
    with live_server(make_app("all", redis_url=redis_url, max_new_tokens=8)) as single, \
            httpx.Client(timeout=60) as client:
        for data in images:
            on_cluster = upload(client, vision.url, data)
            on_single = upload(client, single.url, data)
            assert on_cluster.status_code == 200 and on_single.status_code == 200, on_cluster.text
            assert on_cluster.json() == on_single.json()
            image_id = on_cluster.json()["image_id"]
            answer = ask(client, llm.url, image_id)
            assert answer.status_code == 200, answer.text
            assert answer.json() == ask(client, single.url, image_id).json()
            files = [load_safetensors(client.get(f"{url}/v1/images/{image_id}/embeddings").content)
                     for url in (vision.url, single.url)]
            assert files[0].keys() == files[1].keys()
            assert all(torch.equal(files[0][name], files[1][name]) for name in files[0])
    # the features are spread over every master, and each master holds only whole images
    held = {port: cluster.client(port).keys("splitvl:{*}:*") for port in cluster.masters()}
    assert all(held.values()), {p: len(k) for p, k in held.items()}
    for keys in held.values():
        ids = {k.decode().split("{")[1].split("}")[0] for k in keys}
        assert len(keys) == 2 * len(ids)  # record and latest together


def test_cluster_computes_once_across_workers_and_reuploads_after_loss(make_app, cluster, split_workers,
                                                                       live_server):
    vision, llm = split_workers
    forwards: list[int] = []
    with live_server(make_app("vision", redis_url=cluster.url(cluster.ports[2]))) as other:
        batchers = [w.server.config.app.state.vision.batcher for w in (vision, other)]
        for batcher in batchers:
            real = batcher._run_batch
            batcher._run_batch = lambda batch, real=real: (forwards.append(len(batch)), real(batch))[1]
        data = png(64, 64, seed=801)

        async def uploads() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/images", content=data, headers={
                    "Content-Type": "image/png"}) for url in [vision.url, other.url] * 4))

        responses = asyncio.run(uploads())
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert sum(forwards) == 1, forwards  # eight concurrent uploads over two workers: one forward
    assert sum(not r.json()["cached"] for r in responses) == 1
    meta = responses[0].json()

    r = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    with httpx.Client(timeout=60) as client:
        before = ask(client, llm.url, meta["image_id"]).json()
        key = record_key(meta["fingerprint"], meta["image_id"])
        stored = r.hget(key, "embeds")
        r.hset(key, "embeds", bytes([stored[0] ^ 0xFF]) + stored[1:])  # damaged: refused and dropped
        damaged = client.get(f"{vision.url}/v1/images/{meta['image_id']}/embeddings")
        assert damaged.status_code == 409 and damaged.json()["error"]["code"] == "corrupt_features"
        gone = ask(client, llm.url, meta["image_id"])  # as after an eviction
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_not_found"
        assert upload(client, vision.url, data).json()["cached"] is False  # the client uploads it again
        assert ask(client, llm.url, meta["image_id"]).json() == before
    r.close()


# -- under load: a master killed, slots migrated --------------------------------------------------------


@dataclass
class SplitLoad:
    """Clients that upload (known and new images), ask and read metadata through the split workers."""

    vision: str
    llm: str
    known: dict[str, bytes]  # image id -> bytes
    outcomes: list[Outcome] = field(default_factory=list)
    fresh_seed: int = 5000

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        roll = rng.random()
        image_id = rng.choice(sorted(self.known))
        start = time.monotonic()
        kind = "?"
        try:
            if roll < 0.15:
                kind, self.fresh_seed = "new upload", self.fresh_seed + 1
                r = await client.post(f"{self.vision}/v1/images", content=png(36, 36, seed=self.fresh_seed),
                                      headers={"Content-Type": "image/png"})
            elif roll < 0.4:
                kind = "upload"
                r = await client.post(f"{self.vision}/v1/images", content=self.known[image_id],
                                      headers={"Content-Type": "image/png"})
            elif roll < 0.8:
                kind = "question"
                r = await client.post(f"{self.llm}/v1/questions", json={"image_id": image_id, "question": "what?",
                                                                        "max_tokens": 3})
            else:
                kind = "metadata"
                r = await client.get(f"{self.vision}/v1/images/{image_id}")
        except httpx.HTTPError as exc:
            self.outcomes.append(Outcome.failed(kind, start, exc))
            return
        self.outcomes.append(Outcome.of(kind, start, r))

    async def run(self, clients: int, until: threading.Event, *, at_least_s: float) -> None:
        stop_after = time.monotonic() + at_least_s

        async def loop(seed: int) -> None:
            rng = random.Random(seed)
            async with httpx.AsyncClient(timeout=30) as client:
                while not until.is_set() or time.monotonic() < stop_after:
                    await self.one(client, rng)
                    await asyncio.sleep(rng.uniform(0, 0.01))

        await asyncio.gather(*(loop(i) for i in range(clients)))

    def summary(self) -> Counter:
        return Counter((o.kind, o.status, o.code) for o in self.outcomes)


def preload(vision: str, images: dict[str, bytes]) -> dict[str, bytes]:
    with httpx.Client(timeout=60) as client:
        for image_id, data in images.items():
            r = upload(client, vision, data)
            assert r.status_code == 200 and r.json()["image_id"] == image_id, r.text
    return images


def test_master_killed_under_load_fails_over_to_its_replica(cluster, split_workers):
    vision, llm = split_workers
    known = preload(vision.url, {hashlib.sha256(d).hexdigest(): d for d in (png(40, 40, seed=900 + i) for i in range(12))})
    load = SplitLoad(vision.url, llm.url, known)
    victim = max(cluster.masters(), key=lambda p: cluster.client(p).dbsize())
    replica = cluster.replica_of(victim)
    failed_over = threading.Event()
    times: dict[str, float] = {}

    def fail_over() -> None:
        time.sleep(1.5)
        times["killed"] = time.monotonic()
        cluster.kill(victim)
        wait_until(lambda: cluster.client(replica).info("replication")["role"] == "master", 30, "the failover")
        cluster.wait_healthy()
        times["recovered"] = time.monotonic()
        failed_over.set()

    killer = threading.Thread(target=fail_over)
    killer.start()
    asyncio.run(load.run(clients=6, until=failed_over, at_least_s=6.0))
    killer.join()
    summary = load.summary()
    print(f"\nmaster killed: failover in {times['recovered'] - times['killed']:.1f} s; outcomes {dict(summary)}")

    assert not [o for o in load.outcomes if o.error], [(o.kind, o.started - times["killed"], o.error) for o in load.outcomes if o.error]
    allowed = {200, 503, 404}  # 404: a write acknowledged just before the kill that never reached the replica
    assert {o.status for o in load.outcomes} <= allowed, summary
    for o in load.outcomes:
        if o.status == 503:
            assert o.code == "redis_unavailable" and o.retry_after, o
        if o.status == 404:
            assert o.code == "image_not_found" and o.kind in ("question", "metadata"), o
    assert max(o.elapsed for o in load.outcomes) < 10.0, "a request hung through the failover"
    # recovered without a restart: everything that started a second after the failover succeeded
    after = [o for o in load.outcomes if o.started > times["recovered"] + 1.0]
    assert after and all(o.status in (200, 404) for o in after), Counter((o.kind, o.status) for o in after)
    with httpx.Client(timeout=60) as client:
        for image_id, data in known.items():  # lost features come back with a re-upload
            assert upload(client, vision.url, data).status_code == 200
            assert ask(client, llm.url, image_id).status_code == 200


def test_resharding_under_load_costs_no_request(cluster, split_workers):
    vision, llm = split_workers
    images = {hashlib.sha256(data).hexdigest(): data for data in (png(40, 40, seed=950 + i) for i in range(12))}
    r = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    owner = {image_id: r.get_node_from_key(latest_key(image_id)).port for image_id in images}
    r.close()
    source = Counter(owner.values()).most_common(1)[0][0]
    target = next(p for p in cluster.masters() if p != source)
    # Many keys beside each image on the source (same hash tag, so the same slot), written before the
    # image's own: redis-cli migrates a slot's keys newest first (Redis 7) or in name order (6.2), so
    # the image's keys move early and requests for it meet ASK (and TRYAGAIN) redirections for the
    # rest of its slot's migration, not only the MOVED afterwards.
    for image_id in images:
        if owner[image_id] == source:
            cluster.client(source).mset({f"~filler:{{{image_id}}}:{i}": "x" * 64 for i in range(5000)})
    known = preload(vision.url, images)
    errors_before = cluster.errorstats()
    load = SplitLoad(vision.url, llm.url, known)
    done = threading.Event()
    result: dict[str, object] = {}

    def reshard() -> None:
        time.sleep(0.5)
        start = time.monotonic()
        result["run"] = cluster.reshard(source, target, slots=cluster.slot_count(source), pipeline=1)
        result["took"] = time.monotonic() - start
        done.set()

    mover = threading.Thread(target=reshard)
    mover.start()
    asyncio.run(load.run(clients=6, until=done, at_least_s=3.0))
    mover.join()
    run = result["run"]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    errors = {k: v - errors_before.get(k, 0) for k, v in cluster.errorstats().items()}
    summary = load.summary()
    print(f"\nresharding: {result['took']:.1f} s, redirections {errors}; outcomes {dict(summary)}")
    assert cluster.client(source).dbsize() == 0  # every slot left the source
    assert errors.get("MOVED", 0) > 0 and errors.get("ASK", 0) > 0, errors  # the load met the migration
    bad = [o for o in load.outcomes if o.status != 200]
    assert not bad, (Counter((o.kind, o.status, o.code) for o in bad), Counter(o.message for o in bad))
