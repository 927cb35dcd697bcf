"""The feature store: image embeddings in Redis, keyed by model fingerprint and image id.

Layout (one Redis hash per image and model); ``{image_id}`` with its braces is a Redis Cluster hash
tag, so all of one image's keys live in one hash slot and its transaction and scripts stay atomic:

    splitvl:{<image_id>}:<fingerprint>        embeds (raw bytes, stored dtype, row-major), dtype,
                                              shape, grid_thw, checksum, model, created; for a
                                              family with DeepStack features (Qwen3-VL) also
                                              deepstack (raw bytes, [L, *shape]) and
                                              deepstack_layers (L), under the same checksum as
                                              embeds, so no reader sees half of them
    splitvl:{<image_id>}:latest               fingerprint of the latest write (tells 404 from 409)
    splitvl:{<image_id>}:<fingerprint>:lock   short-lived lock: concurrent uploads of one image
                                              across workers compute it once
    splitvl:models                            model key -> fingerprint (``service.fingerprint``)

The URL may name a single Redis or any node of a Redis Cluster: which one is found on first contact
(``INFO cluster``), and a cluster gets redis-py's cluster client. Redis' own ``maxmemory`` + LRU
eviction bounds memory; an optional TTL applies to every key of an image.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
import torch
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ClusterDownError, ClusterError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import ApiError, unavailable
from service.fingerprint import REGISTRY

log = logging.getLogger(__name__)

PREFIX = "splitvl"
T = TypeVar("T")

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}") from None


# The longest lease a compute lock is ever taken or renewed for (workers take min(this, their
# request timeout)): a lock key with a longer TTL, or none, was not set by a live worker.
MAX_LOCK_LEASE_S = 3.0

# An image's compute lock (KEYS[1]), unless its record (KEYS[2], optional) is stored: -1 when it is
# (no lock taken), else 1 taken, 0 held by another. Atomic, so no worker stores the record between
# the check and the lock, and a lock is never taken only to be dropped again. The lock's value is
# the taker's token (ARGV[1]; lease ARGV[2] ms): the connection's one retry re-sends the same token,
# so an attempt whose reply was lost after it took the lock finds its own token and has it, where a
# bare SET NX would answer "held by another" and the worker would wait a lease on its own lock.
# Junk at the lock key never blocks an image for good: a key of another type is not a lock (it is
# replaced), and one without a TTL, or with a TTL longer than any lease (ARGV[3] ms), gets that
# lease: it expires then unless its holder, alive, renews it.
# The record is not read here: a stored record's fields come from HMGET (``get``), since a Lua
# script that returned them would copy the ~1 MB of embeddings in Redis twice more per hit.
_TAKE_LOCK = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'string' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 or ttl > tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 0
"""
# Extend (ARGV[2] ms) or, without ARGV[2], delete the lock only while it holds our token (ARGV[1]):
# a worker whose lease ran out must not extend or free the lock another worker has taken since.
_OWN_LOCK = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""

# A record written on a Redis Cluster (KEYS: record, latest fingerprint, and the compute lock to free
# when given; ARGV: TTL in s (0: none), fingerprint, then the record's field/value pairs): what the
# single server's MULTI does, in one script. redis-py's async cluster client runs a transaction's
# every queued command on a thread and event loop of its own, which blocks ours and deadlocks once it
# must re-read the slot map (a failover); a script is atomic too and follows MOVED and ASK as any
# command does. It costs Redis one more copy of the embeddings than MULTI, so one server keeps MULTI.
# Whatever held the record's key goes first (a damaged record's other fields, junk of another type).
_PUT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SET', KEYS[2], ARGV[2])
if KEYS[3] then redis.call('DEL', KEYS[3]) end
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""

# What a fingerprint may look like (``service.fingerprint`` writes hex). Read back from the id index or
# the registry, anything else (bytes that are not text, a megabyte, control characters) is junk,
# taken as absent.
_FINGERPRINT = re.compile(r"[\w.-]{1,64}", re.ASCII)


