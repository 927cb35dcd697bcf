"""The HTTP overhead of POST /v1/questions on the CPU: the real routes, middleware and auth
dependency under uvicorn, the real ``LLMEngine`` on a tiny random checkpoint, against
``engine.generate(...).result()`` called directly (what ``llm_bench.http_overhead`` measures on a GPU).

    PYTHONPATH=. python bench/http_overhead_cpu.py [--reps 300] [--tokens 1,32] [--store standin,redis]
        [--rounds 2] [--stages] [--switch-interval-ms 5]

The engine is slower here than on a GPU, but HTTP - direct is the part the issue is about. Each
row: medians over ``reps`` pairs (HTTP and direct requests alternating, HTTP first and direct
first in turn, so drift cancels); ``overhead`` is the median of the pairs' differences;
``in_app`` the metrics middleware's span (arrival to the last byte handed to uvicorn).
``--stages`` also stamps the hand-offs (route entry, question queued, scheduler admission, Finish
put, route exit) and prints the median time between them, HTTP against direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.question_http import (  # noqa: E402
    HTTP_CLIENT,
    RAW_HTTP_CLIENT,
    StandInStore,
    in_app_times,
    paired,
    redis_store,
    serving,
    wait_for_count,
)
from service.llm.engine import LLMEngine  # noqa: E402
from service.llm.generation import Finish, Generation  # noqa: E402
from service.store import ImageRecord  # noqa: E402

IMAGE_ID = "ab" * 32
QUESTION = "What is in this picture?"
GRID = (1, 8, 8)  # 16 image tokens after the 2x2 merge
WARM = 20  # requests (and direct calls) before the timed ones


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def checkpoint() -> Path:
    """The tiny test checkpoint, with an EOS no model can emit: every answer runs to max_tokens."""
    from service.tiny import make_tiny_checkpoint

    path = Path(tempfile.gettempdir()) / "splitvl-http-overhead-ckpt"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, seed=0)
        vocab = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab + 1]}))
    return path


class Stages:
    """perf_counter stamps of one request's hand-offs, from wrappers around the real functions."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.on = False

    def begin(self, name: str) -> None:
        """A request's first stamp: whatever came before (the client's warm-up requests) is dropped."""
        self.current = {}
        self.stamp(name)

    def stamp(self, name: str) -> None:
        if self.on:
            self.current.setdefault(name, time.perf_counter())

    def finish(self, into: list[dict[str, float]]) -> None:
        """The request's stamps go to ``into``; the next request starts with none."""
        if self.on:
            into.append(self.current)
        self.current = {}

    def install(self) -> None:
        from service.llm.worker import LLMWorker
        from service.metrics import RequestMetricsMiddleware

        def wrap(owner: Any, attr: str, name: str, *, after: bool = False, begins: bool = False) -> None:
            fn = getattr(owner, attr)
            if asyncio.iscoroutinefunction(fn):
                async def awrapper(*args: Any, **kwargs: Any) -> Any:
                    (self.begin if begins else self.stamp)(name)
                    result = await fn(*args, **kwargs)
                    self.stamp(name + ".end")
                    return result
                setattr(owner, attr, awrapper)
            else:
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    if not after:
                        self.stamp(name)
                    result = fn(*args, **kwargs)
                    if after:
                        self.stamp(name)
                    return result
                setattr(owner, attr, wrapper)

        import fastapi.routing
        import starlette.responses

        wrap(RequestMetricsMiddleware, "__call__", "app", begins=True)
        wrap(fastapi.routing, "solve_dependencies", "fastapi.dependencies")
        wrap(fastapi.routing, "serialize_response", "fastapi.serialize")
        wrap(starlette.responses.Response, "__call__", "response.send")
        wrap(LLMWorker, "ask", "route.ask")
        wrap(LLMWorker, "answer", "route.answer")
        wrap(LLMEngine, "generate", "generate")
        wrap(LLMEngine, "_start", "sched.admit")
        wrap(LLMEngine, "_start", "sched.first_token", after=True)
        put = Generation._put

        def put_stamped(generation: Generation, event: Any) -> None:
            if isinstance(event, Finish):
                self.stamp("sched.finish_put")
            put(generation, event)

        Generation._put = put_stamped  # type: ignore[method-assign]


STAGES = Stages()


