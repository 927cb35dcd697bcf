"""The vision worker's request path: bytes -> id -> (cache | preprocess -> batched forward -> store)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import PIL.Image
import torch

from service import tracing
from service.batching import BatchQueue
from service.checkpoint import Checkpoint
from service.config import Settings
from service.errors import ApiError, unavailable
from service.ids import image_id_of
from service.metrics import Metrics
from service.preprocess import ImageLimits, open_image
from service.store import MAX_LOCK_LEASE_S, FeatureStore, ImageRecord
from service.vision.decode_pool import HEAVY_WORK, DecodePool
from service.vision.encoder import Patches, VisionEncoder

log = logging.getLogger(__name__)


class Timings:
    """Durations of a request's phases, in order: ``mark(name)`` ends the phase that began at the
    previous mark (or at creation)."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self._last = time.perf_counter()
        self._last_ns = tracing.now_ns()  # wall clock, for the phase's span when tracing is on

    def mark(self, name: str) -> None:
        now, now_ns = time.perf_counter(), tracing.now_ns()
        self.phases.append((name, now - self._last))
        tracing.phase(name, self._last_ns, now_ns)
        self._last, self._last_ns = now, now_ns

    def header(self) -> str:
        """The ``Server-Timing`` header value (durations in ms)."""
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in self.phases)


