"""The ``splitvl`` command: serve the workers, make a tiny checkpoint, talk to a running service.

A caller's mistake (a bad flag or variable, a model that is not there) is one line on stderr and
exit code 2, found before anything heavy starts. Nothing here imports torch at import time: the
client verbs (``embed``, ``ask``) never need it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from service.config import (
    LLM,
    ROLE_ENV,
    ROLES,
    VISION,
    Role,
    Settings,
    env_name,
    flag_of,
    range_text,
    roles_of,
    shown_default,
    value_type,
)
from service.models import FAMILY_NAMES

if TYPE_CHECKING:
    from service.checkpoint import Checkpoint

log = logging.getLogger("splitvl")


METAVARS = {"model": "PATH_OR_HUB_ID", "served_model_name": "NAME", "redis_url": "URL", "vision_url": "URL",
            "host": "ADDRESS", "device": "DEVICE"}


class UsageError(Exception):
    """A mistake the caller fixes: printed as one ``error:`` line, exit code 2."""


# --------------------------------------------------------------------------------------------
# settings: flags built from service.config, errors as one line


def add_setting_flags(parser: argparse.ArgumentParser, role: Role) -> None:
    """One flag per setting. Those of other roles are accepted but hidden, and refused with a clear
    line in ``settings_from_args`` (argparse's 'unrecognized arguments' would not say why)."""
    required = parser.add_argument_group("required")
    options = parser.add_argument_group("settings (each also an environment variable)")
    for name, info in Settings.model_fields.items():
        kind, choices = value_type(name)
        applies = role in roles_of(name)
        limits = f"; {range_text(name)}" if range_text(name) else ""
        text = f"{info.description} (default: {shown_default(name)}{limits}; env {env_name(name)})"
        if name == "model":
            text = f"{info.description} (required: the flag or env {env_name(name)})"
        kwargs: dict = {"dest": name, "default": None, "help": text if applies else argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "api_keys":
            kwargs.update(action="append", metavar="KEY")
        else:
            kwargs.update(type=str.lower if name == "log_level" else kind, metavar=METAVARS.get(name, kind.__name__.upper()))
            if choices:
                kwargs.update(choices=choices, metavar="{" + ",".join(choices) + "}")
        (required if name == "model" else options).add_argument(flag_of(name), **kwargs)


def _given(args: argparse.Namespace) -> dict:
    return {name: value for name in Settings.model_fields if (value := getattr(args, name, None)) is not None}


def describe_error(error: dict, given: dict, role: str) -> str:
    """One pydantic error as the caller sees it: the flag or variable they set, and what to do."""
    field = str(error["loc"][0]) if error.get("loc") else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if field not in Settings.model_fields:
        return message
    if error["type"] == "missing":
        return (f"{flag_of(field)} is required (or set {env_name(field)}): "
                f"{Settings.model_fields[field].description}")
    if field in given:
        value = given[field]
        if isinstance(value, list):
            shown = " ".join(map(repr, value))
        else:  # a value with a newline or a control character is shown quoted: the message stays one line
            shown = value if str(value).isprintable() else repr(value)
        source = f"{flag_of(field)} {shown}"
    else:
        source = f"{env_name(field)}={os.environ.get(env_name(field), '')!r}"
    return f"{source}: {message}"


def _one_process_only(source: str) -> UsageError:
    return UsageError(f"{source}: only `serve vision` runs several processes. The LLM engine owns one KV cache "
                      "per GPU and `serve all` embeds Redis and an engine: run more replicas (one GPU each) instead")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The flags over the environment over the defaults, or a ``UsageError`` saying what to fix."""
    from pydantic import ValidationError

    given = _given(args)
    foreign = [name for name in given if args.role not in roles_of(name)]
    if "workers" in foreign and given["workers"] > 1:
        raise _one_process_only(f"--workers {given['workers']}")
    if foreign:
        name = foreign[0]
        raise UsageError(f"{flag_of(name)} does not apply to `serve {args.role}`: it is a setting of "
                         f"`serve {'` and `serve '.join(roles_of(name))}`")
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        lines = [describe_error(e, given, args.role) for e in exc.errors()]
        raise UsageError("; ".join(lines) + f" (see `splitvl serve {args.role} --help`)") from None
    if settings.workers > 1 and args.role != "vision":
        raise _one_process_only(f"{env_name('workers')}={settings.workers}")
    if settings.redis_url is None and args.role != "all":
        raise UsageError(f"--redis-url (or {env_name('redis_url')}) is required for `serve {args.role}`, e.g. "
                         "redis://:password@host:6379/0; only `serve all` starts a Redis of its own")
    return settings


def open_model(model: str, role: Role) -> Checkpoint:
    """The checkpoint, opened as loading opens it (the app gets this one) and checked for what the
    role's workers will read (``Checkpoint.check``), before anything heavy."""
    from service.checkpoint import CheckpointError, open_checkpoint

    try:
        checkpoint = open_checkpoint(model)
        checkpoint.check(visual=role in VISION, language=role in LLM)
        return checkpoint
    except CheckpointError as exc:
        raise UsageError(f"--model {model}: {exc}") from None


# --------------------------------------------------------------------------------------------
# serve


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    checkpoint = open_model(settings.model, args.role)
    from service import tracing

    try:  # OTEL_* asking for an exporter that is not installed: one line now, not a traceback later
        tracing.setup(f"splitvl-{args.role}")
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    if settings.redis_url is None:
        from service.embedded_redis import redis_binary

        try:
            redis_binary()
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
    configure_serve_logging(settings)
    if settings.workers > 1:
        return _serve_processes(settings, args.role)
    return _serve_one(settings, args.role, checkpoint)


def configure_serve_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format, show_pid=settings.workers > 1)


def _serve_one(settings: Settings, role: Role, checkpoint: Checkpoint) -> int:
    """One process. SIGTERM, SIGHUP and SIGINT all shut down gracefully and stop the embedded Redis
    (uvicorn handles SIGINT and SIGTERM while it serves, then raises them again: the default action
    of SIGTERM, or SIGHUP at any time, would end the process before any ``finally`` ran)."""
    import uvicorn

    from service.app import create_app
    from service.embedded_redis import EmbeddedRedis

    server: uvicorn.Server | None = None

    def on_signal(signum: int, frame: object) -> None:
        if server is not None:
            server.handle_exit(signum, None)  # graceful: drain, run the lifespan's shutdown
        else:
            raise KeyboardInterrupt  # still starting: unwind through the finally below

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    embedded = None
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis()
            settings = settings.model_copy(update={"redis_url": embedded.start()})
            log.info("embedded Redis at %s", settings.redis_url)
        # our handler formats uvicorn's lines too; the access line is ours (with the request id)
        app = create_app(settings, role, checkpoint=checkpoint)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                log_config=None, access_log=False, timeout_graceful_shutdown=10)
        server = uvicorn.Server(config)
        server.run()
        return 0 if server.started else 1
    except KeyboardInterrupt:
        return 0
    finally:
        server = None
        if embedded is not None:
            embedded.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


