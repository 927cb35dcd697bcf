"""API keys: when set, every endpoint of either worker but /healthz needs ``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

import service.guard
from service.cli import main as cli_main
from service.config import Settings

from . import assert_error, png

KEYS = ["key-one-0123456789", "key-two-abcdefghij"]
IMAGE_ID = "ab" * 32


def endpoints(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every operation in the app's schema, path parameters filled in, plus the schema's."""
    out = [("GET", "/openapi.json")]
    for path, item in app.openapi()["paths"].items():
        for method in item:
            out.append((method.upper(), path.replace("{image_id}", IMAGE_ID)))
    return sorted(set(out))


def body_for(method: str, path: str) -> dict:
    if path == "/v1/questions":
        return {"json": {"image_id": IMAGE_ID, "question": "hi", "max_tokens": 1}}
    if path == "/v1/images" and method == "POST":
        return {"content": png(30, 30, seed=1), "headers": {"Content-Type": "image/png"}}
    if path.endswith("/completions"):
        return {"json": {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}}
    return {}


def bearer(token: str, scheme: str = "Bearer") -> dict[str, str | bytes]:
    return {"Authorization": f"{scheme} {token}"}


@pytest.fixture(params=["vision", "llm", "all"])
def secured(request, make_app, redis_url, live_server) -> Iterator[tuple[FastAPI, httpx.Client]]:
    app = make_app(request.param, redis_url=redis_url, api_keys=KEYS, max_new_tokens=4)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        yield app, client


WRONG: list[dict[str, str | bytes]] = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer \tx"},
    bearer("key-one"),  # a prefix of a key
    bearer(KEYS[0] + "x"),
    bearer(KEYS[0].upper()),
    bearer(KEYS[0], scheme="Basic"),
    bearer(KEYS[0], scheme="Token"),
    {"Authorization": KEYS[0]},
    {"Authorization": f"Bearer{KEYS[0]}"},
    {"Authorization": "Bearer \u00e9\u00e9".encode("utf-8")},  # raw non-ASCII bytes
    {"X-Api-Key": KEYS[0]},
]


def test_every_endpoint_but_healthz_needs_a_key(secured):
    app, client = secured
    routes = endpoints(app)
    assert ("GET", "/healthz") in routes and len(routes) >= 5, routes
    # the docs pages could not fetch the schema without a key: they are off
    for page in ("/docs", "/redoc"):
        assert_error(client.get(page), 401, "unauthorized")
        assert_error(client.get(page, headers=bearer(KEYS[0])), 404)
    checked = 0
    for method, path in routes:
        if path == "/healthz":
            assert client.request(method, path).status_code == 200
            continue
        for headers in WRONG:
            kwargs = body_for(method, path)
            kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
            r = client.request(method, path, **kwargs)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
            checked += 1
        for key in KEYS:
            kwargs = body_for(method, path)
            kwargs["headers"] = {**kwargs.get("headers", {}), **bearer(key)}
            r = client.request(method, path, **kwargs)
            assert r.status_code != 401, (method, path, r.text)
            assert r.status_code < 500 or r.status_code == 503, (method, path, r.text)
    assert checked >= 5 * len(WRONG)


