"""One source of versions (constraints.txt) read by the README, .ci/run and the Dockerfiles; what the
images install, run and probe, checked without Docker."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
ROLE_OF = {"vision.Dockerfile": "vision", "llm.Dockerfile": "llm"}


def pins(text: str) -> dict[str, str]:
    """name -> pinned version of each requirement line (comments skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: pin an exact version"
            out[req.name.lower().replace("_", "-")] = spec.version
    return out


def readme_block(title: str) -> list[str]:
    """The command lines of the first ```bash block after the line that contains ``title``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    block = text[text.index("```bash\n", start) + len("```bash\n"):]
    block = block[:block.index("```")]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_every_pin_is_exact_and_torch_has_both_builds():
    found = pins(CONSTRAINTS.read_text())
    assert {"torch", "triton", "transformers", "tokenizers", "safetensors"} <= set(found)
    assert re.search(r"^# cuda: torch==\S+$", CONSTRAINTS.read_text(), re.M)


def test_this_environment_has_the_pinned_versions():
    """The tests ran on what constraints.txt says (CI installs from it; a developer's venv should too)."""
    wrong = []
    for name, pinned in pins(CONSTRAINTS.read_text()).items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            continue  # not needed here (e.g. uvloop on another platform)
        if installed.public != Version(pinned).public:  # 2.13.0+cpu is torch 2.13.0's CPU build
            wrong.append(f"{name} {installed} (pinned {pinned})")
    assert not wrong, "install with `pip install -c constraints.txt ...`: " + ", ".join(wrong)


def test_ci_runs_the_readme_commands_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    install = readme_block("### Install")
    tests = readme_block("### Run the tests")
    assert any("-c constraints.txt torch" in line and "download.pytorch.org/whl/cpu" in line for line in install)
    for line in tests[1:]:  # after the CPU torch line, which CI takes from its local wheel (see .ci/run)
        assert line in ci.splitlines(), f".ci/run lacks the README's `{line}`"
    assert "download.pytorch.org/whl/cpu" in tests[0]
    for line in ci.splitlines():
        if re.search(r"pip install (?!-q --upgrade pip)", line):
            assert "-c constraints.txt" in line, line


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_the_tested_versions(dockerfile: Path, tmp_path: Path):
    text = dockerfile.read_text()
    assert "COPY constraints.txt" in text
    # the image's constraints, made by the Dockerfile's own command, from this checkout's constraints.txt
    made = re.search(r"RUN (sed .+? constraints\.txt) > (\S+)", text)
    assert made, "the Dockerfile should derive its constraints from constraints.txt"
    out = tmp_path / "constraints-cuda.txt"
    subprocess.run(f"{made[1]} > {shlex.quote(str(out))}", shell=True, check=True, cwd=ROOT)
    image, tested = pins(out.read_text()), pins(CONSTRAINTS.read_text())
    cuda_torch = re.search(r"^# cuda: torch==(\S+)$", CONSTRAINTS.read_text(), re.M)[1]
    assert image.pop("torch") == cuda_torch
    tested.pop("torch")
    assert image == tested
    assert re.search(rf"pip install -c {re.escape(made[2])} ", text)
    # no base image bringing its own torch and Triton; the tests' Python; a C compiler for Triton
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-slim", text, re.M)
    assert base and base[1] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(r"apt-get install .*\bgcc\b", text)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_command_is_the_packages(dockerfile: Path, monkeypatch):
    from service.cli import build_parser

    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile.read_text(), re.M)[1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts and scripts[cmd[0]] == "service.cli:main"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "serve" and args.role == ROLE_OF[dockerfile.name]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_healthcheck_probes_the_app(dockerfile: Path, live_server):
    """The HEALTHCHECK command, run as the image runs it, passes against the app and fails without it."""
    from service.app import create_app
    from service.config import Settings

    line = re.search(r"^\s+CMD (python -c .+)$", dockerfile.read_text(), re.M)[1]
    line = shlex.quote(sys.executable) + line.removeprefix("python")  # the image's python: here, this one
    app = create_app(Settings(model="unused", redis_url="redis://127.0.0.1:1/0"), ROLE_OF[dockerfile.name])
    live = live_server(app, lifespan="off")  # its port is chosen, nothing listens on it yet
    env = {**os.environ, "SPLITVL_PORT": str(live.port)}
    assert subprocess.run(line, shell=True, env=env, capture_output=True, timeout=30).returncode != 0
    with live:
        probe = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
