"""One definition of the settings: the CLI's flags, the SPLITVL_* variables and the README's table agree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cli import build_parser, settings_from_args
from service.config import (
    ROLES,
    Settings,
    env_name,
    flag_of,
    range_text,
    roles_of,
    settings_table,
    value_type,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_the_settings_table():
    assert settings_table() in README.read_text(), (
        "README's configuration table differs from the settings: paste the output of `python -m service.config`")


def some_value(name: str) -> tuple[str, object]:
    """A valid value other than the default: (as typed on the command line or in the environment, as parsed)."""
    special = {"model": "/models/m", "served_model_name": "my-model", "redis_url": "redis://:pw@host:6379/1",
               "host": "0.0.0.0", "device": "cuda:1", "vision_url": "http://gateway:8000", "workers": "3"}
    kind, choices = value_type(name)
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    if name in special:
        text = special[name]
    elif choices:
        text = next(c for c in choices if c != default)
    elif kind is bool:
        text = "false" if default else "true"
    elif kind is int:
        text = str(default + 1)
    elif kind is float:
        text = str(default + 0.5)
    elif name == "api_keys":
        return '["k-1"]', ["k-1"]
    else:
        raise AssertionError(f"no test value for {name}")
    return text, {"true": True, "false": False}.get(text, kind(text) if kind is not str else text)


def argv_for(name: str, text: str) -> list[str]:
    if value_type(name)[0] is bool:
        return [flag_of(name) if text == "true" else "--no-" + flag_of(name)[2:]]
    if name == "api_keys":
        return [flag_of(name), "k-1"]
    return [flag_of(name), text]


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_a_flag_and_a_variable_with_the_same_meaning(name, monkeypatch):
    for key in list(os.environ):
        if key.startswith("SPLITVL_"):
            monkeypatch.delenv(key)
    text, value = some_value(name)
    role = "all" if "all" in roles_of(name) else roles_of(name)[0]
    base = ["serve", role, "--model", "/models/m", "--redis-url", "redis://h:1/0"]
    from_flag = settings_from_args(build_parser().parse_args(base + argv_for(name, text)))
    monkeypatch.setenv(env_name(name), text)
    from_env = settings_from_args(build_parser().parse_args(base if name not in ("model", "redis_url") else
                                                            base[:2] + (base[4:] if name == "model" else base[2:4])))
    assert getattr(from_flag, name) == getattr(from_env, name) == value
    assert from_flag == from_env


def test_every_number_has_a_range():
    """--port 80000 was once accepted: each numeric setting is bounded both ways."""
    for name in Settings.model_fields:
        kind, _ = value_type(name)
        if kind in (int, float):
            text = range_text(name)
            assert text and ("-" in text or "<=" in text), f"{name} has no upper and lower bound"


def test_roles_are_known():
    assert all(set(roles_of(name)) <= set(ROLES) for name in Settings.model_fields)


def test_served_model_name_is_never_a_server_path(tmp_path):
    checkpoint = tmp_path / "models" / "my-tiny"
    checkpoint.mkdir(parents=True)
    assert Settings(model=str(checkpoint)).served_name() == "my-tiny"
    assert Settings(model=str(checkpoint) + "/").served_name() == "my-tiny"
    assert Settings(model="Qwen/Qwen2-VL-2B-Instruct").served_name() == "Qwen/Qwen2-VL-2B-Instruct"
    assert Settings(model=str(checkpoint), served_model_name="vl-prod").served_name() == "vl-prod"
