"""The vision worker's request path: bytes -> id -> (cache | preprocess -> batched forward -> store)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from service.batching import BatchQueue
from service.config import Settings
from service.errors import ApiError
from service.metrics import Metrics
from service.preprocess import ImageLimits
from service.store import FeatureStore, ImageRecord
from service.vision.encoder import Patches, VisionEncoder

log = logging.getLogger(__name__)


def image_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class VisionWorker:
    def __init__(self, settings: Settings, store: FeatureStore, metrics: Metrics,
                 encoder: VisionEncoder | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.encoder = encoder or VisionEncoder(
            settings.model,
            device=settings.resolved_device(),
            dtype=settings.resolved_dtype(),
            use_kernels=settings.use_kernels,
            limits=ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels),
        )
        self.fingerprint = self.encoder.fingerprint
        self.model_name = settings.model
        self.batcher: BatchQueue[Patches, torch.Tensor] = BatchQueue(
            self.encoder.forward,
            cost=lambda p: p.num_patches,
            max_cost=settings.max_batch_patches,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            name="vision encoder",
            on_batch=self._observe_batch,
        )
        self._preprocess_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self._inflight: dict[str, asyncio.Future[ImageRecord]] = {}

    def _observe_batch(self, jobs: int, patches: int) -> None:
        self.metrics.batch_size.labels("vision").observe(jobs)
        self.metrics.batch_cost.labels("vision").observe(patches)
        self.metrics.queue_depth.labels("vision").set(self.batcher.depth)

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.encoder.warmup)
        self.batcher.start()
        try:
            await self.store.register_model(self.encoder.model_key, self.fingerprint)
        except ApiError:
            # Redis may come later; registration is retried on every upload
            log.warning("Redis unreachable at start: fingerprint %s not registered yet", self.fingerprint)

    async def stop(self) -> None:
        await self.batcher.stop()
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)

    async def lookup(self, image_id: str, *, with_embeds: bool = True) -> ImageRecord:
        record = await self.store.get(self.fingerprint, image_id, with_embeds=with_embeds)
        if record is None:
            raise ApiError(404, "image_not_found", f"image {image_id} is not stored (never uploaded, deleted or evicted): upload it again")
        return record

    async def encode(self, data: bytes) -> tuple[ImageRecord, bool]:
        """The stored record for these bytes, computing it at most once; True when it was cached."""
        if not data:
            raise ApiError(400, "empty_image", "the request carried no image bytes: send the image as multipart field 'file' or as the raw body")
        if len(data) > self.settings.max_upload_bytes:
            raise ApiError(413, "image_too_large", f"the image is {len(data)} bytes; the limit is {self.settings.max_upload_bytes}")
        image_id = image_id_of(data)
        record = await self.store.get(self.fingerprint, image_id)
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
            record = await self._compute_once(image_id, data)
            future.set_result(record)
            return record, False
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[image_id]

    async def _compute_once(self, image_id: str, data: bytes) -> ImageRecord:
        timeout = self.settings.request_timeout_s
        if not await self.store.lock(self.fingerprint, image_id, ttl_s=timeout):
            record = await self.store.wait_for(self.fingerprint, image_id, timeout_s=timeout)
            if record is not None:
                return record
        try:
            loop = asyncio.get_running_loop()
            patches = await loop.run_in_executor(self._preprocess_pool, self.encoder.preprocess, data)
            embeds = await self.batcher.submit(patches)
            record = ImageRecord(image_id, self.fingerprint, self.model_name, patches.grid_thw, embeds.cpu())
            await self.store.put(record)
            await self.store.register_model(self.encoder.model_key, self.fingerprint)
            return record
        finally:
            await self.store.unlock(self.fingerprint, image_id)