def fingerprint_of(raw: bytes | None) -> str | None:
    """The fingerprint stored in ``raw``, or None when there is none or it is not one."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else None
    return text if text is not None and _FINGERPRINT.fullmatch(text) else None


def is_wrongtype(exc: BaseException) -> bool:
    """Redis' answer to a command on a key of another type: junk where our key belongs."""
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


# CRC-32 guards the stored bytes against damage and truncation, which is all a checksum here can do:
# any unkeyed digest is recomputed by whoever can write to Redis. zlib's runs at ~5 GB/s where blake2b
# took ~1.1 ms of CPU per 2B image (786 KB), on every store and every read of the embeddings.
_CRC32 = "crc32:"
# up to this size (~0.2 ms of CRC-32) checksummed on the event loop, as the upload's sha256 is: the hop
# to a thread cost about as much CPU as it took off the loop (bench/upload_path_cpu.py)
_INLINE_BYTES = 1 << 20


def checksum(*parts: bytes | memoryview) -> str:
    """CRC-32 of the parts' bytes, one after the other (the embeddings, then any DeepStack bytes)."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return f"{_CRC32}{crc:08x}"


def checksum_matches(digest: str, *parts: bytes) -> bool:
    """Whether ``parts`` have the stored checksum: CRC-32, or the blake2b-128 hex digest of records
    stored before CRC-32 (one part; still read, not rewritten)."""
    if digest.startswith(_CRC32):
        return checksum(*parts) == digest
    return len(parts) == 1 and hashlib.blake2b(parts[0], digest_size=16).hexdigest() == digest


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    fingerprint: str
    model: str
    grid_thw: tuple[int, int, int]
    embeds: torch.Tensor  # [num_tokens, hidden_size], CPU, stored dtype
    deepstack: torch.Tensor | None = None  # [L, num_tokens, hidden_size] (Qwen3-VL), same dtype

    @classmethod
    def from_features(cls, image_id: str, fingerprint: str, model: str, grid_thw: tuple[int, int, int],
                      features: torch.Tensor) -> ImageRecord:
        """From the vision encoder's stacked features [1 + L, num_tokens, hidden_size]."""
        return cls(image_id, fingerprint, model, grid_thw, features[0], features[1:] if len(features) > 1 else None)

    @property
    def deepstack_layers(self) -> int:
        return 0 if self.deepstack is None else int(self.deepstack.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.embeds.shape[1])

    def metadata(self, *, cached: bool | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image_id": self.image_id,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "grid_thw": list(self.grid_thw),
            "num_tokens": self.num_tokens,
            "hidden_size": self.hidden_size,
            "dtype": dtype_name(self.embeds.dtype),
        }
        if self.deepstack is not None:
            out["deepstack_layers"] = self.deepstack_layers
        if cached is not None:
            out["cached"] = cached
        return out


# per stored dtype, the unsigned view of its elements and their exponent bits: all ones is NaN or ±inf
_EXPONENT_BITS: dict[torch.dtype, tuple[type[np.unsignedinteger], int]] = {
    torch.float32: (np.uint32, 0x7F800000), torch.bfloat16: (np.uint16, 0x7F80), torch.float16: (np.uint16, 0x7C00)}


# all_finite works through the bytes in steps of this many elements, into a buffer each thread keeps:
# a temporary the size of the features (~786 KB) per call cost ~60 us of page faults in the server
_FINITE_STEP = 1 << 16
_scratch = threading.local()


def all_finite(data: bytes | memoryview, dtype: torch.dtype) -> bool:
    """Whether no element of ``data`` (raw ``dtype`` values) is NaN or infinite: none has its exponent
    bits all ones. On the bytes, so that one check serves a tensor's memory and what Redis returned,
    copying neither (a 2B image's 786 KB of bf16: ~30 us). Every feature tensor of a record is held
    to it when stored and when loaded: a NaN spreads through the attention of every question on the
    image, and a sampled one fails."""
    uint, exponent = _EXPONENT_BITS[dtype]
    bits = np.frombuffer(data, uint)  # [numel] no copy
    scratch = getattr(_scratch, uint.__name__, None)
    if scratch is None:
        scratch = np.empty(_FINITE_STEP, uint)
        setattr(_scratch, uint.__name__, scratch)
    for start in range(0, bits.size, _FINITE_STEP):
        part = bits[start : start + _FINITE_STEP]
        exponents = np.bitwise_and(part, exponent, out=scratch[: part.size])
        if int(exponents.max()) >= exponent:
            return False
    return True


