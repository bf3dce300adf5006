"""ServerConfig: flags over NEXTCHAR_* env over defaults; every bad value names its flag and env var."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nextchar.server.ops.config import ConfigError, ServerConfig, add_arguments, load_config


def test_flags_beat_env_beat_defaults(tmp_path: Path) -> None:
    env = {"NEXTCHAR_MODEL_REPO": str(tmp_path), "NEXTCHAR_PORT": "6000", "NEXTCHAR_MAX_NEW_CHARS": "99",
           "NEXTCHAR_BATCHING": "yes", "NEXTCHAR_LOG_LEVEL": "debug"}
    config = load_config({"port": "7000"}, env)
    assert config == ServerConfig(model_repo=tmp_path, port=7000, max_new_chars=99, batching="on",
                                  log_level="DEBUG")
    assert load_config({"model_repo": str(tmp_path)}, {}).port == 50051


@pytest.mark.parametrize(("raw", "mode"), [("auto", "auto"), ("1", "on"), ("ON", "on"), ("false", "off")])
def test_batching_is_auto_on_or_off(tmp_path: Path, raw: str, mode: str) -> None:
    assert load_config({"model_repo": str(tmp_path)}, {}).batching == "auto"
    assert load_config({"model_repo": str(tmp_path), "batching": raw}, {}).batching == mode
    wanted = r"--batching \(env NEXTCHAR_BATCHING\): must be one of auto, on, off"
    with pytest.raises(ConfigError, match=wanted):
        ServerConfig(model_repo=tmp_path, batching=True)


def test_an_empty_env_var_counts_as_unset(tmp_path: Path) -> None:
    assert load_config({"model_repo": str(tmp_path)}, {"NEXTCHAR_PORT": ""}).port == 50051


@pytest.mark.parametrize(("flags", "env", "wanted"), [
    ({}, {}, "--model-repo (env NEXTCHAR_MODEL_REPO) is required"),
    ({"port": "-1"}, {}, "--port (env NEXTCHAR_PORT): must be an integer in [0, 65535], got -1"),
    ({}, {"NEXTCHAR_GRACE_SECONDS": "soon"}, "env NEXTCHAR_GRACE_SECONDS: cannot parse 'soon'"),
    ({"max_new_chars": "100001"}, {}, "--max-new-chars (env NEXTCHAR_MAX_NEW_CHARS): must be an integer in "
                                      "[1, 100000]"),
    ({"flush_ms": "0"}, {}, "--flush-ms (env NEXTCHAR_FLUSH_MS): must be a number in [0.1, 1000]"),
    ({"variant": "fp16"}, {}, "--variant (env NEXTCHAR_VARIANT): must be one of fp32, int8"),
    ({"log_level": "loud"}, {}, "--log-level (env NEXTCHAR_LOG_LEVEL): must be one of DEBUG, INFO"),
])
def test_bad_values_name_the_flag_and_env_var(tmp_path: Path, flags: dict, env: dict, wanted: str) -> None:
    args = flags if wanted.startswith("--model-repo") else {"model_repo": str(tmp_path), **flags}
    with pytest.raises(ConfigError) as e:
        load_config(args, env)
    assert wanted in str(e.value)


def test_every_field_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = vars(parser.parse_args([]))
    assert set(args) == set(ServerConfig.__dataclass_fields__)
    assert all(v is None for v in args.values())  # None = not given, so env defaults can apply


def test_switches_work_bare_or_with_a_value(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def parsed(*argv: str) -> ServerConfig:
        return load_config(vars(parser.parse_args(["--model-repo", str(tmp_path), *argv])), {})

    assert parsed("--batching").batching == "on" and parsed("--batching", "auto").batching == "auto"
    assert parsed("--log-prompts").log_prompts is True and parsed("--log-prompts", "no").log_prompts is False
