"""The feature store against a real Redis server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import torch

from service.errors import ApiError
from service.fingerprint import REGISTRY
from service.store import (
    MAX_LOCK_LEASE_S,
    FeatureStore,
    ImageRecord,
    all_finite,
    checksum,
    latest_key,
    lock_key,
    record_key,
)
from tests.robustness import junk

ID = "ab" * 32


def record(dtype=torch.bfloat16, fingerprint="fp1") -> ImageRecord:
    return ImageRecord(ID, fingerprint, "tiny", (1, 4, 6), torch.randn(6, 64).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
async def test_roundtrip_keeps_dtype_and_bytes(redis_url, dtype):
    store = FeatureStore(redis_url)
    rec = record(dtype)
    await store.put(rec)
    got = await store.get("fp1", ID)
    assert got is not None and got.embeds.dtype == dtype and got.grid_thw == (1, 4, 6)
    assert torch.equal(got.embeds, rec.embeds)
    assert (await store.get("fp1", ID, with_embeds=False)).embeds.shape == (6, 64)
    await store.close()


async def test_key_layout_and_ttl(redis_url):
    store = FeatureStore(redis_url, ttl_s=100)
    await store.put(record())
    r = redis.Redis.from_url(redis_url)
    assert r.exists(record_key("fp1", ID))
    assert 0 < r.ttl(record_key("fp1", ID)) <= 100
    assert r.hget(record_key("fp1", ID), "dtype") == b"bfloat16"
    await store.close()


async def test_other_fingerprint_and_delete(redis_url):
    store = FeatureStore(redis_url)
    await store.put(record(fingerprint="old"))
    assert await store.get("new", ID) is None
    assert await store.other_fingerprint("new", ID) == "old"
    assert await store.other_fingerprint("old", ID) is None
    assert await store.delete("old", ID)
    assert await store.other_fingerprint("new", ID) is None
    assert not await store.delete("old", ID)
    await store.close()


async def test_corrupt_bytes_are_refused_and_dropped(redis_url):
    store = FeatureStore(redis_url)
    await store.put(record())
    r = redis.Redis.from_url(redis_url)
    raw = bytearray(r.hget(record_key("fp1", ID), "embeds"))
    raw[5] ^= 0xFF
    r.hset(record_key("fp1", ID), "embeds", bytes(raw))
    with pytest.raises(ApiError) as err:
        await store.get("fp1", ID)
    assert err.value.status == 409 and err.value.code == "corrupt_features"
    assert not r.exists(record_key("fp1", ID))
    await store.close()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
async def test_features_that_are_not_finite_are_refused(redis_url, dtype, value):
    """Neither stored nor served, whoever wrote them: a NaN poisons every question on the image."""
    store = FeatureStore(redis_url)
    r = redis.Redis.from_url(redis_url)
    key = record_key("fp1", ID)
    bad = record(dtype)
    bad.embeds[2, 7] = value
    with pytest.raises(ApiError) as err:
        await store.put(bad)
    assert err.value.status == 409 and err.value.code == "corrupt_features" and not r.exists(key)
    raw = bad.embeds.view(torch.uint8).numpy().tobytes()
    for load in (True, False):  # written by another hand, its checksum with it
        await store.put(record(dtype))
        r.hset(key, mapping={"embeds": raw, "checksum": checksum(raw)})
        with pytest.raises(ApiError) as err:
            await store.get("fp1", ID, load=load)
        assert err.value.code == "corrupt_features" and "NaN" in err.value.message and not r.exists(key)
    r.close()
    await store.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_finite_value_is_finite(dtype):
    info = torch.finfo(dtype)
    edges = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, 0.0, -0.0, 1.0], dtype=dtype)
    assert all_finite(edges.view(torch.uint8).numpy().tobytes(), dtype)
    assert all_finite(b"", dtype)
    for value in (float("nan"), float("inf"), float("-inf")):
        assert not all_finite(torch.cat([edges, torch.tensor([value], dtype=dtype)]).view(torch.uint8).numpy().tobytes(),
                              dtype)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated, checksum fixed"])
async def test_get_without_load_checks_the_bytes_as_fully(redis_url, damage):
    """``load=False`` (an upload answered with metadata) skips the tensor copy, not a check."""
    store = FeatureStore(redis_url)
    await store.put(record())
    got = await store.get("fp1", ID, load=False)
    assert got is not None and got.embeds.is_meta and got.embeds.shape == (6, 64)
    assert got.embeds.dtype == torch.bfloat16 and got.metadata() == record().metadata()
    r = redis.Redis.from_url(redis_url)
    key = record_key("fp1", ID)
    raw = r.hget(key, "embeds")
    if damage == "flipped byte":
        r.hset(key, "embeds", bytes([raw[0] ^ 0xFF]) + raw[1:])
    else:  # the checksum passes: only the size tells
        r.hset(key, mapping={"embeds": raw[:-2], "checksum": checksum(raw[:-2])})
    with pytest.raises(ApiError) as err:
        await store.get("fp1", ID, load=False)
    assert err.value.code == "corrupt_features" and not r.exists(key)
    r.close()
    await store.close()


def deepstack_record(layers: int = 3) -> ImageRecord:
    """Qwen3-VL's features: the embeddings and ``layers`` DeepStack tensors of the same shape."""
    return ImageRecord(ID, "fp3", "tiny3", (1, 4, 6), torch.randn(6, 64).to(torch.bfloat16),
                       torch.randn(layers, 6, 64).to(torch.bfloat16))


