"""`splitvl embed` and `splitvl ask` against a live server, run in-process through the CLI's main()."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from service.cli import main


@pytest.fixture
def write_png(image_bytes):
    def write(path, seed: int) -> str:
        path.write_bytes(image_bytes(64, 48, seed))
        return str(path)

    return write


def test_embed_then_ask(server, raw_answer, tmp_path, capsys, monkeypatch, write_png):
    monkeypatch.setenv("SPLITVL_API_KEY", "sekret")
    image = write_png(tmp_path / "cat.png", seed=21)
    assert main(["embed", image, "--url", server.url]) == 0
    image_id = capsys.readouterr().out.strip()
    assert len(image_id) == 64

    saved = tmp_path / "cat.safetensors"
    assert main(["embed", image_id, "--url", server.url, "--save", str(saved)]) == 0
    assert capsys.readouterr().out.strip() == image_id
    tensors = load_file(saved)
    assert tensors["image_embeds"].ndim == 2 and tensors["image_grid_thw"].shape == (1, 3)

    expected = raw_answer(image_id, "What?", 7)["answer"]
    monkeypatch.setenv("SPLITVL_URL", server.url)
    assert main(["ask", image_id, "What?", "--max-tokens", "7"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    other = write_png(tmp_path / "dog.png", seed=22)  # a file the service has never seen: uploaded first
    assert main(["ask", other, "What?", "--max-tokens", "3", "--temperature", "0.7", "--seed", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_errors_go_to_stderr(server, tmp_path, capsys, monkeypatch, write_png):
    monkeypatch.setenv("SPLITVL_URL", server.url)
    monkeypatch.setenv("SPLITVL_API_KEY", "sekret")
    assert main(["ask", "f" * 64, "What?", "--max-tokens", "3"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "image_not_found" in out.err
    assert main(["embed", str(tmp_path / "missing.png")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["embed", write_png(tmp_path / "x.png", 3), "--api-key", "wrong"]) == 1
    assert "unauthorized" in capsys.readouterr().err


def test_client_verbs_are_quiet_and_never_import_torch(server, tmp_path, write_png):
    """A client verb is one HTTP call or two: no log lines on stderr, and no torch (seconds to import)."""
    image = write_png(tmp_path / "quiet.png", seed=23)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVL_")}
    env.update(SPLITVL_URL=server.url, SPLITVL_API_KEY="sekret")
    probe = ("import sys\nfrom service.cli import main\ncode = main(sys.argv[1:])\n"
             "print('torch' in sys.modules, code)")
    for argv in (["embed", image], ["ask", image, "What?", "--max-tokens", "2"]):
        done = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.stderr == "", done.stderr
        assert done.stdout.splitlines()[-1] == "False 0", done.stdout
