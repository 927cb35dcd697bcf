"""Decoding work per upload is bounded before it is done, and a few expensive uploads cannot starve
cheap ones: crafted files as an attacker sends them, through HTTP."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from . import (
    assert_error,
    eventually,
    gif_with_subblocks,
    jpeg_with_segments,
    png,
    png_with_chunks,
    progressive_jpeg,
    upload,
)

# 1024 x 1024 pixels x ~5,000 scans: ~5 G pixel-passes, a few seconds of a core, in ~90 KB
COSTLY_SCANS = 5_000
COSTLY_BUDGET = 20_000_000_000  # lets those through, for the tests of the queue


def costly(i: int) -> bytes:
    return progressive_jpeg(1024, 1024, extra_scans=COSTLY_SCANS + i)  # distinct bytes: no single flight


async def post(client: httpx.AsyncClient, data: bytes, content_type: str = "image/jpeg") -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await client.post("/v1/images", content=data, headers={"Content-Type": content_type})
    return r, time.monotonic() - started


def test_crafted_files_are_refused_at_once(make_app, redis_url, live_server):
    """The attack (a ~1 MB progressive JPEG repeating a scan: 75-80 s, then 200) and its cousins that
    make the image library's Python parsers crawl: 422 in milliseconds, and the server stays free."""
    with live_server(make_app("vision", redis_url=redis_url)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        bombs = {
            "repeated scans": (progressive_jpeg(1024, 1024, extra_scans=60_000), "image/jpeg"),
            "jpeg segments": (jpeg_with_segments(200_000), "image/jpeg"),
            "png chunks": (png_with_chunks(200_000), "image/png"),
            "gif sub-blocks": (gif_with_subblocks(200_000), "image/gif"),
        }
        for name, (data, content_type) in bombs.items():
            started = time.monotonic()
            err = assert_error(upload(client, data, content_type), 422, "image_too_complex")
            assert time.monotonic() - started < 2.0, name
            assert "Re-encode" in err["message"] or "re-encode" in err["message"], err
        assert upload(client, png(64, 64, seed=1)).status_code == 200


async def test_costly_uploads_do_not_starve_cheap_ones(make_app, redis_url, live_server):
    """Four uploads near the budget take both decoding threads' worth of work; a 64x64 upload that
    comes after them is answered at once (one thread is always left to light decodes), and the
    four are answered too."""
    app = make_app("vision", redis_url=redis_url, preprocess_threads=2, max_decode_work=COSTLY_BUDGET)
    with live_server(app) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            heavy = [asyncio.create_task(post(client, costly(i))) for i in range(4)]
            decoder = app.state.vision.decoder
            await eventually(lambda: decoder.running >= 1 and decoder.depth >= 2, "costly uploads decoding and waiting")
            cheap = [await post(client, png(64, 64, seed=10 + i), "image/png") for i in range(3)]
            for r, elapsed in cheap:
                assert r.status_code == 200, r.text
                assert elapsed < 1.5, f"a cheap upload waited {elapsed:.2f} s behind costly ones"
            assert not any(task.done() for task in heavy)  # they were still decoding meanwhile
            for r, _ in await asyncio.gather(*heavy):
                assert r.status_code == 200, r.text


async def test_no_upload_outlives_its_timeout(make_app, redis_url, live_server):
    """Decodes queued past ``request_timeout_s`` are answered 503 at the timeout, not when a thread
    gets to them (queued uploads waited 150 s); the server serves again once the threads are free."""
    timeout = 1.5
    app = make_app("vision", redis_url=redis_url, preprocess_threads=1, max_decode_work=COSTLY_BUDGET,
                   request_timeout_s=timeout)
    with live_server(app) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            results = await asyncio.gather(*[post(client, costly(10 + i)) for i in range(3)])
            for r, elapsed in results:
                assert_error(r, 503, "timeout")
                assert elapsed < timeout + 1.0, elapsed
            assert app.state.vision.decoder.depth == 0  # the ones that never started left the queue
            deadline = time.monotonic() + 30
            while True:  # the decode already running finishes on its thread, unheard
                r, _ = await post(client, png(48, 48, seed=3), "image/png")
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
            assert r.status_code == 200, r.text


async def test_a_full_decode_queue_is_503_with_retry_after(make_app, redis_url, live_server):
    app = make_app("vision", redis_url=redis_url, preprocess_threads=1, max_queue=2, max_decode_work=COSTLY_BUDGET)
    with live_server(app) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            first = asyncio.create_task(post(client, costly(20)))
            decoder = app.state.vision.decoder
            await eventually(lambda: decoder.running == 1, "the first upload decoding, the queue empty behind it")
            results = await asyncio.gather(*[post(client, costly(21 + i)) for i in range(5)])
            statuses = Counter(r.status_code for r, _ in results)
            assert statuses[503] == 3 and statuses[200] == 2, statuses
            for r, elapsed in results:
                if r.status_code == 503:
                    assert_error(r, 503, "overloaded")
                    assert elapsed < 1.0  # at once, not after a wait
            assert (await first)[0].status_code == 200
