"""Ops settings: flags, env vars, cross-field checks, secrets kept out of messages; peers; log format."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest

from nextchar.server.ops.config import ConfigError, ServerConfig, add_arguments, load_config
from nextchar.server.ops.reqlog import JsonFormatter
from nextchar.server.ops.security import TokenError, is_loopback_peer, read_token


def _config(tmp_path: Path, **flags: str) -> ServerConfig:
    return load_config({"model_repo": str(tmp_path), **flags}, environ={})


def test_serve_help_documents_every_setting_with_its_env_var() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text and "NEXTCHAR_" + f.name.upper() in text, flag


def test_ops_settings_from_flags_and_env(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    c = load_config({"model_repo": str(tmp_path), "reload_interval": "2.5", "log_prompts": "true"},
                    environ={"NEXTCHAR_METRICS_PORT": "9100", "NEXTCHAR_LOG_FORMAT": "JSON",
                             "NEXTCHAR_TLS_CERT": str(cert), "NEXTCHAR_TLS_KEY": str(cert),
                             "NEXTCHAR_AUTH_TOKEN": "Zq9-x"})
    assert (c.reload_interval, c.metrics_port, c.log_format, c.log_prompts) == (2.5, 9100, "json", True)
    assert c.tls_cert == cert and c.auth_token == "Zq9-x" and "Zq9-x" not in repr(c)


def test_bare_boolean_flags(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model-repo", str(tmp_path), "--log-prompts"])
    assert load_config(vars(args), environ={}).log_prompts is True
    args = parser.parse_args(["--model-repo", str(tmp_path), "--log-prompts", "off"])
    assert load_config(vars(args), environ={}).log_prompts is False


@pytest.mark.parametrize(("flags", "wanted"), [
    ({"reload_interval": "-1"}, "--reload-interval (env NEXTCHAR_RELOAD_INTERVAL): must be a number in"),
    ({"metrics_port": "70000"}, "--metrics-port (env NEXTCHAR_METRICS_PORT): must be an integer in"),
    ({"metrics_port": "9000", "port": "9000"}, "--metrics-port (env NEXTCHAR_METRICS_PORT): must differ"),
    ({"log_format": "xml"}, "--log-format (env NEXTCHAR_LOG_FORMAT): must be one of text, json"),
    ({"tls_cert": "/nonexistent.pem"}, "--tls-cert (env NEXTCHAR_TLS_CERT): must be an existing file"),
    ({"auth_token_file": "/nonexistent"}, "--auth-token-file (env NEXTCHAR_AUTH_TOKEN_FILE): must be an"),
])
def test_bad_ops_settings_name_the_flag(tmp_path: Path, flags: dict, wanted: str) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, **flags)
    assert wanted in str(e.value)


def test_cross_field_checks(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    with pytest.raises(ConfigError, match=r"--tls-cert .* and --tls-key .* must be given together"):
        _config(tmp_path, tls_cert=str(pem))
    with pytest.raises(ConfigError, match=r"--tls-client-ca .* needs --tls-cert"):
        _config(tmp_path, tls_client_ca=str(pem))
    with pytest.raises(ConfigError, match="give one, not both"):
        _config(tmp_path, auth_token="a", auth_token_file=str(pem))


def test_a_bad_token_is_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, auth_token="has space secret")
    assert "secret" not in str(e.value) and "<hidden>" in str(e.value)


def test_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("  abc123  \nignored\n")
    assert read_token(f) == "abc123"
    f.write_text("\n  \n")
    with pytest.raises(TokenError, match="is empty"):
        read_token(f)
    # gRPC metadata is ASCII: a token no client can send locked everyone out, silently (as --auth-token)
    for bad in ("päss", "two words"):
        f.write_text(bad + "\n")
        with pytest.raises(TokenError, match="must be non-empty printable ASCII without spaces"):
            read_token(f)


def test_loopback_peers() -> None:
    assert is_loopback_peer("ipv4:127.0.0.1:5000") and is_loopback_peer("ipv4:127.8.9.1:1")
    assert is_loopback_peer("ipv6:[::1]:5000") and is_loopback_peer("unix:/tmp/sock")
    assert not is_loopback_peer("ipv4:10.1.2.3:5000") and not is_loopback_peer("ipv6:[2001:db8::1]:80")
    assert not is_loopback_peer("garbage") and not is_loopback_peer("ipv4:nothost:1")


def test_json_log_lines_carry_the_request_fields() -> None:
    record = logging.LogRecord("nextchar.requests", logging.INFO, __file__, 1, "request %s", ("x",), None)
    record.fields = {"request_id": "r1", "code": "OK", "chars": 3}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "request x" and entry["request_id"] == "r1" and entry["chars"] == 3
    assert entry["level"] == "INFO" and entry["time"].endswith("Z")
