"""ServerConfig: the server's settings from flags with NEXTCHAR_* env defaults (the only env reader)."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nextchar.server.core.limits import MAX_BATCH_SIZE, MAX_CHARS_PER_CALL, MAX_NEW_CHARS
from nextchar.server.ops.registry import MAX_LOADED_VERSIONS

VARIANTS = ("fp32", "int8")
# Admin's own listener: loopback by default, so a proxy or load balancer in front of --port never sees it.
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:50059"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """An invalid setting; the message names the flag and its env var and the allowed range."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `nextchar serve` can be told. Built once in the entry point and passed down."""

    model_repo: Path
    host: str = "0.0.0.0"              # every interface: the server runs in a container by default
    port: int = 50051                  # 0 = pick a free port (tests)
    max_prompt_chars: int = 10_000     # longer prompts/contexts/texts are INVALID_ARGUMENT
    max_new_chars: int = 10_000        # the cap on GenerateRequest.max_new_chars
    max_message_bytes: int = 4 << 20   # gRPC receive/send limit; larger messages are RESOURCE_EXHAUSTED
    max_concurrent: int = 64           # calls in flight (and worker threads); more: RESOURCE_EXHAUSTED
    memory_budget_mb: int = 1024       # estimated peak bytes of the calls in flight; more: RESOURCE_EXHAUSTED
    max_per_client: int = 0            # calls in flight per client (peer address); 0 = no per-client cap
    intra_op_threads: int = 0          # onnxruntime threads per call; 0 = auto (1 if model_instances > 1)
    model_instances: int = 0           # batchers (engine calls at once) per model; 0 = the cores available
    grace_seconds: float = 10.0        # how long running calls may finish after SIGTERM
    flush_ms: float = 5.0              # a stream flushes buffered text at least this often under load
    flush_chars: int = 128             # ... or when this many characters are buffered
    variant: str = "fp32"              # which ONNX file of each version to serve
    batching: str = "auto"             # on / off / auto: batch the models proved batch-invariant (fp32)
    max_batch_size: int = 64           # the batcher's largest batch
    max_wait_ms: float = 0.0           # an arrival at an idle batcher waits this long for company
    burst_gap_ms: float = 3.0          # arrivals closer than this are a burst, admitted once it pauses
    max_chars_per_call: int = 64       # K's ceiling: chars a stream advances per engine call
    max_call_ms: float = 30.0          # K is cut so one engine call lasts about this long (cancel latency)
    max_active_streams: int = 256      # batched streams decoding at once per model; more wait in the queue
    max_queue: int = 256               # streams waiting per model; beyond: RESOURCE_EXHAUSTED
    max_sessions: int = 1024           # open Session streams; more: RESOURCE_EXHAUSTED
    session_idle_ttl: float = 300.0    # a session that sends nothing this long is ended, its state freed
    session_max_chars: int = 10_000    # text one session may hold: its memory bound
    session_saved_states: int = 16     # recent states a session keeps so deletes cost no re-read
    session_wait_ms: float = 0.0       # a session step at an idle model waits this long for others' steps
    max_loaded_versions: int = MAX_LOADED_VERSIONS  # non-default versions kept loaded, all models together
    log_level: str = "INFO"
    # Operations (server.reload, server.metrics, server.reqlog, server.security):
    reload_interval: float = 0.0       # seconds between repository scans for new/removed versions; 0 = off
    metrics_port: int = 0              # Prometheus /metrics over HTTP on host:metrics_port; 0 = off
    log_format: str = "text"           # "json": one object per line, for log collectors
    log_prompts: bool = False          # prompts are user data: kept out of the request log unless asked
    tls_cert: Path | None = None       # PEM certificate chain; with tls_key the server speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients must present a certificate this CA signed
    auth_token: str | None = field(default=None, repr=False)  # bearer token every call but health needs
    auth_token_file: Path | None = None  # ... or read from this file (a mounted secret)
    admin_address: str = DEFAULT_ADMIN_ADDRESS  # Admin's listener (host:port or unix:PATH), never --port

    def __post_init__(self) -> None:
        for f in fields(self):
            spec = _SPECS[f.name]
            problem = spec.check(getattr(self, f.name))
            if problem:
                shown = "<hidden>" if spec.secret else repr(getattr(self, f.name))
                raise ConfigError(f"{spec.flag} (env {spec.env}): {problem}, got {shown}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert (env NEXTCHAR_TLS_CERT) and --tls-key (env NEXTCHAR_TLS_KEY) "
                              "must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (env NEXTCHAR_TLS_CLIENT_CA) needs --tls-cert and --tls-key")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ConfigError("--auth-token (env NEXTCHAR_AUTH_TOKEN) and --auth-token-file "
                              "(env NEXTCHAR_AUTH_TOKEN_FILE): give one, not both")
        if not self.reload_interval and not self.model_repo.is_dir():
            # With a watcher the server may start before the repository is filled (NOT_SERVING until then).
            raise ConfigError(f"--model-repo (env NEXTCHAR_MODEL_REPO): must be an existing directory "
                              f"(or set --reload-interval to wait for one), got {str(self.model_repo)!r}")
        if not is_local_address(self.admin_address) and self.auth_token is None \
                and self.auth_token_file is None:
            raise ConfigError(f"--admin-address (env NEXTCHAR_ADMIN_ADDRESS): {self.admin_address!r} is not "
                              "loopback or a unix socket, so Admin there needs --auth-token or "
                              "--auth-token-file")
        admin_port = self.admin_address.rpartition(":")[2]
        if not self.admin_address.startswith("unix:") and self.port != 0 \
                and admin_port.isascii() and admin_port.isdigit() and len(admin_port) < 12 \
                and int(admin_port) == self.port:
            raise ConfigError(f"--admin-address (env NEXTCHAR_ADMIN_ADDRESS): must not use --port "
                              f"{self.port}; Admin is never served on the public port")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(f"--metrics-port (env NEXTCHAR_METRICS_PORT): must differ from --port, "
                              f"got {self.metrics_port}")


