"""The app factory: one FastAPI app serving the vision worker, the LLM worker, or both."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from service import tracing
from service.checkpoint import Checkpoint, open_checkpoint
from service.config import LLM, ROLE_ENV, ROLES, VISION, Role, Settings
from service.errors import install_error_handlers
from service.guard import BodyLimit, RequestGuard
from service.logs import configure_logging
from service.metrics import Metrics, RequestMetricsMiddleware
from service.store import FeatureStore

log = logging.getLogger(__name__)


def loaded_line(settings: Settings, role: Role, checkpoint: Checkpoint | None, seconds: float) -> str:
    """What a newcomer wants to see once at start: which model, of which family, from where, on
    which device and dtype, and how long loading took."""
    where = f" ({checkpoint.family.name}) from {checkpoint.path}" if checkpoint is not None else ""
    return (f"serve {role}: model {settings.served_name()}{where}, {settings.resolved_device()} "
            f"{str(settings.resolved_dtype()).removeprefix('torch.')}, loaded in {seconds:.1f} s")


def create_app(settings: Settings, role: Role, *, workers: dict | None = None,
               checkpoint: Checkpoint | None = None) -> FastAPI:
    """``workers`` may hand in already built workers (tests, ``serve all``); otherwise they load here,
    from ``checkpoint`` (opened once, e.g. by the CLI to check ``--model`` early) or ``settings.model``."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.redis_url is None:
            raise RuntimeError("no Redis URL: pass --redis-url (or use `splitvl serve all`, which embeds one)")
        store = FeatureStore(settings.redis_url, ttl_s=settings.feature_ttl_s, timeout_s=settings.redis_timeout_s)
        app.state.store = store
        loop = asyncio.get_running_loop()
        given = workers or {}
        started = []
        refresher = None
        try:
            loading = time.perf_counter()
            opened = checkpoint
            needed = (role in VISION and given.get("vision_encoder") is None) or (
                role in LLM and given.get("llm_engine") is None)
            if opened is None and needed:  # once, for both workers
                opened = await loop.run_in_executor(None, open_checkpoint, settings.model)
            if role in VISION:
                from service.vision.worker import VisionWorker

                encoder = given.get("vision_encoder")
                vision = await loop.run_in_executor(
                    None, lambda: VisionWorker(settings, store, metrics, encoder, opened))
                await vision.start()
                started.append(vision)
                app.state.vision = vision
                metrics.on_scrape(lambda: metrics.queue_depth.labels("vision").set(
                    vision.batcher.depth + vision.decoder.depth))
            if role in LLM:
                from service.llm.worker import LLMWorker

                engine = given.get("llm_engine")
                fingerprint = app.state.vision.fingerprint if role == "all" else None
                llm = await loop.run_in_executor(
                    None, lambda: LLMWorker(settings, store, metrics, engine, fingerprint, opened))
                await llm.start()
                started.append(llm)
                app.state.llm = llm
                metrics.watch_engine(llm.engine.stats)
                if role == "llm" and settings.vision_url:
                    from service.llm.vision_client import RemoteVision

                    app.state.remote_vision = RemoteVision(settings.vision_url, timeout_s=settings.request_timeout_s)
            logging.getLogger("splitvl").info(
                "%s", loaded_line(settings, role, opened, time.perf_counter() - loading))
            if metrics.multiprocess_dir:
                refresher = asyncio.create_task(metrics.refresh_forever(), name="metrics-refresh")
            app.state.ready = True
            yield
        finally:
            app.state.ready = False
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            for worker in reversed(started):
                await worker.stop()
            remote = getattr(app.state, "remote_vision", None)
            if remote is not None:
                await remote.aclose()
            await store.close()
            metrics.close()

    # with API keys, the schema is behind the key like every path but /healthz (RequestGuard), and
    # the docs pages, which could not fetch it, are off
    no_docs = {"docs_url": None, "redoc_url": None} if settings.api_keys else {}
    # our own request spans (service.tracing), on any FastAPI: its built-in ones (>= 0.165) would nest twice
    native = {"telemetry": {"tracing": False}} if "telemetry" in inspect.signature(FastAPI).parameters else {}
    app = FastAPI(title="splitvl", version="0.1.0", lifespan=lifespan, **no_docs, **native,
                  description="Encode an image once, cache its features in Redis, answer many questions.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    install_error_handlers(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> JSONResponse:
        state = request.app.state
        redis_ok = state.ready and await state.store.ping()
        body = {"ready": bool(state.ready and redis_ok), "model_loaded": bool(state.ready), "redis": bool(redis_ok),
                "role": role}
        if state.ready and hasattr(state, "vision"):
            body["fingerprint"] = state.vision.fingerprint
        if not body["ready"]:
            error = {"code": "not_ready", "message": "model loading or Redis unreachable"}
            return JSONResponse({**body, "error": error}, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse(body)

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    limits: dict[str, BodyLimit] = {}  # path -> what its body may be; other paths take none
    if role in VISION:
        from service.vision import routes as vision_routes

        app.include_router(vision_routes.router)
        limits |= vision_routes.body_limits(settings)
    if role in LLM:
        from service.llm import openai_routes
        from service.llm import routes as llm_routes

        app.include_router(llm_routes.router)
        app.include_router(openai_routes.router)
        limits |= llm_routes.body_limits(settings) | openai_routes.body_limits(settings)
    # added first, so it runs inside the metrics middleware: refused requests are counted and logged too
    app.add_middleware(RequestGuard, api_keys=settings.api_keys, limits=limits,
                       body_timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    if tracing.setup(f"splitvl-{role}"):  # OTEL_* variables: off by default
        app.add_middleware(tracing.TracingMiddleware)
    return app


def create_app_from_env() -> FastAPI:
    """The app of each process of ``splitvl serve vision --workers N`` (uvicorn ``factory=True``).

    uvicorn's supervisor spawns fresh interpreters that receive nothing from the CLI but the
    environment: the settings come from ``SPLITVL_*`` (the CLI exported its effective ones), the
    role from ``SPLITVL_ROLE``, both read here in the worker process, never at import time. A
    spawned process starts with no logging set up either, so it is set up here, each line tagged
    with the process id.
    """
    role = os.environ.get(ROLE_ENV, "")
    if role not in ROLES:
        raise RuntimeError(f"{ROLE_ENV} must be one of {', '.join(ROLES)}, not {role!r}")
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, show_pid=True)
    return create_app(settings, role)
