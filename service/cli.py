"""The ``splitvl`` command: serve the workers, make a tiny checkpoint, talk to a running service."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from service.config import ROLE_ENV, Settings
from service.logs import configure_logging
from service.models import FAMILY_NAMES


def _serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items()
                 if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1 and args.role != "vision":
        print(f"error: --workers {settings.workers}: only `serve vision` runs several processes. The LLM engine "
              "owns one KV cache per GPU and `serve all` embeds Redis and an engine: run more replicas "
              "(one GPU each) instead", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, show_pid=settings.workers > 1)
    if settings.redis_url is None and args.role != "all":
        print("error: --redis-url is required for `serve vision` and `serve llm`", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return _serve_processes(settings, args.role)

    import uvicorn

    from service.app import create_app
    from service.embedded_redis import EmbeddedRedis

    embedded = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis()
        settings = settings.model_copy(update={"redis_url": embedded.start()})
        logging.getLogger("splitvl").info("embedded Redis at %s", settings.redis_url)
    try:
        app = create_app(settings, args.role)
        # our handler formats uvicorn's lines too; the access line is ours (with the request id)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                    access_log=False, timeout_graceful_shutdown=10)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


class _ErrorSeen(logging.Handler):
    """Notes whether uvicorn's supervisor logged an error (a process that failed to start, a port
    in use): ``uvicorn.run`` with several workers returns normally then, and the CLI should not."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = True


def _serve_processes(settings: Settings, role: str) -> int:
    """``settings.workers`` processes on one listening socket under uvicorn's supervisor (which
    restarts a process that dies), each loading its own copy of the model.

    The processes are spawned, not forked: they get the settings, role and metrics directory from
    the environment set here before they start, and build their app in
    ``service.app.create_app_from_env``. The metrics directory is fresh (files left by an earlier
    run would be summed in) and removed at exit.
    """
    import uvicorn

    metrics_dir = tempfile.mkdtemp(prefix="splitvl-metrics-")
    env = {**settings.to_env(), ROLE_ENV: role, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    supervisor_log = logging.getLogger("uvicorn.error")  # in this process: the supervisor's lines only
    errors = _ErrorSeen()
    supervisor_log.addHandler(errors)
    saved = dict(os.environ)  # the children read it at spawn; restored after (main() may run in-process)
    os.environ.update({key: value for key, value in env.items() if value is not None})
    for key in (key for key, value in env.items() if value is None):
        os.environ.pop(key, None)  # an unset optional setting must not come from an inherited variable
    try:
        uvicorn.run("service.app:create_app_from_env", factory=True, workers=settings.workers,
                    host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                    access_log=False, timeout_graceful_shutdown=10)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        supervisor_log.removeHandler(errors)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if errors.seen else 0


def _make_tiny(args: argparse.Namespace) -> int:
    from service.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.dir, family=args.family, seed=args.seed, shard_size=args.shard_size)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitvl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a worker (vision, llm) or both with an embedded Redis (all)")
    serve.add_argument("role", choices=["vision", "llm", "all"])
    serve.add_argument("--model", help="checkpoint directory or hub id in the local HF cache (env SPLITVL_MODEL)")
    serve.add_argument("--redis-url", dest="redis_url")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int,
                       help="vision only: processes serving the port, each with its own copy of the tower, so "
                       "uploads' host work runs in parallel on one GPU (env SPLITVL_WORKERS; default 1)")
    serve.add_argument("--device", choices=["cpu", "cuda"])
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--feature-ttl-s", dest="feature_ttl_s", type=int)
    serve.add_argument("--max-batch-patches", dest="max_batch_patches", type=int)
    serve.add_argument("--max-batch-wait-ms", dest="max_batch_wait_ms", type=float)
    serve.add_argument("--graph-max-images", dest="graph_max_images", type=int,
                       help="vision on cuda: CUDA graphs for forwards of up to this many same-size images (0: none)")
    serve.add_argument("--max-queue", dest="max_queue", type=int)
    serve.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=int)
    serve.add_argument("--max-image-pixels", dest="max_image_pixels", type=int)
    serve.add_argument("--request-timeout-s", dest="request_timeout_s", type=float)
    serve.add_argument("--api-key", dest="api_keys", action="append", help="require this bearer key (repeatable)")
    serve.add_argument("--no-kernels", dest="use_kernels", action="store_const", const=False)
    serve.add_argument("--vision-url", dest="vision_url",
                       help="llm: vision worker or gateway that encodes images sent inline to /v1/chat/completions")
    serve.add_argument("--log-level", dest="log_level", type=str.lower,
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help="default info (env SPLITVL_LOG_LEVEL)")
    serve.add_argument("--log-format", dest="log_format", choices=["text", "json"],
                       help="json: one JSON object per line, with request ids (env SPLITVL_LOG_FORMAT)")
    serve.set_defaults(func=_serve)

    tiny = sub.add_parser("make-tiny", help="write a small random checkpoint to try the pipeline offline")
    tiny.add_argument("dir")
    tiny.add_argument("--family", default="qwen2_vl", choices=list(FAMILY_NAMES),
                      help="model family (default qwen2_vl)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shard-size", dest="shard_size", help="e.g. 40KB for a sharded checkpoint")
    tiny.set_defaults(func=_make_tiny)

    from clients.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