async def test_deepstack_features_live_in_the_image_record(redis_url):
    store = FeatureStore(redis_url)
    rec = deepstack_record()
    await store.put(rec)
    got = await store.get("fp3", ID)
    assert torch.equal(got.embeds, rec.embeds) and torch.equal(got.deepstack, rec.deepstack)
    assert got.metadata() == rec.metadata() and got.metadata()["deepstack_layers"] == 3
    meta_only = await store.get("fp3", ID, with_embeds=False)
    assert meta_only.deepstack.is_meta and meta_only.deepstack.shape == (3, 6, 64)
    unloaded = await store.get("fp3", ID, load=False)
    assert unloaded.deepstack.is_meta and unloaded.deepstack_layers == 3
    r = redis.Redis.from_url(redis_url)
    key = record_key("fp3", ID)
    assert r.type(key) == b"hash" and r.hget(key, "deepstack_layers") == b"3"  # one record, one key
    assert r.hget(key, "checksum").decode() == checksum(r.hget(key, "embeds"), r.hget(key, "deepstack"))
    r.close()
    await store.close()


async def test_a_deepstack_that_is_not_finite_is_refused(redis_url):
    """Every feature tensor of a record is held to the same check, the DeepStack ones too."""
    store = FeatureStore(redis_url)
    r = redis.Redis.from_url(redis_url)
    bad = deepstack_record()
    bad.deepstack[1, 2, 3] = float("nan")
    with pytest.raises(ApiError) as err:
        await store.put(bad)
    assert err.value.code == "corrupt_features" and not r.exists(record_key("fp3", ID))
    await store.put(deepstack_record())
    key = record_key("fp3", ID)
    raw = bad.deepstack.view(torch.uint8).numpy().tobytes()
    r.hset(key, mapping={"deepstack": raw, "checksum": checksum(r.hget(key, "embeds"), raw)})
    for load in (False, True):
        with pytest.raises(ApiError) as err:
            await store.get("fp3", ID, load=load)
        assert err.value.code == "corrupt_features" and not r.exists(key)
        await store.put(deepstack_record())
        r.hset(key, mapping={"deepstack": raw, "checksum": checksum(r.hget(key, "embeds"), raw)})
    r.close()
    await store.close()


@pytest.mark.parametrize("damage", ["flipped DeepStack byte", "DeepStack missing", "one layer short",
                                    "layer count changed"])
