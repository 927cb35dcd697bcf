"""The load test, short: 16 clients for 10 s against ``splitvl serve all`` (bench/load_test.py runs 64 x 60 s)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_test_module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "load_test.py"
    spec = importlib.util.spec_from_file_location("splitvl_bench_load_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_short_load_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bench = load_test_module()
    report = bench.run(clients=16, duration_s=10.0, model=tiny_checkpoint, workdir=tmp_path)
    bench.print_report(report)
    assert report.requests > 100, report
    assert report.lost == 0, report.lost_examples  # every request got a response
    assert report.server_errors == 0, report.by_status  # no 5xx but 503
    assert report.unavailable_503_without_retry_after == 0
    assert set(report.by_status) <= {"200", "503"}, report.by_status  # no 4xx for well-formed traffic either
    assert {"POST /v1/images", "POST /v1/questions"} <= set(report.by_endpoint)
    growth = report.rss_mb["end"] - report.rss_mb["middle"]
    assert growth < 64, report.rss_mb  # flat: no growth with the request count
    assert report.ok(max_rss_growth_mb=64) == []