def stage_table(http: list[dict[str, float]], direct: list[dict[str, float]]) -> list[str]:
    """Median gaps between consecutive stamps (in the order they happen), HTTP against direct."""
    order = ["app", "fastapi.dependencies", "fastapi.dependencies.end", "route.ask", "generate", "generate.end", "route.ask.end", "route.answer", "sched.admit",
             "sched.first_token", "sched.finish_put", "route.answer.end",
             "fastapi.serialize", "fastapi.serialize.end", "response.send", "response.send.end", "app.end",
             "result.end"]
    lines = []

    def gaps(rows: list[dict[str, float]]) -> dict[str, float]:
        out: dict[str, list[float]] = {}
        for row in rows:
            names = sorted((n for n in row if n in order), key=lambda n: row[n])
            for a, b in zip(names, names[1:], strict=False):
                out.setdefault(f"{a} -> {b}", []).append((row[b] - row[a]) * 1e3)
        return {k: med(v) for k, v in out.items() if len(v) >= len(rows) // 2}

    for label, rows in (("http", http), ("direct", direct)):
        for gap, ms in gaps(rows).items():
            lines.append(f"    {label:6} {gap:42} {ms:8.3f} ms")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--tokens", default="1,32")
    parser.add_argument("--store", default="standin", help="standin, redis or both (comma-separated)")
    parser.add_argument("--client", default="http", help="http (http.client), raw (bare socket) or both")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every row this many times")
    parser.add_argument("--stages", action="store_true", help="stamp the hand-offs (adds a little overhead)")
    parser.add_argument("--switch-interval-ms", type=float, default=None)
    parser.add_argument("--idle-ms", type=float, default=0.0, help="sleep before each timed request")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (2 cores here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.stages:
        STAGES.install()

    import service

    print(f"service from {Path(service.__file__).parent}; torch threads {torch.get_num_threads()}; "
          f"switch interval {sys.getswitchinterval() * 1e3:g} ms", flush=True)
    ckpt = checkpoint()
    engine = LLMEngine(ckpt, device="cpu", max_batch_slots=4, prefix_cache_entries=4)
    torch.manual_seed(0)
    t, h, w = GRID
    embeds = torch.randn(t * h * w // 4, engine.hidden_size)
    record = ImageRecord(IMAGE_ID, "fp", "bench", GRID, embeds)

    def run(store_name: str, store: Any, in_app: list[float]) -> None:
        with serving(engine, ckpt, store, "cpu", record.fingerprint) as port:
            for _ in range(args.rounds):
                for tokens in [int(x) for x in args.tokens.split(",")]:
                    body = json.dumps({"image_id": IMAGE_ID, "question": QUESTION, "max_tokens": tokens})
                    http_stages: list[dict[str, float]] = []
                    direct_stages: list[dict[str, float]] = []

                    def direct(tokens: int = tokens, direct_stages: list = direct_stages) -> float:
                        t0 = time.perf_counter()
                        STAGES.begin("route.ask")
                        engine.generate(embeds, GRID, f"fp:{IMAGE_ID}", QUESTION, tokens, deltas=False).result()
                        STAGES.stamp("result.end")
                        elapsed = (time.perf_counter() - t0) * 1e3
                        STAGES.finish(direct_stages)
                        return elapsed

                    for _ in range(WARM):
                        direct()
                    STAGES.on = args.stages
                    for client_name in ("http", "raw") if args.client == "both" else (args.client,):
                        script = HTTP_CLIENT if client_name == "http" else RAW_HTTP_CLIENT
                        in_app.clear()
                        h, d = paired(script, port, body, args.reps, direct, warm=WARM, idle_s=args.idle_ms / 1e3,
                                      after_http=partial(STAGES.finish, http_stages))
                        span = wait_for_count(in_app, WARM + args.reps)[WARM:]
                        diffs = [a - b for a, b in zip(h, d, strict=True)]
                        print(f"{store_name:8} {client_name:4} tokens={tokens:<3} reps={args.reps} "
                              f"http={med(h):.3f} direct={med(d):.3f} overhead={med(diffs):.3f} "
                              f"in_app={med(span):.3f} in_app-direct={med(span) - med(d):.3f} "
                              f"outside={med(h) - med(span):.3f} ms", flush=True)
                    STAGES.on = False
                    if args.stages:
                        print("\n".join(stage_table(http_stages, direct_stages)), flush=True)

    try:
        with in_app_times() as in_app:
            for store_name in args.store.split(","):
                if store_name == "standin":
                    run("standin", StandInStore(record), in_app)
                else:
                    with redis_store(record) as store:
                        run("redis", store, in_app)
    finally:
        engine.close()

if __name__ == "__main__":
    main()