@dataclass(frozen=True)
class _Spec:
    flag: str
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None]
    help: str
    secret: bool = False  # never echo the value in an error message

    @property
    def env(self) -> str:
        return "NEXTCHAR_" + self.flag.removeprefix("--").replace("-", "_").upper()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


BATCHING_MODES = ("auto", "on", "off")


def _batching_mode(text: str) -> str:
    """auto, or any boolean spelling of _bool (true -> on, false -> off)."""
    value = text.strip().lower()
    if value == "auto":
        return value
    try:
        return "on" if _bool(value) else "off"
    except ValueError:
        raise ValueError("must be auto, on or off (or 1/0, true/false, yes/no)") from None


def _int_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be an integer in [{lo}, {hi}]"
    return check


def _float_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be a number in [{lo:g}, {hi:g}]"
    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _file(v: Any) -> str | None:
    if v is None:
        return None
    return None if isinstance(v, Path) and v.is_file() else "must be an existing file"


def _token(v: Any) -> str | None:
    if v is None:
        return None
    ok = isinstance(v, str) and v and all(33 <= ord(c) <= 126 for c in v)
    return None if ok else "must be non-empty printable ASCII without spaces"


def is_local_address(address: str) -> bool:
    """unix:PATH, or host:port whose host is loopback (127.0.0.0/8, [::1], localhost)."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _address(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be host:port or unix:PATH"
    if v.startswith("unix:"):
        return None if len(v) > len("unix:") else "unix: needs a socket path"
    host, _, port = v.rpartition(":")
    ok = bool(host) and port.isdigit() and 0 <= int(port) <= 65535
    return None if ok else "must be host:port (port 0-65535) or unix:PATH"


def _repo(v: Any) -> str | None:
    # Whether it must exist yet depends on --reload-interval (ServerConfig.__post_init__).
    if not isinstance(v, Path) or not str(v):
        return "is required (a directory of <name>/<version>/ model artifacts)"
    return None


_SPECS: dict[str, _Spec] = {
    "model_repo": _Spec("--model-repo", Path, _repo, "model repository: <dir>/<name>/<version>/"),
    "host": _Spec("--host", str, lambda v: None if v else "must not be empty", "address to bind"),
    "port": _Spec("--port", int, _int_range(0, 65535), "port to bind (0 = any free port)"),
    "max_prompt_chars": _Spec("--max-prompt-chars", int, _int_range(1, 10_000_000),
                              "longest prompt, context or scored text in characters"),
    "max_new_chars": _Spec("--max-new-chars", int, _int_range(1, MAX_NEW_CHARS),
                           "cap on max_new_chars per generation"),
    "max_message_bytes": _Spec("--max-message-bytes", int, _int_range(1024, 1 << 30),
                               "largest gRPC message received or sent"),
    "max_concurrent": _Spec("--max-concurrent", int, _int_range(1, 4096),
                            "model calls in flight before RESOURCE_EXHAUSTED"),
    "memory_budget_mb": _Spec("--memory-budget-mb", int, _int_range(16, 1 << 20),
                              "MiB the calls in flight may take together (each reserves an estimate from "
                              "its length and the vocabulary) before RESOURCE_EXHAUSTED"),
    "max_per_client": _Spec("--max-per-client", int, _int_range(0, 4096),
                            "model calls one client (peer address; behind a local proxy, the last "
                            "x-forwarded-for address) may have in flight, an open Session counting as "
                            "one, before RESOURCE_EXHAUSTED (0 = no cap)"),
    "intra_op_threads": _Spec("--intra-op-threads", int, _int_range(0, 256),
                              "onnxruntime threads per engine call; 0 = 1 when batching with --model-"
                              "instances above 1, else the CPUs available to the process (affinity mask, "
                              "cgroup cpu.max quota) unless one thread is faster at warm-up"),
    "model_instances": _Spec("--model-instances", int, _int_range(0, 256),
                             "batched engine calls a model runs at once, each on its own thread with its "
                             "own share of the streams; 0 = the CPUs available to the process"),
    "grace_seconds": _Spec("--grace-seconds", float, _float_range(0.0, 3600.0),
                           "time running calls get to finish on SIGTERM"),
    "flush_ms": _Spec("--flush-ms", float, _float_range(0.1, 1000.0),
                      "longest a stream holds back text (stretched by calls in flight / 4 past 4 calls)"),
    "flush_chars": _Spec("--flush-chars", int, _int_range(1, 65536),
                         "a stream sends its buffered text once this many characters are waiting (a "
                         "threshold, not a cap: a message carries everything buffered, so under load it "
                         "may hold more)"),
    "variant": _Spec("--variant", str, _one_of(VARIANTS), "model file to serve: fp32 or int8"),
    "batching": _Spec("--batching", _batching_mode, _one_of(BATCHING_MODES),
                      "merge concurrent decode steps of a model into batched engine calls: on, off, or "
                      "auto = only models whose warm-up proved a row's result independent of its batch "
                      "mates (fp32; not int8), so seeded texts never depend on other requests"),
    "max_batch_size": _Spec("--max-batch-size", int, _int_range(1, MAX_BATCH_SIZE),
                             "largest decode batch"),
    "max_wait_ms": _Spec("--max-wait-ms", float, _float_range(0.0, 1000.0),
                         "longest an arrival at an idle batcher waits for others (default 0: it starts at "
                         "once and later arrivals join the next engine call)"),
    "burst_gap_ms": _Spec("--burst-gap-ms", float, _float_range(0.0, 1000.0),
                          "generations arriving less than this apart are a burst: admitted together once "
                          "arrivals pause this long (at most --max-call-ms), so their prefills share calls; "
                          "a lone arrival starts at once (0 = off)"),
    "max_chars_per_call": _Spec("--max-chars-per-call", int, _int_range(1, MAX_CHARS_PER_CALL),
                                "most chars a stream advances per engine call (K; 1 = one char per call)"),
    "max_call_ms": _Spec("--max-call-ms", float, _float_range(0.0, 10_000.0),
                         "K is cut so one engine call lasts about this long: a cancel waits at most that"),
    "max_active_streams": _Spec("--max-active-streams", int, _int_range(1, 1 << 20),
                                "batched streams decoding at once per model"),
    "max_queue": _Spec("--max-queue", int, _int_range(0, 1 << 20),
                       "batched streams waiting per model before RESOURCE_EXHAUSTED"),
    "max_sessions": _Spec("--max-sessions", int, _int_range(0, 1 << 20),
                          "open typing sessions (Session RPC) before RESOURCE_EXHAUSTED (0 = none)"),
    "session_idle_ttl": _Spec("--session-idle-ttl", float, _float_range(0.01, 86400.0),
                              "seconds a session may send nothing before it ends and its state is freed"),
    "session_max_chars": _Spec("--session-max-chars", int, _int_range(1, 10_000_000),
                               "characters one session may hold (bounds its memory)"),
    "session_saved_states": _Spec("--session-saved-states", int, _int_range(0, 4096),
                                  "recent model states a session keeps, so deleting back costs no re-read"),
    "session_wait_ms": _Spec("--session-wait-ms", float, _float_range(0.0, 100.0),
                             "while other sessions are typing on a model, a step waits this long for "
                             "theirs to share its engine call: less CPU per keystroke, that much more "
                             "latency (default 0: steps go at once; those arriving meanwhile go together)"),
    "max_loaded_versions": _Spec("--max-loaded-versions", int, _int_range(0, 4096),
                                 "versions other than the defaults that stay loaded after requests named "
                                 "them (ModelRef.version), all models together; beyond it the least "
                                 "recently used one unloads once its calls end (0 = each unloads after "
                                 "its calls)"),
    "log_level": _Spec("--log-level", str.upper, _one_of(LOG_LEVELS), "logging level"),
    "reload_interval": _Spec("--reload-interval", float, _float_range(0.0, 86400.0),
                             "seconds between scans of the repository for new or removed versions (0 = off); "
                             "when on, an empty repository is no error: NOT_SERVING until a model appears"),
    "metrics_port": _Spec("--metrics-port", int, _int_range(0, 65535),
                          "Prometheus metrics over HTTP at http://HOST:PORT/metrics (0 = off)"),
    "log_format": _Spec("--log-format", str.lower, _one_of(LOG_FORMATS), "log lines as text or json"),
    "log_prompts": _Spec("--log-prompts", _bool,
                         lambda v: None if isinstance(v, bool) else "must be a boolean",
                         "include prompts/contexts/texts in the per-request log lines"),
    "tls_cert": _Spec("--tls-cert", Path, _file, "PEM certificate (chain): serve TLS (needs --tls-key)"),
    "tls_key": _Spec("--tls-key", Path, _file, "PEM private key of --tls-cert"),
    "tls_client_ca": _Spec("--tls-client-ca", Path, _file,
                           "PEM CA bundle: require client certificates it signed (mutual TLS)"),
    "auth_token": _Spec("--auth-token", str, _token, secret=True,
                        help="bearer token required on every call but health (Admin always needs it)"),
    "auth_token_file": _Spec("--auth-token-file", Path, _file, "read the bearer token from this file"),
    "admin_address": _Spec("--admin-address", str, _address,
                           "the Admin service's own listener, host:port or unix:PATH; loopback or unix "
                           "unless a token is set (Admin is never served on --port)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults stay None so `load_config` can tell 'not given' from a value."""
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    for name, spec in _SPECS.items():
        default = "" if name == "model_repo" else f"default {defaults[name]}; "
        shown = f" ({default}env {spec.env})"
        # Booleans work bare (`--log-prompts`) or with a value (`--log-prompts false`); so does
        # --batching (bare = on).
        bare: dict[str, Any] = {"nargs": "?", "const": "true"} if spec.parse in (_bool, _batching_mode) \
            else {}
        parser.add_argument(spec.flag, dest=name, default=None, metavar=name.upper().split("_")[-1],
                            help=spec.help + shown, **bare)


def load_config(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags (strings or None) over NEXTCHAR_* env vars over the defaults -> a validated ServerConfig.

    Raises ConfigError naming the flag and env var of the first bad value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, spec in _SPECS.items():
        raw, source = flags.get(name), spec.flag
        if raw is None and env.get(spec.env):  # an empty variable counts as unset
            raw, source = env[spec.env], f"env {spec.env}"
        if raw is None:
            continue
        try:
            values[name] = spec.parse(raw) if isinstance(raw, str) else raw
        except ValueError as e:
            raise ConfigError(f"{source}: cannot parse {raw!r}: {e}") from None
    if "model_repo" not in values:
        raise ConfigError(f"--model-repo (env {_SPECS['model_repo'].env}) is required")
    try:
        return ServerConfig(**values)
    except TypeError as e:  # a flag of the wrong Python type passed programmatically
        raise ConfigError(str(e)) from None