async def test_one_checksum_covers_embeddings_and_deepstack(redis_url, damage):
    """A reader never sees half of an image's features: damage to the DeepStack part, or a record
    that lost it, is refused (409) and dropped like damage to the embeddings."""
    store = FeatureStore(redis_url)
    await store.put(deepstack_record())
    r = redis.Redis.from_url(redis_url)
    key = record_key("fp3", ID)
    deep = r.hget(key, "deepstack")
    if damage == "flipped DeepStack byte":
        r.hset(key, "deepstack", deep[:-1] + bytes([deep[-1] ^ 0x01]))
    elif damage == "DeepStack missing":
        r.hdel(key, "deepstack")
    elif damage == "one layer short":  # the checksum made to pass: only the size tells
        short = deep[: len(deep) * 2 // 3]
        r.hset(key, mapping={"deepstack": short, "checksum": checksum(r.hget(key, "embeds"), short)})
    else:
        r.hset(key, "deepstack_layers", "2")
    with pytest.raises(ApiError) as err:
        await store.get("fp3", ID)
    assert err.value.status == 409 and err.value.code == "corrupt_features" and not r.exists(key)
    r.close()
    await store.close()


@contextlib.contextmanager
def out_of_memory(r: redis.Redis) -> Iterator[None]:
    """Redis refuses every write (OOM) meanwhile: the test server's policy is noeviction."""
    r.config_set("maxmemory", 1)
    try:
        yield
    finally:
        r.config_set("maxmemory", 0)


async def test_a_write_redis_refuses_is_503_naming_why(redis_url):
    store, r = FeatureStore(redis_url), redis.Redis.from_url(redis_url)
    with out_of_memory(r), pytest.raises(ApiError) as err:
        await store.put(record())
    assert err.value.status == 503 and err.value.code == "redis_unavailable"
    assert "refused the command (OOM)" in err.value.message and "maxmemory" not in err.value.message
    r.close()
    await store.close()


async def test_unreachable_redis_is_503():
    store = FeatureStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(ApiError) as err:
        await store.get("fp", ID)
    assert err.value.status == 503 and err.value.retry_after
    assert not await store.ping()
    await store.close()


async def test_restarted_redis_costs_no_request(redis_server, tmp_path):
    """Connections that sat idle in the pool while Redis was down are stale once it is back: each
    is retried on a fresh connection instead of failing one request."""
    own = type(redis_server)(tmp_path)
    own.start()
    store = FeatureStore(own.url, timeout_s=1.0)
    try:
        assert await asyncio.gather(*[store.get("fp", f"{i:064x}") for i in range(16)]) == [None] * 16
        own.stop()
        with pytest.raises(ApiError) as err:  # down: a fast 503, not a hang
            await store.get("fp", ID)
        assert err.value.status == 503 and err.value.code == "redis_unavailable"
        own.start()  # same port, new process: the pooled connections that were not used are closed at its end
        assert await asyncio.gather(*[store.get("fp", f"{i:064x}") for i in range(16)]) == [None] * 16
    finally:
        await store.close()
        own.stop()


def test_a_pooled_connection_closed_under_uvloop_costs_no_request(redis_url):
    """Under uvloop (which uvicorn runs on), a write to a pooled connection whose socket was closed
    raises RuntimeError, not redis-py's ConnectionError: seen as a 500 while a Redis Cluster master
    failed over. The store retries the call on a fresh connection, as for a ConnectionError."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        store = FeatureStore(redis_url)
        try:
            stored = record()
            await store.put(stored)
            client = await store.client()
            pooled = list(client.connection_pool._available_connections)
            assert pooled
            for connection in pooled:
                connection._writer.transport.close()  # the socket goes; redis-py still holds it as connected
            await asyncio.sleep(0.01)
            got = await store.get("fp1", ID)
            assert got is not None and torch.equal(got.embeds, stored.embeds)
            assert await store.ping()
        finally:
            await store.close()

    uvloop.run(scenario())


async def test_lock_lets_one_compute(redis_url):
    store = FeatureStore(redis_url)
    assert await store.lock("fp1", ID, ttl_s=5)
    assert not await store.lock("fp1", ID, ttl_s=5)

    async def finish_later():
        await asyncio.sleep(0.1)
        await store.put(record())
        await store.unlock("fp1", ID)

    task = asyncio.create_task(finish_later())
    got = await store.wait_for("fp1", ID, timeout_s=5)
    await task
    assert got is not None and got.image_id == ID
    await store.close()


class LostReplyProxy:
    """A TCP proxy in front of Redis that, once armed, lets Redis run the first command whose bytes
    hold ``trigger`` and then cuts the client's connection instead of passing the reply on."""

    def __init__(self, upstream_port: int, trigger: bytes) -> None:
        self.upstream_port, self.trigger, self.armed, self.fired = upstream_port, trigger, False, False

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        cut = asyncio.Event()

        async def upstream() -> None:
            while (data := await client_r.read(1 << 16)) and not cut.is_set():
                if self.armed and not self.fired and self.trigger in data:
                    self.fired = True
                    cut.set()  # Redis still runs it: the reply is what is lost
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(1 << 16):
                if cut.is_set():
                    break
                client_w.write(data)
                await client_w.drain()
            client_w.transport.abort()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        redis_w.close()


async def test_a_lock_whose_reply_was_lost_is_still_ours(redis_server, redis_url):
    """The connection's retry re-sends a lock command that Redis had run: the lock is ours, not
    "held by another" (a worker would then wait a whole lease on its own lock)."""
    proxy = LostReplyProxy(redis_server.port, b"EVALSHA")
    store = FeatureStore(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=2.0)
    other = FeatureStore(redis_url)
    try:
        assert await store.lock_unless_stored("fp9", "cd" * 32, ttl_s=5) is True  # script loaded
        proxy.armed = True
        assert await store.lock_unless_stored("fp9", ID, ttl_s=5) is True
        assert proxy.fired
        assert await other.lock_unless_stored("fp9", ID, ttl_s=5) is False  # and it is held
        await store.unlock("fp9", ID)
        assert await other.lock("fp9", ID, ttl_s=5)
    finally:
        await store.close()
        await other.close()
        proxy.server.close()


async def test_only_the_holder_extends_or_frees_a_lock(redis_url):
    ours, theirs = FeatureStore(redis_url), FeatureStore(redis_url)
    r = redis.Redis.from_url(redis_url)
    assert await ours.lock("fp9", ID, ttl_s=0.2)
    await asyncio.sleep(0.3)  # our lease ran out ...
    assert await theirs.lock("fp9", ID, ttl_s=1)  # ... and another worker took the lock
    await ours.extend_lock("fp9", ID, ttl_s=60)
    await ours.unlock("fp9", ID)
    assert 0 < r.pttl(lock_key("fp9", ID)) <= 1000  # neither extended nor freed by us
    await theirs.extend_lock("fp9", ID, ttl_s=60)  # a lease is never longer than MAX_LOCK_LEASE_S
    assert 1000 < r.pttl(lock_key("fp9", ID)) <= MAX_LOCK_LEASE_S * 1000
    await theirs.unlock("fp9", ID)
    assert not r.exists(lock_key("fp9", ID))
    await ours.close()
    await theirs.close()


async def test_a_put_that_failed_leaves_its_lock_to_unlock(both):
    """A put that would also free the lock, refused by Redis: the worker's unlock frees the lock at
    once, not a lease later (uploads of the same image on other workers wait on it meanwhile)."""
    store, r = both
    assert await store.lock_unless_stored("fp1", ID, ttl_s=MAX_LOCK_LEASE_S)
    with out_of_memory(r), pytest.raises(ApiError) as err:
        await store.put(record(), release_lock=True)
    assert err.value.status == 503
    assert not r.exists(record_key("fp1", ID)) and r.exists(lock_key("fp1", ID))
    await store.unlock("fp1", ID)
    assert not r.exists(lock_key("fp1", ID))


async def test_lock_unless_stored(redis_url):
    store = FeatureStore(redis_url)
    rec = record(fingerprint="fp9")
    assert await store.lock_unless_stored("fp9", ID, ttl_s=5) is True
    assert await store.lock_unless_stored("fp9", ID, ttl_s=5) is False  # held by us: refused
    await store.unlock("fp9", ID)
    await store.put(rec)
    assert await store.lock_unless_stored("fp9", ID, ttl_s=5) is None  # stored: no lock needed
    assert await store.lock("fp9", ID, ttl_s=5)  # and it was not kept
    await store.close()


async def test_lock_unless_stored_takes_the_lease_in_one_command(redis_url):
    store = FeatureStore(redis_url)
    r = redis.Redis.from_url(redis_url)
    assert await store.lock_unless_stored("fp9", ID, ttl_s=2.5) is True
    assert 0 < r.pttl(lock_key("fp9", ID)) <= 2500
    assert not r.exists(record_key("fp9", ID))
    await store.close()


async def test_lock_unless_stored_held_by_another_waits_for_its_record(redis_url):
    ours, theirs = FeatureStore(redis_url), FeatureStore(redis_url)
    assert await theirs.lock_unless_stored("fp9", ID, ttl_s=5) is True
    assert await ours.lock_unless_stored("fp9", ID, ttl_s=5) is False

    async def store_later() -> None:
        await asyncio.sleep(0.1)
        await theirs.put(record(fingerprint="fp9"), release_lock=True)

    task = asyncio.create_task(store_later())
    got = await ours.wait_for("fp9", ID, timeout_s=5)
    await task
    assert got is not None and got.image_id == ID
    assert await ours.lock_unless_stored("fp9", ID, ttl_s=5) is None  # stored meanwhile: no lock
    assert await ours.lock("fp9", ID, ttl_s=5)  # the holder's lock went with its store, and none was kept
    for store in (ours, theirs):
        await store.close()


@pytest.mark.parametrize("damage", ["flipped byte", "not a hash"])
async def test_lock_unless_stored_on_a_corrupt_record_then_get_drops_it(redis_url, damage):
    store = FeatureStore(redis_url)
    await store.put(record(fingerprint="fp9"))
    r = redis.Redis.from_url(redis_url)
    key = record_key("fp9", ID)
    if damage == "not a hash":
        r.delete(key)
        r.set(key, b"junk")
    else:
        raw = bytearray(r.hget(key, "embeds"))
        raw[3] ^= 0x10
        r.hset(key, "embeds", bytes(raw))
    assert await store.lock_unless_stored("fp9", ID, ttl_s=5) is None  # something is stored: not locked
    with pytest.raises(ApiError) as err:
        await store.get("fp9", ID)
    assert err.value.status == 409 and err.value.code == "corrupt_features"
    assert not r.exists(key)
    assert await store.lock_unless_stored("fp9", ID, ttl_s=5) is True  # dropped: a miss now
    await store.close()


async def test_lock_unless_stored_loads_its_script_again_after_a_flush(redis_url):
    store = FeatureStore(redis_url)
    assert await store.lock_unless_stored("fp9", ID, ttl_s=5) is True
    redis.Redis.from_url(redis_url).script_flush()  # as after a Redis restart: NOSCRIPT, loaded again
    assert await store.lock_unless_stored("fp9", "cd" * 32, ttl_s=5) is True
    await store.close()


async def test_lock_unless_stored_with_redis_down_is_503():
    store = FeatureStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(ApiError) as err:
        await store.lock_unless_stored("fp", ID, ttl_s=5)
    assert err.value.status == 503 and err.value.code == "redis_unavailable" and err.value.retry_after
    await store.close()


async def test_checksum_is_crc32_and_records_stored_with_blake2b_are_still_read(redis_url):
    import hashlib

    store = FeatureStore(redis_url)
    rec = record(fingerprint="fp9")
    await store.put(rec)
    r = redis.Redis.from_url(redis_url)
    key = record_key("fp9", ID)
    raw = r.hget(key, "embeds")
    assert r.hget(key, "checksum").decode() == checksum(raw) and checksum(raw).startswith("crc32:")
    r.hset(key, "checksum", hashlib.blake2b(raw, digest_size=16).hexdigest())  # as stored before
    got = await store.get("fp9", ID)
    assert got is not None and torch.equal(got.embeds, rec.embeds)
    damaged = bytearray(raw)
    damaged[7] ^= 0x01
    r.hset(key, "embeds", bytes(damaged))
    with pytest.raises(ApiError) as err:
        await store.get("fp9", ID)
    assert err.value.code == "corrupt_features" and not r.exists(key)
    await store.close()


async def test_large_embeddings_are_checksummed_off_the_loop_and_read_back(redis_url):
    store = FeatureStore(redis_url)
    big = ImageRecord(ID, "fp9", "tiny", (1, 64, 64), torch.randn(1024, 1024).to(torch.bfloat16))  # 2 MiB
    await store.put(big)
    got = await store.get("fp9", ID)
    assert got is not None and torch.equal(got.embeds, big.embeds)
    await store.close()


# -- junk at the keys the store reads: 404/409, never a 500, never a 503 or a lock that lasts ---------


@pytest.fixture
async def both(redis_url) -> AsyncIterator[tuple[FeatureStore, redis.Redis]]:
    store, r = FeatureStore(redis_url), redis.Redis.from_url(redis_url)
    yield store, r
    r.close()
    await store.close()


@pytest.mark.parametrize("kind", ["hash", "list", "zset", "not utf-8", "a megabyte"])
async def test_junk_in_the_id_index_is_no_other_model(both, kind):
    store, r = both
    junk(r, latest_key(ID), kind)
    assert await store.other_fingerprint("fp1", ID) is None
    await store.put(record())  # and a store replaces it
    assert await store.other_fingerprint("fp2", ID) == "fp1"


@pytest.mark.parametrize("value", [b"\xff\xfe\xfd", b"x" * 1_000_000, b"fp\r\n1", b""])
async def test_junk_values_are_no_fingerprint(both, value):
    store, r = both
    r.set(latest_key(ID), value)
    r.hset(REGISTRY, "model-key", value)
    assert await store.other_fingerprint("fp1", ID) is None
    assert await store.registered_fingerprint("model-key") is None


@pytest.mark.parametrize("kind", ["not utf-8", "list"])
async def test_junk_where_the_registry_belongs_is_replaced(both, kind):
    store, r = both
    junk(r, REGISTRY, kind)
    assert await store.registered_fingerprint("model-key") is None  # not a 503
    await store.put(record(), model_key="model-key")  # the record, and the registration, are stored
    assert await store.registered_fingerprint("model-key") == "fp1"
    assert (await store.get("fp1", ID)) is not None
    junk(r, REGISTRY, kind)
    await store.register_model("model-key", "fp2")
    assert await store.registered_fingerprint("model-key") == "fp2"


@pytest.mark.parametrize("kind", ["hash", "list"])
async def test_junk_where_a_record_belongs_is_replaced_by_a_put(both, kind):
    store, r = both
    junk(r, record_key("fp1", ID), kind)  # a hash with a field no record has, or a list
    await store.put(record())
    assert (await store.get("fp1", ID)) is not None and not r.hexists(record_key("fp1", ID), "junk")


@pytest.mark.parametrize("kind", ["hash", "list", "zset"])
async def test_a_lock_key_of_another_type_is_no_lock(both, kind):
    store, r = both
    lock = lock_key("fp1", ID)
    junk(r, lock, kind)
    assert await store.lock("fp1", ID, ttl_s=2)
    await store.extend_lock("fp1", ID, ttl_s=2)
    await store.unlock("fp1", ID)
    assert not r.exists(lock)
    junk(r, lock, kind)  # and one that turned into junk while we held it
    assert await store.lock_unless_stored("fp1", ID, ttl_s=2)
    junk(r, lock, kind)
    await store.extend_lock("fp1", ID, ttl_s=2)  # neither fails nor touches it
    await store.unlock("fp1", ID)
    assert r.type(lock) == kind.encode()


@pytest.mark.parametrize("ttl_ms", [None, 3_600_000])
async def test_a_lock_without_a_lease_expires_within_one(both, ttl_ms):
    """A lock key no live worker set (no TTL, or an hour's) blocked an image's uploads for good: it
    gets one lease, and is taken once that ran out."""
    store, r = both
    lock = lock_key("fp1", ID)
    r.set(lock, "someone", px=ttl_ms)
    started = asyncio.get_running_loop().time()
    assert not await store.lock("fp1", ID, ttl_s=1)
    assert 0 < r.pttl(lock) <= MAX_LOCK_LEASE_S * 1000
    assert await store.wait_for("fp1", ID, timeout_s=10) is None  # the lock went, no record came
    assert await store.lock("fp1", ID, ttl_s=1)
    assert asyncio.get_running_loop().time() - started < MAX_LOCK_LEASE_S + 1
