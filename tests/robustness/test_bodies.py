"""Every route bounds its body while reading it, whatever the framing, and an unauthenticated request
is refused before its body is read: bodies sent over raw sockets, as an attacker sends them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from . import assert_error, png

KEY = "body-test-key-0123456789"
UPLOAD_LIMIT = 1_000_000
CHUNK = b"x" * 65536


@dataclass
class Sent:
    """What a raw client got: the response's head and body, and how much of its body it could send."""

    status: int
    headers: dict[str, str]
    body: bytes
    sent: int


def raw_request(port: int, head: bytes, body_bytes: int, *, chunked: bool, first: bytes = b"") -> Sent:
    """Send ``head``, then ``first`` and up to ``body_bytes`` more body bytes (chunked or not) from a
    thread, while reading the response; the sender stops when the server stops reading."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sent = 0

    def send() -> None:
        nonlocal sent
        try:
            sock.sendall(head)
            pieces = [first] if first else []
            pieces += [CHUNK] * (body_bytes // len(CHUNK))
            for piece in pieces:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: what we meant to see

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    finally:
        sender.join(timeout=20)
        sock.close()
    head_end = data.index(b"\r\n\r\n")
    lines = data[:head_end].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return Sent(int(lines[0].split()[1]), headers, data[head_end + 4:], sent)


def _length(data: bytes) -> int:
    head = data[: data.index(b"\r\n\r\n")].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def head(method: str, path: str, content_type: str, *, length: int | None = None, key: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def live(make_app, redis_url, live_server) -> Iterator[int]:
    app = make_app("all", redis_url=redis_url, api_keys=[KEY], max_upload_bytes=UPLOAD_LIMIT, max_new_tokens=4)
    with live_server(app) as server:
        yield server.port


ROUTES = [("POST", "/v1/questions", "application/json"), ("POST", "/v1/chat/completions", "application/json"),
          ("POST", "/v1/images", "image/png"), ("POST", "/v1/images", "multipart/form-data; boundary=B"),
          ("GET", "/v1/images/" + "ab" * 32, "application/json"), ("DELETE", "/v1/images/" + "ab" * 32, "text/plain")]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("method,path,content_type", ROUTES)
def test_no_key_is_refused_before_the_body(live, method, path, content_type, chunked):
    """A 1.5 GB body with no key: 401 while the client is still sending, and the connection closes
    (it was read and parsed before its 401)."""
    size = 1_500_000_000
    started = time.monotonic()
    got = raw_request(live, head(method, path, content_type, length=None if chunked else size), 200_000_000,
                      chunked=chunked)
    assert got.status == 401 and got.headers["connection"] == "close", got
    assert b'"unauthorized"' in got.body
    assert got.sent < 100_000_000 and time.monotonic() - started < 10


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("method,path,content_type", ROUTES)
def test_every_body_is_bounded_while_it_is_read(live, method, path, content_type, chunked):
    """With the key: 413 in our format, saying what the route takes, whatever the framing (a chunked
    multipart upload was spooled to disk in full, 2 GB, before its 413)."""
    size = 1_500_000_000
    first = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' if "multipart" in \
        content_type else b""
    got = raw_request(live, head(method, path, content_type, length=None if chunked else size, key=KEY),
                      200_000_000, chunked=chunked, first=first)
    assert got.headers["connection"] == "close" and got.sent < 100_000_000, got
    if method != "POST" and chunked:  # a route that reads no body answers as ever; the rest is never read
        assert_error(httpx.Response(got.status, content=got.body), 404, "image_not_found")
        return
    error = assert_error(httpx.Response(got.status, content=got.body), 413)
    takes = {"/v1/questions": "question", "/v1/chat/completions": "chat request", "/v1/images": "image"}
    assert takes.get(path, "no body") in error["message"], error


def test_bodies_within_their_limits_pass(live):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{live}", timeout=60, headers=headers) as client:
        data = png(300, 300, seed=1)
        assert len(data) < UPLOAD_LIMIT
        image = client.post("/v1/images", files={"file": ("a.png", data, "image/png")})
        assert image.status_code == 200, image.text
        image_id = image.json()["image_id"]
        # the longest question the schema allows (as \\u escapes, six bytes a character) is within the limit
        escaped = "\\u00e9" * 65536
        long = f'{{"image_id": "{image_id}", "question": "{escaped}", "max_tokens": 1}}'
        r = client.post("/v1/questions", content=long.encode(), headers={"Content-Type": "application/json"})
        assert_error(r, 422, "question_too_long")
        r = client.post("/v1/questions", json={"image_id": image_id, "question": "hi", "max_tokens": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,content_type", [("/v1/questions", "application/json"),
                                               ("/v1/images", "image/png")])
def test_a_trickled_body_is_cut_at_the_timeout(make_app, redis_url, live_server, path, content_type):
    """A body sent a few bytes at a time held its request (and its place in the server) forever."""
    timeout = 1.0
    with live_server(make_app("all", redis_url=redis_url, body_timeout_s=timeout)) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        started = time.monotonic()
        sock.sendall(head("POST", path, content_type, length=1000))
        stop = threading.Event()

        def trickle() -> None:  # a byte every 50 ms: the deadline does not move with it
            while not stop.wait(0.05):
                try:
                    sock.sendall(b" ")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        elapsed = time.monotonic() - started
        stop.set()
        sock.close()
    assert data.startswith(b"HTTP/1.1 408") and b"connection: close" in data.lower(), data[:300]
    assert timeout <= elapsed < timeout + 2.0
