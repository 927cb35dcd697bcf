"""The feature store: image embeddings in Redis, keyed by model fingerprint and image id.

Layout (one Redis hash per image and model):

    splitvl:{fingerprint}:{image_id}   embeds (raw bytes, stored dtype, row-major), dtype, shape,
                                       grid_thw, checksum, model, created; for a family with
                                       DeepStack features (Qwen3-VL) also deepstack (raw bytes,
                                       [L, *shape]) and deepstack_layers (L), under the same
                                       checksum as embeds, so no reader sees half of them
    splitvl:id:{image_id}              fingerprint of the latest write (tells 404 from 409)
    splitvl:lock:{fingerprint}:{id}    short-lived lock: concurrent uploads of one image across
                                       workers compute it once

Redis' own ``maxmemory`` + LRU eviction bounds memory; an optional TTL applies to every key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from service.errors import ApiError, unavailable
from service.fingerprint import REGISTRY

PREFIX = "splitvl"

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}") from None


# An image's compute lock (KEYS[1]), unless its record (KEYS[2], optional) is stored: -1 when it is
# (no lock taken), else 1 taken, 0 held by another. Atomic, so no worker stores the record between
# the check and the lock, and a lock is never taken only to be dropped again. The lock's value is
# the taker's token (ARGV[1]; lease ARGV[2] ms): the connection's one retry re-sends the same token,
# so an attempt whose reply was lost after it took the lock finds its own token and has it, where a
# bare SET NX would answer "held by another" and the worker would wait a lease on its own lock.
# The record is not read here: a stored record's fields come from HMGET (``get``), since a Lua
# script that returned them would copy the ~1 MB of embeddings in Redis twice more per hit.
_TAKE_LOCK = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# Extend (ARGV[2] ms) or, without ARGV[2], delete the lock only while it holds our token (ARGV[1]):
# a worker whose lease ran out must not extend or free the lock another worker has taken since.
_OWN_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""


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


class FeatureStore:
    """Async access to the feature store. Every Redis failure becomes a 503 with ``Retry-After``."""

    def __init__(self, url: str, *, ttl_s: int | None = None, timeout_s: float = 5.0) -> None:
        self.url = url
        self.ttl_s = ttl_s or None
        # After Redis restarts, every pooled connection that sat idle through the outage is closed
        # at the server's end and fails its next command: one immediate retry on a fresh connection
        # hides that. Without it (from_url gives the connections no retry), a restart cost one 503 per
        # idle connection. Timeouts are not retried: a slow server would double every wait.
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        # EVALSHA by its digest; redis-py loads the script again when the server answers NOSCRIPT
        # (a restarted or flushed Redis)
        self._take_lock = self.redis.register_script(_TAKE_LOCK)
        self._own_lock = self.redis.register_script(_OWN_LOCK)
        self._tokens: dict[str, str] = {}  # lock key -> the token of the lock this store holds

    async def close(self) -> None:
        await self.redis.aclose()

    def key(self, fingerprint: str, image_id: str) -> str:
        return f"{PREFIX}:{fingerprint}:{image_id}"

    def _lock_key(self, fingerprint: str, image_id: str) -> str:
        return f"{PREFIX}:lock:{fingerprint}:{image_id}"

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def _call(self, coro):  # type: ignore[no-untyped-def]
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise unavailable("redis_unavailable", f"the feature store (Redis) is unreachable: {exc}", 2.0) from exc

    async def put(self, record: ImageRecord, *, model_key: str | None = None, release_lock: bool = False) -> None:
        """Store the record in one round trip, there also registering its fingerprint under ``model_key``
        and releasing this image's compute lock when asked."""
        # large embeddings: copied and checksummed on a thread, not the event loop (zlib releases the GIL)
        nbytes = record.embeds.nbytes + (0 if record.deepstack is None else record.deepstack.nbytes)
        parts, digest = _serialize(record) if nbytes <= _INLINE_BYTES else await asyncio.to_thread(_serialize, record)
        if record.deepstack is not None and tuple(record.deepstack.shape[1:]) != tuple(record.embeds.shape):
            raise ValueError(f"deepstack {list(record.deepstack.shape)} does not fit embeds {list(record.embeds.shape)}")
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
        key = self.key(record.fingerprint, record.image_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=mapping)
        if model_key is not None:
            pipe.hset(REGISTRY, model_key, record.fingerprint)
        if release_lock:  # a plain DEL: the record it guards is stored in the same transaction
            lock_key = self._lock_key(record.fingerprint, record.image_id)
            self._tokens.pop(lock_key, None)
            pipe.delete(lock_key)
        pipe.set(f"{PREFIX}:id:{record.image_id}", record.fingerprint)
        if self.ttl_s:
            pipe.expire(key, self.ttl_s)
            pipe.expire(f"{PREFIX}:id:{record.image_id}", self.ttl_s)
        await self._call(pipe.execute())

    async def get(self, fingerprint: str, image_id: str, *, with_embeds: bool = True,
                  load: bool = True) -> ImageRecord | None:
        """The record, or None when absent. A record that fails its checks is refused (and dropped).
        With ``load=False`` the embeddings are read and checked all the same, but not copied into a
        tensor: the record's embeds are a meta tensor of their shape (for an answer of metadata only)."""
        key = self.key(fingerprint, image_id)
        fields = ["dtype", "shape", "grid_thw", "checksum", "model", "deepstack_layers"] + (
            ["embeds", "deepstack"] if with_embeds else [])
        try:
            values = await self.redis.hmget(key, fields)
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise unavailable("redis_unavailable", f"the feature store (Redis) failed: {exc}", 2.0) from exc
            raise await self._drop_corrupt(key, image_id, "not a hash") from exc  # not ours to serve
        except (RedisError, OSError) as exc:
            raise unavailable("redis_unavailable", f"the feature store (Redis) is unreachable: {exc}", 2.0) from exc
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
        await self._call(self.redis.delete(key))
        return ApiError(
            409, "corrupt_features",
            f"stored features for image {image_id} are corrupt ({reason}); they were dropped: upload the image again",
        )

    async def drop(self, record: ImageRecord, reason: str) -> ApiError:
        """Drop a record that does not fit the model reading it; the error to answer with."""
        return await self._drop_corrupt(self.key(record.fingerprint, record.image_id), record.image_id, reason)

    async def exists(self, fingerprint: str, image_id: str) -> bool:
        return bool(await self._call(self.redis.exists(self.key(fingerprint, image_id))))

    async def delete(self, fingerprint: str, image_id: str) -> bool:
        removed = await self._call(self.redis.delete(self.key(fingerprint, image_id)))
        return bool(removed)

    async def other_fingerprint(self, fingerprint: str, image_id: str) -> str | None:
        """The fingerprint this image was last stored under, when that is not ours and still present."""
        other = await self._call(self.redis.get(f"{PREFIX}:id:{image_id}"))
        if other is None:
            return None
        other_fp = other.decode()
        if other_fp == fingerprint or not await self.exists(other_fp, image_id):
            return None
        return other_fp

    async def register_model(self, model_key: str, fingerprint: str) -> None:
        await self._call(self.redis.hset(REGISTRY, model_key, fingerprint))

    async def registered_fingerprint(self, model_key: str) -> str | None:
        value = await self._call(self.redis.hget(REGISTRY, model_key))
        return value.decode() if value is not None else None

    async def _take(self, fingerprint: str, image_id: str, ttl_s: float, *, unless_stored: bool) -> int:
        lock_key = self._lock_key(fingerprint, image_id)
        token = os.urandom(8).hex()
        keys = [lock_key, self.key(fingerprint, image_id)] if unless_stored else [lock_key]
        taken = int(await self._call(self._take_lock(keys=keys, args=[token, int(ttl_s * 1000)])))
        if taken == 1:
            self._tokens[lock_key] = token
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
        lock_key = self._lock_key(fingerprint, image_id)
        token = self._tokens.get(lock_key)
        if token is not None:
            await self._call(self._own_lock(keys=[lock_key], args=[token, int(ttl_s * 1000)]))

    async def unlock(self, fingerprint: str, image_id: str) -> None:
        """Free a lock this store holds; one another worker took after our lease ran out stays."""
        lock_key = self._lock_key(fingerprint, image_id)
        token = self._tokens.pop(lock_key, None)
        if token is not None:
            await self._call(self._own_lock(keys=[lock_key], args=[token]))

    async def wait_for(self, fingerprint: str, image_id: str, timeout_s: float) -> ImageRecord | None:
        """Wait while another worker holds the lock for this image; None when it gave up or it expired."""
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        lock_key = self._lock_key(fingerprint, image_id)
        while time.monotonic() < deadline:
            record = await self.get(fingerprint, image_id)
            if record is not None:
                return record
            if not await self._call(self.redis.exists(lock_key)):
                # the holder stores the record and drops the lock in one transaction: look once more,
                # or a record written between the two reads would be computed again
                return await self.get(fingerprint, image_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        return None