def _bytes_of(t: torch.Tensor) -> memoryview:
    # the tensor's own memory, not a copy: redis-py sends a memoryview as it is (a fresh ~1 MB bytes
    # object per upload cost page faults under load), and nothing writes to the embeddings meanwhile
    return memoryview(t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy())


def _serialize(record: ImageRecord) -> tuple[list[memoryview], str]:
    """The record's feature bytes (embeddings, then DeepStack if any) and their one checksum."""
    parts = [_bytes_of(record.embeds)] + ([] if record.deepstack is None else [_bytes_of(record.deepstack)])
    return parts, checksum(*parts)


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def checked_meta(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A meta tensor of ``shape`` for bytes that ``tensor_from_bytes`` would accept, without its copy
    (~786 KB a 2B image, per cached upload): the same size check, none of the memory."""
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes do not hold a {list(shape)} {dtype_name(dtype)} tensor")
    return torch.empty(shape, dtype=dtype, device="meta")


def record_key(fingerprint: str, image_id: str) -> str:
    return f"{PREFIX}:{{{image_id}}}:{fingerprint}"


def lock_key(fingerprint: str, image_id: str) -> str:
    return f"{PREFIX}:{{{image_id}}}:{fingerprint}:lock"


def latest_key(image_id: str) -> str:
    return f"{PREFIX}:{{{image_id}}}:latest"


Client = aioredis.Redis | RedisCluster
# What a Redis failure raises: redis-py's errors, a socket's, and the cluster client's own (a cluster
# it cannot map, e.g. while a failover leaves slots without a master), which are not RedisErrors.
REDIS_FAILURES = (RedisError, OSError, RedisClusterException)
# A cluster client retries a command whose node failed (after re-reading the slot map) and a
# transaction that met a MOVED or ASK redirection (a slot migrating): a few tries with short
# jittered waits ride out a resharding; a dead master still answers within about a second.
CLUSTER_RETRIES = 6
# While a slot migrates, redis-py's cluster client sends ASKING on one pooled connection and the
# command on another, which the importing node answers with MOVED back to the source: the command
# bounces until its 16 hops are spent ("TTL exhausted") or the slot has moved. Our own tries, after
# these waits, outlast one slot's migration (the commands bounced are never executed: safe to repeat).
REDIRECT_WAITS_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


async def open_client(url: str, timeout_s: float) -> Client:
    """A client for the Redis at ``url``: the cluster client when that node runs in cluster mode."""
    # After Redis restarts, every pooled connection that sat idle through the outage is closed at
    # the server's end and fails its next command: one immediate retry on a fresh connection hides
    # that. Without it (from_url gives the connections no retry), a restart cost one 503 per idle
    # connection. Timeouts are not retried: a slow server would double every wait.
    single = aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    try:
        clustered = int((await single.info("cluster")).get("cluster_enabled", 0)) == 1
    except ResponseError:  # INFO refused (renamed by a managed service): a single server
        clustered = False
    except BaseException:
        await single.aclose()
        raise
    if not clustered:
        return single
    await single.aclose()
    # A MOVED (a slot migrated) corrects that one slot in the client's map (reinitialize_steps=0): by
    # default every fifth re-read the whole map and closed every connection, commands in flight too.
    cluster = RedisCluster.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), CLUSTER_RETRIES), reinitialize_steps=0,
    )
    try:
        return await cluster.initialize()
    except BaseException:
        await cluster.aclose()
        raise


def _closed_transport(exc: BaseException) -> bool:
    """uvloop's error for a write to a socket already closed (a node that died, a reset connection),
    where asyncio's own loop drops the write and redis-py then raises a ConnectionError."""
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


async def _on_live_connection(op: Callable[[Client], Awaitable[T]], client: Client) -> T:
    """``op(client)``, tried once more when a pooled connection's socket was closed under it. redis-py
    drops that connection, and nothing reached the server (the write failed), so the retry is safe
    even for a script. It is the same single retry that ``open_client`` configures for a
    ConnectionError, which redis-py cannot apply because it does not know this error. Without it,
    during a failover this error was a 500, and the connection uvicorn then closed cost the next
    request too."""
    for retry in (False, True):
        try:
            return await op(client)
        except RuntimeError as exc:
            if not _closed_transport(exc):
                raise
            if retry:
                raise RedisConnectionError("the connection was closed") from exc
    raise AssertionError("unreachable")


_last_logged = 0.0  # monotonic time of the last Redis failure written to the log


def store_unavailable(exc: BaseException) -> ApiError:
    """The 503 for a failed Redis call. Its message says what happened, never where: redis-py's text
    names the server's address, which is for our log (a line every 10 s at most while it lasts),
    not for clients."""
    global _last_logged
    if time.monotonic() - _last_logged >= 10.0:
        _last_logged = time.monotonic()
        log.warning("feature store (Redis) call failed: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, (RedisTimeoutError, TimeoutError)):
        what = "did not answer in time"
    elif isinstance(exc, ResponseError):
        # the server's error class (OOM, READONLY, LOADING, ...), without the rest, which may name other
        # nodes (a cluster's MOVED): redis-py keeps the class it strips from the errors it knows
        # (OutOfMemoryError, ReadOnlyError, ...) as status_code; an unknown one's text starts with it
        kind = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
        what = f"refused the command ({kind})" if kind.isalpha() and kind.isupper() else "refused the command"
    elif isinstance(exc, (RedisConnectionError, OSError)):
        what = "is unreachable"
    else:
        what = "failed"
    return unavailable("redis_unavailable", f"the feature store (Redis) {what}; retry shortly", 2.0)


class FeatureStore:
    """Async access to the feature store. Every Redis failure becomes a 503 with ``Retry-After``."""

    def __init__(self, url: str, *, ttl_s: int | None = None, timeout_s: float = 5.0) -> None:
        self.url = url
        self.ttl_s = ttl_s or None
        self.timeout_s = timeout_s
        # opened on first use, not here: a worker starts while Redis is still down and finds it later
        self._client: Client | None = None
        self._opening: asyncio.Task[Client] | None = None  # the one attempt that callers meanwhile share
        self._tokens: dict[str, str] = {}  # lock key -> the token of the lock this store holds

    @property
    def cluster(self) -> bool:
        return isinstance(self._client, RedisCluster)

    async def client(self) -> Client:
        """The Redis client, opened (and told single from cluster) by the first call that reaches Redis;
        calls meanwhile share that attempt rather than queue one connect timeout each behind it."""
        if self._client is not None:
            return self._client
        if self._opening is None:
            self._opening = asyncio.create_task(self._open(), name="feature-store-open")
            self._opening.add_done_callback(lambda t: t.cancelled() or t.exception())  # failure seen by its callers
        return await asyncio.shield(self._opening)

    async def _open(self) -> Client:
        try:
            client = await open_client(self.url, self.timeout_s)
        finally:
            self._opening = None  # a failed attempt is made again by the next call
        # EVALSHA by its digest; redis-py loads the script again when the server answers NOSCRIPT
        # (a restarted or flushed Redis, a promoted replica)
        self._take_lock = client.register_script(_TAKE_LOCK)
        self._own_lock = client.register_script(_OWN_LOCK)
        self._put = client.register_script(_PUT)
        self._client = client
        return client

    async def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._client is not None:
            await self._client.aclose()

    async def ping(self) -> bool:
        """Whether the store can serve: the server answers; a cluster also has every slot served."""
        try:
            client = await self.client()
            if isinstance(client, RedisCluster):
                return (await _on_live_connection(lambda c: c.cluster_info(), client)).get("cluster_state") == "ok"
            return bool(await _on_live_connection(lambda c: c.ping(), client))
        except REDIS_FAILURES:
            return False

    async def _call(self, op: Callable[[Client], Awaitable[T]]) -> T:
        try:
            client = await self.client()
            for wait_s in REDIRECT_WAITS_S:
                try:
                    return await _on_live_connection(op, client)
                except ClusterError as exc:  # redirections that outlasted redis-py's hops: a slot mid-migration
                    if isinstance(exc, ClusterDownError):
                        raise
                await asyncio.sleep(wait_s)
            return await _on_live_connection(op, client)
        except REDIS_FAILURES as exc:
            raise store_unavailable(exc) from exc

    async def put(self, record: ImageRecord, *, model_key: str | None = None, release_lock: bool = False) -> None:
        """Store the record in one round trip, there also registering its fingerprint under ``model_key``
        and releasing this image's compute lock when asked."""
        if record.deepstack is not None and tuple(record.deepstack.shape[1:]) != tuple(record.embeds.shape):
            raise ValueError(f"deepstack {list(record.deepstack.shape)} does not fit embeds {list(record.embeds.shape)}")
        if not record.model.isprintable():  # get refuses such a record: it would be stored only to be dropped
            raise ValueError(f"model name {record.model!r} is not printable text")
        # large embeddings: copied and checksummed on a thread, not the event loop (zlib releases the GIL)
        nbytes = record.embeds.nbytes + (0 if record.deepstack is None else record.deepstack.nbytes)
        parts, digest = _serialize(record) if nbytes <= _INLINE_BYTES else await asyncio.to_thread(_serialize, record)
        if not all(all_finite(part, record.embeds.dtype) for part in parts):
            raise ApiError(409, "corrupt_features", f"encoding image {record.image_id} gave features that are not "
                           "finite (NaN or infinite values); they were not stored")
        mapping = {
            "embeds": parts[0],
            "dtype": dtype_name(record.embeds.dtype),
            "shape": json.dumps(list(record.embeds.shape)),
            "grid_thw": json.dumps(list(record.grid_thw)),
            "checksum": digest,
            "model": record.model,
            "created": str(time.time()),
        }
        if record.deepstack is not None:
            mapping |= {"deepstack": parts[1], "deepstack_layers": str(record.deepstack_layers)}
        key = record_key(record.fingerprint, record.image_id)
        latest = latest_key(record.image_id)
        lock = lock_key(record.fingerprint, record.image_id)

        def transaction(r: aioredis.Redis) -> Awaitable[list[Any]]:
            pipe = r.pipeline(transaction=True)
            pipe.delete(key)  # whatever was there: a damaged record's other fields, junk of another type
            pipe.hset(key, mapping=mapping)
            if release_lock:  # a plain DEL: the record it guards is stored in the same transaction
                pipe.delete(lock)
            pipe.set(latest, record.fingerprint)
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
                pipe.expire(latest, self.ttl_s)
            if model_key is not None:  # last: the answer looked at below
                pipe.hset(REGISTRY, model_key, record.fingerprint)
            # every command runs (a transaction does not stop at an error); each answer is looked at
            return pipe.execute(raise_on_error=False)

        async def script(r: RedisCluster) -> list[Any]:
            keys = [key, latest, lock] if release_lock else [key, latest]
            fields = [item for pair in mapping.items() for item in pair]
            writes = [self._put(keys=keys, args=[self.ttl_s or 0, record.fingerprint, *fields])]
            if model_key is not None:  # the registry lives in another slot, likely on another node
                writes.append(r.hset(REGISTRY, model_key, record.fingerprint))
            done = await asyncio.gather(*writes, return_exceptions=True)
            if isinstance(done[0], BaseException):  # the record's write: raised, for _call to retry a redirection
                raise done[0]
            return done

        results = await self._call(lambda r: script(r) if isinstance(r, RedisCluster) else transaction(r))
        if release_lock:  # freed with the record; until it is stored, the caller's unlock frees it
            self._tokens.pop(lock, None)
        for i, result in enumerate(results):
            if not isinstance(result, BaseException):
                continue
            if model_key is not None and i == len(results) - 1 and is_wrongtype(result):
                await self.register_model(model_key, record.fingerprint)  # replaces the junk there
            else:
                raise store_unavailable(result) from result

    async def get(self, fingerprint: str, image_id: str, *, with_embeds: bool = True,
                  load: bool = True) -> ImageRecord | None:
        """The record, or None when absent. A record that fails its checks is refused (and dropped).
        With ``load=False`` the embeddings are read and checked all the same, but not copied into a
        tensor: the record's embeds are a meta tensor of their shape (for an answer of metadata only)."""
        key = record_key(fingerprint, image_id)
        fields = ["dtype", "shape", "grid_thw", "checksum", "model", "deepstack_layers"] + (
            ["embeds", "deepstack"] if with_embeds else [])
        try:
            values = await self._call(lambda r: r.hmget(key, fields))
        except ApiError as exc:
            if not is_wrongtype(exc.__cause__):
                raise
            raise await self._drop_corrupt(key, image_id, "not a hash") from exc  # not ours to serve
        got = dict(zip(fields, values, strict=True))
        if all(v is None for v in values):
            return None
        try:
            dtype = parse_dtype(got["dtype"].decode())
            shape = tuple(json.loads(got["shape"]))
            grid = tuple(json.loads(got["grid_thw"]))
            if len(shape) != 2 or len(grid) != 3 or not all(
                    type(x) is int and x > 0 for x in (*shape, *grid)):
                raise ValueError(f"shape {list(shape)} and grid_thw {list(grid)} must be 2 and 3 positive integers")
            model = got["model"].decode()
            if not model.isprintable():  # it goes into response headers (X-Splitvl-Model)
                raise ValueError("the model name is not printable text")
            layers = int(got["deepstack_layers"] or 0)
            if layers < 0:
                raise ValueError(f"deepstack_layers {layers} is negative")
            deep_shape = (layers, *shape)
            if with_embeds:
                parts = [got["embeds"] or b""] + ([got["deepstack"] or b""] if layers else [])
                digest = got["checksum"].decode()
                # a legacy blake2b digest is ~1 ms per 786 KB: always a thread for that one
                inline = sum(map(len, parts)) <= _INLINE_BYTES and digest.startswith(_CRC32)
                if not (checksum_matches(digest, *parts) if inline
                        else await asyncio.to_thread(checksum_matches, digest, *parts)):
                    raise ValueError("checksum mismatch")
                if not all(all_finite(part, dtype) for part in parts):  # a checksum matches whatever was written
                    raise ValueError("the features hold NaN or infinite values")
                read = tensor_from_bytes if load else checked_meta
                embeds = read(parts[0], dtype, shape)
                deepstack = read(parts[1], dtype, deep_shape) if layers else None
            else:
                embeds = torch.empty(shape, dtype=dtype, device="meta")
                deepstack = torch.empty(deep_shape, dtype=dtype, device="meta") if layers else None
        except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
            raise await self._drop_corrupt(key, image_id, str(exc)) from exc
        return ImageRecord(image_id, fingerprint, model, grid, embeds, deepstack)  # type: ignore[arg-type]

    async def _drop_corrupt(self, key: str, image_id: str, reason: str) -> ApiError:
        await self._call(lambda r: r.delete(key))
        return ApiError(
            409, "corrupt_features",
            f"stored features for image {image_id} are corrupt ({reason}); they were dropped: upload the image again",
        )

    async def drop(self, record: ImageRecord, reason: str) -> ApiError:
        """Drop a record that does not fit the model reading it; the error to answer with."""
        return await self._drop_corrupt(record_key(record.fingerprint, record.image_id), record.image_id, reason)

    async def exists(self, fingerprint: str, image_id: str) -> bool:
        return bool(await self._call(lambda r: r.exists(record_key(fingerprint, image_id))))

    async def delete(self, fingerprint: str, image_id: str) -> bool:
        removed = await self._call(lambda r: r.delete(record_key(fingerprint, image_id)))
        return bool(removed)

    async def _read_or_none(self, op: Callable[[Client], Awaitable[T]]) -> T | None:
        """A read of one of our keys where junk of another type is taken as nothing stored."""
        try:
            return await self._call(op)
        except ApiError as exc:
            if is_wrongtype(exc.__cause__):
                return None
            raise

    async def other_fingerprint(self, fingerprint: str, image_id: str) -> str | None:
        """The fingerprint this image was last stored under, when that is not ours and still present."""
        other = fingerprint_of(await self._read_or_none(lambda r: r.get(latest_key(image_id))))
        if other is None or other == fingerprint or not await self.exists(other, image_id):
            return None
        return other

    async def register_model(self, model_key: str, fingerprint: str) -> None:
        try:
            await self._call(lambda r: r.hset(REGISTRY, model_key, fingerprint))
        except ApiError as exc:
            if not is_wrongtype(exc.__cause__):
                raise
            # junk of another type where the registry belongs: it held no registration, the hash replaces it
            log.warning("the model registry %s held a value of another type; replaced", REGISTRY)
            await self._call(lambda r: r.delete(REGISTRY))
            await self._call(lambda r: r.hset(REGISTRY, model_key, fingerprint))

    async def registered_fingerprint(self, model_key: str) -> str | None:
        return fingerprint_of(await self._read_or_none(lambda r: r.hget(REGISTRY, model_key)))

    async def _take(self, fingerprint: str, image_id: str, ttl_s: float, *, unless_stored: bool) -> int:
        lock = lock_key(fingerprint, image_id)
        token = os.urandom(8).hex()
        keys = [lock, record_key(fingerprint, image_id)] if unless_stored else [lock]
        lease_ms = int(min(ttl_s, MAX_LOCK_LEASE_S) * 1000)
        taken = int(await self._call(lambda _: self._take_lock(keys=keys, args=[token, lease_ms,
                                                                               int(MAX_LOCK_LEASE_S * 1000)])))
        if taken == 1:
            self._tokens[lock] = token
        return taken

    async def lock(self, fingerprint: str, image_id: str, ttl_s: float) -> bool:
        """Take this image's compute lock for ``ttl_s``: False when another holder has it."""
        return await self._take(fingerprint, image_id, ttl_s, unless_stored=False) == 1

    async def lock_unless_stored(self, fingerprint: str, image_id: str, ttl_s: float) -> bool | None:
        """Take this image's compute lock in the same round trip that checks for its record: True when
        taken, False when another holder has it, None when the record is stored already (a worker
        that stored it between our miss and now; no lock is taken)."""
        taken = await self._take(fingerprint, image_id, ttl_s, unless_stored=True)
        return None if taken == -1 else bool(taken)

    async def extend_lock(self, fingerprint: str, image_id: str, ttl_s: float) -> None:
        """Renew the lease of a lock this store holds (nothing when it lost it)."""
        lock = lock_key(fingerprint, image_id)
        token = self._tokens.get(lock)
        if token is not None:
            lease_ms = int(min(ttl_s, MAX_LOCK_LEASE_S) * 1000)
            await self._call(lambda _: self._own_lock(keys=[lock], args=[token, lease_ms]))

    async def unlock(self, fingerprint: str, image_id: str) -> None:
        """Free a lock this store holds; one another worker took after our lease ran out stays."""
        lock = lock_key(fingerprint, image_id)
        token = self._tokens.pop(lock, None)
        if token is not None:
            await self._call(lambda _: self._own_lock(keys=[lock], args=[token]))

    async def wait_for(self, fingerprint: str, image_id: str, timeout_s: float) -> ImageRecord | None:
        """Wait while another worker holds the lock for this image; None when it gave up or it expired."""
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        lock = lock_key(fingerprint, image_id)
        while time.monotonic() < deadline:
            record = await self.get(fingerprint, image_id)
            if record is not None:
                return record
            if not await self._call(lambda r: r.exists(lock)):
                # the holder stores the record and drops the lock in one transaction: look once more,
                # or a record written between the two reads would be computed again
                return await self.get(fingerprint, image_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        return None