class VisionWorker:
    def __init__(self, settings: Settings, store: FeatureStore, metrics: Metrics,
                 encoder: VisionEncoder | None = None, checkpoint: Checkpoint | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        # this worker's limits, also when the encoder was handed in (serve all, tests)
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels,
                                  max_decode_work=settings.max_decode_work)
        self.encoder = encoder or VisionEncoder(
            checkpoint or settings.model,
            device=settings.resolved_device(),
            dtype=settings.resolved_dtype(),
            use_kernels=settings.use_kernels,
            limits=self.limits,
            graph_max_images=settings.graph_max_images,
        )
        self.fingerprint = self.encoder.fingerprint
        self.model_name = settings.served_name()  # never a server path
        self.batcher: BatchQueue[Patches, torch.Tensor] = BatchQueue(
            self.encoder.launch,
            finish=self.encoder.finish,
            cost=lambda p: p.num_patches,
            max_cost=settings.max_batch_patches,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            name="vision encoder",
            on_batch=self._observe_batch,
        )
        self.decoder = DecodePool(settings.preprocess_threads, settings.max_queue)
        self._inflight: dict[str, asyncio.Future[ImageRecord]] = {}

    def _observe_batch(self, jobs: int, patches: int) -> None:
        self.metrics.batch_size.labels("vision").observe(jobs)
        self.metrics.batch_cost.labels("vision").observe(patches)

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.encoder.warmup, self.settings.max_batch_patches)
        self.batcher.start()
        try:
            await self.store.register_model(self.encoder.model_key, self.fingerprint)
        except ApiError:
            # Redis may come later; registration is retried on every upload
            log.warning("Redis unreachable at start: fingerprint %s not registered yet", self.fingerprint)

    async def stop(self) -> None:
        await self.batcher.stop()
        self.decoder.shutdown()

    async def _stored(self, image_id: str, *, with_embeds: bool = True, load: bool = True) -> ImageRecord | None:
        """The stored record, checked against this tower; one that does not fit it is dropped (409)."""
        record = await self.store.get(self.fingerprint, image_id, with_embeds=with_embeds, load=load)
        if record is not None:
            t, h, w = record.grid_thw
            merge = self.encoder.spatial_merge_size
            if (h % merge or w % merge or record.num_tokens != t * h * w // merge**2
                    or record.hidden_size != self.encoder.hidden_size
                    or record.deepstack_layers != self.encoder.deepstack_layers):
                raise await self.store.drop(record, f"{record.num_tokens}x{record.hidden_size} embeddings with "
                                                    f"{record.deepstack_layers} DeepStack layers do not fit grid "
                                                    f"{list(record.grid_thw)} of this model")
        return record

    async def _reusable(self, image_id: str, *, load: bool = True) -> ImageRecord | None:
        """The stored record, or None when there is none or it was damaged (dropped: compute it again)."""
        try:
            return await self._stored(image_id, load=load)
        except ApiError as exc:
            if exc.code != "corrupt_features":
                raise
            return None

    async def lookup(self, image_id: str, *, with_embeds: bool = True) -> ImageRecord:
        record = await self._stored(image_id, with_embeds=with_embeds)
        if record is None:
            raise ApiError(404, "image_not_found", f"image {image_id} is not stored (never uploaded, deleted or evicted): upload it again")
        return record

    async def encode(self, data: bytes, timings: Timings | None = None, *,
                     load: bool = True) -> tuple[ImageRecord, bool]:
        """The stored record for these bytes, computing it at most once; True when it was cached.
        ``timings`` collects how long each phase took (the route sends them as ``Server-Timing``).
        With ``load=False`` (the caller answers with metadata only) a record found stored is checked
        in full but its embeds may be a meta tensor; a computed or shared one always has them.
        All of it within ``request_timeout_s`` (503 after): waits for a decoding thread, a batch, a
        lock or Redis included."""
        timeout = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._encode(data, timings if timings is not None else Timings(), load)
        except TimeoutError:
            raise unavailable("timeout", f"the image was not encoded within {timeout:g} s; retry shortly",
                              2.0) from None

    async def _encode(self, data: bytes, timings: Timings, load: bool) -> tuple[ImageRecord, bool]:
        if not data:
            raise ApiError(400, "empty_image", "the request carried no image bytes: send the image as multipart field 'file' or as the raw body")
        if len(data) > self.settings.max_upload_bytes:
            raise ApiError(413, "image_too_large", f"the image is {len(data)} bytes; the limit is {self.settings.max_upload_bytes}")
        # hashing a large upload takes milliseconds: a thread, not the event loop (hashlib releases the GIL)
        image_id = await asyncio.to_thread(image_id_of, data) if len(data) > 1 << 20 else image_id_of(data)
        timings.mark("hash")
        record = await self._reusable(image_id, load=load)
        timings.mark("lookup")
        if record is not None:
            self.metrics.cache.labels("features", "hit").inc()
            return record, True
        self.metrics.cache.labels("features", "miss").inc()
        # Single flight within this process; a Redis lock across workers.
        pending = self._inflight.get(image_id)
        if pending is not None:
            return await asyncio.shield(pending), True
        future: asyncio.Future[ImageRecord] = asyncio.get_running_loop().create_future()
        self._inflight[image_id] = future
        try:
            record, cached = await self._compute_once(image_id, data, timings)
            future.set_result(record)
            return record, cached
        except BaseException as exc:
            # our cancellation is not theirs: uploads of the same image waiting on us get a 503 to retry
            future.set_exception(exc if isinstance(exc, Exception) else unavailable(
                "interrupted", "encoding this image was interrupted; retry shortly"))
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[image_id]

    async def _compute_once(self, image_id: str, data: bytes, timings: Timings) -> tuple[ImageRecord, bool]:
        """The record and whether another worker computed it (we waited on its lock)."""
        timeout = self.settings.request_timeout_s
        # a short lease, renewed while we compute: a worker that dies holding it delays others by one lease
        lease = min(MAX_LOCK_LEASE_S, timeout)
        held = await self.store.lock_unless_stored(self.fingerprint, image_id, ttl_s=lease)
        timings.mark("lock")
        if held is None:
            # another worker stored it between our miss and our lock: read it (no second encode)
            record = await self._reusable(image_id)
            if record is not None:
                return record, True
            held = await self.store.lock(self.fingerprint, image_id, ttl_s=lease)  # damaged or gone meanwhile
        if not held:
            # another worker computes it: wait for its record, within encode's deadline; when that worker
            # gave up or died (the lock went, no record came), compute it here
            record = await self.store.wait_for(self.fingerprint, image_id, timeout_s=timeout)
            if record is not None:
                return record, True
        renew = asyncio.create_task(self._renew_lock(image_id, lease)) if held else None
        stored = False
        try:
            patches = await self._preprocess(data)
            timings.mark("preprocess")  # decode + patchify, waits for a free decoding thread included
            features = await self.batcher.submit(patches)  # [K, tokens, D]
            timings.mark("encode")  # the batch window, the queue and the forward
            record = ImageRecord.from_features(image_id, self.fingerprint, self.model_name, patches.grid_thw, features)
            await self.store.put(record, model_key=self.encoder.model_key, release_lock=held)
            timings.mark("store")
            stored = True
            return record, False
        finally:
            if renew is not None:
                renew.cancel()
                if not stored:
                    await self.store.unlock(self.fingerprint, image_id)

    async def _preprocess(self, data: bytes) -> Patches:
        """Decode and patchify on the decoding threads; a heavy decode in the pool's heavy lane."""
        out = await self.decoder.run(self._open_and_preprocess_light, data)
        if isinstance(out, Patches):
            return out
        return await self.decoder.run(self.encoder.preprocess, out, self.limits, heavy=True)

    def _open_and_preprocess_light(self, data: bytes) -> Patches | PIL.Image.Image:
        """On a decoding thread: the header (checked), then the patches unless the decode is heavy;
        then the opened image, for the heavy lane."""
        image, work = open_image(data, self.limits)
        if work > HEAVY_WORK:
            return image
        return self.encoder.preprocess(image, self.limits)

    async def _renew_lock(self, image_id: str, lease: float) -> None:
        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(ApiError):
                await self.store.extend_lock(self.fingerprint, image_id, lease)