def test_right_key_works_end_to_end(make_app, redis_url, live_server):
    app = make_app("all", redis_url=redis_url, api_keys=KEYS, max_new_tokens=4)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30, headers=bearer(KEYS[1])) as client:
        r = client.post("/v1/images", content=png(40, 40, seed=2), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        image_id = r.json()["image_id"]
        assert client.get(f"/v1/images/{image_id}").status_code == 200
        assert client.get(f"/v1/images/{image_id}/embeddings").status_code == 200
        r = client.post("/v1/questions", json={"image_id": image_id, "question": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert "/v1/questions" in client.get("/openapi.json").json()["paths"]
        # scheme and spacing as RFC 6750 allows: case-insensitive scheme
        assert client.get("/readyz", headers={"Authorization": f"bearer {KEYS[0]}"}).status_code == 200
        assert client.delete(f"/v1/images/{image_id}").status_code == 204


def test_unauthenticated_requests_learn_nothing(make_app, redis_url, live_server):
    """401 comes before body validation, routing of ids, or any Redis lookup."""
    app = make_app("all", redis_url=redis_url, api_keys=KEYS)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        assert_error(client.post("/v1/questions", content=b"{not json"), 401, "unauthorized")
        assert_error(client.post("/v1/questions", json={"image_id": "nope"}), 401, "unauthorized")
        assert_error(client.get("/v1/images/not-an-id"), 401, "unauthorized")
        assert_error(client.post("/v1/images", content=b"", headers={"Content-Type": "text/plain"}), 401,
                     "unauthorized")
        assert_error(client.get("/openapi.json"), 401, "unauthorized")
        metrics = client.get("/metrics", headers=bearer(KEYS[0])).text
        assert 'status="401"' in metrics


def test_no_keys_means_no_auth(make_app, redis_url, live_server):
    with live_server(make_app("vision", redis_url=redis_url)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("given,matching", [(KEYS[0], 0), (KEYS[1], 1), ("wrong", None), ("", None)])
def test_keys_are_compared_in_constant_time(monkeypatch, given, matching):
    """Every key is compared with hmac.compare_digest, with no early exit on a match."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(service.guard.hmac, "compare_digest", compare)

    token = service.guard.bearer_token([(b"authorization", f"Bearer {given}".encode())])
    assert service.guard.key_matches(token, [k.encode() for k in KEYS]) is (matching is not None)
    assert [b for _, b in calls] == [k.encode() for k in KEYS]  # all keys, in order, whatever matched
    assert all(a == given.encode() for a, _ in calls)


@pytest.mark.parametrize("keys", [[""], ["  "], [" padded"], ["ok", ""], ["tab\tkey"], ["clé"]])
def test_unusable_keys_are_refused_at_startup(keys):
    """An empty key would let in a request with no Authorization header at all."""
    with pytest.raises(ValidationError):
        Settings(model="unused", api_keys=keys)


def test_empty_key_on_the_command_line_is_refused(tiny_checkpoint, capsys, monkeypatch):
    assert cli_main(["serve", "vision", "--model", str(tiny_checkpoint), "--redis-url", "redis://127.0.0.1:1/0",
                     "--api-key", ""]) == 2
    assert "API keys" in capsys.readouterr().err
    monkeypatch.setenv("SPLITVL_API_KEYS", json.dumps([""]))
    with pytest.raises(ValidationError):
        Settings(model="unused")


def test_redis_with_a_password(make_app, redis_server, tmp_path, live_server):
    """compose runs Redis with requirepass: the right password works; a wrong one is a 503, never a 500."""
    import redis

    own = type(redis_server)(tmp_path)
    own.start()
    try:
        secret = "s3cret-redis-pass"
        admin = redis.Redis.from_url(own.url)
        admin.config_set("requirepass", secret)
        admin.close()
        good = own.url.replace("redis://", f"redis://:{secret}@")
        with live_server(make_app("all", redis_url=good, max_new_tokens=2)) as live, \
                httpx.Client(base_url=live.url, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            r = client.post("/v1/images", content=png(40, 40, seed=3), headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            q = client.post("/v1/questions", json={"image_id": r.json()["image_id"], "question": "hi"})
            assert q.status_code == 200, q.text
        for url in (own.url, own.url.replace("redis://", "redis://:wrong-password@")):
            with live_server(make_app("all", redis_url=url)) as live, \
                    httpx.Client(base_url=live.url, timeout=30) as client:
                assert_error(client.get("/readyz"), 503)
                r = client.post("/v1/images", content=png(40, 40, seed=4), headers={"Content-Type": "image/png"})
                err = assert_error(r, 503, "redis_unavailable")
                assert secret not in err["message"] and "wrong-password" not in err["message"]
                r = client.post("/v1/questions", json={"image_id": IMAGE_ID, "question": "hi"})
                assert_error(r, 503, "redis_unavailable")
    finally:
        own.stop()