# --------------------------------------------------------------------------------------------
# make-tiny


def _make_tiny(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file: make-tiny writes a checkpoint directory; name a new or empty one")
    if target.is_dir() and any(target.iterdir()):
        raise UsageError(f"{target} is not empty: name a new or empty directory (make-tiny never overwrites)")
    from service.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(target, family=args.family, seed=args.seed, shard_size=args.shard_size)
    share_readable(path)
    print(path)
    return 0


def share_readable(path: Path) -> None:
    """The modes a plain ``open``/``mkdir`` would give under the umask (0644/0755 with the usual 022):
    some writers create 0600 files (a temp file renamed into place), which the images' non-root user
    could not read through the models mount."""
    mask = os.umask(0)
    os.umask(mask)
    for item in [path, *path.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


# --------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitvl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a worker (vision, llm) or both with an embedded Redis (all)",
                           description="Run a worker: `serve ROLE --help` lists that role's settings.")
    roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
    about = {"vision": "the vision worker: loads visual.* only, encodes uploads, stores features in Redis",
             "llm": "the LLM worker: loads all but visual.*, answers questions from stored features",
             "all": "both workers in one process on one port; without --redis-url an embedded redis-server"}
    for role in ROLES:
        p = roles.add_parser(role, help=about[role], description=about[role] + ".")
        add_setting_flags(p, role)
        p.set_defaults(func=_serve)

    tiny = sub.add_parser("make-tiny", help="write a small random checkpoint to try the pipeline offline")
    tiny.add_argument("dir", help="a new or empty directory")
    tiny.add_argument("--family", default="qwen2_vl", choices=list(FAMILY_NAMES),
                      help="model family (default: qwen2_vl)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    tiny.add_argument("--shard-size", dest="shard_size", help="e.g. 40KB for a sharded checkpoint (default: one file)")
    tiny.set_defaults(func=_make_tiny)

    from clients.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
