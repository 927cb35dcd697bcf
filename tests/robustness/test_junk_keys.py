"""Junk at the keys the service reads, as a buggy neighbour in a shared Redis (or someone with access
to it) writes it: 404 or 409, never a 500, never a 503 that does not end, never a lock that blocks an
image for good."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from service.checkpoint import open_checkpoint
from service.fingerprint import REGISTRY, model_key
from service.store import MAX_LOCK_LEASE_S, latest_key, lock_key

from . import assert_error, junk, png, upload


@dataclass
class Split:
    """A vision worker and an LLM worker sharing one Redis: the LLM worker learns the fingerprint
    from the registry, as in the split deployment."""

    vision: httpx.Client
    llm: httpx.Client
    r: redis.Redis
    fingerprint: str

    def ask(self, image_id: str) -> httpx.Response:
        return self.llm.post("/v1/questions", json={"image_id": image_id, "question": "what?", "max_tokens": 2})


@pytest.fixture
def split(make_app, redis_url, live_server) -> Iterator[Split]:
    r = redis.Redis.from_url(redis_url)
    with live_server(make_app("vision", redis_url=redis_url)) as v, \
            live_server(make_app("llm", redis_url=redis_url, max_new_tokens=4)) as llm, \
            httpx.Client(base_url=v.url, timeout=30) as vision, httpx.Client(base_url=llm.url, timeout=30) as ask:
        yield Split(vision, ask, r, vision.get("/readyz").json()["fingerprint"])
    r.close()


@pytest.mark.parametrize("kind", ["hash", "list", "not utf-8", "a megabyte"])
def test_junk_in_the_id_index(split, kind):
    """Where an image's latest fingerprint is expected: a non-UTF-8 string gave 500, a hash 503 for good."""
    unknown = hashlib.sha256(b"never uploaded").hexdigest()
    junk(split.r, latest_key(unknown), kind)
    assert_error(split.ask(unknown), 404, "image_not_found")
    chat = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"splitvl://images/{unknown}"}}, {"type": "text", "text": "?"}]}]}
    assert_error(split.llm.post("/v1/chat/completions", json=chat), 404, "image_not_found")
    image_id = upload(split.vision, png(56, 56, seed=1)).json()["image_id"]
    junk(split.r, latest_key(image_id), kind)
    assert split.ask(image_id).status_code == 200


@pytest.mark.parametrize("kind", ["hash", "list", "not utf-8"])
def test_junk_where_the_registry_belongs(split, kind):
    """The registry a vision worker writes and an LLM worker reads: refused for good (503) when it was
    not a hash; now taken as empty (404) and replaced by the next registration."""
    if kind == "hash":
        split.r.delete(REGISTRY)
        split.r.hset(REGISTRY, mapping={"a-model": "junk", "other": b"\xff"})
    else:
        junk(split.r, REGISTRY, kind)
    unknown = hashlib.sha256(b"never uploaded").hexdigest()
    assert_error(split.ask(unknown), 404, "image_not_found")
    r = upload(split.vision, png(56, 56, seed=2))
    assert r.status_code == 200, r.text
    assert split.ask(r.json()["image_id"]).status_code == 200


def test_a_wrong_registered_fingerprint_is_looked_up_again(make_app, redis_url, live_server, tiny_checkpoint):
    """An LLM worker that learned a fingerprint that does not name this model's features (junk, or
    vision workers since upgraded) reads the registry again on a miss, instead of 404 for good."""
    r = redis.Redis.from_url(redis_url)
    r.hset(REGISTRY, model_key(open_checkpoint(tiny_checkpoint)), "0123456789abcdef")
    with live_server(make_app("llm", redis_url=redis_url, max_new_tokens=4)) as llm, \
            httpx.Client(base_url=llm.url, timeout=30) as ask:  # learns the wrong one as it starts
        with live_server(make_app("vision", redis_url=redis_url)) as v, \
                httpx.Client(base_url=v.url, timeout=30) as vision:  # registers the right one
            image_id = upload(vision, png(56, 56, seed=3)).json()["image_id"]
        r = ask.post("/v1/questions", json={"image_id": image_id, "question": "what?", "max_tokens": 2})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("kind", ["hash", "list", "no TTL", "a day's TTL"])
def test_a_junk_lock_does_not_block_an_image(split, kind):
    """A compute lock key of another type blocked an image's uploads for good; one without a TTL for
    60 s, then 503, on every try. Now: taken at once, or within one lease."""
    data = png(64, 56, seed=4)
    lock = lock_key(split.fingerprint, hashlib.sha256(data).hexdigest())
    if kind in ("hash", "list"):
        junk(split.r, lock, kind)
    else:
        split.r.set(lock, "not a worker's token", px=None if kind == "no TTL" else 86_400_000)
    started = time.monotonic()
    r = upload(split.vision, data)
    assert r.status_code == 200 and r.json()["cached"] is False, r.text
    assert time.monotonic() - started < MAX_LOCK_LEASE_S + 2.0
    assert split.ask(r.json()["image_id"]).status_code == 200
