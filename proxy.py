#!/usr/bin/env python3
"""cc-proxy: OpenAI- and Anthropic-compatible API in front of coding-agent backends.

One file, Python standard library only, Python 3.9+.

    python3 proxy.py                 # serve on 127.0.0.1:3000 (config.json beside this file)
    python3 proxy.py help            # commands: start, config, service, usage, version, help

Front ends (what clients speak):  OpenAI Chat Completions  POST /v1/chat/completions
                                   OpenAI Responses          POST /v1/responses
                                   Anthropic Messages        POST /v1/messages
Backends (where answers come from): Command Code (api.commandcode.ai, /alpha/generate NDJSON)
                                     Claude Code CLI (the local `claude` binary, stream-json)

Data flows through one pipeline, and this file reads in that order:

    client JSON --decode--> Request --backend.stream--> event batches --encode--> SSE or JSON

Sections: 1 start-up, 2 configuration, 3 logging, 4 canonical request/events/errors, 5 front
ends, 6 pipeline, 7 backend Command Code, 8 backend Claude Code CLI, 9 HTTP server, 10 usage
ledger and dashboard, 11 command line.
"""

import os
import sys

# =====================================================================================
# 1. Start-up: the re-exec that frees the script's syntax tree
# =====================================================================================

# Python keeps the syntax tree of the script it runs (~11 MB for this file) until the script's
# top level returns, which for a server is never; a module run with -m (or imported) has its tree
# freed once compiled, and its bytecode cached in __pycache__. So `start`, the one long-lived
# command, when the interpreter runs this file as its script, re-executes itself as
# `python3 [options] -m proxy start ...`: same process id, interpreter options and arguments, a
# command line `ps` shows plainly, ~12 MB less resident memory for as long as it runs. -m finds
# the module in the working directory, so the exec happens from this file's directory and the
# new process returns to the caller's at once. (Windows has no exec that keeps the process,
# Python 3.9 no sys.orig_argv, -I/-P no working directory on sys.path: those run as scripts.)
_REEXEC_CWD = "CC_PROXY_REEXEC_CWD"
if __name__ == "__main__" and _REEXEC_CWD in os.environ:
    try:
        os.chdir(os.environ.pop(_REEXEC_CWD))
    except OSError:
        pass   # the caller's directory went away meanwhile: relative paths resolve from here
elif (__name__ == "__main__" and globals().get("__spec__") is None
        and sys.modules["__main__"].__dict__ is globals()   # not run by cProfile, pdb, runpy
        and sys.argv[1:2] in ([], ["start"]) and __file__.endswith(".py") and os.name == "posix"
        and os.path.basename(__file__)[:-3].isidentifier()   # -m needs a module name
        and sys.executable and hasattr(sys, "orig_argv")
        and not sys.flags.isolated and not getattr(sys.flags, "safe_path", False)):
    _caller_cwd = None
    try:
        _caller_cwd = os.getcwd()
        os.chdir(os.path.dirname(os.path.abspath(__file__)))
        os.environ[_REEXEC_CWD] = _caller_cwd
        _options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
        os.execv(sys.executable, [sys.executable, *_options, "-m", os.path.basename(__file__)[:-3],
                                  *sys.argv[1:]])
    except OSError:
        os.environ.pop(_REEXEC_CWD, None)   # serve on as a script: the same server, more memory
        if _caller_cwd:
            os.chdir(_caller_cwd)

import argparse
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import fnmatch
import functools
import hashlib
import hmac
import http.client
import http.cookies
import http.server
import ipaddress
import itertools
import json
import logging
import queue
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from dataclasses import dataclass, field, replace as dataclass_replace
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

__version__ = "0.1.0"
PROXY_DIR = os.path.dirname(os.path.abspath(__file__))


# =====================================================================================
# 2. Configuration: defaults, file, environment, validation
# =====================================================================================

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "k": 1024, "mb": 1024 ** 2, "m": 1024 ** 2,
               "gb": 1024 ** 3, "g": 1024 ** 3}


def parse_size(value):
    """'10mb' / '512kb' / 1048576 -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10mb")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 10mb, 512kb or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_int(value, low=None, high=None):
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError("expected a whole number") from None
    if low is not None and number < low:
        raise ValueError("must be at least %d" % low)
    if high is not None and number > high:
        raise ValueError("must be at most %d" % high)
    return number


def parse_bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_model_map(value):
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ValueError('expected a JSON object such as '
                             '{"claude-haiku-*": "deepseek/deepseek-v4-flash"}') from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in value.items()):
        raise ValueError("expected a JSON object mapping model ids or globs to model ids")
    return dict(value)


def _enum(*allowed):
    def parse(value):
        text = str(value).strip()
        if text not in allowed:
            raise ValueError("expected one of: " + ", ".join(allowed))
        return text
    parse.allowed = allowed
    return parse


def _text(value):
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("expected text")
    return str(value)


def parse_networks(value):
    """'127.0.0.1, 10.0.0.0/8' -> a tuple of networks (the front proxies whose X-Forwarded-For
    we trust)."""
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    try:
        return tuple(ipaddress.ip_network(str(item).strip(), strict=False)
                     for item in items if str(item).strip())
    except ValueError as e:
        raise ValueError("expected IP addresses or CIDR ranges: %s" % e) from None


def _url(value):
    text = str(value).strip().rstrip("/")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL")
    return text


@dataclass(frozen=True)
class Setting:
    key: str
    env: str
    default: Any
    parse: Any
    kind: str
    help: str
    secret: bool = False


def _ms(low=0):
    return lambda v: parse_int(v, low)


SETTINGS = [
    Setting("port", "PORT", 3000, lambda v: parse_int(v, 0, 65535), "port", "listen port"),
    Setting("host", "HOST", "127.0.0.1", _text, "text", "listen address"),
    Setting("backend", "BACKEND", "commandcode", _enum("commandcode", "claude-code"), "enum",
            "which backend answers"),
    Setting("apiKey", "API_KEY", "", _text, "text",
            "the proxy's own key (claude-code backend)", True),
    Setting("trustedProxies", "TRUSTED_PROXIES", (), parse_networks, "list",
            "front proxies (IPs/CIDRs) whose X-Forwarded-For is believed"),
    Setting("corsOrigin", "CORS_ORIGIN", "*", _text, "text",
            "allowed CORS origin; empty disables CORS"),
    Setting("logLevel", "LOG_LEVEL", "info", _enum("error", "warn", "info", "debug"), "enum",
            "log level"),
    Setting("logFile", "LOG_FILE", "", _text, "path", "also log to this file, rotated"),
    Setting("logMaxSize", "LOG_MAX_SIZE", 10 * 1024 ** 2, parse_size, "size",
            "rotate the log file at this size"),
    Setting("logMaxFiles", "LOG_MAX_FILES", 5, lambda v: parse_int(v, 1, 1000), "int",
            "rotated log files kept"),
    Setting("maxBodyBytes", "MAX_BODY_BYTES", 32 * 1024 ** 2, parse_size, "size",
            "larger request bodies get 413"),
    Setting("maxInFlight", "MAX_IN_FLIGHT", 64, lambda v: parse_int(v, 1), "int",
            "more concurrent model requests get 503 + Retry-After"),
    Setting("usageDb", "USAGE_DB", "usage.sqlite3", _text, "path",
            "usage ledger (sqlite), relative to the config file's directory; empty = off"),
    Setting("usageRetentionDays", "USAGE_RETENTION_DAYS", 90, lambda v: parse_int(v, 1, 36500),
            "int", "ledger rows older than this many days are pruned (at start, then hourly)"),
    Setting("dashboardKey", "DASHBOARD_KEY", "", _text, "text",
            "key for /dashboard; empty = loopback clients only", True),
    Setting("defaultModel", "DEFAULT_MODEL", "", _text, "text",
            "model used when a request names none"),
    Setting("modelMap", "MODEL_MAP", {}, parse_model_map, "json",
            "client model id or * glob -> backend model id"),
    Setting("upstreamRetries", "UPSTREAM_RETRIES", 2, lambda v: parse_int(v, 0, 10), "int",
            "retries of failures that happen before any byte reached the client"),
    Setting("upstreamIdleMs", "UPSTREAM_IDLE_MS", 50000, _ms(10), "ms",
            "idle keep-alive upstream connections are closed after this long"),
    Setting("upstreamRetryBackoffMs", "UPSTREAM_RETRY_BACKOFF_MS", 250, _ms(0), "ms",
            "wait before the first retry, doubling for each next one, at most 2 s"),
    Setting("apiBase", "CC_API_BASE", "https://api.commandcode.ai", _url, "url",
            "Command Code base URL"),
    Setting("upstreamCaFile", "CC_CA_FILE", "", _text, "path",
            "more CA certificates (PEM) to trust for apiBase besides the system's, e.g. a "
            "TLS-inspecting proxy's; relative to the config file's directory"),
    Setting("projectSlug", "PROJECT_SLUG", "cc-proxy", _text, "text", "x-project-slug header"),
    Setting("ccVersion", "CC_VERSION", "", _text, "text",
            "x-command-code-version; empty = npm latest, refreshed every 24 h"),
    Setting("useProviderModels", "CC_USE_PROVIDER_MODELS", True, parse_bool, "bool",
            "build /v1/models from the live list"),
    Setting("modelRefreshIntervalMs", "CC_MODEL_REFRESH_MS", 300000, _ms(1000), "ms",
            "model list cache"),
    Setting("streamIdleTimeoutMs", "STREAM_IDLE_TIMEOUT_MS", 300000, _ms(1), "ms",
            "abort a streaming upstream that sends nothing for this long"),
    Setting("nonStreamIdleTimeoutMs", "NON_STREAM_IDLE_TIMEOUT_MS", 300000, _ms(1), "ms",
            "abort a non-streaming upstream that sends nothing for this long"),
    Setting("keepAliveIntervalMs", "KEEPALIVE_INTERVAL_MS", 15000, _ms(10), "ms",
            "SSE keep-alive comment / ping interval during upstream silence"),
    Setting("claudePath", "CLAUDE_PATH", "claude", _text, "path", "the Claude Code CLI binary"),
    Setting("claudeWorkingDir", "CLAUDE_WORKING_DIR", "", _text, "path",
            "default working directory (empty = the server's cwd)"),
    Setting("claudePermissionMode", "CLAUDE_PERMISSION_MODE", "default",
            _enum("default", "acceptEdits", "plan", "dontAsk", "bypassPermissions"), "enum",
            "permission mode of CLI runs"),
    Setting("claudeMaxTurns", "CLAUDE_MAX_TURNS", 25, lambda v: parse_int(v, 1), "int",
            "agentic turns per request"),
    Setting("claudeTimeoutMs", "CLAUDE_TIMEOUT_MS", 300000, _ms(1), "ms",
            "wall-clock limit per CLI run"),
    Setting("claudeMaxProcesses", "CLAUDE_MAX_PROCESSES", 4, lambda v: parse_int(v, 1), "int",
            "concurrent CLI processes; more wait, then 429"),
    Setting("claudeAskWorkingDir", "CLAUDE_ASK_WORKING_DIR", True, parse_bool, "bool",
            "ask a new conversation for its working directory"),
    Setting("claudeToolNotes", "CLAUDE_TOOL_NOTES", True, parse_bool, "bool",
            "show the CLI's own tool calls and results as short reasoning notes "
            "(never as tool calls)"),
    Setting("claudeSystemPromptMode", "CLAUDE_SYSTEM_PROMPT_MODE", "append",
            _enum("append", "replace"), "enum",
            "client system text: append to Claude Code's prompt or replace it"),
    Setting("claudeAllowedDirs", "CLAUDE_ALLOWED_DIRS", "", _text, "text",
            "working directories clients may choose, comma-separated (empty = any)"),
    Setting("claudeQueueWaitMs", "CLAUDE_QUEUE_WAIT_MS", 10000, _ms(0), "ms",
            "how long a request waits for a free CLI process before 429"),
    Setting("claudeKillGraceMs", "CLAUDE_KILL_GRACE_MS", 1500, _ms(10), "ms",
            "stopping a CLI: SIGINT, then SIGTERM, then SIGKILL, this long between steps"),
    Setting("claudeExitWaitMs", "CLAUDE_EXIT_WAIT_MS", 5000, _ms(10), "ms",
            "time a CLI gets to exit by itself after its result"),
    Setting("claudeTools", "CLAUDE_TOOLS", "", _text, "text",
            "built-in tools offered to the CLI: empty = its default, none, "
            "or a list like Read,Grep"),
    Setting("claudeWarmProcesses", "CLAUDE_WARM_PROCESSES", 4, lambda v: parse_int(v, 0), "int",
            "idle CLI processes kept warm for their conversation's next turn "
            "(0 = a process per request)"),
    Setting("claudeIdleTimeoutMs", "CLAUDE_IDLE_TIMEOUT_MS", 600000, _ms(100), "ms",
            "close a warm CLI process idle this long"),
    Setting("claudeSpareProcesses", "CLAUDE_SPARE_PROCESSES", 1, lambda v: parse_int(v, 0), "int",
            "CLI processes started ahead for a new conversation with the default settings"),
    Setting("claudeClientTools", "CLAUDE_CLIENT_TOOLS", "auto", _enum("auto", "off"), "enum",
            "the client's own tools: auto = offered to the CLI (answered as tool calls), "
            "off = dropped"),
    Setting("claudeToolResultTimeoutMs", "CLAUDE_TOOL_RESULT_TIMEOUT_MS", 300000, _ms(100), "ms",
            "how long a CLI turn waits for the client's tool results"),
    Setting("sessionTtlMs", "SESSION_TTL_MS", 3600000, _ms(1000), "ms",
            "conversation -> CLI session mapping lifetime"),
    Setting("sessionFile", "SESSION_FILE", "", _text, "path",
            "persist that mapping across restarts"),
    Setting("codexInstructionsFile", "CODEX_INSTRUCTIONS_FILE", "", _text, "path",
            "the system prompt Codex's model catalog gives every model, relative to the config "
            "file's directory; empty = no catalog"),
]
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
SETTINGS_BY_ENV = {s.env: s for s in SETTINGS}


def resolve_setting(name):
    """camelCase key or its env-style alias (API_KEY) -> Setting, or None."""
    return (SETTINGS_BY_KEY.get(name) or SETTINGS_BY_ENV.get(name)
            or SETTINGS_BY_ENV.get(name.upper()))


def default_config_path(environ=None):
    environ = os.environ if environ is None else environ
    return environ.get("CC_PROXY_CONFIG") or os.path.join(PROXY_DIR, "config.json")


class ConfigError(Exception):
    pass


def read_config_file(path):
    """The file's raw JSON object ({} when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError("cannot read config file %s: %s" % (path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError("config file %s must hold a JSON object" % path)
    return data


def write_json_atomic(path, data, mode=None):
    """Write JSON next to `path`, fsync, then rename over it: readers see the old or the new file,
    never half of one. Sorted and indented, so the file stays human-editable."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        elif os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_config(path=None, environ=None, overrides=None, sources=None):
    """Defaults, then the file, then the environment, then overrides (command-line flags).

    Returns a dict of every setting with parsed values. `sources`, if given, is filled with
    where each value came from (default / file / env / flag)."""
    environ = os.environ if environ is None else environ
    path = path or default_config_path(environ)
    layers = [("file", read_config_file(path)),
              ("env", {s.key: environ[s.env] for s in SETTINGS if s.env in environ}),
              ("flag", dict(overrides or {}))]
    config = {s.key: s.default for s in SETTINGS}
    origin = {s.key: "default" for s in SETTINGS}
    for layer, values in layers:
        for name, raw in values.items():
            setting = resolve_setting(name)
            if setting is None:
                continue  # unknown keys are kept in the file but ignored here
            try:
                config[setting.key] = setting.parse(raw)
            except ValueError as e:
                raise ConfigError("%s (from %s): %s" % (setting.key, layer, e)) from None
            origin[setting.key] = layer
    config["configPath"] = os.path.abspath(path)
    if sources is not None:
        sources.update(origin)
    return config


def config_relative_path(config, name):
    """A path setting, relative to the config file's directory; None when it is empty."""
    path = os.path.expanduser(config[name])
    if not path:
        return None
    return (path if os.path.isabs(path)
            else os.path.join(os.path.dirname(config["configPath"]), path))


def codex_instructions(config):
    """codexInstructionsFile's text, or None when it is not set. Codex sends a catalog entry's
    base_instructions as its whole system prompt, so an empty file is refused: it would leave
    Codex with none."""
    path = config_relative_path(config, "codexInstructionsFile")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("codexInstructionsFile %s cannot be read: %s" % (path, e)) from None
    if not text.strip():
        raise ConfigError("codexInstructionsFile %s is empty: Codex would send no system "
                          "prompt at all" % path)
    return text


# =====================================================================================
# 3. Logging: levels, rotation, never a key or a prompt
# =====================================================================================

log = logging.getLogger("cc-proxy")
log.addHandler(logging.NullHandler())  # silent until setup_logging (library use, tests)
log.propagate = False
_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG}


def setup_logging(config):
    log.handlers[:] = []
    log.setLevel(_LEVELS[config["logLevel"]])
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    log.addHandler(console)
    if config["logFile"]:
        # imported only here: it pulls in pickle (0.6 MB resident)
        from logging.handlers import RotatingFileHandler
        path = os.path.expanduser(config["logFile"])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rotating = RotatingFileHandler(
            path, maxBytes=config["logMaxSize"], backupCount=config["logMaxFiles"],
            encoding="utf-8")
        rotating.setFormatter(formatter)
        log.addHandler(rotating)


_SECRET_RE = re.compile(r"(user_|sk-(?:ant-)?)[A-Za-z0-9_\-]{4,}")


def redact(text):
    """Strip anything that looks like a key from a message bound for a log."""
    return _SECRET_RE.sub(lambda m: m.group(1) + "***", str(text))


# =====================================================================================
# 4. Canonical request, events, errors
# =====================================================================================

class ProxyError(Exception):
    """Every failure a client can see. Front ends render it in their own protocol's shape.

    kind is one of: invalid_request, authentication, permission, not_found, request_too_large,
    rate_limit, insufficient_quota, overloaded, timeout, upstream, api_error."""

    def __init__(self, status, kind, message, retry_after=None, code=None, should_retry=None,
                 retryable=False, param=None, allow=None, upstream_message=None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.code = code
        self.should_retry = should_retry
        self.retryable = retryable  # may the proxy itself try again (before any client byte)?
        self.param = param
        self.allow = allow          # the methods a route takes, for a 405's Allow header
        # the upstream's own wording: Claude Code decides retries by matching Anthropic's messages
        self.upstream_message = upstream_message

    def headers(self):
        headers = {"Allow": self.allow} if self.allow else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(int(max(0, self.retry_after)))
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers


def bearer_token(headers):
    """The token of an `Authorization: Bearer ...` header, else ""."""
    authorization = (headers.get("authorization") or "").strip()
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""


def key_matches(candidates, expected):
    """Whether any non-empty candidate is the expected key. Every candidate is compared in
    constant time, so the time taken says nothing about any of them."""
    ok = False
    for given in candidates:
        ok |= bool(given) and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                  expected.encode("utf-8"))
    return ok


def bad_request(message, param=None):
    return ProxyError(400, "invalid_request", message, param=param)


@dataclass
class Request:
    """The canonical request every front end decodes into and every backend encodes from.

    messages: [{"role": "user"|"assistant"|"tool", "parts": [part, ...]}] where a part is
      {"type": "text", "text"}
      {"type": "image", "media_type", "data"}  or  {"type": "image", "url"}
      {"type": "reasoning", "text", "signature"}
      {"type": "tool_call", "id", "name", "arguments": dict}
      {"type": "tool_result", "call_id", "name", "content": str, "is_error": bool,
       "images": [image parts]}
    system: [{"text", "cache": bool}]
    tools: [{"name", "description", "schema"}]
    tool_choice: "auto" | "none" | "required" | {"name": ...}
    """
    model: str = ""
    system: List[dict] = field(default_factory=list)
    messages: List[dict] = field(default_factory=list)
    tools: List[dict] = field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: Optional[bool] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: List[str] = field(default_factory=list)
    reasoning_effort: Optional[str] = None
    response_format: Optional[dict] = None
    stream: bool = False
    session_id: Optional[str] = None
    # tools we could not send, named in a header
    dropped_tools: List[str] = field(default_factory=list)
    client_model: str = ""  # the model id as the client asked for it
    explicit_session: Optional[str] = None  # X-Session-Id: the client names its conversation
    working_dir: Optional[str] = None       # X-Working-Dir (claude-code backend)
    # front-end specifics (include_usage, store, ...)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Usage:
    input: int = 0          # all prompt tokens, cached ones included
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0         # reasoning included
    reasoning: int = 0

    @property
    def uncached_input(self):
        return max(0, self.input - self.cache_read - self.cache_write)

    def add(self, other, sign=1):
        for name in ("input", "cache_read", "cache_write", "output", "reasoning"):
            setattr(self, name, max(0, getattr(self, name) + sign * getattr(other, name)))
        return self


def token_count(value):
    """A token count from a backend's JSON: a number, else 0; bounded (sqlite holds 64 bits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        return 0
    return max(0, min(int(value), 10 ** 12))


# Events: what a backend yields, in batches (lists), and what every consumer takes. An empty
# batch is a tick of upstream silence. A backend that fails raises ProxyError; once output has
# reached the client, the pipeline gives the consumer an ErrorEvent in place of a Finish.
class TextDelta(NamedTuple):
    text: str


class ReasoningDelta(NamedTuple):
    text: str


class ReasoningSignature(NamedTuple):   # closes the current reasoning block
    signature: str


class ToolCallStart(NamedTuple):
    call_id: str
    name: str


class ToolCallDelta(NamedTuple):
    call_id: str
    fragment: str       # a piece of the arguments JSON


class ToolCallEnd(NamedTuple):
    call_id: str
    arguments: str      # the complete arguments JSON


class UsageEvent(NamedTuple):   # in the batch that ends with Finish
    usage: Usage


class Finish(NamedTuple):
    reason: str         # stop | length | tool_calls | content_filter | stop_sequence | refusal
    stop_sequence: Optional[str] = None


class ModelUsed(NamedTuple):    # the model id the backend really used
    model: str


class ErrorEvent(NamedTuple):   # the end of a stream that failed after output began
    error: ProxyError


CONTENT_EVENTS = (TextDelta, ReasoningDelta, ToolCallStart)   # what makes an answer non-empty


class EventConsumer:
    """The one interface every consumer of events implements: the non-streaming fold (Completion)
    and each front end's stream encoder. feed() dispatches each event to its on_* method through
    a table keyed by the record's type; a consumer overrides only the events it renders."""

    HANDLERS = {TextDelta: "on_text", ReasoningDelta: "on_reasoning",
                ReasoningSignature: "on_signature", ToolCallStart: "on_tool_start",
                ToolCallDelta: "on_tool_delta", ToolCallEnd: "on_tool_end", UsageEvent: "on_usage",
                Finish: "on_finish", ModelUsed: "on_model", ErrorEvent: "on_error"}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._dispatch = {kind: getattr(cls, name) for kind, name in EventConsumer.HANDLERS.items()}

    def feed(self, batch):
        dispatch = self._dispatch
        for event in batch:
            dispatch[type(event)](self, event)

    def _ignore(self, event):
        pass

    on_text = on_reasoning = on_signature = on_tool_start = on_tool_delta = on_tool_end = _ignore
    on_usage = on_finish = on_model = on_error = _ignore


class Block:
    """One output item of a folded answer: kind "text", "reasoning" or "tool_call"."""
    __slots__ = ("kind", "pieces", "signature", "call_id", "name")

    def __init__(self, kind, text="", call_id="", name=""):
        self.kind = kind
        self.pieces = [text] if text else []   # joined when read: long answers fold in linear time
        self.signature = None                  # reasoning: set by the signature that closes it
        self.call_id = call_id
        self.name = name

    @property
    def text(self):
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    arguments = text   # a tool call's arguments JSON


class Completion(EventConsumer):
    """Events folded into one answer: what a non-streaming response is built from."""

    def __init__(self):
        self.blocks = []
        self.usage = Usage()
        self.finish = "stop"
        self.stop_sequence = None
        self.model = None
        self._tools = {}

    def _last(self, kind):
        block = self.blocks[-1] if self.blocks else None
        return block if block is not None and block.kind == kind else None

    def on_text(self, event):
        if not event.text:
            return
        block = self._last("text")
        if block is None:
            self.blocks.append(Block("text", event.text))
        else:
            block.pieces.append(event.text)

    def on_reasoning(self, event):
        if not event.text:
            return
        block = self._last("reasoning")
        if block is None or block.signature is not None:
            self.blocks.append(Block("reasoning", event.text))
        else:
            block.pieces.append(event.text)

    def on_signature(self, event):
        block = self._last("reasoning")
        if block is not None:
            block.signature = event.signature

    def on_tool_start(self, event):
        block = Block("tool_call", call_id=event.call_id, name=event.name)
        self._tools[event.call_id] = block
        self.blocks.append(block)

    def on_tool_delta(self, event):
        self._tools[event.call_id].pieces.append(event.fragment)

    def on_tool_end(self, event):
        self._tools[event.call_id].pieces = [event.arguments]

    def on_usage(self, event):
        self.usage = event.usage

    def on_finish(self, event):
        self.finish, self.stop_sequence = event.reason, event.stop_sequence

    def on_model(self, event):
        self.model = event.model

    def text(self):
        return "".join(b.text for b in self.blocks if b.kind == "text")

    def reasoning(self):
        return "".join(b.text for b in self.blocks if b.kind == "reasoning")

    def tool_calls(self):
        return [b for b in self.blocks if b.kind == "tool_call"]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub_surrogates(value):
    """Clients' JSON may hold lone UTF-16 surrogates; upstreams reject them once re-serialised."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value) if _LONE_SURROGATE.search(value) else value
    if isinstance(value, list):
        return [scrub_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {scrub_surrogates(k): scrub_surrogates(v) for k, v in value.items()}
    return value


def parse_json_body(raw):
    """Request bytes -> dict, with lone surrogates replaced; 400 on anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request("request body is not valid UTF-8 (byte %d)" % e.start) from None
    try:
        body = _json_decode(text)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        if _LONE_SURROGATE.search(text) or "\\ud" in text or "\\uD" in text:
            body = scrub_surrogates(body)
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None
    except ValueError as e:
        raise bad_request("request body is not valid JSON: %s" % e) from None
    return body


# One encoder, built once: json.dumps with non-default options builds a new encoder per call,
# and this runs for every streamed delta. Output is encoded with errors="replace", so a lone
# surrogate from an upstream's JSON never reaches a client as invalid UTF-8.
json_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number %s is out of range" % text)
    return value


# NaN, Infinity and 1e999 are not JSON: refuse them rather than forward something invalid.
_json_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_json_decode = _json_decoder.decode
# The C scanner itself, for the upstream's NDJSON lines: (value, end) or StopIteration, without
# decode()'s two Python frames and whitespace regex per line (~0.3 us of every relayed event).
_json_scan = _json_decoder.scan_once


def json_line_object(line):
    """A line of JSON that should hold an object -> the object, or {} when it does not."""
    try:
        item = json.loads(line)
    except ValueError:
        return {}
    return item if isinstance(item, dict) else {}


class Fields:
    """Typed access to a client JSON object, so a wrong type is a 400 naming the field."""

    _NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
              list: "an array", dict: "an object"}

    def __init__(self, body, prefix=""):
        self.body = body
        self.prefix = prefix

    def get(self, name, kind, default=None, required=False):
        value = self.body.get(name)
        if value is None:
            if required:
                raise bad_request("'%s%s' is required" % (self.prefix, name), self.prefix + name)
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
                 for k in ((int, float) if float in kinds else ()) + kinds)
        if not ok:
            expected = " or ".join(self._NAMES.get(k, k.__name__) for k in kinds)
            raise bad_request("'%s%s' must be %s" % (self.prefix, name, expected),
                              self.prefix + name)
        return value


def data_url_image(url):
    """'data:image/png;base64,...' -> image part; an http(s) URL -> URL image part."""
    if url.startswith("data:"):
        m = re.match(r"data:([^;,]+)?(;base64)?,(.*)", url, re.S)
        if not m or not m.group(2):
            raise bad_request("image data URLs must be base64 encoded")
        return {"type": "image", "media_type": m.group(1) or "image/png", "data": m.group(3)}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "url": url}
    raise bad_request("image URL must be a data: URL or an http(s) URL")


def arguments_object(text, where):
    """Tool-call arguments as the JSON text clients send -> the object upstreams want."""
    if isinstance(text, dict):
        return text
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        raise bad_request("%s must be a JSON object encoded as a string" % where)
    try:
        value = _json_decode(text)
    except (ValueError, RecursionError):
        raise bad_request("%s must be a JSON object encoded as a string" % where) from None
    if not isinstance(value, dict):
        raise bad_request("%s must encode a JSON object" % where)
    return value


def tool_definition(spec, schema_field, where):
    """A client's function tool -> canonical tool. A missing or non-object root schema becomes an
    empty object schema: Command Code refuses the whole request over one such tool."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request("'%s.name' is required" % where, where + ".name")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise bad_request("'%s.description' must be a string" % where, where + ".description")
    schema = spec.get(schema_field)
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        schema = {"type": "object", "properties": {}}
    return {"name": spec["name"], "description": description, "schema": schema}


def json_format_instruction(fmt):
    """response_format / text.format json modes, honoured by instruction (best effort)."""
    if not fmt:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("the response format must be an object such as "
                          "{\"type\": \"json_object\"}", "response_format")
    if fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return ("Respond with a single valid JSON object and nothing else "
                "(no prose, no code fences).")
    if fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema", fmt)
        if not isinstance(schema, dict):
            raise bad_request("'json_schema' must be an object", "response_format.json_schema")
        return ("Respond with a single valid JSON object that conforms to this JSON Schema, "
                "and nothing else (no prose, no code fences):\n"
                + json_dumps(schema.get("schema", schema)))
    raise bad_request("response format type %r is not supported" % fmt.get("type"),
                      "response_format")


_CJK = re.compile("[\u1100-\u11ff\u2e80-\ua4cf\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def estimate_tokens(text):
    """Local token estimate: ~4 characters per token for Latin text, ~1 token per CJK character."""
    if not text:
        return 0
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk + 3) // 4


def estimate_request_tokens(request):
    """Prompt size of a canonical request: system, messages, tools, images (~1 600 tokens each)."""
    total = sum(estimate_tokens(p["text"]) for p in request.system)
    for message in request.messages:
        total += 4
        for part in message["parts"]:
            kind = part["type"]
            if kind in ("text", "reasoning"):
                total += estimate_tokens(part["text"])
            elif kind == "image":
                total += 1600
            elif kind == "tool_call":
                total += estimate_tokens(part["name"] + json_dumps(part["arguments"]))
            elif kind == "tool_result":
                total += estimate_tokens(part["content"]) + 1600 * len(part.get("images") or ())
    for tool in request.tools:
        total += estimate_tokens(tool["name"] + (tool["description"] or "")
                                 + json_dumps(tool["schema"]))
    return max(1, total)


class TokenCalibration:
    """Per-model correction of the local estimate from real usage: each finished answer whose
    backend counts the prompt as sent (Command Code) gives the ratio of its input tokens to our
    estimate of that request; the factor is their running mean, smoothed and bounded. In memory
    only, keyed by model id: nothing of a prompt is kept."""

    SMOOTHING = 0.2          # weight of each new observation once warmed up
    BOUNDS = (0.5, 2.0)      # a factor outside this is an outlier, not a tokenizer
    MIN_ESTIMATE = 50        # tiny requests say more about overheads than about the tokenizer

    def __init__(self, models=256):
        self.lock = threading.Lock()
        self.factors = collections.OrderedDict()   # model -> (factor, observations)
        self.models = models

    def observe(self, model, estimate, actual):
        if estimate < self.MIN_ESTIMATE or actual <= 0:
            return
        ratio = min(self.BOUNDS[1], max(self.BOUNDS[0], actual / estimate))
        with self.lock:
            factor, seen = self.factors.pop(model, (1.0, 0))
            weight = max(self.SMOOTHING, 1.0 / (seen + 1))   # a plain mean until warmed up
            self.factors[model] = (factor + (ratio - factor) * weight, seen + 1)
            while len(self.factors) > self.models:
                self.factors.popitem(last=False)

    def factor(self, model):
        with self.lock:
            return self.factors.get(model, (1.0, 0))[0]

    def estimate(self, request, raw=None):
        """The calibrated estimate (of `raw` when already counted); models are known by the id
        the client used."""
        raw = estimate_request_tokens(request) if raw is None else raw
        return max(1, int(round(raw * self.factor(request.client_model or request.model))))


class Slots:
    """A counted limit shared by request threads: model requests in flight, CLI processes
    running."""

    def __init__(self, limit):
        self.limit = limit
        self.count = 0
        self.changed = threading.Condition()

    def acquire(self, timeout=0.0):
        with self.changed:
            if not self.changed.wait_for(lambda: self.count < self.limit, timeout):
                return False
            self.count += 1
            return True

    def release(self):
        with self.changed:
            self.count -= 1
            self.changed.notify_all()

    @contextlib.contextmanager
    def held(self, timeout=0.0):
        """`with slots.held() as admitted:` -- released on the way out, whatever raised."""
        admitted = self.acquire(timeout)
        try:
            yield admitted
        finally:
            if admitted:
                self.release()

    def wait_idle(self, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: self.count == 0, timeout)


def append_parts(request, role, parts):
    """Consecutive assistant or tool items (reasoning, then a function call; several results)
    form one turn."""
    if request.messages and request.messages[-1]["role"] == role and role != "user":
        request.messages[-1]["parts"].extend(parts)
    else:
        request.messages.append({"role": role, "parts": parts})


# Ids a client or the upstream sees (request, response, trace and call ids): a keyed hash of a
# counter, as unpredictable as the key, without a getrandom() system call per id (each one a
# turn at the GIL for every busy thread).
_ID_KEY = secrets.token_bytes(32)
_ID_COUNTER = itertools.count()


def random_hex(digits):
    """`digits` (at most 128) hex digits no one without this process's key can predict."""
    digest = hashlib.blake2b(next(_ID_COUNTER).to_bytes(8, "little"), key=_ID_KEY)
    return digest.hexdigest()[:digits]


def new_id(prefix):
    return prefix + random_hex(24)


def fold_system_text(request, text, cache=False):
    if text:
        request.system.append({"text": text, "cache": cache})


# =====================================================================================
# 5. Front ends: OpenAI Chat Completions, Anthropic Messages, OpenAI Responses
#
# Each front end is a decoder (wire JSON -> Request), a stream encoder (event batches ->
# SSE bytes), a body renderer (Completion -> JSON) and an error renderer.
# =====================================================================================

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def openai_usage(usage):
    return {"prompt_tokens": usage.input, "completion_tokens": usage.output,
            "total_tokens": usage.input + usage.output,
            "prompt_tokens_details": {"cached_tokens": usage.cache_read},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning}}


_OPENAI_ERROR_TYPES = {"invalid_request": "invalid_request_error",
                       "authentication": "authentication_error",
                       "permission": "permission_error", "not_found": "not_found_error",
                       "request_too_large": "invalid_request_error",
                       "rate_limit": "rate_limit_error",
                       "insufficient_quota": "insufficient_quota", "overloaded": "server_error",
                       "timeout": "timeout_error", "upstream": "api_error",
                       "api_error": "api_error"}


def openai_error_body(err):
    return {"error": {"message": err.message,
                      "type": _OPENAI_ERROR_TYPES.get(err.kind, "api_error"),
                      "param": err.param, "code": err.code or err.kind}}


def _sse_data(obj):
    return "data: " + json_dumps(obj) + "\n\n"


def text_of_parts(content, where, allowed=("text", "input_text", "output_text")):
    """A string, or a list of text parts, as one string (system / developer / tool content)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad_request("'%s' must be a string or an array of text parts" % where, where)
    texts = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif (isinstance(part, dict) and part.get("type") in allowed
              and isinstance(part.get("text"), str)):
            texts.append(part["text"])
        else:
            raise bad_request("'%s[%d]' must be a text part" % (where, i), "%s[%d]" % (where, i))
    return "\n".join(texts)


class FrontEnd:
    """What the three client protocols share; each subclass adds its decoder and encoders."""

    overloaded_status = 503
    keepalive = b": keep-alive\n\n"      # SSE comment during upstream silence
    error_body = staticmethod(openai_error_body)
    request_id_header = None   # the protocol's own name for X-Request-Id on errors, if it has one
    route = ""

    def owns(self, path):
        """Errors for requests to this path are rendered in this protocol's shape."""
        return path == self.route or path.startswith(self.route + "/")

    def spoken_by(self, headers, query):
        """Does a request on a route no front end owns (models, 404s) speak this protocol?"""
        return False

    def routes(self):
        """(path, method, handler(request handler, rest of the path)); a path ending in "/" takes a
        parameter. The model route, plus whatever extra routes the protocol has."""
        return [(self.route, "POST", lambda handler, _: handler.model_request(self))]

    @staticmethod
    def model_list(models, owner, query):
        """GET /v1/models in OpenAI's shape, all at once (the Anthropic front end pages)."""
        return {"object": "list", "data": [FrontEnd.model_object(m, owner) for m in models]}

    @staticmethod
    def model_object(model, owner):
        return {"id": model.id, "object": "model", "created": 0, "owned_by": owner}

    @staticmethod
    def begin(body, max_tokens_fields):
        """The fields every protocol has: model, stream, sampling, the output token limit."""
        f = Fields(body)
        request = Request(stream=bool(f.get("stream", bool, False)))
        request.model = request.client_model = f.get("model", str, "")
        request.temperature = f.get("temperature", float)
        request.top_p = f.get("top_p", float)
        for name in max_tokens_fields:
            request.max_tokens = f.get(name, int)
            if request.max_tokens is not None:
                if request.max_tokens < 1:
                    raise bad_request("'%s' must be at least 1" % name, name)
                break
        return f, request


def openai_tool_choice(choice):
    """Chat's {"type":"function","function":{"name"}} or Responses' {"type":"function","name"}."""
    if choice is None or choice == "auto":
        return "auto"
    if choice in ("none", "required"):
        return choice
    named = choice.get("function") or choice if isinstance(choice, dict) else None
    if isinstance(named, dict) and isinstance(named.get("name"), str):
        return {"name": named["name"]}
    raise bad_request("'tool_choice' must be none, auto, required or a function", "tool_choice")


class ChatCompletions(FrontEnd):
    """OpenAI Chat Completions: POST /v1/chat/completions."""

    name = "chat"
    route = "/v1/chat/completions"
    id_prefix = "chatcmpl-"

    # ---- decode -------------------------------------------------------------------
    def decode(self, body, headers):
        f, request = self.begin(body, ("max_completion_tokens", "max_tokens"))
        messages = f.get("messages", list, required=True)
        if not messages:
            raise bad_request("'messages' must not be empty", "messages")
        if f.get("n", int, 1) != 1:
            raise bad_request("'n' other than 1 is not supported: one answer per request", "n")
        if f.get("logprobs", bool, False) or body.get("top_logprobs") is not None:
            raise bad_request("'logprobs' is not supported by this backend", "logprobs")
        tool_names = {}
        for i, message in enumerate(messages):
            self._decode_message(request, message, "messages[%d]" % i, tool_names)
        for i, tool in enumerate(f.get("tools", list, [])):
            request.tools.append(tool_definition(
                tool.get("function") if isinstance(tool, dict) else None,
                "parameters", "tools[%d].function" % i))
        for i, fn in enumerate(f.get("functions", list, [])):  # legacy function calling
            request.tools.append(tool_definition(fn, "parameters", "functions[%d]" % i))
        request.tool_choice = openai_tool_choice(body.get("tool_choice", body.get("function_call")))
        request.parallel_tool_calls = f.get("parallel_tool_calls", bool)
        stop = f.get("stop", (str, list))
        request.stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in request.stop):
            raise bad_request("'stop' must be a string or an array of strings", "stop")
        effort = f.get("reasoning_effort", str)
        if effort is not None and effort not in EFFORTS:
            raise bad_request("'reasoning_effort' must be one of " + ", ".join(EFFORTS),
                              "reasoning_effort")
        request.reasoning_effort = effort
        fmt = f.get("response_format", dict)
        fold_system_text(request, json_format_instruction(fmt))
        options = f.get("stream_options", dict, {})
        request.options["include_usage"] = bool(options.get("include_usage"))
        request.session_id = headers.get("x-session-id") or headers.get("x-claude-code-session-id")
        return request

    def _decode_message(self, request, message, where, tool_names):
        if not isinstance(message, dict):
            raise bad_request("'%s' must be an object" % where, where)
        role = message.get("role")
        decode = self.ROLES.get(role) if isinstance(role, str) else None
        if decode is None:
            raise bad_request("'%s.role' must be system, developer, user, assistant or tool"
                              % where, where + ".role")
        decode(self, request, message, where, tool_names)

    def _system(self, request, message, where, tool_names):
        fold_system_text(request, text_of_parts(message.get("content"), where + ".content"))

    def _user(self, request, message, where, tool_names):
        request.messages.append({"role": "user", "parts": self._user_parts(message.get("content"),
                                                                           where + ".content")})

    def _assistant(self, request, message, where, tool_names):
        parts = []
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if isinstance(reasoning, str) and reasoning:
            parts.append({"type": "reasoning", "text": reasoning, "signature": None})
        content = message.get("content")
        if content:
            text = text_of_parts(content, where + ".content", ("text", "output_text", "refusal")) \
                if not isinstance(content, str) else content
            if text:
                parts.append({"type": "text", "text": text})
        parts += self._tool_calls(request, message, where, tool_names)
        if parts:
            request.messages.append({"role": "assistant", "parts": parts})

    @staticmethod
    def _tool_calls(request, message, where, tool_names):
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise bad_request("'%s.tool_calls' must be an array" % where, where + ".tool_calls")
        named = []   # (where, where its function is, id, function)
        for j, call in enumerate(calls):
            call = call if isinstance(call, dict) else {}
            here = "%s.tool_calls[%d]" % (where, j)
            named.append((here, here + ".function", call.get("id"), call.get("function")))
        legacy = message.get("function_call")   # before tool_calls: one call, named by its function
        if isinstance(legacy, dict) and isinstance(legacy.get("name"), str):
            named.append((where, where + ".function_call", legacy["name"], legacy))
        parts = []
        for j, (here, fn_where, call_id, fn) in enumerate(named):
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request("'%s.name' is required" % fn_where)
            call_id = call_id or "call_%d_%d" % (len(request.messages), j)
            if not isinstance(call_id, str):
                raise bad_request("'%s.id' must be a string" % here)
            tool_names[call_id] = fn["name"]
            parts.append({"type": "tool_call", "id": call_id, "name": fn["name"], "arguments":
                          arguments_object(fn.get("arguments"), "'%s.arguments'" % fn_where)})
        return parts

    def _tool_result(self, request, message, where, tool_names):
        call_id = message.get("tool_call_id") or message.get("name")
        if not isinstance(call_id, str):
            raise bad_request("'%s.tool_call_id' is required" % where, where + ".tool_call_id")
        append_parts(request, "tool", [{
            "type": "tool_result", "call_id": call_id, "name": tool_names.get(call_id, "unknown"),
            "content": text_of_parts(message.get("content"), where + ".content"), "is_error": False,
            "images": []}])

    ROLES = {"system": _system, "developer": _system, "user": _user, "assistant": _assistant,
             "tool": _tool_result, "function": _tool_result}

    @staticmethod
    def _user_parts(content, where):
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise bad_request("'%s' must be a string or an array of parts" % where, where)
        parts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise bad_request("'%s[%d].image_url.url' is required" % (where, i))
                parts.append(data_url_image(url))
            else:
                raise bad_request("'%s[%d]' has unsupported type %r "
                                  "(text and image_url are supported)"
                                  % (where, i, kind), "%s[%d]" % (where, i))
        return parts

    # ---- encode -------------------------------------------------------------------
    def stream_encoder(self, request, exchange):
        return ChatStreamEncoder(request, exchange, request.options["include_usage"])

    def render(self, completion, request, exchange):
        message = {"role": "assistant", "content": completion.text() or None}
        reasoning = completion.reasoning()
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = completion.tool_calls()
        if calls:
            message["tool_calls"] = [{"id": c.call_id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in calls]
        return {"id": exchange.response_id, "object": "chat.completion",
                "created": exchange.created, "model": completion.model or request.model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": CHAT_FINISH[completion.finish]}],
                "usage": openai_usage(completion.usage), "system_fingerprint": None}


CHAT_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
               "content_filter": "content_filter", "stop_sequence": "stop",
               "refusal": "content_filter"}


class StreamEncoder(EventConsumer):
    """A consumer that renders events as one front end's SSE: start() is what goes out with the
    status line, encode(batch) the bytes for one batch (each on_* method appends to self.out)."""

    def start(self):
        return b""

    def encode(self, batch):
        self.out = []
        self.feed(batch)
        return "".join(self.out).encode("utf-8", "replace")


class ChatStreamEncoder(StreamEncoder):
    """Events -> chat.completion.chunk SSE. The JSON around each delta is built once."""

    def __init__(self, request, exchange, include_usage):
        self.head = ('data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,'
                     '"choices":[{"index":0,"delta":'
                     % (json_dumps(exchange.response_id), exchange.created,
                        json_dumps(request.model)))
        self.tail = ',"logprobs":null,"finish_reason":null}]}\n\n'
        self.include_usage = include_usage
        self.tools = {}        # call id -> [index, arguments streamed?]
        self.usage = Usage()
        self.exchange = exchange
        self.model = request.model

    def start(self):
        return (self.head + '{"role":"assistant","content":""}' + self.tail).encode()

    def _delta(self, delta_json):
        self.out.append(self.head + delta_json + self.tail)

    def on_text(self, event):   # the hottest path of a relay: no helper call
        if event.text:
            self.out.append(self.head + '{"content":' + json_dumps(event.text) + "}" + self.tail)

    def on_reasoning(self, event):
        if event.text:
            self._delta('{"reasoning_content":' + json_dumps(event.text) + "}")

    def on_tool_start(self, event):
        index = len(self.tools)
        self.tools[event.call_id] = [index, False]
        self._delta('{"tool_calls":[{"index":%d,"id":%s,"type":"function","function":{"name":%s,'
                    '"arguments":""}}]}'
                    % (index, json_dumps(event.call_id), json_dumps(event.name)))

    def _arguments(self, index, fragment):
        self._delta('{"tool_calls":[{"index":%d,"function":{"arguments":%s}}]}'
                    % (index, json_dumps(fragment)))

    def on_tool_delta(self, event):
        state = self.tools[event.call_id]
        if event.fragment:
            state[1] = True
            self._arguments(state[0], event.fragment)

    def on_tool_end(self, event):
        state = self.tools[event.call_id]
        if not state[1]:  # only the final call arrived: its arguments in one delta
            self._arguments(state[0], event.arguments)

    def on_usage(self, event):
        self.usage = event.usage

    def on_finish(self, event):
        usage = openai_usage(self.usage)
        chunk = {"id": self.exchange.response_id, "object": "chat.completion.chunk",
                 "created": self.exchange.created, "model": self.model,
                 "choices": [{"index": 0, "delta": {}, "logprobs": None,
                              "finish_reason": CHAT_FINISH[event.reason]}]}
        if self.include_usage:
            self.out.append(_sse_data(chunk))
            chunk = dict(chunk, choices=[])
        chunk["usage"] = usage
        self.out.append(_sse_data(chunk) + "data: [DONE]\n\n")

    def on_error(self, event):
        self.out.append(_sse_data(openai_error_body(event.error)))


# ---- Anthropic Messages -----------------------------------------------------------

_ANTHROPIC_ERROR_TYPES = {"invalid_request": "invalid_request_error",
                          "authentication": "authentication_error",
                          "permission": "permission_error", "not_found": "not_found_error",
                          "request_too_large": "request_too_large",
                          "rate_limit": "rate_limit_error",
                          "insufficient_quota": "rate_limit_error",
                          "overloaded": "overloaded_error",
                          "timeout": "api_error", "upstream": "api_error",
                          "api_error": "api_error"}
ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "content_filter": "refusal", "stop_sequence": "stop_sequence",
                  "refusal": "refusal"}
_SESSION_IN_USER_ID = re.compile(r"session_?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                                 r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12})")
# Anthropic server-side tools (web search, code execution, ...) carry a versioned type;
# no backend runs them.
_CUSTOM_TOOL_TYPES = (None, "custom", "function")


def anthropic_error_body(err):
    """Anthropic's type, and the upstream's message as it wrote it where there is one."""
    return {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(err.kind, "api_error"),
                                       "message": err.upstream_message or err.message}}


def anthropic_usage(usage):
    return {"input_tokens": usage.uncached_input, "output_tokens": usage.output,
            "cache_read_input_tokens": usage.cache_read,
            "cache_creation_input_tokens": usage.cache_write}


def thinking_signature(text):
    """A stable, well-formed signature for reasoning that has none of its own. Clients replay
    it with the thinking block; we accept and drop it, so it only has to look right."""
    digest = hmac.new(_SIGNATURE_SECRET, text.encode("utf-8", "replace"), hashlib.sha256).digest()
    return base64.b64encode(b"ccproxy1" + digest).decode()


_SIGNATURE_SECRET = secrets.token_bytes(32)


def anthropic_session_id(metadata):
    """Claude Code's metadata.user_id carries its session id (a JSON string, or the older
    'user_<hash>_account_<uuid>_session_<uuid>' form)."""
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return None
    try:
        decoded = json.loads(user_id)
        if isinstance(decoded, dict) and isinstance(decoded.get("session_id"), str):
            return decoded["session_id"]
    except ValueError:
        pass
    m = _SESSION_IN_USER_ID.search(user_id)
    return m.group(1) if m else None


def thinking_effort(thinking, output_config):
    """thinking / output_config.effort -> canonical reasoning effort (None = backend default)."""
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    if not isinstance(thinking, dict):
        return effort if effort in EFFORTS else None
    kind = thinking.get("type")
    if kind == "disabled":
        return "none"
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            return effort if effort in EFFORTS else "medium"
        return "high" if budget >= 10000 else "medium" if budget >= 5000 else "low"
    if kind == "adaptive":
        effort = effort or thinking.get("effort")
        return effort if effort in EFFORTS else None
    raise bad_request("'thinking.type' must be enabled, adaptive or disabled", "thinking.type")


class AnthropicMessages(FrontEnd):
    """Anthropic Messages: POST /v1/messages (and count_tokens)."""

    name = "messages"
    route = "/v1/messages"
    id_prefix = "msg_"
    # what Anthropic answers, and what Claude Code and the SDK retry as overloaded
    overloaded_status = 529
    keepalive = b'event: ping\ndata: {"type":"ping"}\n\n'
    error_body = staticmethod(anthropic_error_body)
    request_id_header = "request-id"

    def spoken_by(self, headers, query):
        return bool(headers and headers.get("anthropic-version"))

    def routes(self):
        return super().routes() + [(self.route + "/count_tokens", "POST", self._count_tokens_route)]

    def _count_tokens_route(self, handler, _):
        raw = handler.read_body()
        handler.authenticate()
        handler.send_json(200, self.count_tokens(parse_json_body(raw), handler.headers,
                                                 handler.server.pipeline.calibration))

    @staticmethod
    def model_list(models, owner, query):
        """Anthropic's page: ?limit (1-1000, default 20), ?after_id or ?before_id."""
        limit = (query.get("limit") or ["20"])[0]
        if not re.fullmatch(r"[0-9]{1,4}", limit) or not 1 <= int(limit) <= 1000:
            raise bad_request("'limit' must be an integer from 1 to 1000", "limit")
        ids = [m.id for m in models]
        after, before = ((query.get(name) or [None])[0] for name in ("after_id", "before_id"))
        for name, given in (("after_id", after), ("before_id", before)):
            if given is not None and given not in ids:
                raise bad_request("%s %r is not a listed model" % (name, given), name)
        start = ids.index(after) + 1 if after is not None else 0
        end = ids.index(before) if before is not None else len(ids)
        page = models[start:end]
        page = page[-int(limit):] if before is not None and after is None else page[:int(limit)]
        data = [AnthropicMessages.model_object(m, owner) for m in page]
        return {"data": data, "has_more": len(page) < max(0, end - start),
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @staticmethod
    def model_object(model, owner):
        return {"type": "model", "id": model.id, "display_name": model.label,
                "created_at": "2026-01-01T00:00:00Z"}

    def decode(self, body, headers):
        f, request = self.begin(body, ("max_tokens",))
        system = f.get("system", (str, list))
        if isinstance(system, str):
            fold_system_text(request, system, cache=True)
        elif system:
            for i, block in enumerate(system):
                if not isinstance(block, dict) or not isinstance(block.get("text"), str):
                    raise bad_request("'system[%d]' must be a text block" % i, "system[%d]" % i)
                fold_system_text(request, block["text"], cache=bool(block.get("cache_control")))
        messages = f.get("messages", list, required=True)
        if not messages:
            raise bad_request("'messages' must not be empty", "messages")
        for i, message in enumerate(messages):
            self._decode_message(request, message, "messages[%d]" % i)
        for i, tool in enumerate(f.get("tools", list, [])):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise bad_request("'tools[%d].name' is required" % i, "tools[%d].name" % i)
            if tool.get("type") not in _CUSTOM_TOOL_TYPES:
                request.dropped_tools.append(tool["name"])
                continue
            # a tool without input_schema (Claude Code's deferred placeholder) gets an empty one
            request.tools.append(tool_definition(tool, "input_schema", "tools[%d]" % i))
        choice = f.get("tool_choice", dict)
        if choice:
            kind = choice.get("type")
            if kind == "tool" and isinstance(choice.get("name"), str):
                request.tool_choice = {"name": choice["name"]}
            elif kind in ("auto", "any", "none"):
                request.tool_choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
            else:
                raise bad_request("'tool_choice.type' must be auto, any, tool or none",
                                  "tool_choice.type")
            if choice.get("disable_parallel_tool_use"):
                request.parallel_tool_calls = False
        f.get("top_k", int)  # validated, then ignored: no backend takes it
        stops = f.get("stop_sequences", list, [])
        if not all(isinstance(s, str) for s in stops):
            raise bad_request("'stop_sequences' must be an array of strings", "stop_sequences")
        request.stop = stops
        request.reasoning_effort = thinking_effort(f.get("thinking", dict),
                                                   f.get("output_config", dict))
        request.session_id = (headers.get("x-session-id") or headers.get("x-claude-code-session-id")
                              or anthropic_session_id(f.get("metadata", dict)))
        return request

    def _decode_message(self, request, message, where):
        if not isinstance(message, dict):
            raise bad_request("'%s' must be an object" % where, where)
        role, content = message.get("role"), message.get("content")
        if role == "system":  # Claude Code puts its environment block here, list or string
            fold_system_text(request, text_of_parts(content, where + ".content"))
            return
        if role not in ("user", "assistant"):
            raise bad_request("'%s.role' must be user or assistant" % where, where + ".role")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise bad_request("'%s.content' must be a string or an array of blocks" % where,
                              where + ".content")
        parts, results = [], []
        for i, block in enumerate(content):
            here = "%s.content[%d]" % (where, i)
            kind = block.get("type") if isinstance(block, dict) else None
            decode = self.BLOCKS.get((role, kind)) if isinstance(kind, str) else None
            if decode is None:
                raise bad_request("'%s' has unsupported type %r for role %s"
                                  % (here, kind, role), here)
            part = decode(self, request, block, here)
            if part is not None:
                (results if part["type"] == "tool_result" else parts).append(part)
        if results:
            request.messages.append({"role": "tool", "parts": results})
        if parts:
            request.messages.append({"role": role, "parts": parts})

    def _text_block(self, request, block, here):
        if not isinstance(block.get("text"), str):
            raise bad_request("'%s.text' must be a string" % here, here + ".text")
        return {"type": "text", "text": block["text"]} if block["text"] else None

    def _image_block(self, request, block, here):
        return self._image(block, here)

    def _thinking_block(self, request, block, here):
        # earlier reasoning goes back upstream; its signature is ours to accept and drop
        if block.get("type") == "thinking" and block.get("thinking"):
            return {"type": "reasoning", "text": str(block["thinking"]),
                    "signature": block.get("signature")}
        return None

    def _tool_use_block(self, request, block, here):
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise bad_request("'%s' needs an id and a name" % here, here)
        tool_input = block.get("input")
        if isinstance(tool_input, str):
            tool_input = arguments_object(tool_input, "'%s.input'" % here)
        return {"type": "tool_call", "id": block["id"], "name": block["name"],
                "arguments": tool_input if isinstance(tool_input, dict) else {}}

    def _server_tool_block(self, request, block, here):
        return None  # server-executed tool traffic is not replayed (as the official CLI does)

    def _document_block(self, request, block, here):
        raise bad_request("'%s': document blocks (PDF) are not supported by this backend; send "
                          "the text or images of the document instead" % here, here)

    @staticmethod
    def _image(block, where):
        source = block.get("source")
        if not isinstance(source, dict):
            raise bad_request("'%s.source' is required" % where, where + ".source")
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            return {"type": "image", "media_type": source.get("media_type") or "image/png",
                    "data": source["data"]}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return data_url_image(source["url"])
        raise bad_request("'%s.source' must be base64 data or a url" % where, where + ".source")

    def _tool_result(self, request, block, where):
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str):
            raise bad_request("'%s.tool_use_id' is required" % where, where + ".tool_use_id")
        content = block.get("content")
        texts, images = [], []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text":
                    texts.append(str(item.get("text", "")))
                elif kind == "image":
                    images.append(self._image(item, "%s.content[%d]" % (where, j)))
                else:
                    texts.append(json_dumps(item))
        name = "unknown"
        for message in reversed(request.messages):
            for part in message["parts"]:
                if part["type"] == "tool_call" and part["id"] == call_id:
                    name = part["name"]
        return {"type": "tool_result", "call_id": call_id, "name": name,
                "content": "\n".join(texts), "is_error": bool(block.get("is_error")),
                "images": images}

    BLOCKS = {("user", "image"): _image_block, ("user", "tool_result"): _tool_result,
              ("assistant", "thinking"): _thinking_block,
              ("assistant", "redacted_thinking"): _thinking_block,
              ("assistant", "tool_use"): _tool_use_block}
    for _role in ("user", "assistant"):
        BLOCKS[_role, "text"] = _text_block
        BLOCKS[_role, "document"] = _document_block
        for _kind in ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                      "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result"):
            BLOCKS[_role, _kind] = _server_tool_block
    del _role, _kind

    def stream_encoder(self, request, exchange):
        return AnthropicStreamEncoder(request, exchange)

    def render(self, completion, request, exchange):
        content = []
        for block in completion.blocks:
            if block.kind == "text":
                if block.text:
                    content.append({"type": "text", "text": block.text})
            elif block.kind == "reasoning":
                content.append({"type": "thinking", "thinking": block.text,
                                "signature": block.signature or thinking_signature(block.text)})
            else:
                content.append({"type": "tool_use", "id": block.call_id, "name": block.name,
                                "input": decoded_arguments(block.arguments)})
        return {"id": exchange.response_id, "type": "message", "role": "assistant",
                "model": completion.model or request.model, "content": content,
                "stop_reason": ANTHROPIC_STOP[completion.finish],
                "stop_sequence": completion.stop_sequence,
                "usage": anthropic_usage(completion.usage)}

    def count_tokens(self, body, headers, calibration=None):
        request = self.decode(dict(body, stream=False), headers)
        return {"input_tokens": calibration.estimate(request) if calibration
                else estimate_request_tokens(request)}


def decoded_arguments(text):
    """Arguments JSON from a backend -> object; a model's malformed JSON becomes {}."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _sse_event(name, obj):
    return "event: " + name + "\ndata: " + json_dumps(obj) + "\n\n"


_BLOCK_STOP = 'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_BLOCK_DELTA = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                '"delta":{"type":%s,%s:%s}}\n\n')


class AnthropicStreamEncoder(StreamEncoder):
    """Events -> Anthropic SSE: message_start, content blocks (contiguous indexes), message_delta,
    message_stop. A thinking block always ends with a signature_delta."""

    def __init__(self, request, exchange):
        self.request = request
        self.exchange = exchange
        self.index = -1
        self.open = None         # "text" | "thinking" | tool call id
        self.thinking = []       # text of the open thinking block, for its signature
        self.streamed_args = False
        self.usage = None

    def start(self):
        usage = {"input_tokens": self.exchange.input_estimate, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        message = {"id": self.exchange.response_id, "type": "message", "role": "assistant",
                   "model": self.request.model, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": usage}
        return (_sse_event("message_start", {"type": "message_start", "message": message}) +
                'event: ping\ndata: {"type":"ping"}\n\n').encode("utf-8", "replace")

    def _delta(self, kind, name, value):
        self.out.append(_BLOCK_DELTA % (self.index, kind, name, json_dumps(value)))

    def _close(self, signature=None):
        if self.open is None:
            return
        if self.open == "thinking":
            self._delta('"signature_delta"', '"signature"',
                        signature or thinking_signature("".join(self.thinking)))
        self.out.append(_BLOCK_STOP % self.index)
        self.open = None

    def _open(self, kind, block):
        self._close()
        self.index += 1
        self.open = kind
        self.out.append(_sse_event("content_block_start", {
            "type": "content_block_start", "index": self.index, "content_block": block}))

    def on_text(self, event):
        if event.text:
            if self.open != "text":
                self._open("text", {"type": "text", "text": ""})
            self._delta('"text_delta"', '"text"', event.text)

    def on_reasoning(self, event):
        if event.text:
            if self.open != "thinking":
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                self.thinking = []
            self.thinking.append(event.text)
            self._delta('"thinking_delta"', '"thinking"', event.text)

    def on_signature(self, event):
        if self.open == "thinking":
            self._close(event.signature)

    def on_tool_start(self, event):
        self._open(event.call_id, {"type": "tool_use", "id": event.call_id, "name": event.name,
                                   "input": {}})
        self.streamed_args = False

    def on_tool_delta(self, event):
        if self.open == event.call_id and event.fragment:
            self.streamed_args = True
            self._delta('"input_json_delta"', '"partial_json"', event.fragment)

    def on_tool_end(self, event):
        if self.open == event.call_id:
            if not self.streamed_args:
                self._delta('"input_json_delta"', '"partial_json"', event.arguments)
            self._close()

    def on_usage(self, event):
        self.usage = event.usage

    def on_finish(self, event):
        self._close()
        self.out.append(_sse_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": ANTHROPIC_STOP[event.reason],
                      "stop_sequence": event.stop_sequence},
            "usage": anthropic_usage(self.usage or Usage())}))
        self.out.append('event: message_stop\ndata: {"type":"message_stop"}\n\n')

    def on_error(self, event):
        self.out.append(_sse_event("error", anthropic_error_body(event.error)))


# ---- OpenAI Responses --------------------------------------------------------------

# Built-in Responses tool types no backend here can run; Codex sends some on every request.
_RESPONSES_FUNCTION_TYPES = ("function",)


def custom_tool_definition(tool, where):
    """A freeform (custom) tool, offered upstream as a function of one string, `input`; its
    grammar or format travels in the description (no backend here constrains decoding)."""
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise bad_request("'%s.name' is required" % where, where + ".name")
    description = str(tool.get("description") or "")
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        description += ("\n\nCall this tool with its raw input in `input` (plain text, not JSON), "
                        "following this %s grammar exactly:\n%s"
                        % (fmt.get("syntax") or "lark", fmt.get("definition") or ""))
    else:
        description += "\n\nCall this tool with its raw input in `input` (plain text, not JSON)."
    return {"name": tool["name"], "description": description.strip(),
            "schema": {"type": "object", "required": ["input"], "additionalProperties": False,
                       "properties": {"input": {"type": "string",
                                                "description": "the tool's raw input"}}}}


def custom_input(arguments):
    """A custom tool call's raw input, from the function arguments the backend produced."""
    value = decoded_arguments(arguments).get("input")
    return value if isinstance(value, str) else arguments or ""


def completion_message(completion):
    """The assistant turn a Completion stands for, as a canonical message (for chaining)."""
    parts = []
    for block in completion.blocks:
        if block.kind == "tool_call":
            parts.append({"type": "tool_call", "id": block.call_id, "name": block.name,
                          "arguments": decoded_arguments(block.arguments)})
        elif block.text:
            parts.append({"type": block.kind, "text": block.text} if block.kind == "text" else
                         {"type": "reasoning", "text": block.text, "signature": block.signature})
    return {"role": "assistant", "parts": parts}


class StoredResponse(NamedTuple):
    expires: float          # monotonic time
    response: dict          # the response object, as GET /v1/responses/{id} returns it
    messages: list          # the canonical conversation up to and including its answer


class ResponseStore:
    """Recent Responses (input + output) so previous_response_id chains work. Bounded, TTL'd."""

    def __init__(self, limit=1000, ttl=3600.0):
        self.limit, self.ttl = limit, ttl
        self.lock = threading.Lock()
        # id -> StoredResponse
        self.items = collections.OrderedDict()

    def put(self, response_id, response, messages):
        with self.lock:
            self.items[response_id] = StoredResponse(time.monotonic() + self.ttl, response,
                                                     messages)
            self.items.move_to_end(response_id)
            while len(self.items) > self.limit:
                self.items.popitem(last=False)

    def get(self, response_id):
        with self.lock:
            item = self.items.get(response_id)
            if item is None or item.expires < time.monotonic():
                self.items.pop(response_id, None)
                return None
            return item

    def output_item(self, item_id):
        """An output item of a stored response by its id (msg_/rs_/fc_<response>_<index>)."""
        prefix, _, rest = item_id.partition("_")
        response_hex, _, _ = rest.rpartition("_")
        if prefix + "_" not in ("msg_", "rs_", "fc_", "ctc_") or not response_hex:
            return None
        stored = self.get("resp_" + response_hex)
        outputs = stored.response["output"] if stored else ()
        return next((item for item in outputs if item.get("id") == item_id), None)


class ReasoningSeal:
    """encrypted_content of reasoning items, for clients that keep no server state (Codex sends
    store: false and include: ["reasoning.encrypted_content"], then replays the items): our own
    opaque token carrying what the upstream needs to replay the reasoning, its text and
    signature. Versioned, compressed, size-bounded and authenticated (HMAC-SHA256, a key of this
    server's); a forged, truncated, foreign or oversized token is ignored, never trusted. It is
    sealed, not secret: it holds only what this client was already shown."""

    PREFIX = "ccr1."
    MAX_BYTES = 1 << 20
    MAC_BYTES = 16

    def __init__(self, key=None):
        self.key = key or secrets.token_bytes(32)

    def _mac(self, payload):
        return hmac.new(self.key, payload, hashlib.sha256).digest()[:self.MAC_BYTES]

    def seal(self, text, signature):
        payload = zlib.compress(json_dumps({"text": text, "signature": signature}).encode())
        if len(payload) > self.MAX_BYTES:
            return None
        token = base64.urlsafe_b64encode(self._mac(payload) + payload).decode()
        return self.PREFIX + token.rstrip("=")

    def open(self, token):
        """(text, signature) from a token this server sealed, else None."""
        if not isinstance(token, str) or not token.startswith(self.PREFIX) \
                or len(token) > self.MAX_BYTES * 2:
            return None
        body = token[len(self.PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            return None
        mac, payload = raw[:self.MAC_BYTES], raw[self.MAC_BYTES:]
        if len(mac) < self.MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            inflater = zlib.decompressobj()
            doc = json.loads(inflater.decompress(payload, self.MAX_BYTES * 8))
        except (zlib.error, ValueError):
            return None
        if inflater.unconsumed_tail or not isinstance(doc, dict) \
                or not isinstance(doc.get("text"), str) \
                or not isinstance(doc.get("signature"), (str, type(None))):
            return None
        return doc["text"], doc["signature"]


RESPONSES_STATUS = {"length": ("incomplete", {"reason": "max_output_tokens"}),
                    "content_filter": ("incomplete", {"reason": "content_filter"}),
                    "refusal": ("incomplete", {"reason": "content_filter"})}

# Codex's model catalog (GET /v1/models?client_version=..., fetched when a provider sets
# model_catalog_url): {"models": [ModelInfo, ...]}, each entry Codex's truth about that model.
# What the model list does not know repeats Codex's own fallback metadata, so an entry changes
# only what is known: context window, reasoning levels, image input, name. Except the prompt:
# Codex requires base_instructions and sends it as its whole system prompt (an empty one leaves
# it none), so the operator supplies it (codexInstructionsFile) and the proxy never makes one up.
CODEX_FALLBACK_FIELDS = {
    "shell_type": "default", "supported_in_api": True, "upgrade": None,
    "support_verbosity": False, "default_verbosity": None, "apply_patch_tool_type": None,
    "truncation_policy": {"mode": "bytes", "limit": 10000},
    "supports_parallel_tool_calls": False, "experimental_supported_tools": []}
# Each of our effort names is a value of Codex's ReasoningEffort; its picker shows the line.
CODEX_EFFORTS = {"minimal": "Least reasoning, fastest answers",
                 "low": "Light reasoning, quick answers",
                 "medium": "Balanced reasoning depth and speed",
                 "high": "Deeper reasoning for harder problems",
                 "xhigh": "Extra deep reasoning for the hardest problems",
                 "max": "The deepest reasoning the model offers"}


def codex_model_entry(model, priority, owner, instructions):
    """One ModelInfo of Codex's catalog, from a ModelInfo of ours."""
    efforts = [e for e in model.efforts if e in CODEX_EFFORTS]
    entry = dict(CODEX_FALLBACK_FIELDS, slug=model.id, display_name=model.label,
                 description="%s through cc-proxy (%s)" % (model.label, owner),
                 visibility="list", priority=priority, context_window=model.context,
                 input_modalities=["text", "image"] if model.images else ["text"],
                 supported_reasoning_levels=[{"effort": e, "description": CODEX_EFFORTS[e]}
                                             for e in efforts],
                 # older Codex sends reasoning.effort only to a model that has summaries
                 supports_reasoning_summaries=bool(efforts), base_instructions=instructions)
    if efforts:
        entry["default_reasoning_level"] = clamp_effort("medium", efforts)
    return entry


class OpenAIResponses(FrontEnd):
    """OpenAI Responses: POST /v1/responses, GET /v1/responses/{id} (what Codex CLI speaks), and
    Codex's model catalog (GET /v1/models?client_version=...)."""

    name = "responses"
    route = "/v1/responses"
    id_prefix = "resp_"

    def __init__(self, store=None, seal=None, codex_instructions=None):
        self.store = store or ResponseStore(limit=256)
        self.seal = seal or ReasoningSeal()
        self.codex_instructions = codex_instructions   # codexInstructionsFile's text, or None

    def routes(self):
        return super().routes() + [(self.route + "/", "GET", self._stored_response_route)]

    def spoken_by(self, headers, query):
        return "client_version" in query   # Codex asking for its model catalog

    def model_list(self, models, owner, query):
        """Codex's catalog, of the models whose metadata is known (a context window): Codex
        takes a catalog URL's list as the whole truth, so one left out gets its fallback and
        warning, as it would with no catalog."""
        if self.codex_instructions is None:
            raise ProxyError(404, "not_found", "Codex's model catalog is off: set "
                             "codexInstructionsFile to the system prompt its entries give Codex "
                             "(Codex sends it in place of its own)", code="codex_catalog_off")
        known = [m for m in models if m.context]
        return {"models": [codex_model_entry(m, i, owner, self.codex_instructions)
                           for i, m in enumerate(known)]}

    def _stored_response_route(self, handler, response_id):
        handler.authenticate()
        item = self.store.get(response_id)
        if item is None:
            raise ProxyError(404, "not_found", "response %r not found (kept for one hour, "
                             "never with store: false)" % response_id)
        handler.send_json(200, item.response)

    def decode(self, body, headers):
        f, request = self.begin(body, ("max_output_tokens",))
        fold_system_text(request, f.get("instructions", str))
        previous_id = f.get("previous_response_id", str)
        if previous_id:
            previous = self.store.get(previous_id)
            if previous is None:
                raise bad_request("previous response %r is unknown or expired (responses are "
                                  "kept for one hour, and never with store: false)"
                                  % previous_id, "previous_response_id")
            request.messages.extend(previous.messages)
        history_length = len(request.messages)
        items = f.get("input", (str, list), required=True)
        if isinstance(items, str):
            items = [{"type": "message", "role": "user", "content": items}]
        tool_names = {p["id"]: p["name"] for m in request.messages for p in m["parts"]
                      if p["type"] == "tool_call"}
        for i, item in enumerate(items):
            self._decode_item(request, item, "input[%d]" % i, tool_names)
        for i, tool in enumerate(f.get("tools", list, [])):
            self._decode_tool(request, tool, "tools[%d]" % i)
        request.tool_choice = openai_tool_choice(body.get("tool_choice"))
        request.parallel_tool_calls = f.get("parallel_tool_calls", bool)
        reasoning = f.get("reasoning", dict, {})
        effort = reasoning.get("effort")
        if effort is not None and effort not in EFFORTS:
            raise bad_request("'reasoning.effort' must be one of " + ", ".join(EFFORTS),
                              "reasoning.effort")
        request.reasoning_effort = effort
        text = f.get("text", dict, {})
        fold_system_text(request, json_format_instruction(text.get("format")))
        request.session_id = (headers.get("x-session-id") or headers.get("session-id")
                              or f.get("prompt_cache_key", str))
        include = f.get("include", list, [])
        request.options["encrypted_reasoning"] = "reasoning.encrypted_content" in include
        request.options.update(store=f.get("store", bool, True),
                               history_length=history_length, previous_response_id=previous_id,
                               metadata=f.get("metadata", dict, {}))
        # a response object repeats the settings it was made with, as OpenAI's do
        # (defaults included)
        request.options["echo"] = {
            "instructions": f.get("instructions", str), "tools": f.get("tools", list, []),
            "tool_choice": body.get("tool_choice") or "auto",
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "max_output_tokens": request.max_tokens,
            "reasoning": {"effort": effort, "summary": reasoning.get("summary")},
            "text": text or {"format": {"type": "text"}},
            "truncation": f.get("truncation", str, "disabled"),
            "user": f.get("user", str)}
        return request

    def _decode_tool(self, request, tool, where):
        if not isinstance(tool, dict):
            raise bad_request("'%s' must be an object" % where, where)
        kind = tool.get("type")
        if kind == "namespace":  # Codex groups some functions under a namespace tool
            for j, inner in enumerate(tool.get("tools") or []):
                self._decode_tool(request, inner, "%s.tools[%d]" % (where, j))
        elif kind in _RESPONSES_FUNCTION_TYPES:
            request.tools.append(tool_definition(tool, "parameters", where))
        elif kind == "custom":   # freeform: Codex's apply_patch editor and other grammar tools
            request.tools.append(custom_tool_definition(tool, where))
            request.options.setdefault("custom_tools", set()).add(tool["name"])
        else:
            request.dropped_tools.append(str(tool.get("name") or kind))

    def _decode_item(self, request, item, where, tool_names):
        if not isinstance(item, dict):
            raise bad_request("'%s' must be an object" % where, where)
        kind = item.get("type", "message" if "role" in item else None)
        decode = self.ITEMS.get(kind) if isinstance(kind, str) else None
        if decode is None:
            raise bad_request("'%s.type' %r is not supported" % (where, kind), where + ".type")
        decode(self, request, item, where, tool_names)

    def _message_item(self, request, item, where, tool_names):
        role, content = item.get("role"), item.get("content")
        if role in ("system", "developer"):
            fold_system_text(request, text_of_parts(content, where + ".content"))
            return
        if role not in ("user", "assistant"):
            raise bad_request("'%s.role' must be user, assistant, system or developer" % where,
                              where + ".role")
        if isinstance(content, str):
            content = [{"type": "input_text", "text": content}]
        if not isinstance(content, list):
            raise bad_request("'%s.content' must be a string or an array" % where,
                              where + ".content")
        parts = [self._content_part(part, role, "%s.content[%d]" % (where, j))
                 for j, part in enumerate(content)]
        parts = [part for part in parts if part is not None]
        if parts:
            append_parts(request, role, parts)

    @staticmethod
    def _content_part(part, role, here):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype in ("input_text", "output_text", "text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise bad_request("'%s.text' must be a string" % here, here + ".text")
            return {"type": "text", "text": text} if text else None
        if ptype == "input_image" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_request("'%s.image_url' must be a data: or http(s) URL (file ids are not "
                                  "supported)" % here, here + ".image_url")
            return data_url_image(url)
        raise bad_request("'%s' has unsupported type %r" % (here, ptype), here)

    def _function_call_item(self, request, item, where, tool_names):
        call_id, name = item.get("call_id") or item.get("id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise bad_request("'%s' needs call_id and name" % where, where)
        tool_names[call_id] = name
        append_parts(request, "assistant", [{
            "type": "tool_call", "id": call_id, "name": name,
            "arguments": arguments_object(item.get("arguments"), "'%s.arguments'" % where)}])

    def _function_output_item(self, request, item, where, tool_names):
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise bad_request("'%s.call_id' is required" % where, where + ".call_id")
        output = item.get("output")
        append_parts(request, "tool", [{
            "type": "tool_result", "call_id": call_id, "name": tool_names.get(call_id, "unknown"),
            "content": (output if isinstance(output, str)
                        else text_of_parts(output, where + ".output")),
            "is_error": False, "images": []}])

    def _custom_call_item(self, request, item, where, tool_names):
        call_id, name = item.get("call_id") or item.get("id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise bad_request("'%s' needs call_id and name" % where, where)
        if not isinstance(item.get("input", ""), str):
            raise bad_request("'%s.input' must be a string" % where, where + ".input")
        tool_names[call_id] = name
        append_parts(request, "assistant", [{"type": "tool_call", "id": call_id, "name": name,
                                             "arguments": {"input": item.get("input", "")}}])

    def _reasoning_item(self, request, item, where, tool_names):
        opened = self.seal.open(item.get("encrypted_content"))
        if opened is not None:   # ours, intact: the text and signature as the upstream gave them
            if opened[0]:
                append_parts(request, "assistant", [
                    {"type": "reasoning", "text": opened[0], "signature": opened[1]}])
            return
        summary = item.get("summary")
        text = "\n".join(str(s.get("text", "")) for s in summary if isinstance(s, dict)) \
            if isinstance(summary, list) else ""
        if text:
            append_parts(request, "assistant",
                         [{"type": "reasoning", "text": text, "signature": None}])

    def _builtin_tool_item(self, request, item, where, tool_names):
        pass  # built-in tool traffic no backend here ran: nothing to replay

    def _reference_item(self, request, item, where, tool_names):
        """An earlier output item resent by id (the Vercel AI SDK does): replayed from the store."""
        item_id = item.get("id")
        found = self.store.output_item(item_id) if isinstance(item_id, str) else None
        if found is None:
            raise bad_request("'%s' references item %r, which this proxy does not hold (responses "
                              "are kept for one hour, never with store: false); send the item "
                              "itself instead" % (where, item_id), where + ".id")
        self._decode_item(request, found, where, tool_names)

    ITEMS = {"message": _message_item, "function_call": _function_call_item,
             "function_call_output": _function_output_item, "reasoning": _reasoning_item,
             "custom_tool_call": _custom_call_item,
             "custom_tool_call_output": _function_output_item,
             "item_reference": _reference_item,
             **dict.fromkeys(("web_search_call", "file_search_call", "image_generation_call",
                              "local_shell_call", "local_shell_call_output", "mcp_list_tools",
                              "mcp_call"), _builtin_tool_item)}

    def stream_encoder(self, request, exchange):
        return ResponsesStreamEncoder(self, request, exchange)

    def response_object(self, request, exchange, completion, status=None, error=None):
        item_status = "incomplete" if status in ("failed", "incomplete") else "completed"
        custom = request.options.get("custom_tools") or ()
        output = []
        for i, block in enumerate(completion.blocks):
            kind = "custom_tool_call" if block.kind == "tool_call" and block.name in custom \
                else block.kind
            item_id = "%s_%d" % (exchange.response_id.replace("resp_", block_prefix(kind), 1), i)
            if block.kind == "text":
                output.append({"id": item_id, "type": "message", "status": item_status,
                               "role": "assistant", "content": [
                                   {"type": "output_text", "text": block.text, "annotations": []}]})
            elif block.kind == "reasoning":
                output.append({"id": item_id, "type": "reasoning",
                               "summary": [{"type": "summary_text", "text": block.text}]})
                if request.options.get("encrypted_reasoning"):
                    output[-1]["encrypted_content"] = self.seal.seal(block.text, block.signature)
            elif kind == "custom_tool_call":
                output.append({"id": item_id, "type": "custom_tool_call", "status": item_status,
                               "call_id": block.call_id, "name": block.name,
                               "input": custom_input(block.arguments)})
            else:
                output.append({"id": item_id, "type": "function_call", "status": item_status,
                               "call_id": block.call_id, "name": block.name,
                               "arguments": block.arguments})
        incomplete = None
        if status is None:
            status, incomplete = RESPONSES_STATUS.get(completion.finish, ("completed", None))
        usage = completion.usage
        return {"id": exchange.response_id, "object": "response", "created_at": exchange.created,
                "status": status, "error": error, "incomplete_details": incomplete,
                "model": completion.model or request.model, "output": output,
                "output_text": completion.text(),
                "parallel_tool_calls": request.parallel_tool_calls is not False,
                "previous_response_id": request.options.get("previous_response_id"),
                "store": request.options.get("store", True),
                "metadata": request.options.get("metadata") or {},
                **request.options.get("echo", {}),
                "usage": None if status == "in_progress" else {
                    "input_tokens": usage.input,
                    "input_tokens_details": {"cached_tokens": usage.cache_read},
                    "output_tokens": usage.output,
                    "output_tokens_details": {"reasoning_tokens": usage.reasoning},
                    "total_tokens": usage.input + usage.output}}

    def render(self, completion, request, exchange):
        response = self.response_object(request, exchange, completion)
        self.remember(request, completion, response)
        return response

    def remember(self, request, completion, response):
        if request.options.get("store", True):
            self.store.put(response["id"], response,
                           request.messages + [completion_message(completion)])


def block_prefix(kind):
    return {"text": "msg_", "reasoning": "rs_", "tool_call": "fc_",
            "custom_tool_call": "ctc_"}[kind]


class OpenItem(NamedTuple):
    kind: str           # "text" | "reasoning" | "tool_call"
    item_id: str
    index: int          # output_index
    call_id: str        # tool calls: the call whose argument deltas belong here


class ResponsesStreamEncoder(StreamEncoder):
    """Events -> Responses SSE, in the documented order, numbered by sequence_number. The final
    response object is built from the same folded events as a non-streaming answer."""

    def __init__(self, frontend, request, exchange):
        self.frontend, self.request, self.exchange = frontend, request, exchange
        self.completion = Completion()
        self.sequence = 0
        self.open = None       # the OpenItem being streamed
        self.texts = []
        self.streamed_args = False

    def _event(self, name, payload):
        payload = dict(type=name, sequence_number=self.sequence, **payload)
        self.sequence += 1
        self.out.append("event: " + name + "\ndata: " + json_dumps(payload) + "\n\n")

    def _snapshot(self, status, error=None):
        return self.frontend.response_object(self.request, self.exchange, self.completion, status,
                                             error)

    def start(self):
        self.out = []
        snapshot = self._snapshot("in_progress")
        self._event("response.created", {"response": snapshot})
        self._event("response.in_progress", {"response": snapshot})
        return "".join(self.out).encode("utf-8", "replace")

    def _where(self, **more):
        return dict(item_id=self.open.item_id, output_index=self.open.index, **more)

    def _close(self):
        if self.open is None:
            return
        text = "".join(self.texts)
        if self.open.kind == "text":
            self._event("response.output_text.done",
                        self._where(content_index=0, text=text, logprobs=[]))
            self._event("response.content_part.done", self._where(
                content_index=0, part={"type": "output_text", "text": text, "annotations": []}))
        elif self.open.kind == "reasoning":
            self._event("response.reasoning_summary_text.done",
                        self._where(summary_index=0, text=text))
            self._event("response.reasoning_summary_part.done", self._where(
                summary_index=0, part={"type": "summary_text", "text": text}))
        elif self.open.kind == "custom_tool_call":
            arguments = self.completion.blocks[self.open.index].arguments
            self._event("response.custom_tool_call_input.done",
                        self._where(input=custom_input(arguments)))
        else:
            arguments = self.completion.blocks[self.open.index].arguments
            self._event("response.function_call_arguments.done", self._where(arguments=arguments))
        item = self._snapshot("in_progress")["output"][self.open.index]
        self._event("response.output_item.done", {"output_index": self.open.index, "item": item})
        self.open = None

    def _open(self, kind, call_id=""):
        self._close()
        index = len(self.completion.blocks) - 1
        item = self._snapshot("in_progress")["output"][index]
        self.open = OpenItem(kind, item["id"], index, call_id)
        self.texts = []
        if kind == "text":
            item["status"], item["content"] = "in_progress", []
        elif kind == "tool_call":
            item["status"], item["arguments"] = "in_progress", ""
        elif kind == "custom_tool_call":
            item["status"], item["input"] = "in_progress", ""
        else:
            item["summary"] = []
        self._event("response.output_item.added", {"output_index": index, "item": item})
        if kind == "text":
            self._event("response.content_part.added", self._where(
                content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        elif kind == "reasoning":
            self._event("response.reasoning_summary_part.added", self._where(
                summary_index=0, part={"type": "summary_text", "text": ""}))

    def feed(self, batch):
        """Each event is folded into the completion first: item ids, the arguments that end a
        tool call and the final response object all come from that one fold."""
        completion, dispatch = self.completion, self._dispatch
        blocks, fold = completion.blocks, completion._dispatch
        for event in batch:
            before = len(blocks)
            fold[type(event)](completion, event)
            self.grew = len(blocks) > before
            dispatch[type(event)](self, event)

    def _text_delta(self, event, kind, name, index_field):
        if event.text:
            if self.grew:
                self._open(kind)
            self.texts.append(event.text)
            self._event(name, self._where(delta=event.text, **index_field))

    def on_text(self, event):
        self._text_delta(event, "text", "response.output_text.delta",
                         {"content_index": 0, "logprobs": []})

    def on_reasoning(self, event):
        self._text_delta(event, "reasoning", "response.reasoning_summary_text.delta",
                         {"summary_index": 0})

    def on_tool_start(self, event):
        custom = event.name in (self.request.options.get("custom_tools") or ())
        self._open("custom_tool_call" if custom else "tool_call", event.call_id)
        self.streamed_args = False

    def _arguments_delta(self, fragment):
        self._event("response.function_call_arguments.delta", self._where(delta=fragment))

    def on_tool_delta(self, event):
        # a custom call's input is a string inside the argument JSON: it goes out whole at the end
        if self.open and self.open.call_id == event.call_id and event.fragment \
                and self.open.kind == "tool_call":
            self.streamed_args = True
            self._arguments_delta(event.fragment)

    def on_tool_end(self, event):
        if self.open and self.open.call_id == event.call_id:
            if self.open.kind == "custom_tool_call":
                self._event("response.custom_tool_call_input.delta",
                            self._where(delta=custom_input(event.arguments)))
            elif not self.streamed_args:
                self._arguments_delta(event.arguments)
            self._close()

    def on_finish(self, event):
        self._close()
        response = self._snapshot(None)
        self.frontend.remember(self.request, self.completion, response)
        name = "response.completed" if response["status"] == "completed" else "response.incomplete"
        self._event(name, {"response": response})

    def on_error(self, event):
        err = event.error
        failed = self._snapshot("failed", {
            "code": err.code or _OPENAI_ERROR_TYPES.get(err.kind, "api_error"),
            "message": err.message})
        self._event("response.failed", {"response": failed})



# =====================================================================================
# 6. Pipeline: attempts, retries, guards, usage, commit, keep-alive
#
# The one place a request runs through the backend, the same for every front end and backend.
# It never sees a socket: the HTTP side hands it a client with six methods -- gone(),
# start_stream(headers), send(bytes), end_stream(), send_answer(body, headers) and
# send_failure(err, frontend) -- and the backend reports back through the Exchange.
# =====================================================================================

class ClientGone(Exception):
    """The client closed its connection (or stopped reading past the socket timeout)."""


# A client that hangs up is noticed this soon, whatever the upstream does.
CLIENT_CHECK_SECONDS = 0.2


class Exchange:
    """One model request in the pipeline: what the backend needs besides the canonical Request,
    and what it reports back (response headers, cost, usage) for the client and the metrics."""

    def __init__(self, request_id, frontend, credential, tick):
        self.request_id = request_id
        self.created = int(time.time())
        self.response_id = new_id(frontend.id_prefix)
        self.trace_id = random_hex(32)         # shared by every attempt of this request
        self.tick = tick                       # a backend yields an empty batch at least this often
        self.credential = credential
        self.input_estimate = 0                # calibrated: what a client is told before usage
        self.raw_estimate = 0                  # uncalibrated: what calibration compares with usage
        self.committed = False                 # status line sent: no more retries or HTTP statuses
        self.produced = False                  # any content event seen in the current attempt
        # monotonic time of the next "is the client there": it has just sent this request
        self.next_client_check = time.monotonic() + CLIENT_CHECK_SECONDS
        self.last_write = time.monotonic()
        self.response_headers = {}             # set by the backend (e.g. X-Claude-Cost-Usd)
        self.cost_usd = None                   # what the backend says this request cost
        self.usage = None                      # the answer's final usage, once known
        self.status = None                     # 499 when the client left before the status line
        self.error_kind = None                 # why it failed after the status line, if it did
        self.backend_model = None              # the model the backend says it used
        self.retries = 0


class StreamedAnswer:
    """An SSE answer: the status line goes out with the first event or keep-alive, then each
    batch as the encoder renders it; a failure after that is an in-stream error event."""

    def __init__(self, pipeline, frontend, request, exchange, client):
        self.pipeline, self.frontend, self.request = pipeline, frontend, request
        self.exchange, self.client = exchange, client
        self.encoder = frontend.stream_encoder(request, exchange)
        self.keepalive_every = pipeline.config["keepAliveIntervalMs"] / 1000

    def attempt(self):
        pass   # nothing reaches the encoder before the commit, after which no attempt follows

    def _send(self, data):
        if data:
            self.client.send(data)
            self.exchange.last_write = time.monotonic()

    def _commit(self):
        self.client.start_stream(self.pipeline.response_headers(self.request, self.exchange))
        self.exchange.committed = True
        self._send(self.encoder.start())

    def take(self, batch):
        if not batch:
            if time.monotonic() - self.exchange.last_write >= self.keepalive_every:
                if not self.exchange.committed:
                    self._commit()
                self._send(self.frontend.keepalive)
            return
        if not self.exchange.committed:
            self._commit()
        self._send(self.encoder.encode(batch))

    def fail(self, err):
        self._send(self.encoder.encode([ErrorEvent(err)]))
        self.client.end_stream()

    def complete(self):
        self.client.end_stream()


class FoldedAnswer:
    """A JSON answer: each attempt's events folded into a fresh Completion, rendered at the end."""

    def __init__(self, pipeline, frontend, request, exchange, client):
        self.pipeline, self.frontend, self.request = pipeline, frontend, request
        self.exchange, self.client = exchange, client
        self.completion = None

    def attempt(self):
        self.completion = Completion()

    def take(self, batch):
        self.completion.feed(batch)

    def complete(self):
        self.exchange.usage = self.completion.usage
        body = self.frontend.render(self.completion, self.request, self.exchange)
        self.client.send_answer(body, self.pipeline.response_headers(self.request, self.exchange))


class Pipeline:
    """Runs a decoded request through the backend and answers the client in the front end's
    protocol: admission (maxInFlight), attempts with retries while nothing has reached the
    client, the zero-output guard, the client-gone watch, usage accounting and the rule that an
    error after the status line is an in-stream error event, never a fake normal ending."""

    def __init__(self, config, backend, metrics):
        self.config, self.backend, self.metrics = config, backend, metrics
        self.inflight = Slots(config["maxInFlight"])
        self.calibration = TokenCalibration()
        self.tick = min(CLIENT_CHECK_SECONDS, config["keepAliveIntervalMs"] / 1000)

    def exchange(self, frontend, request_id, credential):
        return Exchange(request_id, frontend, credential, self.tick)

    def run(self, frontend, request, exchange, client):
        with self.inflight.held() as admitted:
            if not admitted:
                return client.send_failure(ProxyError(
                    503, "overloaded", "too many requests in flight (maxInFlight=%d); retry shortly"
                    % self.inflight.limit, retry_after=1), frontend)
            self.metrics.gauge("in_flight", {}, 1)
            exchange.raw_estimate = estimate_request_tokens(request)
            exchange.input_estimate = self.calibration.estimate(request, exchange.raw_estimate)
            kind = StreamedAnswer if request.stream else FoldedAnswer
            try:
                self._answer(kind(self, frontend, request, exchange, client), exchange)
            except ClientGone:
                self.metrics.count("client_disconnects_total", {})
                exchange.error_kind = "client_disconnected"
                if not exchange.committed:
                    exchange.status = 499   # nginx's "client closed request", for the access log
                raise
            finally:
                self.metrics.gauge("in_flight", {}, -1)
                self._account(request, exchange)

    def _answer(self, answer, exchange):
        try:
            self._attempts(answer, exchange)
        except ProxyError as err:
            if not exchange.committed:
                return answer.client.send_failure(err, answer.frontend)
            log.warning("%s failed after output started: %s %s", exchange.request_id, err.status,
                        err.kind)
            exchange.error_kind = err.kind
            return answer.fail(err)
        answer.complete()

    def _attempts(self, answer, exchange):
        """Run the backend, retrying failures while nothing has reached the client."""
        retries = self.config["upstreamRetries"]
        attempt = 0
        while True:
            answer.attempt()
            exchange.produced = False   # what an earlier, failed attempt produced is not this one's
            events = self.backend.stream(answer.request, exchange)
            try:
                for batch in events:
                    self._watch_client(answer.client, exchange)
                    if batch:
                        self._check(exchange, batch)
                    answer.take(batch)
                return
            except ProxyError as err:
                self.metrics.count("upstream_errors_total", {"kind": err.kind})
                if err.kind == "timeout":
                    self.metrics.count("upstream_timeouts_total", {})
                if not err.retryable or exchange.committed or attempt >= retries:
                    raise
            finally:
                events.close()
            attempt += 1
            exchange.retries = attempt
            self.metrics.count("upstream_retries_total", {})
            self._back_off(attempt, answer.client)

    def _back_off(self, attempt, client):
        backoff = self.config["upstreamRetryBackoffMs"] / 1000
        deadline = time.monotonic() + min(2.0, backoff * 2 ** (attempt - 1))
        while time.monotonic() < deadline:
            if client.gone():
                raise ClientGone()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    @staticmethod
    def _watch_client(client, exchange):
        """Raise ClientGone once the client has hung up; looks at most every CLIENT_CHECK_SECONDS,
        whether the upstream is silent (empty batches come that often) or talking."""
        now = time.monotonic()
        if now >= exchange.next_client_check:
            exchange.next_client_check = now + CLIENT_CHECK_SECONDS
            if client.gone():
                raise ClientGone()

    @staticmethod
    def _check(exchange, batch):
        """The zero-output guard (a finish with nothing before it is an error, not an empty 200),
        and the usage a backend reports just before Finish (only a last batch is looked into)."""
        if not exchange.produced:   # a backend names its model before (or with) its first content
            for event in batch:
                if isinstance(event, CONTENT_EVENTS):
                    exchange.produced = True
                    break
                if type(event) is ModelUsed:
                    exchange.backend_model = event.model
                elif type(event) is Finish:
                    raise ProxyError(502, "upstream", "the backend finished without any output",
                                     retry_after=10, retryable=True, code="empty_response")
        if type(batch[-1]) is Finish:
            exchange.usage = next((e.usage for e in batch if type(e) is UsageEvent), exchange.usage)

    @staticmethod
    def response_headers(request, exchange):
        headers = dict(exchange.response_headers)
        if request.dropped_tools:
            names = ",".join(re.sub(r"[^\x21-\x7e]", "_", n) for n in request.dropped_tools)
            headers["x-cc-proxy-dropped-tools"] = names[:1000]
        return headers

    def _account(self, request, exchange):
        usage = exchange.usage
        if usage and usage.input and self.backend.prompt_counted_as_sent:
            self.calibration.observe(request.client_model or request.model, exchange.raw_estimate,
                                     usage.input)
        if usage:
            for kind, value in (("input", usage.input), ("cached", usage.cache_read),
                                ("output", usage.output)):
                self.metrics.count("tokens_total", {"model": request.model, "kind": kind}, value)


# =====================================================================================
# 7. Backend: Command Code (POST /alpha/generate, NDJSON), spoken as the official CLI 1.64 does
# =====================================================================================

# ---- models: the CLI's catalog, ids and version ------------------------------------------

PINNED_CC_VERSION = "1.64.0"   # known-good x-command-code-version when npm cannot be reached
CC_DEFAULT_MODEL = "deepseek/deepseek-v4-flash"
CC_MAX_TOKENS_DEFAULT = 64000
CC_MAX_TOKENS_CAP = 200000
EFFORT_ORDER = ("minimal", "low", "medium", "high", "xhigh", "max")

# The official CLI 1.64 catalog: id | image input | accepted reasoning_effort values
# ("reasons" = thinks without effort control, "-" = none) | context window | label.
CC_CATALOG_TEXT = """
claude-sonnet-5|image|low,medium,high,xhigh,max|1000000|Claude Sonnet 5
claude-sonnet-4-6|image|low,medium,high,xhigh,max|1000000|Claude Sonnet 4.6
claude-fable-5-1|image|low,medium,high,xhigh,max|1000000|Claude Fable 5.1
claude-fable-5|image|low,medium,high,xhigh,max|1000000|Claude Fable 5
claude-opus-5-5|image|low,medium,high,xhigh,max|1000000|Claude Opus 5.5
claude-opus-5|image|low,medium,high,xhigh,max|1000000|Claude Opus 5
claude-opus-4-8|image|low,medium,high,xhigh,max|1000000|Claude Opus 4.8
claude-opus-4-7|image|low,medium,high,xhigh,max|1000000|Claude Opus 4.7
claude-haiku-4-5-20251001|image|-|200000|Claude Haiku 4.5
gpt-6-astra|image|low,medium,high,xhigh,max|1050000|GPT-6 Astra
gpt-6-sol|image|low,medium,high,xhigh,max|1050000|GPT-6 Sol
gpt-6-luna|image|low,medium,high,xhigh,max|1050000|GPT-6 Luna
gpt-5.6-sol|image|low,medium,high,xhigh,max|1050000|GPT-5.6 Sol
gpt-5.6-terra|image|low,medium,high,xhigh,max|1050000|GPT-5.6 Terra
gpt-5.6-luna|image|low,medium,high,xhigh,max|1050000|GPT-5.6 Luna
gpt-5.5|image|low,medium,high,xhigh|400000|GPT-5.5
gpt-5.4|image|low,medium,high,xhigh|400000|GPT-5.4
gpt-5.3-codex|image|low,medium,high,xhigh|400000|GPT-5.3 Codex
gpt-5.4-mini|image|low,medium,high|400000|GPT-5.4 Mini
MiniMaxAI/MiniMax-M3-Free|image|low,medium,high|1000000|MiniMax M3
deepseek/deepseek-v4-pro|-|high,max|1000000|DeepSeek V4 Pro (latest)
deepseek/deepseek-v4-flash|-|high,max|1000000|DeepSeek V4 Flash (latest)
deepseek/deepseek-v4-flash-vision-exp|image|high,max|1000000|DeepSeek V4 Flash Vision (exp)
deepseek/deepseek-v4-flash-fast|-|low,high,max|1000000|DeepSeek V4 Flash Fast
deepseek/deepseek-v4.1-flash|image|low,high,max|1000000|DeepSeek V4.1 Flash
moonshotai/Kimi-K3|image|low,high,max|1000000|Kimi K3
moonshotai/Kimi-K2.7-Code|image|reasons|256000|Kimi K2.7 Code
moonshotai/Kimi-K2.7-Code-Highspeed|image|reasons|262000|Kimi K2.7 Code HighSpeed
moonshotai/Kimi-K2.6|image|-|256000|Kimi K2.6
moonshotai/Kimi-K2.5|image|-|256000|Kimi K2.5
z-ai/glm-5.3-flash|image|low,high,max|1048576|GLM-5.3 Flash
z-ai/glm-5.3-flashx|image|low,high,max|1000000|GLM-5.3 FlashX
zai-org/GLM-5.3|-|low,high,max|1000000|GLM-5.3
zai-org/GLM-5.2|-|high,max|1000000|GLM-5.2
zai-org/GLM-5.2-Fast|-|-|1000000|GLM-5.2 Fast
zai-org/GLM-5.1|-|-|200000|GLM-5.1
zai-org/GLM-5|-|-|200000|GLM-5
MiniMaxAI/MiniMax-M3|image|low,medium,high|1000000|MiniMax M3
MiniMaxAI/MiniMax-M2.7|-|-|200000|MiniMax M2.7
minimax/minimax-m3-free|image|low,medium,high|1000000|MiniMax M3
minimax/minimax-m2.7-free|-|-|197000|MiniMax M2.7
MiniMaxAI/MiniMax-M2.5|-|-|200000|MiniMax M2.5
xiaomi/mimo-v2.6-pro|image|-|1048576|MiMo V2.6 Pro
xiaomi/mimo-v2.6-pro-ultraspeed|image|-|1048576|MiMo V2.6 Pro UltraSpeed
xiaomi/mimo-v2.6-flash|image|-|1048576|MiMo V2.6 Flash
xiaomi/mimo-v2.5-pro|-|-|1000000|MiMo V2.5 Pro
xiaomi/mimo-v2.5|image|-|1000000|MiMo V2.5
Qwen/Qwen3.8-Omni-Flash|image|low,medium,xhigh|1000000|Qwen 3.8 Omni Flash
Qwen/Qwen3.8-Max-0902|image|low,medium,xhigh|1000000|Qwen 3.8 Max 0902
Qwen/Qwen3.8-Max|image|low,medium,xhigh|1000000|Qwen 3.8 Max
Qwen/Qwen3.8-27B|image|low,medium,xhigh|262144|Qwen 3.8 27B
Qwen/Qwen3.8-Flash|image|low,medium,xhigh|1000000|Qwen 3.8 Flash
Qwen/Qwen3.7-Max|-|reasons|1000000|Qwen 3.7 Max
Qwen/Qwen3.7-Plus|image|reasons|1000000|Qwen 3.7 Plus
Qwen/Qwen3.7-Flash|image|reasons|1000000|Qwen 3.7 Flash
Qwen/Qwen3.6-Max-Preview|-|reasons|200000|Qwen 3.6 Max Preview
Qwen/Qwen3.6-Plus|image|reasons|200000|Qwen 3.6 Plus
meituan/LongCat-2.0|-|reasons|1048576|LongCat 2.0
meituan/LongCat-2.0:free|-|reasons|1048576|LongCat 2.0
stepfun/Step-5-Preview|image|low,medium,high|1000000|Step 5 Preview
stepfun/Step-3.7-Flash|image|reasons|256000|Step 3.7 Flash
stepfun/Step-3.5-Flash|-|reasons|1000000|Step 3.5 Flash
tencent/Hy3|-|reasons|262144|Tencent Hy3 (Free)
tencent/hy3-paid|-|reasons|262144|Tencent Hy3
tencent/hy4-preview|-|low,medium,high|1048576|Tencent Hy4 Preview
google/gemini-3.8-flash|image|low,medium,high|1000000|Gemini 3.8 Flash
google/gemini-3.7-flash|image|low,medium,high|1048576|Gemini 3.7 Flash
google/gemini-3.6-flash|image|low,medium,high|1000000|Gemini 3.6 Flash
google/gemini-3.5-flash|image|low,medium,high|1000000|Gemini 3.5 Flash
google/gemini-3.5-flash-lite|image|low,medium,high|1000000|Gemini 3.5 Flash Lite
google/gemini-3.1-flash-lite|image|low,medium,high|1000000|Gemini 3.1 Flash Lite
sakana/fugu-ultra|image|high,xhigh|1000000|Fugu Ultra
nvidia/nemotron-3-ultra-550b-a55b|-|reasons|1000000|Nemotron 3 Ultra
thinkingmachines/inkling|image|reasons|256000|Inkling
thinkingmachines/inkling-small|image|reasons|1000000|Inkling Small
poolside/laguna-s-2.1-free|-|reasons|256000|Laguna S 2.1
inclusionai/ling-3.0-flash-free|-|reasons|256000|Ling 3.0 Flash
inclusionai/ling-3.0-flash-sante:free|-|reasons|262144|Ling 3.0 Flash Sante
meta/muse-spark-1.1|image|low,medium,high,xhigh|1048576|Muse Spark 1.1
meta/muse-spark-1.2|image|low,medium,high,xhigh|1048576|Muse Spark 1.2
meta/muse-spark-1.2-contributor|image|low,medium,high,xhigh|1048576|Muse Spark 1.2 Contributor
meta/muse-spark-1.3|image|low,medium,high,xhigh,max|1048576|Muse Spark 1.3
meta/muse-spark-1.3-contributor|image|low,medium,high,xhigh|1048576|Muse Spark 1.3 Contributor
xai/grok-4.5|image|low,medium,high|500000|Grok 4.5
xai/grok-4.6|image|low,medium,high,xhigh|500000|Grok 4.6
xai/grok-4.7|image|low,medium,high,xhigh|500000|Grok 4.7
"""


@dataclass(frozen=True)
class ModelInfo:
    id: str
    images: bool
    efforts: tuple
    context: int
    label: str


CC_CATALOG = {}
for _line in CC_CATALOG_TEXT.strip().splitlines():
    _id, _img, _eff, _ctx, _label = _line.split("|")
    CC_CATALOG[_id.lower()] = ModelInfo(_id, _img == "image",
                                        tuple(e for e in _eff.split(",") if e in EFFORT_ORDER),
                                        int(_ctx), _label)
del _line, _id, _img, _eff, _ctx, _label

# Deprecated ids the CLI rewrites before sending (canonicalizeModelId in CLI 1.64).
CC_DEPRECATED = {"claude-sonnet-4-20250514": "claude-sonnet-4-6",
                 "claude-sonnet-4-5-20250929": "claude-sonnet-4-6",
                 "claude-sonnet-4-5": "claude-sonnet-4-6", "claude-sonnet-4": "claude-sonnet-4-6",
                 "claude-opus-4-5-20251101": "claude-opus-4-7",
                 "claude-opus-4-5": "claude-opus-4-7", "claude-opus-4-6": "claude-opus-4-7",
                 "claude-haiku-4-5": "claude-haiku-4-5-20251001",
                 "tencent/hy3": "tencent/Hy3"}
_DATE_SUFFIX = re.compile(r"[-@]\d{8}$")


def map_model(model, model_map, default):
    """Client model id -> backend model id through modelMap (exact ids first, then globs in
    order)."""
    if not model:
        return default
    if model in model_map:
        return model_map[model]
    lowered = model.lower()
    for pattern, target in model_map.items():
        if ("*" in pattern or "?" in pattern) and fnmatch.fnmatchcase(lowered, pattern.lower()):
            return target
    return model


def canonical_cc_model(model):
    """Case-insensitive catalog match; deprecated ids and date suffixes as the CLI rewrites them."""
    lowered = model.lower()
    for candidate in (lowered, CC_DEPRECATED.get(lowered, "").lower(),
                      _DATE_SUFFIX.sub("", lowered),
                      CC_DEPRECATED.get(_DATE_SUFFIX.sub("", lowered), "").lower()):
        if candidate in CC_CATALOG:
            return CC_CATALOG[candidate].id
        if candidate and candidate in {v.lower() for v in CC_DEPRECATED.values()}:
            return next(v for v in CC_DEPRECATED.values() if v.lower() == candidate)
    return model


def clamp_effort(effort, allowed):
    """Nearest level the model accepts (ties go up); None when it takes no effort at all."""
    if not effort or effort == "none" or not allowed:
        return None
    if effort in allowed:
        return effort
    rank = EFFORT_ORDER.index(effort)
    return min(allowed, key=lambda level: (abs(EFFORT_ORDER.index(level) - rank),
                                           -EFFORT_ORDER.index(level)))


def image_capable_models():
    return [m.id for m in CC_CATALOG.values() if m.images]


class VersionWatcher:
    """x-command-code-version: the configured ccVersion, else npm's latest `command-code`,
    fetched in the background every 24 h, else the pinned known-good version."""

    REGISTRY_URL = "https://registry.npmjs.org/command-code/latest"

    def __init__(self, configured, ca_file=""):
        self.configured = configured
        self.ca_file = ca_file   # behind a TLS-inspecting proxy, npm is behind it too
        self.latest = None
        self.stop_event = threading.Event()

    @property
    def version(self):
        return self.configured or self.latest or PINNED_CC_VERSION

    def start(self):
        if not self.configured:
            threading.Thread(target=self._run, name="cc-version", daemon=True).start()

    def _run(self):
        registry = ConnectionPool(self.REGISTRY_URL, ca_file=self.ca_file)
        while not self.stop_event.is_set():
            conn = registry.new_connection(10)
            try:
                conn.request("GET", registry.prefix,  # the URL's path
                             headers={"Accept": "application/json"})
                response = conn.getresponse()
                document = _json_decode(response.read(65536).decode("utf-8", "replace"))
                version = (document.get("version")
                           if response.status == 200 and isinstance(document, dict) else None)
                if isinstance(version, str) and re.fullmatch(r"\d+\.\d+\.\d+[\w.\-]*", version):
                    if version != self.latest:
                        log.info("command-code version from npm: %s", version)
                    self.latest = version
                else:
                    log.debug("npm answered %s without a usable version; using %s",
                              response.status, self.version)
            except Exception as e:  # offline, proxy, registry down: the pinned version serves
                log.debug("npm version check failed (%s); using %s", type(e).__name__, self.version)
            finally:
                conn.close()
            self.stop_event.wait(24 * 3600)


# ---- request -> the /alpha/generate body and its session ---------------------------------

class UpstreamSessions:
    """One upstream session (x-session-id = threadId) per client key: 12 h plus a random 0-1 h,
    unless the client names its own. Also counts consecutive idle timeouts per key."""

    LIFETIME = 12 * 3600

    def __init__(self):
        self.lock = threading.Lock()
        self.by_key = {}          # sha256(key) -> [session uuid, expires at]
        self.timeouts = {}        # sha256(key) -> consecutive timeouts
        self.last_sweep = time.monotonic()

    @staticmethod
    def _digest(key):
        return hashlib.sha256(key.encode()).hexdigest()

    def session_for(self, key, client_session=None):
        if client_session:
            try:
                return str(uuid.UUID(client_session.strip()))
            except ValueError:
                pass  # not a UUID: the upstream would refuse it as threadId, so keep ours
        digest, now = self._digest(key), time.monotonic()
        with self.lock:
            if now - self.last_sweep > 600:
                self.by_key = {k: v for k, v in self.by_key.items() if v[1] > now}
                self.last_sweep = now
            entry = self.by_key.get(digest)
            if entry is None or entry[1] <= now:
                entry = [str(uuid.uuid4()), now + self.LIFETIME + random.uniform(0, 3600)]
                self.by_key[digest] = entry
            return entry[0]

    def note_timeout(self, key):
        with self.lock:
            digest = self._digest(key)
            self.timeouts[digest] = self.timeouts.get(digest, 0) + 1
            return self.timeouts[digest]

    def note_success(self, key):
        with self.lock:
            self.timeouts.pop(self._digest(key), None)


def wire_system(request):
    """params.system: the client's text as parts with cache markers (at most 4, as Anthropic
    allows), or a single space: an empty system makes the server inject ~7.5k tokens of its own
    prompt."""
    parts = [p["text"] for p in request.system if p["text"]]
    if not parts:
        return " "
    if len(parts) > 4:
        parts = parts[:3] + ["\n".join(parts[3:])]
    last = len(parts) - 1
    return [{"type": "text", "text": text if i == last else text + "\n",
             "cache_control": {"type": "ephemeral"}}
            for i, text in enumerate(parts)]


def wire_image(part):
    if "url" in part:
        return {"type": "image", "image": part["url"]}
    return {"type": "image", "image": "data:%s;base64,%s" % (part["media_type"], part["data"]),
            "mimeType": part["media_type"]}


def wire_messages(request):
    """Canonical messages -> AI-SDK model messages as CLI 1.64 sends them (toWireMessages)."""
    wire = []
    for message in request.messages:
        role = message["role"]
        content = []
        hoisted = []  # images inside tool results travel in a following user message
        for part in message["parts"]:
            kind = part["type"]
            if kind == "text":
                content.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                content.append(wire_image(part))
            elif kind == "reasoning":
                content.append({"type": "reasoning", "text": part["text"]})
            elif kind == "tool_call":
                content.append({"type": "tool-call", "toolCallId": part["id"],
                                "toolName": part["name"], "input": part["arguments"]})
            elif kind == "tool_result":
                value = part["content"]
                for image in part.get("images") or ():
                    hoisted.append(wire_image(image))
                    value += "\n[image %d attached below]" % len(hoisted)
                content.append({"type": "tool-result", "toolCallId": part["call_id"],
                                "toolName": part["name"],
                                "output": {"type": "text", "value": value}})
        if not content:
            continue
        if role == "tool" and wire and wire[-1]["role"] == "tool":
            wire[-1]["content"].extend(content)
        else:
            wire.append({"role": role, "content": content})
        if hoisted:
            wire.append({"role": "user", "content": hoisted})
    return wire


def drop_dangling_reasoning(request):
    """A conversation must not end in an assistant turn holding only reasoning (clients resend
    what they kept of a failed attempt); upstream models refuse such a 'prefill'."""
    while request.messages and request.messages[-1]["role"] == "assistant" and \
            all(p["type"] == "reasoning" for p in request.messages[-1]["parts"]):
        request.messages.pop()


def has_images(request):
    return any(part["type"] == "image" or (part["type"] == "tool_result" and part.get("images"))
               for message in request.messages for part in message["parts"])


# ---- the upstream exchange: TLS, connection pool, one call, body framing -----------------

@functools.lru_cache(maxsize=None)
def tls_context(ca_file=""):
    """One client TLS context per CA choice, made on first use: each holds its own copy of the
    CA store (~1-2 MB). ca_file: more CA certificates (PEM) to trust besides the system's, e.g.
    those of a TLS-inspecting corporate proxy (checked at start by check_ca_file)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


def check_ca_file(ca_file):
    """A CA file that cannot be loaded stops the start, rather than every upstream request."""
    try:   # a bare context: without the system's CA store, so nothing big is built twice
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(ca_file)
    except OSError as e:   # missing, unreadable, or no certificate in it (ssl.SSLError)
        raise ConfigError("upstreamCaFile %s: cannot load it as PEM certificates (%s)"
                          % (ca_file, getattr(e, "strerror", None) or e)) from None


class _OnePacketRequest:
    """A request leaves at once and whole: no Nagle delay on the upstream socket, and without
    Nagle http.client's two sends of a request (its head, then its body) would be two packets
    (two TLS records) and two system calls each, so endheaders() here joins them into one."""

    held = None   # what send() was given while endheaders() runs

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def endheaders(self, message_body=None, **kwargs):
        self.held = []
        try:
            super().endheaders(message_body, **kwargs)
        except BaseException:
            self.held = None
            raise
        held, self.held = self.held, None
        if held:
            super().send(b"".join(held))

    def send(self, data):
        if self.held is None:
            return super().send(data)
        self.held.append(data if isinstance(data, bytes) else bytes(data))


class UpstreamHTTPConnection(_OnePacketRequest, http.client.HTTPConnection):
    pass


class UpstreamHTTPSConnection(_OnePacketRequest, http.client.HTTPSConnection):
    pass


class ConnectionPool:
    """Idle keep-alive connections per upstream origin, so requests skip a new TCP+TLS handshake.

    Every acquire() is answered by one release() (reusable) or discard(). The idle list holds
    up to as many connections as were in use at once since the pool was last quiet (at least
    MIN_IDLE), so the next burst of that size finds them all. One reaper thread, started with
    the first idle connection, looks at the idle ones every REAP_EVERY s: it closes one once it
    has been idle `idle_seconds`, or once the upstream closed its side, so a burst leaves no
    sockets behind (ESTABLISHED or CLOSE_WAIT). It sleeps while nothing is idle; a request never
    starts a thread or wakes it, except the release that ends such a sleep."""

    MIN_IDLE = 8
    REAP_EVERY = 1.0

    def __init__(self, base_url, idle_seconds=50.0, ca_file=""):
        parts = urllib.parse.urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.ca_file = ca_file
        if ca_file:
            check_ca_file(ca_file)
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.idle_seconds = idle_seconds
        self.lock = threading.Lock()
        self.idle = []  # (connection, released at)
        self.out = 0    # acquired, not yet released or discarded
        self.peak = 0   # the most out at once since the pool was last quiet
        self.reaper_wait = threading.Condition(self.lock)
        self.reaper = None
        self.reaper_asleep = False   # waiting for something to be idle (not on its timer)
        self.closed = False

    def acquire(self, timeout):
        """(connection, reused?)"""
        now = time.monotonic()
        stale = []
        reused = None
        with self.lock:
            if not self.out and not self.idle:
                self.peak = 0   # quiet: this burst sizes the idle list afresh
            self.out += 1
            self.peak = max(self.peak, self.out)
            while self.idle:
                conn, released = self.idle.pop()
                if (now - released < self.idle_seconds and conn.sock is not None
                        and conn.sock.fileno() != -1):
                    reused = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        if reused is not None:
            reused.timeout = timeout
            if reused.sock is not None:
                reused.sock.settimeout(timeout)
            return reused, True
        return self.new_connection(timeout), False

    def new_connection(self, timeout):
        """A connection of this origin outside the pool's count (for a one-off request)."""
        if self.tls:
            return UpstreamHTTPSConnection(self.host, self.port, timeout=timeout,
                                           context=tls_context(self.ca_file))
        return UpstreamHTTPConnection(self.host, self.port, timeout=timeout)

    def close_all(self):
        with self.lock:
            idle, self.idle = self.idle, []
            self.closed = True
            self.reaper_wait.notify()
        for conn, _ in idle:
            conn.close()

    def discard(self, conn):
        with self.lock:
            self.out -= 1
        conn.close()

    def release(self, conn):
        with self.lock:
            self.out -= 1
            kept = (not self.closed and conn.sock is not None
                    and len(self.idle) < max(self.MIN_IDLE, self.peak))
            if kept:
                self.idle.append((conn, time.monotonic()))
                start = self.reaper is None
                if start:
                    self.reaper = threading.Thread(target=self._reap, name="upstream-reaper",
                                                   daemon=True)
                elif self.reaper_asleep:
                    self.reaper_wait.notify()
        if not kept:
            conn.close()
        elif start:   # outside the lock: a thread's start waits for the thread to run
            self.reaper.start()

    def _reap(self):
        while True:
            with self.lock:
                self.reaper_asleep = True
                while not self.idle and not self.closed:
                    self.reaper_wait.wait()
                self.reaper_asleep = False
                if self.closed:
                    return
                now = time.monotonic()
                expired = [c for c, at in self.idle if now - at >= self.idle_seconds]
                socks = {c.sock: c for c, at in self.idle
                         if now - at < self.idle_seconds and c.sock is not None}
            for conn in expired:
                self._drop(conn)
            try:   # an idle keep-alive socket turns readable only with EOF or unasked-for bytes
                spoilt = select.select(list(socks), [], [], 0)[0]
            except (OSError, ValueError):   # a socket closed under us: look again next time
                spoilt = []
            for sock in spoilt:
                self._drop(socks[sock])
            with self.lock:
                if not self.closed:
                    self.reaper_wait.wait(self.REAP_EVERY)

    def _drop(self, conn):
        with self.lock:
            kept = [(c, at) for c, at in self.idle if c is not conn]
            taken = len(kept) != len(self.idle)
            self.idle = kept
        if taken:   # not meanwhile acquired by a request
            conn.close()


class UpstreamHead(NamedTuple):     # the status line and headers (a body only for a non-200)
    status: int
    headers: list
    body: Optional[bytes]


class UpstreamChunk(NamedTuple):
    data: bytes


class UpstreamEnd(NamedTuple):      # the body is complete
    pass


class UpstreamFailed(NamedTuple):   # the exchange broke (connect, reset, bad framing)
    error: Exception


_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ChunkedBody:
    """HTTP/1.1 chunked framing, undone as bytes arrive: feed(data) returns the payload bytes
    in them (every chunk's at once, so a read that brought ten events yields one piece), `done`
    once the last chunk and its trailers are in. Extensions and trailers are skipped; a
    malformed size line is a ValueError (the attempt failed)."""

    MAX_LINE = 4096

    def __init__(self):
        self.buffer = b""
        self.left = 0           # payload bytes of the current chunk still to come
        self.crlf = False       # the CRLF after a chunk's payload is still to come
        self.trailers = False   # past the last chunk: trailer lines until an empty one
        self.done = False

    def feed(self, data):
        buffer, pos, out = self.buffer + data if self.buffer else data, 0, []
        while not self.done:
            if self.left:
                piece = buffer[pos:pos + self.left]
                out.append(piece)
                self.left -= len(piece)
                pos += len(piece)
                if self.left:
                    break
                self.crlf = True
            if self.crlf:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos:pos + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                pos += 2
                self.crlf = False
            end = buffer.find(b"\r\n", pos)
            if end == -1:
                if len(buffer) - pos > self.MAX_LINE:
                    raise ValueError("chunk size line too long")
                break
            line, pos = buffer[pos:end], end + 2
            if self.trailers:
                self.done = not line
            else:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):   # int() would take -1, +5, 0x5 and 1_0
                    raise ValueError("bad chunk size line %r" % line[:40])
                self.left = int(size, 16)
                self.trailers = self.left == 0
        self.buffer = buffer[pos:]
        return out[0] if len(out) == 1 else b"".join(out)


class PlainBody:
    """A body framed by Content-Length, or (length None) by the connection's close."""

    def __init__(self, length):
        self.left = length
        self.buffer = b""       # bytes not yet fed; once done, bytes past the body
        self.done = length == 0

    def feed(self, data):
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        if self.left is None:
            return data
        piece, self.buffer = data[:self.left], data[self.left:]
        self.left -= len(piece)
        self.done = self.left == 0
        return piece


class UpstreamCall:
    """One upstream HTTP exchange, read on the request's own thread: wait(timeout) returns the
    next item (UpstreamHead, UpstreamChunk, UpstreamEnd, UpstreamFailed) or None after `timeout`
    s of silence, so the request thread can tick (keep-alives, idle limit, client checks) between
    reads. No reader thread, no queue: a client that stops reading stops the upstream read
    (TCP backpressure), and abort() closes the connection at once.

    http.client sends the request and reads the head; the body is read here, from the socket
    made non-blocking: select() waits, one recv takes all that arrived (whole chunks decoded at
    once), so each wake-up costs two system calls however many events it brings."""

    CHUNK = 65536
    WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError)

    def __init__(self, pool, method, path, headers, body, socket_timeout):
        (self.pool, self.method, self.path,
         self.headers, self.body) = pool, method, path, headers, body
        self.socket_timeout = socket_timeout
        self.conn = self.response = self.sock = self.framing = None
        self.tls_pending = None   # a TLS socket's pending(): bytes decrypted, not yet read
        self.done = False
        self.reused = False     # the connection came from the pool (it may have been closed)

    def wait(self, timeout):
        if self.done:
            return None
        try:
            if self.response is None:
                return self._head(timeout)
            return self._body(timeout)
        except Exception as e:   # connect, reset, bad framing: the attempt failed
            self.abort()
            return UpstreamFailed(e)

    def _send(self, fresh=False):
        if fresh:   # the pooled connection had been closed by the server: a new one
            self.conn.close()   # http.client reconnects a closed connection on request()
            self.reused = False
        else:
            self.conn, self.reused = self.pool.acquire(self.socket_timeout)
        try:
            self.conn.request(self.method, self.pool.prefix + self.path, self.body, self.headers)
        except (http.client.ImproperConnectionState, ConnectionResetError, BrokenPipeError):
            if not self.reused:
                raise
            self._send(fresh=True)   # a pooled connection the server had closed
        self.sock = self.conn.sock   # kept: http.client drops it from a will-close connection

    def _head(self, timeout):
        if self.conn is None:
            self._send()
        if not select.select([self.sock], [], [], timeout)[0]:
            return None
        try:
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            if not self.reused:
                raise
            self.conn.close()   # closed while idle: the request never reached the server
            self._send(fresh=True)
            return None
        self.response = response
        if response.status != 200:
            body = response.read(65536)
            self.abort()
            return UpstreamHead(response.status, response.getheaders(), body)
        self.framing = ChunkedBody() if response.chunked else PlainBody(response.length)
        self.sock.settimeout(0.0)
        self.tls_pending = self.sock.pending if isinstance(self.sock, ssl.SSLSocket) else None
        try:   # what http.client read past the head is the body's start
            self.framing.buffer = response.fp.read1(self.CHUNK) + self.framing.buffer
        except self.WOULD_BLOCK:
            pass
        return UpstreamHead(200, response.getheaders(), None)

    def _body(self, timeout):
        framing = self.framing
        if framing.buffer and not framing.done:   # bytes http.client had read past the head
            data = framing.feed(b"")
            if data:
                return UpstreamChunk(data)
        if framing.done:
            return self._end()
        sock, pending = self.sock, self.tls_pending
        while True:
            if not (pending and pending()):
                if not select.select([sock], [], [], timeout)[0]:
                    return None
            try:
                data = sock.recv(self.CHUNK)
            except self.WOULD_BLOCK:
                continue   # a TLS record only part here, or a spurious wake-up
            if not data:
                if framing.left is None:   # framed by the close: this is the end
                    framing.done = True
                    return self._end()
                raise http.client.IncompleteRead(b"")
            data = framing.feed(data)
            if data:
                return UpstreamChunk(data)
            if framing.done:
                return self._end()

    def _end(self):
        """The body is complete: the connection goes back to the pool for the next request,
        unless it is closing or the upstream sent more than the body."""
        self.done = True
        response, conn = self.response, self.conn
        response.close()
        self.conn = None
        sock, self.sock = self.sock, None   # no longer ours to abort
        if response.will_close or self.framing.buffer:
            sock.close()
            self.pool.discard(conn)
        else:
            self.pool.release(conn)   # acquire() restores the socket's timeout
        return UpstreamEnd()

    def finish(self):
        """The answer is complete though the body may not be: read the rest (briefly) so the
        connection can be reused, else close it."""
        deadline = time.monotonic() + 1.0
        while not self.done and time.monotonic() < deadline:
            item = self.wait(max(0.0, deadline - time.monotonic()))
            if item is None or type(item) is UpstreamFailed:
                break
        if not self.done:
            self.abort()

    def abort(self):
        """Close the upstream connection now: the upstream sees the client go away."""
        self.done = True
        conn, self.conn = self.conn, None
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self.response is not None:
            self.response.close()
        if conn is not None:
            self.pool.discard(conn)


# ---- upstream answer -> canonical events: errors, the NDJSON decoder ---------------------

def parse_upstream_error(body):
    """An upstream error body -> (message, code, rateLimit). Shapes seen: {"error": {...}},
    {"success": false, "error": {...}}, a JSON document inside message, bare prose."""
    message, code, rate_limit = "", None, None
    try:
        doc = json.loads(body) if isinstance(body, (bytes, str)) and body else body
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        error = doc.get("error", doc)
        if isinstance(error, str):
            message = error
        elif isinstance(error, dict):
            message = str(error.get("message") or "")
            code = error.get("code") or error.get("type")
            rate_limit = error.get("rateLimit")
        code = doc.get("code") if doc.get("code") == "USAGE_EXCEEDED" else code
    elif body:
        message = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        if message.lstrip().startswith("<"):
            message = "(an HTML page)"
    return message.strip()[:500], code, rate_limit


# Errors whose wording is ours on every protocol: they tell the operator or user what to do.
_OUR_WORDING = ("insufficient_quota", "usage_limit", "upgrade_required", "model_not_in_plan")


def classify_upstream_error(status, message, code=None, rate_limit=None, retry_after=None):
    """Map what Command Code answered to what the client gets (table in the README), keeping
    the upstream's own message for the protocols that show it unchanged (Anthropic's)."""
    err = _classify_upstream_error(status, message, code, rate_limit, retry_after)
    if message and err.code not in _OUR_WORDING:
        err.upstream_message = redact(message)
    return err


def _classify_upstream_error(status, message, code=None, rate_limit=None, retry_after=None):
    text = (message or "").lower()
    code_text = str(code or "").lower()
    shown = message or "HTTP %s" % status
    if "premium_credits_exhausted" in text or "insufficient credits" in text \
            or code_text == "usage_exceeded" or status == 402:
        return ProxyError(429, "insufficient_quota", "Command Code credits exhausted: " + shown,
                          code="insufficient_quota", should_retry=False)
    if code_text == "model_not_in_plan" or "model_not_in_plan" in text:
        return ProxyError(403, "permission", "model not in your Command Code plan: " + shown,
                          code="model_not_in_plan")
    if code_text == "upgrade_required" or "upgrade_required" in text:
        return ProxyError(502, "upstream", "Command Code refused our client version "
                          "(upgrade_required). The operator should set ccVersion to the current "
                          "command-code version: python3 proxy.py config set ccVersion <version>",
                          code="upgrade_required")
    if status == 401:
        return ProxyError(401, "authentication", "Command Code rejected the API key: " + shown,
                          code="invalid_api_key")
    if status == 403:
        return ProxyError(403, "permission", "Command Code refused the request: " + shown)
    if status == 429:
        if code_text == "rate_limited" and isinstance(rate_limit, dict) \
                and rate_limit.get("window"):
            reset = rate_limit.get("reset")
            wait = max(1, int(reset - time.time())) if isinstance(reset, (int, float)) else 3600
            return ProxyError(429, "rate_limit",
                              "Command Code %s usage limit reached; it resets in %d s: %s"
                              % (rate_limit.get("window"), wait, shown), retry_after=wait,
                              code="usage_limit", should_retry=False)
        return ProxyError(429, "rate_limit", "Command Code is rate limiting: " + shown,
                          retry_after=retry_after or 30, code="rate_limited")
    if status == 529:
        return ProxyError(503, "overloaded", "Command Code is overloaded: " + shown,
                          retry_after=retry_after or 5, retryable=True, code="overloaded")
    if status in (408, 504):
        return ProxyError(504, "timeout", "Command Code timed out: " + shown, retryable=True)
    if status is None or status >= 500:
        return ProxyError(502, "upstream", "Command Code error: " + shown,
                          retry_after=retry_after or 5, retryable=True, code="upstream_error")
    if status == 404:
        return ProxyError(404, "not_found", "Command Code: " + shown)
    if status == 413:
        return ProxyError(413, "request_too_large", "Command Code: request too large: " + shown)
    if status in (400, 422):
        return ProxyError(400, "invalid_request", "Command Code rejected the request: " + shown)
    return ProxyError(502, "upstream", "Command Code answered HTTP %s: %s" % (status, shown))


def stream_error(error):
    """An in-stream {"type":"error"} payload -> ProxyError. The message may embed
    '<status> {json}', which the CLI unpacks the same way."""
    if isinstance(error, dict):
        message, status = str(error.get("message") or ""), error.get("statusCode")
    else:
        message, status = str(error or ""), None
    m = re.match(r"\s*(\d{3})\s+(\{.*\})\s*$", message, re.S)
    code, rate_limit = None, None
    if m:
        status = status or int(m.group(1))
        message, code, rate_limit = parse_upstream_error(m.group(2))
    err = classify_upstream_error(status if isinstance(status, int) else None, message, code,
                                  rate_limit)
    if isinstance(error, dict) and error.get("isRetryable") is True:
        err.retryable = True
    return err


def cc_usage(raw):
    if not isinstance(raw, dict):
        return None
    details = raw.get("inputTokenDetails") or {}
    output_details = raw.get("outputTokenDetails") or {}
    return Usage(input=token_count(raw.get("inputTokens")),
                 cache_read=token_count(details.get("cacheReadTokens",
                                                    raw.get("cachedInputTokens"))),
                 cache_write=token_count(details.get("cacheWriteTokens")),
                 output=token_count(raw.get("outputTokens")),
                 reasoning=token_count(output_details.get("reasoningTokens",
                                                     raw.get("reasoningTokens"))))


CC_FINISH = {"stop": "stop", "length": "length", "tool-calls": "tool_calls",
             "content-filter": "content_filter", "other": "stop"}


class CommandCodeStreamDecoder:
    """NDJSON lines -> canonical events. Tolerant as the CLI is: blank lines, `data: ` prefixes,
    non-JSON lines skipped and counted, a last line without newline still read."""

    MAX_LINE = 64 * 1024 * 1024

    def __init__(self, request):
        self.request = request
        self.pending = []          # pieces of a line whose newline has not arrived yet
        self.pending_size = 0
        self.skipped = 0
        self.finished = False
        self.failure = None        # an error line met after events of the same read
        self.step_usage = None
        self.tools = {}   # call id -> argument text streamed so far
        self.handlers = {"text-delta": self._text, "reasoning-delta": self._reasoning,
                         "tool-input-start": self._tool_start, "tool-input-delta": self._tool_delta,
                         "tool-call": self._tool_call, "finish-step": self._finish_step,
                         "finish": self._finish, "error": self._error, "abort": self._abort}

    def feed(self, data):
        """Bytes as they arrive -> a batch of events from the lines they complete."""
        complete, newline, rest = data.rpartition(b"\n")
        if not newline:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > self.MAX_LINE:
                raise ProxyError(502, "upstream",
                                 "Command Code sent a line longer than %d bytes" % self.MAX_LINE)
            return []
        if self.pending:
            complete = b"".join(self.pending) + complete
        self.pending = [rest] if rest else []
        self.pending_size = len(rest)
        # one decode per chunk: a UTF-8 character never spans a newline
        return self._lines(complete.decode("utf-8", "replace").split("\n"))

    def close(self):
        """The stream ended: a last line without a newline still counts."""
        lines = [b"".join(self.pending).decode("utf-8", "replace")] if self.pending else []
        self.pending = []
        return self._lines(lines)

    def _lines(self, lines):
        """The batch of these lines' events. An error line after events in the same read is
        held in `failure`: the events before it reach the client first, as they would had they
        arrived in a read of their own."""
        batch = []
        try:
            for line in lines:
                if self.finished:
                    break
                self._line(line, batch)
        except ProxyError as err:
            if not batch:
                raise
            self.failure = err
        return batch

    def _line(self, line, batch):
        line = line.strip()
        if not line:
            return
        if line.startswith("data:"):
            line = line[5:].lstrip()
            if line == "[DONE]":
                return
        try:
            event, end = _json_scan(line, 0)
            if end != len(line):
                raise ValueError("trailing data")
            handler = self.handlers.get(event.get("type"))
        except (StopIteration, ValueError, AttributeError, TypeError, RecursionError):
            self.skipped += 1
            return
        if handler is not None:
            handler(event, batch)

    @staticmethod
    def _delta_text(event):
        text = event.get("text", event.get("delta", event.get("textDelta")))
        return text if isinstance(text, str) else ""

    def _text(self, event, batch):
        batch.append(TextDelta(self._delta_text(event)))

    def _reasoning(self, event, batch):
        batch.append(ReasoningDelta(self._delta_text(event)))

    def _tool_start(self, event, batch):
        call_id = str(event.get("id") or event.get("toolCallId") or new_id("call_"))
        if event.get("providerExecuted") or call_id in self.tools:
            return
        self.tools[call_id] = ""
        batch.append(ToolCallStart(call_id, str(event.get("toolName") or "")))

    def _tool_delta(self, event, batch):
        call_id = str(event.get("id") or event.get("toolCallId"))
        delta = event.get("delta", event.get("inputTextDelta"))
        if self.tools.get(call_id) is not None and isinstance(delta, str) and delta:
            self.tools[call_id] += delta
            batch.append(ToolCallDelta(call_id, delta))

    def _tool_call(self, event, batch):
        if event.get("providerExecuted"):
            return
        call_id = str(event.get("toolCallId") or event.get("id") or new_id("call_"))
        arguments = event.get("input", event.get("args"))
        if isinstance(arguments, list) and len(arguments) == 1:
            arguments = arguments[0]
        if not isinstance(arguments, str):
            arguments = json_dumps(arguments if arguments is not None else {})
        if call_id not in self.tools:
            self.tools[call_id] = ""
            batch.append(ToolCallStart(call_id, str(event.get("toolName") or "")))
        streamed = self.tools[call_id]
        if streamed and decoded_arguments(streamed) == decoded_arguments(arguments):
            arguments = streamed  # the same bytes the client already saw as deltas
        batch.append(ToolCallEnd(call_id, arguments))

    def _finish_step(self, event, batch):
        self.step_usage = cc_usage(event.get("usage")) or self.step_usage

    def _finish(self, event, batch):
        reason = event.get("finishReason")
        if reason == "error":
            raise ProxyError(502, "upstream", "Command Code ended the answer with an error",
                             retryable=True)
        usage = cc_usage(event.get("totalUsage")) or self.step_usage or Usage()
        finish = CC_FINISH.get(reason, "stop")
        stop_sequence = None
        if event.get("rawFinishReason") == "stop_sequence":
            finish = "stop_sequence"
            stop_sequence = self.request.stop[0] if len(self.request.stop) == 1 else None
        self.finished = True
        batch.append(UsageEvent(usage))
        batch.append(Finish(finish, stop_sequence))

    def _error(self, event, batch):
        raise stream_error(event.get("error"))

    def _abort(self, event, batch):
        raise ProxyError(502, "upstream", "Command Code aborted the answer", retryable=True)


# ---- the backend -------------------------------------------------------------------------

class ModelList:
    """/v1/models for Command Code: the live /provider/v1/models list (cached), else the catalog.
    A listing never waits for the upstream (Claude Code gives discovery 3 s): a stale or missing
    list is refreshed in the background and the last one (or the catalog) answers now."""

    def __init__(self, backend):
        self.backend = backend
        self.lock = threading.Lock()
        self.cached = None
        self.fetched_at = 0.0
        self.refreshing = False

    def ids(self, key):
        config = self.backend.config
        if config["useProviderModels"] and key:
            with self.lock:
                stale = self.cached is None or \
                    time.monotonic() - self.fetched_at >= config["modelRefreshIntervalMs"] / 1000
                start = stale and not self.refreshing
                self.refreshing = self.refreshing or start
                cached = list(self.cached) if self.cached else None
            if start:
                threading.Thread(target=self._refresh_in_background, args=(key,),
                                 name="model-list", daemon=True).start()
            if cached:
                return cached
        return [m.id for m in CC_CATALOG.values()]

    def _refresh_in_background(self, key):
        try:
            self._refresh(key)
        finally:
            with self.lock:
                self.refreshing = False

    def _refresh(self, key):
        pool = self.backend.pool
        conn = pool.new_connection(10)
        try:
            conn.request("GET", pool.prefix + "/provider/v1/models",
                         headers=self.backend.headers(key, None, None))
            response = conn.getresponse()
            body = response.read(4 * 1024 * 1024)
            data = json.loads(body).get("data") if response.status == 200 else None
            ids = ([m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
                   if isinstance(data, list) else None)
        except (OSError, ValueError, AttributeError, TypeError, http.client.HTTPException) as e:
            log.debug("provider model list unavailable (%s); using the built-in catalog",
                      type(e).__name__)
            ids = None
        finally:
            conn.close()
        with self.lock:
            self.fetched_at = time.monotonic()
            if ids:
                self.cached = ids


class CommandCodeBackend:
    name = "commandcode"
    auth_hint = "send your Command Code key (user_...) as Authorization: Bearer or x-api-key"
    open_model_list = True   # the catalog is listed without a key (with one, the account's too)
    prompt_counted_as_sent = True   # its input tokens are our request's: they calibrate estimates

    def __init__(self, config, metrics):
        self.config = config
        self.metrics = metrics
        self.sessions = UpstreamSessions()
        ca_file = config_relative_path(config, "upstreamCaFile") or ""
        self.version = VersionWatcher(config["ccVersion"], ca_file)
        self.pool = ConnectionPool(config["apiBase"], config["upstreamIdleMs"] / 1000, ca_file)
        self.models = ModelList(self)
        self.last_upstream_ok = None

    def start(self):
        self.version.start()

    def stop(self):
        self.version.stop_event.set()
        self.pool.close_all()

    # ---- before any upstream call ----------------------------------------------------
    def authenticate(self, headers):
        for value in (headers.get("authorization"), headers.get("x-api-key")):
            m = re.search(r"user_[A-Za-z0-9_\-]+", value or "")
            if m:
                return m.group(0)
        raise ProxyError(401, "authentication",
                         "a Command Code key is required: " + self.auth_hint +
                         " (sk-... keys are not Command Code keys)", code="invalid_api_key")

    def prepare(self, request):
        """Model mapping, canonical ids, limits and capability checks, all before any upstream
        call."""
        default = self.config["defaultModel"] or CC_DEFAULT_MODEL
        drop_dangling_reasoning(request)
        request.model = canonical_cc_model(map_model(request.model, self.config["modelMap"],
                                                     default))
        info = CC_CATALOG.get(request.model.lower())
        if info is not None and not info.images and has_images(request):
            raise bad_request("model %s does not accept images; models that do: %s"
                              % (request.model, ", ".join(image_capable_models())), "model")
        if info is not None:
            request.reasoning_effort = clamp_effort(request.reasoning_effort, info.efforts)
        elif request.reasoning_effort == "none":
            request.reasoning_effort = None
        request.max_tokens = min(request.max_tokens or CC_MAX_TOKENS_DEFAULT, CC_MAX_TOKENS_CAP)

    # ---- the wire ---------------------------------------------------------------------
    def headers(self, key, session_id, traceparent):
        headers = {"content-type": "application/json", "User-Agent": "cli",
                   "x-command-code-version": self.version.version,
                   "x-cli-environment": "production",
                   "x-project-slug": self.config["projectSlug"], "x-taste-learning": "true"}
        if session_id:
            headers["x-session-id"] = session_id
        headers["Authorization"] = "Bearer " + key
        if traceparent:
            headers["traceparent"] = traceparent
        headers.update({"accept": "*/*", "accept-language": "*", "sec-fetch-mode": "cors"})
        return headers

    def envelope(self, request, session_id):
        """The /alpha/generate body, keys in the CLI's order, with a neutral environment
        snapshot."""
        params = {"model": request.model, "messages": wire_messages(request),
                  "tools": [] if request.tool_choice == "none" else
                  [{"name": t["name"], "description": t["description"], "input_schema": t["schema"]}
                   for t in request.tools],
                  "system": wire_system(request), "max_tokens": request.max_tokens, "stream": True}
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.top_p is not None:
            params["top_p"] = request.top_p
        if request.stop:
            params["stop"] = request.stop
        if params["tools"] and request.tool_choice == "required":
            params["tool_choice"] = {"type": "any"}
        elif params["tools"] and isinstance(request.tool_choice, dict):
            params["tool_choice"] = {"type": "tool", "name": request.tool_choice["name"]}
        if params["tools"] and request.parallel_tool_calls is False:
            params["parallel_tool_calls"] = False
        if request.reasoning_effort:
            params["reasoning_effort"] = request.reasoning_effort
        config = {"workingDir": "/workspace/" + self.config["projectSlug"],
                  "date": time.strftime("%Y-%m-%d", time.gmtime()), "environment": "linux",
                  "structure": [], "isGitRepo": False, "currentBranch": "", "mainBranch": "",
                  "gitStatus": "", "recentCommits": []}
        return {"config": config, "memory": None, "taste": None, "skills": None,
                "permissionMode": "standard", "threadId": session_id, "params": params}

    # ---- the stream -------------------------------------------------------------------
    def stream(self, request, exchange):
        """Event batches for one attempt; [] while the upstream is silent (a tick)."""
        key = exchange.credential
        session_id = self.sessions.session_for(key, request.session_id)
        body = json_dumps(self.envelope(request, session_id)).encode()
        traceparent = "00-%s-%s-01" % (exchange.trace_id, random_hex(16))
        idle_limit = self.config["streamIdleTimeoutMs" if request.stream
                                 else "nonStreamIdleTimeoutMs"] / 1000
        call = UpstreamCall(self.pool, "POST", "/alpha/generate",
                            self.headers(key, session_id, traceparent),
                            body, socket_timeout=idle_limit + 30)
        decoder = CommandCodeStreamDecoder(request)
        tick = exchange.tick
        last_heard = time.monotonic()
        try:
            while True:
                item = call.wait(tick)
                now = time.monotonic()
                if item is None:
                    if now - last_heard >= idle_limit:
                        raise self._timeout(key, idle_limit)
                    yield []
                    continue
                last_heard = now
                if type(item) is UpstreamChunk:
                    batch = decoder.feed(item.data)
                elif type(item) is UpstreamHead:
                    self._check_head(item)
                    continue
                elif type(item) is UpstreamEnd:
                    batch = decoder.close()
                else:
                    raise ProxyError(502, "upstream", "cannot reach Command Code (%s)"
                                     % type(item.error).__name__, retryable=True, retry_after=2)
                if decoder.finished:
                    self._succeeded(key, decoder)
                    yield batch
                    return
                if batch:
                    yield batch
                if decoder.failure is not None:
                    raise decoder.failure
                if type(item) is UpstreamEnd:
                    raise ProxyError(502, "upstream", "Command Code's stream ended before it "
                                     "finished the answer (no finish event)",
                                     retryable=True, retry_after=2)
        finally:
            if decoder.finished:
                call.finish()   # the rest of the body, so the connection can be reused
            else:
                call.abort()
            if decoder.skipped:
                self.metrics.count("upstream_skipped_lines_total", {}, decoder.skipped)

    def _check_head(self, head):
        """A non-200 answer is the error it says; a 200 marks the upstream reachable."""
        if head.status != 200:
            headers = {k.lower(): v for k, v in head.headers}
            message, code, rate_limit = parse_upstream_error(head.body)
            retry_after = headers.get("retry-after")
            raise classify_upstream_error(
                head.status, message, code, rate_limit,
                int(retry_after) if re.fullmatch(r"[0-9]{1,9}", retry_after or "") else None)
        self.last_upstream_ok = time.time()

    def _succeeded(self, key, decoder):
        self.sessions.note_success(key)

    def _timeout(self, key, idle_limit):
        count = self.sessions.note_timeout(key)
        message = "Command Code sent nothing for %g s" % idle_limit
        if count >= 3:
            message = ("Response timeout (%d in a row) - try reducing the context length: "
                       "summarize or drop earlier messages" % count)
        return ProxyError(504, "timeout", message, retry_after=5, code="upstream_timeout")

    def list_models(self, key):
        """The catalog or live list, then each plain modelMap alias under its own name (so a
        client that lists claude-* models can pick a Command Code model by an alias)."""
        models = [CC_CATALOG.get(i.lower()) or ModelInfo(i, False, (), 0, i)
                  for i in self.models.ids(key)]
        listed = {m.id.lower() for m in models}
        for alias, target in self.config["modelMap"].items():
            if not any(c in alias for c in "*?[") and alias.lower() not in listed:
                listed.add(alias.lower())
                target = str(target)
                info = CC_CATALOG.get(canonical_cc_model(target).lower())
                models.append(ModelInfo(alias, False, (), 0, "%s (alias of %s)" % (alias, target))
                              if info is None else dataclass_replace(
                                  info, id=alias, label="%s (%s)" % (info.label, alias)))
        return models

    def health(self):
        return {"upstream": self.config["apiBase"], "commandCodeVersion": self.version.version,
                "lastUpstreamOk": self.last_upstream_ok}



# =====================================================================================
# 8. Backend: Claude Code CLI (the local `claude` binary, stream-json in and out)
#
# `claude -p --input-format stream-json --output-format stream-json --verbose
# --include-partial-messages ...`, each user turn one JSON line on stdin, stdin kept open: a
# conversation's process stays warm for its next turn (ClaudeWorker, ClaudeWorkers), spares are
# started ahead, and conversations map to CLI sessions (--session-id, then --resume) for when a
# process has to be replaced. The client's own tools are an sdk MCP server answered over the same
# pipes; a tools/call is held until the client's next request brings its result. Without client
# tools the CLI's own tool activity becomes short reasoning notes, never tool calls.
# What the CLI prints in each case: testdata/captures/claude-cli/ (CLI 2.1.197 and 2.1.330).
# =====================================================================================

CLAUDE_DEFAULT_MODEL = "sonnet"
# Aliases the CLI resolves itself (they move with CLI releases, so they are passed through).
CLAUDE_ALIASES = ("sonnet", "opus", "haiku", "fable", "opusplan", "sonnet[1m]", "opus[1m]")
CLAUDE_KNOWN_MODELS = (("claude-opus-4-8", "Claude Opus 4.8"),
                       ("claude-sonnet-5", "Claude Sonnet 5"),
                       ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
                       ("claude-fable-5", "Claude Fable 5"), ("claude-opus-4-6", "Claude Opus 4.6"),
                       ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"))
CLAUDE_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
                  "xhigh": "xhigh", "max": "max"}
CLAUDE_PERMISSION_MODES = ("default", "acceptEdits", "plan", "dontAsk", "bypassPermissions", "auto")
_CLAUDE_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@\[\]\-]{0,127}$")

CLAUDE_SYSTEM_ARG_LIMIT = 100000  # longer system text goes through a file (argv caps at 128 KiB)
CLAUDE_STDERR_KEEP = 16384

# What the child's environment is built from (nothing else of ours leaks in).
CLAUDE_ENV_NAMES = frozenset((
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TMPDIR", "TZ", "TERM",
    "IS_SANDBOX", "API_TIMEOUT_MS", "MAX_THINKING_TOKENS", "MCP_TIMEOUT", "MCP_TOOL_TIMEOUT",
    "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
    "NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUD_ML_REGION"))
CLAUDE_ENV_PREFIXES = ("ANTHROPIC_", "CLAUDE_", "LC_", "DISABLE_", "AWS_", "VERTEX_REGION_",
                       "AZURE_")
CLAUDE_ENV_DROP = frozenset(("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT", "CLAUDE_CODE_SSE_PORT"))
CLAUDE_NO_PHONE_HOME = (("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
                        ("DISABLE_TELEMETRY", "1"), ("DISABLE_ERROR_REPORTING", "1"),
                        ("DISABLE_AUTOUPDATER", "1"))
# The CLI's default of 10 retries (401 included) can hold a request for minutes.
CLAUDE_DEFAULT_MAX_RETRIES = "1"

CLAUDE_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                 "refusal": "refusal", "tool_use": "stop", "pause_turn": "stop",
                 "model_context_window_exceeded": "length"}


def claude_env(environ=None):
    """The CLI's environment: PATH/HOME/locale, auth and provider variables, nothing else."""
    environ = os.environ if environ is None else environ
    ours = set(SETTINGS_BY_ENV)  # the proxy's own settings (CLAUDE_PATH, ...) are not for the CLI
    env = {}
    for name, value in environ.items():
        if name in CLAUDE_ENV_DROP or name in ours:
            continue
        if name in CLAUDE_ENV_NAMES or name.startswith(CLAUDE_ENV_PREFIXES):
            env[name] = value
    for name, value in CLAUDE_NO_PHONE_HOME:
        env.setdefault(name, value)
    env.setdefault("CLAUDE_CODE_MAX_RETRIES", CLAUDE_DEFAULT_MAX_RETRIES)
    env.setdefault("PATH", os.defpath)
    if "HOME" not in env:
        env["HOME"] = os.path.expanduser("~")
    return env


def ensure_api_key(config, out=None):
    """First start of the claude-code backend without an apiKey: generate one, save it into the
    config file (other keys kept), print it once. Returns the key."""
    if config.get("apiKey"):
        return config["apiKey"]
    key = "sk-ccp-" + secrets.token_urlsafe(32)
    path = config.get("configPath")
    saved = False
    if path:
        try:
            data = read_config_file(path)
            data["apiKey"] = key
            write_json_atomic(path, data, 0o600)
            saved = True
        except (ConfigError, OSError) as e:
            log.error("could not save the generated apiKey to %s: %s", path, e)
    config["apiKey"] = key
    out = out or sys.stdout
    where = ("saved to %s" % path) if saved else "NOT saved (set API_KEY or apiKey to keep it)"
    out.write("cc-proxy: no apiKey was configured; generated one and %s.\n\n    %s\n\n"
              "Clients send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.\n"
              % (where, key))
    out.flush()
    return key


# ---- conversations -> CLI sessions ----------------------------------------------------

def _claude_norm(text):
    # all whitespace out: content-array vs string, trimmed or re-wrapped text hash the same
    return re.sub(r"\s+", "", text)


def normalised_turns(messages):
    """Messages -> [[role, normalised text]], consecutive same-role messages merged, reasoning
    ignored (clients keep or drop it at will)."""
    turns = []
    for message in messages:
        role = "assistant" if message["role"] == "assistant" else "user"
        pieces = []
        for part in message["parts"]:
            kind = part["type"]
            if kind == "text":
                pieces.append(part["text"])
            elif kind == "image":
                pieces.append("[image:%s]" % hashlib.sha256(
                    (part.get("data") or part.get("url") or "").encode()).hexdigest()[:16])
            elif kind == "tool_call":
                pieces.append("[call:%s]" % part["name"])
            elif kind == "tool_result":
                pieces.append(part.get("content") or "")
        text = _claude_norm("".join(pieces))
        if turns and turns[-1][0] == role:
            turns[-1][1] += text
        else:
            turns.append([role, text])
    return turns


def conversation_key(cwd, turns=None, explicit=None, namespace=None):
    """Session-store key, always with the working directory (CLI sessions live per directory):
    the client's explicit session id (X-Session-Id: sticky, whatever history comes with it), else
    the normalised history, within the client's own session hint (Claude Code's metadata
    session) when there is one, so equal histories of two client sessions never share a CLI
    session, and a side request of that client (a title, one message) never resumes it."""
    digest = hashlib.sha256(b"cc-proxy/claude/1\0" + cwd.encode("utf-8", "replace") + b"\0")
    if explicit is not None:
        digest.update(b"explicit\0" + explicit.encode("utf-8", "replace"))
    else:
        if namespace:
            digest.update(b"namespace\0" + namespace.encode("utf-8", "replace") + b"\0")
        digest.update(json_dumps(turns).encode("utf-8", "replace"))
    return digest.hexdigest()


# An answer the client cut off (it disconnected) is remembered as this, whatever part of it the
# client kept: it cannot say, and no text of its own normalises to it.
CLAUDE_CUT_ANSWER = ["assistant", None]


def split_trailing_turn(messages):
    """(earlier messages up to the last assistant turn, the user messages after it)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[:last + 1], messages[last + 1:]


class KeyedLocks:
    """One lock per key, created on demand and dropped when nobody uses it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.table = {}   # key -> [Lock, users]

    def enter(self, key):
        with self.lock:
            item = self.table.setdefault(key, [threading.Lock(), 0])
            item[1] += 1
            return item[0]

    def leave(self, key):
        with self.lock:
            item = self.table.get(key)
            if item is not None:
                item[1] -= 1
                if item[1] <= 0:
                    del self.table[key]


class ClaudeSessions:
    """conversation key -> {"session": CLI session uuid, "cwd": dir, "expires": epoch s}.
    Expiry is wall-clock so it survives restarts through sessionFile."""

    def __init__(self, ttl_ms, path=""):
        self.ttl = ttl_ms / 1000.0
        self.path = os.path.abspath(os.path.expanduser(path)) if path else ""
        self.lock = threading.Lock()
        self.file_lock = threading.Lock()
        self.entries = {}
        self.locks = KeyedLocks()

    def __len__(self):
        return len(self.entries)

    def load(self):
        if not self.path:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            sessions = data.get("sessions") if isinstance(data, dict) else None
            if not isinstance(sessions, dict):
                raise ValueError("no 'sessions' object")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("session file %s is unreadable or corrupt (%s); starting with no sessions",
                        self.path, e)
            return
        now = time.time()
        loaded = {}
        for key, entry in sessions.items():
            if isinstance(entry, dict) and isinstance(entry.get("session"), str) and \
                    isinstance(entry.get("cwd"), str) and \
                    isinstance(entry.get("expires"), (int, float)) and entry["expires"] > now:
                loaded[key] = {"session": entry["session"], "cwd": entry["cwd"],
                               "expires": entry["expires"]}
        with self.lock:
            self.entries.update(loaded)
        log.info("loaded %d Claude Code session(s) from %s", len(loaded), self.path)

    def save(self):
        if not self.path:
            return
        with self.file_lock:
            with self.lock:
                data = {"version": 1, "sessions": dict(self.entries)}
            try:
                write_json_atomic(self.path, data, 0o600)
            except OSError as e:
                log.error("cannot write session file %s: %s", self.path, e)

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            if entry["expires"] <= time.time():
                del self.entries[key]
                return None
            return dict(entry)

    def put(self, key, session, cwd):
        with self.lock:
            self.entries[key] = {"session": session, "cwd": cwd, "expires": time.time() + self.ttl}
        self.save()

    def discard(self, key):
        with self.lock:
            found = self.entries.pop(key, None) is not None
        if found:
            self.save()

    def sweep(self):
        now = time.time()
        with self.lock:
            expired = [k for k, v in self.entries.items() if v["expires"] <= now]
            for key in expired:
                del self.entries[key]
        if expired:
            self.save()
        return len(expired)


# ---- the working-directory dialogue (ccp's) ---------------------------------------------

_DIALOGUE_ASK = "\U0001F4C2 cc-proxy:"          # open folder
_DIALOGUE_CONFIRM = "\u2705 cc-proxy:"           # check mark
_DIALOGUE_REJECT = "\u274C cc-proxy:"            # cross
_PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def _message_text(message):
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def dialogue_kind(message):
    """'ask' | 'confirm' | 'reject' for the proxy's own canned assistant messages, else None."""
    if message["role"] != "assistant":
        return None
    text = _message_text(message).lstrip()
    for prefix, kind in ((_DIALOGUE_ASK, "ask"), (_DIALOGUE_CONFIRM, "confirm"),
                         (_DIALOGUE_REJECT, "reject")):
        if text.startswith(prefix):
            return kind
    return None


def allowed_dirs(config):
    raw = config["claudeAllowedDirs"]
    items = (raw if isinstance(raw, (list, tuple))
             else re.split(r"[,%s]" % re.escape(os.pathsep), str(raw)))
    return [os.path.realpath(os.path.expanduser(item.strip())) for item in items if item.strip()]


def check_working_dir(path, allowed=()):
    """A user- or client-named directory -> (real path, None) or (None, reason)."""
    text = path.strip().strip("`'\"").strip()
    if not text:
        return None, "no directory was given"
    expanded = os.path.expanduser(text)
    if not os.path.isabs(expanded):
        return None, "%s is not an absolute path" % text
    real = os.path.realpath(expanded)
    for pseudo in _PSEUDO_FILESYSTEMS:   # as named and as resolved: /proc/self/cwd is refused too
        if any(p == pseudo or p.startswith(pseudo + "/")
               for p in (os.path.normpath(expanded), real)):
            return None, "%s is inside %s, which is refused" % (text, pseudo)
    if not os.path.isdir(real):
        return None, "%s is not an existing directory" % text
    if allowed and not any(real == a or real.startswith(a.rstrip(os.sep) + os.sep)
                           for a in allowed):
        return None, "%s is outside the allowed directories (%s)" % (text, ", ".join(allowed))
    return real, None


def _looks_like_path(text):
    text = text.strip().strip("`'\"").strip()
    return bool(text) and "\n" not in text and text[0] in "/~"


def working_dir_dialogue(messages, default_dir, allowed):
    """ccp's dialogue. -> (cwd, messages without the dialogue, None) when the CLI should run,
    or (None, None, canned reply) when the proxy answers by itself."""
    hint = ("Reply with an absolute path (or ~/path) to an existing directory, "
            "or `default` for %s." % default_dir)
    ask = ("%s which working directory should Claude Code use for this conversation?\n\n%s"
           % (_DIALOGUE_ASK, hint))

    def answer(text):
        if text.strip().strip("`'\"").lower() in ("default", "."):
            return default_dir, None
        if not _looks_like_path(text):
            return None, None
        return check_working_dir(text, allowed)

    def verdict(text):
        directory, reason = answer(text)
        if directory:
            return ("%s working directory set to %s. Claude Code will work there for the rest "
                    "of this conversation. What should it do?" % (_DIALOGUE_CONFIRM, directory))
        if reason:
            return "%s %s.\n\n%s" % (_DIALOGUE_REJECT, reason, hint)
        return ask

    kinds = [dialogue_kind(m) for m in messages]
    canned = [i for i, kind in enumerate(kinds) if kind]
    if not canned:
        if any(m["role"] == "assistant" for m in messages):
            return default_dir, messages, None   # a real conversation from elsewhere: no question
        last = _message_text(messages[-1]) if messages and messages[-1]["role"] == "user" else ""
        return None, None, verdict(last) if _looks_like_path(last) else ask
    strip = set(canned)
    confirmed = None
    for i in canned:
        if kinds[i] in ("confirm", "reject") and i > 0 and messages[i - 1]["role"] == "user":
            strip.add(i - 1)   # the path answer itself is not for Claude
        if kinds[i] == "confirm":
            confirmed = i - 1 if i > 0 and messages[i - 1]["role"] == "user" else None
        elif confirmed is not None and i > confirmed:
            confirmed = None   # asked again after a confirmation
    last_canned = canned[-1]
    if confirmed is None or last_canned == len(messages) - 1:
        tail = [m for m in messages[last_canned + 1:] if m["role"] == "user"]
        return None, None, verdict(_message_text(tail[-1])) if tail else ask
    directory, reason = answer(_message_text(messages[confirmed]))
    if not directory:
        return None, None, "%s %s.\n\n%s" % (
            _DIALOGUE_REJECT, reason or "that directory is no longer usable", hint)
    return directory, [m for i, m in enumerate(messages) if i not in strip], None


# ---- request -> CLI invocation ----------------------------------------------------------

def _claude_part_text(part):
    kind = part["type"]
    if kind == "text":
        return part["text"]
    if kind == "image":
        return "[image]"
    if kind == "tool_call":
        return "[called tool %s with %s]" % (part["name"], json_dumps(part["arguments"]))
    if kind == "tool_result":
        return "[result of tool %s%s]\n%s" % (part.get("name") or "",
                                               " (error)" if part.get("is_error") else "",
                                               part.get("content") or "")
    return ""


def claude_user_blocks(messages):
    """The trailing user messages -> Anthropic content blocks for the stdin line."""
    blocks = []
    for message in messages:
        for part in message["parts"]:
            if part["type"] == "image":
                if part.get("data"):
                    blocks.append({"type": "image",
                                   "source": {"type": "base64", "media_type": part["media_type"],
                                              "data": part["data"]}})
                else:
                    blocks.append({"type": "image", "source": {"type": "url", "url": part["url"]}})
            elif part["type"] != "reasoning":
                text = _claude_part_text(part)
                if text.strip():
                    blocks.append({"type": "text", "text": text})
    return blocks


CLAUDE_MCP_SERVER = "client"   # the proxy's sdk MCP server: the model sees mcp__client__<tool>
CLAUDE_MCP_PREFIX = "mcp__%s__" % CLAUDE_MCP_SERVER


def claude_tool_choice_hint(request):
    """A forced tool_choice, asked for in words: the CLI has no way to force a tool call."""
    if not request.tools or request.tool_choice in (None, "auto", "none"):
        return []
    if isinstance(request.tool_choice, dict):
        text = "the tool %s%s" % (CLAUDE_MCP_PREFIX, request.tool_choice.get("name"))
    else:
        text = "one of the %s tools" % CLAUDE_MCP_PREFIX
    return [{"type": "text", "text": "[cc-proxy: the client asks for this turn to be answered "
                                     "by calling %s.]" % text}]


def claude_transcript(messages):
    """Earlier turns as one text block, for a conversation the CLI has no session of."""
    lines = ["[cc-proxy: this conversation began before this Claude Code session existed. "
             "Its earlier turns follow; continue it as the assistant.]", "",
             "<conversation_history>"]
    for message in messages:
        label = {"user": "User", "assistant": "Assistant"}.get(message["role"], "Tool")
        text = "\n".join(t for t in (_claude_part_text(p) for p in message["parts"]) if t.strip())
        if text:
            lines.append("%s: %s" % (label, text))
            lines.append("")
    lines.append("</conversation_history>")
    lines.append("")
    lines.append("The user's new message:")
    return "\n".join(lines)


class ClaudeSpawn(NamedTuple):
    """What is fixed when a CLI process starts: a warm process serves only turns that agree."""
    model: str
    system: str
    replace_system: bool
    cwd: str
    client_tools: str            # the client's tool definitions as JSON ("" = none)
    builtin_tools: Optional[str]  # --tools, None = the CLI's default set
    permission_mode: str
    effort: Optional[str]
    max_turns: int


CLAUDE_CLIENT_LOOP_TURNS = 1000   # --max-turns when the client runs the tools: its loop decides


def claude_spawn(config, request, cwd):
    tools = [{"name": t["name"], "description": t.get("description") or "",
              "inputSchema": t.get("schema") or {"type": "object", "properties": {}}}
             for t in request.tools]
    configured = config["claudeTools"].strip()
    if configured.lower() == "none":
        builtin = ""
    elif configured:
        builtin = configured
    else:   # with its own tools the client is the agent: the CLI's built-in ones are off
        builtin = "" if tools or request.options.get("claude_agent") else None
    return ClaudeSpawn(request.model, "\n\n".join(p["text"] for p in request.system if p["text"]),
                       config["claudeSystemPromptMode"] == "replace", cwd,
                       json_dumps(tools) if tools else "", builtin, config["claudePermissionMode"],
                       CLAUDE_EFFORTS.get(request.reasoning_effort or ""),
                       max(config["claudeMaxTurns"], CLAUDE_CLIENT_LOOP_TURNS) if tools
                       else config["claudeMaxTurns"])


def claude_argv(cli, spawn, session_id, resume, system_file=None):
    argv = [cli, "-p", "--input-format", "stream-json", "--output-format", "stream-json",
            "--verbose", "--include-partial-messages"]
    if spawn.model and spawn.model != "default":
        argv += ["--model", spawn.model]
    argv += ["--resume", session_id] if resume else ["--session-id", session_id]
    if spawn.system:
        if system_file:
            argv += ["--system-prompt-file" if spawn.replace_system
                     else "--append-system-prompt-file", system_file]
        else:
            argv += ["--system-prompt" if spawn.replace_system else "--append-system-prompt",
                     spawn.system]
    if spawn.builtin_tools is not None:
        argv += ["--tools", spawn.builtin_tools]
    if spawn.client_tools:
        names = [CLAUDE_MCP_PREFIX + t["name"] for t in json.loads(spawn.client_tools)]
        argv += ["--mcp-config", json_dumps({"mcpServers": {CLAUDE_MCP_SERVER: {
                     "type": "sdk", "name": CLAUDE_MCP_SERVER}}}),
                 "--strict-mcp-config", "--allowedTools", ",".join(names)]
    if spawn.effort:
        argv += ["--effort", spawn.effort]
    argv += ["--permission-mode", spawn.permission_mode, "--max-turns", str(spawn.max_turns)]
    return argv


# ---- CLI output -> canonical events -------------------------------------------------------

def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def claude_turn_model_usage(result):
    """The per-model usage of this turn alone: a warm process's modelUsage (and total_cost_usd)
    counts every turn since it started; model_usage_since_last_result is the turn's own."""
    for name in ("model_usage_since_last_result", "modelUsage"):
        if isinstance(result.get(name), dict) and result[name]:
            return name, result[name]
    return None, {}


def claude_turn_cost(result, worker):
    """This turn's cost in USD, or None: the since-last-result costs, else the growth of the
    process's running total."""
    name, per_model = claude_turn_model_usage(result)
    total = result.get("total_cost_usd")
    if name == "model_usage_since_last_result":
        costs = [m.get("costUSD") for m in per_model.values() if isinstance(m, dict)]
        if costs and all(_is_number(c) for c in costs):
            worker.cost_seen = total if _is_number(total) else worker.cost_seen
            return sum(costs)
    if not _is_number(total):
        return None
    cost, worker.cost_seen = max(0.0, total - worker.cost_seen), total
    return cost


def claude_turn_usage(result, worker):
    """This turn's usage: the since-last-result figures, else the growth of the process's
    running modelUsage (CLI 2.1.197 has only that)."""
    if claude_turn_model_usage(result)[0] == "model_usage_since_last_result":
        return claude_usage(result)
    running = claude_usage(result)
    turn = dataclass_replace(running).add(worker.usage_seen, -1)
    worker.usage_seen = running
    return turn


# Usage keys: the result's per-model usage (camelCase), an Anthropic usage object (snake_case).
_CLAUDE_MODEL_USAGE_KEYS = ("inputTokens", "cacheReadInputTokens", "cacheCreationInputTokens",
                            "outputTokens")
_ANTHROPIC_USAGE_KEYS = ("input_tokens", "cache_read_input_tokens",
                         "cache_creation_input_tokens", "output_tokens")


def claude_usage(result):
    """Usage of a turn: its per-model usage summed (result.usage can be zero or short)."""
    usage = Usage()
    per_model = claude_turn_model_usage(result)[1]
    if per_model:
        for item in per_model.values():
            if isinstance(item, dict):
                claude_message_usage(item, usage, _CLAUDE_MODEL_USAGE_KEYS)
        return usage
    return claude_message_usage(result.get("usage") if isinstance(result.get("usage"), dict)
                                else {}, usage)


def claude_message_usage(raw, into, keys=_ANTHROPIC_USAGE_KEYS):
    """A usage object (uncached input apart, named by `keys`) added into a Usage."""
    fresh, read, write, output = (token_count(raw.get(k)) for k in keys)
    into.input += fresh + read + write
    into.cache_read += read
    into.cache_write += write
    into.output += output
    return into


def classify_claude_error(status, kind, text, retry_after=None):
    """is_error result -> ProxyError, from api_error_status and the synthetic error kind only."""
    shown = redact(" ".join(str(text or "").split()))[:500] or "no details"
    if status == 401:
        return ProxyError(401, "authentication", "Claude Code's upstream rejected its credentials: "
                          "%s (fix the CLI's login or ANTHROPIC_API_KEY on the proxy host)" % shown,
                          code="upstream_auth")
    if status is None and kind == "authentication_failed":
        return ProxyError(502, "upstream", "the Claude Code CLI is not logged in: %s (run `claude` "
                          "once as the proxy's user and log in, or set ANTHROPIC_API_KEY)" % shown,
                          code="cli_not_logged_in")
    if status == 403 or kind == "billing_error":
        return ProxyError(403, "permission", "Claude Code: " + shown, code="billing_error"
                          if kind == "billing_error" else None)
    if status == 404 or kind == "model_not_found":
        return ProxyError(404, "not_found", "Claude Code: " + shown, code="model_not_found")
    if status == 429 or kind == "rate_limit":
        return ProxyError(429, "rate_limit", "Claude Code is rate limited: " + shown,
                          retry_after=max(1, int(retry_after + 0.999)) if retry_after else 30,
                          code="rate_limited")
    if status == 413:
        return ProxyError(413, "request_too_large", "Claude Code: " + shown)
    if status in (400, 422) or kind == "invalid_request":
        return ProxyError(400, "invalid_request", "Claude Code: " + shown)
    if status == 529 or kind == "overloaded":
        return ProxyError(503, "overloaded", "Claude Code's upstream is overloaded: " + shown,
                          retry_after=5, retryable=True, code="overloaded")
    if status in (408, 504):
        return ProxyError(504, "timeout", "Claude Code's upstream timed out: " + shown,
                          retry_after=5, retryable=True)
    return ProxyError(502, "upstream", "Claude Code failed: " + shown, retry_after=5,
                      retryable=status is None or status >= 500, code="upstream_error")


def _short(text, limit):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def claude_tool_note(name, tool_input):
    """'⏺ Bash(echo hi)': the CLI's own tool call as Claude Code's UI shows it."""
    summary = None
    if isinstance(tool_input, dict):
        for field_name in ("command", "file_path", "path", "pattern", "url", "query",
                           "description", "prompt"):
            if isinstance(tool_input.get(field_name), str) and tool_input[field_name].strip():
                summary = tool_input[field_name]
                break
        if summary is None and tool_input:
            summary = json_dumps(tool_input)
    return "\u23fa %s(%s)\n" % (name, _short(summary or "", 160))


def claude_result_note(content, is_error):
    if isinstance(content, list):
        content = " ".join(str(c.get("text", "")) if isinstance(c, dict) else str(c)
                           for c in content)
    text = _short(content or "", 200) or "(no output)"
    return "  \u23bf  %s%s\n" % ("error: " if is_error else "", text)


class ClaudeStreamDecoder:
    """stream-json lines -> event lists. Streaming requests take text from the token deltas and
    reconcile them with the per-block `assistant` lines; non-streaming ones take the `assistant`
    lines only (they are the truth when the CLI silently replaced a broken stream)."""

    def __init__(self, use_deltas=True, tool_notes=True, client_prefix=None, client_calls=None):
        self.use_deltas = use_deltas
        self.tool_notes = tool_notes
        # the client's own tools, served to the CLI as mcp__<server>__<name>: their tool_use
        # blocks become tool calls (without the prefix), their results are not notes
        self.client_prefix = client_prefix
        self.client_calls = client_calls if client_calls is not None else set()
        self.calls = []             # ToolCallStart of every client call in this answer
        self.open_call = None       # [tool_use id, argument pieces] of the streaming client call
        self.message_calls = 0      # client calls in the current assistant message
        self.tool_stop = False      # that message stopped for them: the client's turn to act
        self.streamed_usage = Usage()   # the messages' own usage, for an answer without a result
        self.answer = []            # every TextDelta emitted: what the client will echo back
        self.last_text = ""
        self.last_reasoning = ""
        self.produced = False
        self.continuation = False   # next text block continues a max_tokens cut: no separator
        self.block_started = False  # the open text block has emitted nothing yet
        self.open_text = None       # [message id, streamed text] of the open streamed text block
        self.open_thinking = None   # message id whose thinking block streamed
        self.message_id = None
        self.last_stop = None
        self.model = None
        self.session_id = None
        self.init_seen = False
        self.result = None
        self.synthetic_error = None
        self.synthetic_text = ""
        self.retry_after = None
        self.skipped = 0
        self.held = []              # events kept back until content (or the end) comes

    # -- emit helpers
    def _text(self, out, text, new_block):
        if not text:
            return
        if new_block and self.answer and not self.continuation:
            last = self.last_text
            if last.endswith("\n\n") or text.startswith("\n\n"):
                sep = ""
            elif last.endswith("\n") or text.startswith("\n"):
                sep = "\n"
            else:
                sep = "\n\n"
            text = sep + text
        self.continuation = False
        out.append(TextDelta(text))
        self.answer.append(text)
        self.last_text = text
        self.produced = True

    def _reasoning(self, out, text):
        if text:
            out.append(ReasoningDelta(text))
            self.last_reasoning = text
            self.produced = True

    def _note(self, out, text):
        if self.tool_notes:
            if self.last_reasoning and not self.last_reasoning.endswith("\n"):
                text = "\n" + text
            self._reasoning(out, text)

    def _client_tool(self, name):
        prefix = self.client_prefix
        if prefix and isinstance(name, str) and name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
        return None

    def _call_start(self, out, call_id, name):
        self.calls.append(ToolCallStart(call_id, name))
        self.client_calls.add(call_id)
        self.message_calls += 1
        self.produced = True
        out.append(ToolCallStart(call_id, name))

    def _model(self, out, model):
        if isinstance(model, str) and model and model != "<synthetic>":
            model = model.replace("[1m]", "")
            if model != self.model:
                self.model = model
                out.append(ModelUsed(model))

    # -- lines
    def feed(self, line):
        try:
            item = json.loads(line)
        except ValueError:
            self.skipped += 1
            return []
        if not isinstance(item, dict):
            self.skipped += 1
            return []
        out = []
        kind = item.get("type")
        if kind == "stream_event":
            if item.get("parent_tool_use_id") is None and isinstance(item.get("event"), dict):
                self._stream_event(out, item["event"])
        elif kind == "assistant":
            self._assistant(out, item)
        elif kind == "user":
            self._user(out, item)
        elif kind == "system":
            subtype = item.get("subtype")
            if subtype == "init":
                self.init_seen = True
                self.session_id = item.get("session_id")
                self._model(out, item.get("model"))
            elif subtype == "api_retry":
                delay = item.get("retry_delay_ms")
                if item.get("error_status") == 429 and isinstance(delay, (int, float)):
                    self.retry_after = delay / 1000.0
                log.debug("claude api_retry attempt=%s status=%s error=%s", item.get("attempt"),
                          item.get("error_status"), item.get("error"))
        elif kind == "result":
            self.result = item
        return out

    def _stream_event(self, out, event):
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.message_id = message.get("id")
            self._model(out, message.get("model"))
            self.continuation = self.last_stop == "max_tokens"
            self.last_stop = None
            self.message_calls = 0
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            name = self._client_tool(block.get("name")) if block.get("type") == "tool_use" else None
            if name and self.use_deltas and isinstance(block.get("id"), str):
                self.open_call = [block["id"], []]
                self._call_start(out, block["id"], name)
            elif block.get("type") == "text":
                self.open_text = [self.message_id, ""]
                self.block_started = True
            elif block.get("type") == "thinking" and self.use_deltas:
                self.open_thinking = self.message_id
        elif kind == "content_block_delta" and self.use_deltas:
            delta = event.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta" and self.open_text is not None:
                text = delta.get("text") or ""
                self._text(out, text, self.block_started)
                if text:
                    self.block_started = False
                self.open_text[1] += text
            elif dtype == "thinking_delta":
                self._reasoning(out, delta.get("thinking") or "")
            elif dtype == "signature_delta" and delta.get("signature"):
                out.append(ReasoningSignature(delta["signature"]))
                self.last_reasoning = "\n"
            elif dtype == "input_json_delta" and self.open_call and delta.get("partial_json"):
                self.open_call[1].append(delta["partial_json"])
                out.append(ToolCallDelta(self.open_call[0], delta["partial_json"]))
        elif kind == "content_block_stop":
            self.open_text = None
            if self.open_call:
                out.append(ToolCallEnd(self.open_call[0], "".join(self.open_call[1]) or "{}"))
                self.open_call = None
        elif kind == "message_delta":
            self.last_stop = (event.get("delta") or {}).get("stop_reason")
            self.tool_stop = self.last_stop == "tool_use" and self.message_calls > 0
            usage = event.get("usage")
            if isinstance(usage, dict):
                claude_message_usage(usage, self.streamed_usage)

    def _assistant(self, out, item):
        message = item.get("message") if isinstance(item.get("message"), dict) else {}
        content = message.get("content") if isinstance(message.get("content"), list) else []
        if message.get("model") == "<synthetic>":
            self.synthetic_error = item.get("error") or "unknown"
            self.synthetic_text = " ".join(b.get("text", "") for b in content
                                           if isinstance(b, dict))
            return
        sub_agent = item.get("parent_tool_use_id") is not None
        message_id = message.get("id")
        if message_id != self.message_id and not self.use_deltas:
            # a new upstream call seen through assistant lines only
            self.continuation = self.last_stop == "max_tokens"
            self.message_id = message_id
        if not sub_agent:
            self._model(out, message.get("model"))
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            client_name = None if sub_agent else self._client_tool(block.get("name"))
            if kind == "tool_use" and client_name:
                self._assistant_call(out, block, client_name)
            elif kind == "tool_use":
                self._note(out, ("  " if sub_agent else "")
                           + claude_tool_note(block.get("name", "tool"), block.get("input")))
            elif sub_agent:
                continue
            elif kind == "text":
                self._assistant_text(out, message_id, block.get("text") or "")
            elif kind == "thinking":
                if self.use_deltas and self.open_thinking == message_id:
                    continue   # streamed already, signature included
                self._reasoning(out, block.get("thinking") or "")
                if block.get("signature") and block.get("thinking"):
                    out.append(ReasoningSignature(block["signature"]))
                    self.last_reasoning = "\n"

    def _assistant_text(self, out, message_id, text):
        if not self.use_deltas:
            self._text(out, text, True)
            return
        if self.open_text is not None and self.open_text[0] == message_id:
            streamed = self.open_text[1]
            if text.startswith(streamed):
                self._text(out, text[len(streamed):], not streamed)
            else:   # the CLI replaced what it streamed: say so rather than diverge silently
                self._text(out, text, True)
            self.open_text[1] = text
            self.block_started = False
        else:       # a block that arrived without deltas (non-streaming fallback)
            self._text(out, text, True)

    def _assistant_call(self, out, block, name):
        """A client tool call seen whole: streamed already, or (without deltas) emitted now."""
        call_id = block.get("id")
        if not isinstance(call_id, str) or (self.use_deltas and call_id in self.client_calls):
            return
        arguments = json_dumps(block.get("input") if isinstance(block.get("input"), dict) else {})
        self._call_start(out, call_id, name)
        out.append(ToolCallDelta(call_id, arguments))
        out.append(ToolCallEnd(call_id, arguments))

    def _user(self, out, item):
        message = item.get("message") if isinstance(item.get("message"), dict) else {}
        content = message.get("content")
        if not isinstance(content, list) or item.get("isReplay"):
            return
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result" \
                    and block.get("tool_use_id") not in self.client_calls:
                self._note(out, ("  " if item.get("parent_tool_use_id") else "") +
                           claude_result_note(block.get("content"), block.get("is_error")))


# ---- processes --------------------------------------------------------------------------

def parent_death_prefix():
    """The argv prefix that has the kernel send a CLI child SIGTERM when the thread that started it
    ends, even when the proxy is SIGKILLed: util-linux `setpriv --pdeathsig` (Linux). Without it a
    killed proxy's CLI works on until its next write fails; a normal exit always stops its
    children."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv:
        try:
            usage = subprocess.run([setpriv, "--help"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        if b"--pdeathsig" in usage:
            return [setpriv, "--pdeathsig", "TERM", "--"]
    return []


class ClaudeSpawner:
    """Starts every CLI child from one long-lived thread: Linux sends the parent-death signal
    when the *thread* that forked a child ends, and a warm process outlives the request that
    started it."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="claude-spawner")

    def popen(self, argv, **kwargs):
        return self.pool.submit(subprocess.Popen, argv, **kwargs).result()

    def stop(self):
        self.pool.shutdown(wait=False)


class ClaudeProcess:
    """One CLI child in its own process group, stdin kept open for more lines. stdout lines
    arrive on a queue, except control requests (the CLI asking its host), which go to
    on_control on the reader thread at once: the CLI waits for their answers."""

    def __init__(self, argv, cwd, env, kill_grace=1.5, exit_wait=5.0, popen=subprocess.Popen,
                 on_control=None):
        self.kill_grace = kill_grace   # SIGINT -> SIGTERM -> SIGKILL, this long between steps
        self.exit_wait = exit_wait     # after stdin closes, time the CLI gets to exit by itself
        self.on_control = on_control
        self.lines = queue.Queue()
        self.stderr_chunks = collections.deque()
        self.stderr_size = 0
        self.lock = threading.Lock()
        self.outbox = queue.Queue()   # lines for stdin; None closes it
        self.writing = True           # stdin still takes lines
        self.closed = False
        self.started = time.monotonic()
        self.proc = popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        self.pid = self.proc.pid
        self.threads = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True),
                        threading.Thread(target=self._write_stdin, daemon=True)]
        for thread in self.threads:
            thread.start()

    @property
    def alive(self):
        return not self.closed and self.proc.poll() is None

    def send(self, item):
        """One JSON line for the CLI's stdin, written by the process's own writer thread, so a
        CLI that is not reading never blocks a request, the reader or a close; False once stdin
        is closed or broken."""
        if not self.writing:
            return False
        self.outbox.put((json_dumps(item) + "\n").encode("utf-8", "replace"))
        return True

    def close_stdin(self):
        self.outbox.put(None)   # after what is queued: the CLI exits after its result

    def _write_stdin(self):
        stdin = self.proc.stdin
        try:
            for data in iter(self.outbox.get, None):
                stdin.write(data)
                stdin.flush()
        except (OSError, ValueError):
            pass
        finally:
            self.writing = False
            try:
                stdin.close()
            except (OSError, ValueError):
                pass

    def _read_stdout(self):
        try:
            for line in iter(self.proc.stdout.readline, b""):
                if self.on_control and b'"control_request"' in line and self._control(line):
                    continue
                if line.strip():
                    self.lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self.lines.put(None)

    def _control(self, line):
        """A control request (the CLI asking its host) -> on_control; True when it was one."""
        item = json_line_object(line)
        if item.get("type") != "control_request":
            return False
        try:
            self.on_control(item)
        except Exception:   # a bad request must not stop the reader: the turn goes on
            log.exception("claude control request could not be answered")
        return True

    def _read_stderr(self):
        try:
            for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
                self.stderr_chunks.append(chunk)
                self.stderr_size += len(chunk)
                while self.stderr_size > CLAUDE_STDERR_KEEP and len(self.stderr_chunks) > 1:
                    self.stderr_size -= len(self.stderr_chunks.popleft())
        except (OSError, ValueError):
            pass

    def stderr_text(self):
        self.threads[1].join(1.0)
        text = b"".join(self.stderr_chunks).decode("utf-8", "replace")
        return redact(text.strip())[-600:]

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _signal(self, sig):
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        except OSError:
            pass

    def close(self, natural=False):
        """Stop the child and reap it: after its result it may exit by itself once stdin is
        closed, otherwise SIGINT (the CLI saves the session), SIGTERM, SIGKILL. Leftover members
        of its process group (tool subprocesses) are killed too. Idempotent and thread-safe."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        proc = self.proc
        self.writing = False
        self.close_stdin()
        try:
            if natural:
                self.wait(self.exit_wait)
            if proc.poll() is None:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._signal(sig)
                    if self.wait(self.kill_grace) is not None:
                        break
                if proc.poll() is None:
                    self._signal(signal.SIGKILL)
                    proc.wait()
            self._signal(signal.SIGKILL)
        finally:
            for stream in (proc.stdout, proc.stderr):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass


# ---- warm processes and the client's tools (an sdk MCP server on the CLI's own pipes) ------

CLAUDE_INTERRUPT_WAIT = 3.0   # s an interrupted turn gets to print its result before signals


CLAUDE_TOOL_STOP_GRACE = 0.5  # s a tools/call waits for its message's end before the answer ends
CLAUDE_WARM_FIRST_LINE = 10.0  # s a warm process gets to print its turn's first line


class ClaudeCallAsked(NamedTuple):   # on a process's line queue: the CLI sent this tools/call
    call_id: str


class ClaudeSilent(Exception):
    """A warm process printed nothing for its turn: taken for hung, replaced."""


class ClaudeTurnLimits:
    """The clocks of one answer: claudeTimeoutMs wall time, the idle limit, and for a warm
    process the wait for its first line."""

    def __init__(self, config, request, first_line_wait=None):
        self.started = self.last_line = time.monotonic()
        self.wall = config["claudeTimeoutMs"] / 1000
        self.idle = config["streamIdleTimeoutMs" if request.stream
                           else "nonStreamIdleTimeoutMs"] / 1000
        self.first_line_wait = first_line_wait
        self.silent = True

    def heard(self):
        self.last_line = time.monotonic()
        self.silent = False

    def overdue(self, now):
        if now - self.started >= self.wall:
            return "did not finish within claudeTimeoutMs (%d s)" % self.wall
        if self.silent and self.first_line_wait and \
                now - self.started >= min(self.first_line_wait, self.idle):
            return "silent"
        if now - self.last_line >= self.idle:
            return "printed nothing for %d s" % self.idle
        return None

    def wait(self, now, tick, stop_by=None):
        limits = [tick, self.wall - (now - self.started), self.idle - (now - self.last_line)]
        if self.silent and self.first_line_wait:
            limits.append(self.first_line_wait - (now - self.started))
        if stop_by is not None:
            limits.append(stop_by - now)
        return max(0.01, min(limits))


def mcp_tool_result(part):
    """A canonical tool_result part -> an MCP tools/call result."""
    text, images = part.get("content") or "", part.get("images") or []
    # an empty text block is refused upstream: say so, or leave it out beside an image
    content = [{"type": "text", "text": text}] if text or not images else []
    if not text and not images:
        content[0]["text"] = "(no output)"
    for image in images:
        if image.get("data"):
            content.append({"type": "image", "data": image["data"],
                            "mimeType": image.get("media_type") or "image/png"})
        elif image.get("url"):
            content.append({"type": "text", "text": "[image: %s]" % image["url"]})
    result = {"content": content}
    if part.get("is_error"):
        result["isError"] = True
    return result


def claude_results_with_text(results, call_ids, texts):
    """The client's text beside its tool results (Claude Code puts reminders there) rides on
    the last result the CLI will read, since the turn takes no new user line."""
    if not texts:
        return results
    last = [c for c in call_ids if c in results][-1]
    results = dict(results)
    results[last] = dict(results[last], content=results[last]["content"] + [
        {"type": "text", "text": text} for text in texts])
    return results


def mcp_error_result(text):
    return {"content": [{"type": "text", "text": text}], "isError": True}


class ClaudeWorker:
    """One CLI process that lives across turns: stdin stays open, a turn is one more user line,
    and the client's tools are an sdk MCP server answered over the same pipes. A tools/call is
    held until the client sends that call's result in its next request."""

    def __init__(self, spawn, session_id, argv, env, popen, config, system_file=None):
        self.spawn = spawn
        self.session_id = session_id
        self.system_file = system_file
        self.tools = json.loads(spawn.client_tools) if spawn.client_tools else []
        self.lock = threading.Lock()
        self.asked = {}          # tool_use id -> (control request id, JSON-RPC id): CLI waiting
        self.answers = {}        # tool_use id -> MCP result the client sent before the CLI asked
        self.awaiting = []       # tool_use ids the client was given and has not answered yet
        self.awaiting_since = 0.0
        self.client_calls = set()   # every client call id this process made (never notes)
        self.turn_open = False   # a user line was sent whose result has not been read
        self.reported = Usage()  # usage already reported for the open turn (tool-call answers)
        self.cost_seen = 0.0     # the CLI's running total_cost_usd at its last result
        self.usage_seen = Usage()   # and its running modelUsage
        self.key = None          # the conversation it continues
        self.slot = False        # it holds a claudeMaxProcesses slot while awaiting results
        self.idle_since = time.monotonic()
        self.interrupts = 0
        self.proc = ClaudeProcess(argv, spawn.cwd, env, config["claudeKillGraceMs"] / 1000,
                                  config["claudeExitWaitMs"] / 1000, popen, self._control)
        self.pid = self.proc.pid

    @property
    def alive(self):
        return self.proc.alive

    # -- the CLI asks (reader thread)
    def _control(self, item):
        request = item.get("request") if isinstance(item.get("request"), dict) else {}
        request_id = item.get("request_id")
        if request.get("subtype") != "mcp_message" or request.get("server_name") != \
                CLAUDE_MCP_SERVER or not isinstance(request.get("message"), dict):
            self.proc.send({"type": "control_response", "response": {
                "subtype": "error", "request_id": request_id,
                "error": "cc-proxy does not answer %r" % request.get("subtype")}})
            return
        message = request["message"]
        method, rpc_id = message.get("method"), message.get("id")
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        if method == "tools/call":
            return self._tool_call(request_id, rpc_id, params)
        answer = self.MCP_METHODS.get(method)
        if rpc_id is None:
            reply = {"jsonrpc": "2.0", "result": {}}      # a notification
        elif answer:
            reply = {"jsonrpc": "2.0", "id": rpc_id, "result": answer(self, params)}
        else:
            reply = {"jsonrpc": "2.0", "id": rpc_id,
                     "error": {"code": -32601, "message": "method not found: %s" % method}}
        self._respond(request_id, reply)

    def _initialize(self, params):
        return {"protocolVersion": params.get("protocolVersion") or "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": CLAUDE_MCP_SERVER, "version": __version__}}

    def _tools_list(self, params):
        return {"tools": self.tools}

    MCP_METHODS = {"initialize": _initialize, "tools/list": _tools_list,
                   "ping": lambda self, params: {}}

    def _tool_call(self, request_id, rpc_id, params):
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        call_id = meta.get("claudecode/toolUseId")
        with self.lock:
            result = self.answers.pop(call_id, None) if call_id else mcp_error_result(
                "cc-proxy cannot tell which tool call this is (no claudecode/toolUseId)")
            if result is None:
                self.asked[call_id] = (request_id, rpc_id)
                self.proc.lines.put(ClaudeCallAsked(call_id))   # in order with the stream
                return
        self._respond(request_id, {"jsonrpc": "2.0", "id": rpc_id, "result": result})

    def _respond(self, request_id, reply):
        self.proc.send({"type": "control_response", "response": {
            "subtype": "success", "request_id": request_id, "response": {"mcp_response": reply}}})

    # -- the proxy answers (request threads)
    def answer(self, results, missing):
        """The client's tool results (tool_use id -> MCP result), each given to the CLI when it
        asks for it; a call the client left out gets an error result saying `missing`."""
        ready = []
        with self.lock:
            for call_id in self.awaiting:
                result = results.get(call_id) or mcp_error_result(missing)
                if call_id in self.asked:
                    ready.append((self.asked.pop(call_id), result))
                else:
                    self.answers[call_id] = result
            self.awaiting = []
        for (request_id, rpc_id), result in ready:
            self._respond(request_id, {"jsonrpc": "2.0", "id": rpc_id, "result": result})

    def refuse(self, call_id):
        """Answer, with an error, a tools/call for a call the client never saw."""
        with self.lock:
            asked = self.asked.pop(call_id, None)
        if asked:
            self._respond(asked[0], {"jsonrpc": "2.0", "id": asked[1], "result": mcp_error_result(
                "cc-proxy: this tool runs in the client, which was not asked to run this call")})

    def begin_turn(self, blocks):
        self._drop_stale()
        self.turn_open = True
        self.reported = Usage()
        return self.proc.send({"type": "user", "message": {"role": "user", "content": blocks}})

    def _drop_stale(self):
        """What a parked process printed between turns belongs to no answer."""
        while True:
            try:
                line = self.proc.lines.get_nowait()
            except queue.Empty:
                return
            if line is None:   # its output ended: the new turn's pump sees that too
                self.proc.lines.put(None)
                return

    def end_turn(self):
        self.turn_open = False
        with self.lock:
            self.answers.clear()
            self.asked.clear()

    def interrupt(self, wait=CLAUDE_INTERRUPT_WAIT):
        """Cancel the open turn without killing the process: a control_request interrupt, then
        what is left of the turn read and dropped up to its result. False: not answered."""
        self.interrupts += 1
        if not self.proc.send({"type": "control_request", "request_id": "cc-proxy-interrupt-%d"
                               % self.interrupts, "request": {"subtype": "interrupt"}}):
            return False
        deadline = time.monotonic() + wait
        while self.turn_open:
            try:
                line = self.proc.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                return False
            if type(line) is bytes and b'"result"' in line and \
                    json_line_object(line).get("type") == "result":
                self.end_turn()
        return True

    def close(self):
        try:
            self.proc.close(natural=not self.turn_open)   # a finished turn: it exits by itself
        finally:
            if self.system_file:
                try:
                    os.unlink(self.system_file)
                except OSError:
                    pass


@dataclass
class ClaudeRun:
    """One request's hold on the backend: session locks, a slot, the worker and how it was
    found (cold | resume | warm | spare | tools: a turn taken over with its tool results)."""
    held: list = field(default_factory=list)   # (key, lock) pairs
    slot: bool = False
    worker: Any = None
    how: str = "cold"
    delivered: bool = False   # the last batch reached the pipeline: the client has the answer


class ClaudeWorkers:
    """The CLI processes kept between requests: warm ones by conversation key (the least
    recently used closed first past the limit), ones awaiting the client's tool results by
    call id, and spares started ahead for a new conversation."""

    def __init__(self, warm_limit):
        self.warm_limit = warm_limit
        self.lock = threading.Lock()
        self.warm = collections.OrderedDict()   # conversation key -> idle worker
        self.waiting = {}                       # tool_use id -> worker awaiting its result
        self.spares = []

    def counts(self):
        with self.lock:
            return {"warm": len(self.warm), "spare": len(self.spares),
                    "awaitingTools": len(set(map(id, self.waiting.values())))}

    def park(self, worker):
        """An idle worker back in the pool under its key; returns the ones to close."""
        worker.idle_since = time.monotonic()
        with self.lock:
            old = self.warm.pop(worker.key, None)
            out = [old] if old is not None and old is not worker else []
            self.warm[worker.key] = worker
            while len(self.warm) > self.warm_limit:   # this worker too, with a limit of 0
                out.append(self.warm.popitem(last=False)[1])
        return out

    def take(self, key, spawn):
        """(the warm worker of this conversation when it can serve this turn, one to close)."""
        with self.lock:
            worker = self.warm.pop(key, None)
        if worker is None:
            return None, None
        if worker.spawn != spawn or not worker.alive:
            return None, worker
        return worker, None

    def hold(self, worker):
        worker.awaiting_since = time.monotonic()
        with self.lock:
            for call_id in worker.awaiting:
                self.waiting[call_id] = worker

    def _unhold(self, worker):   # with self.lock held
        calls = [c for c, w in self.waiting.items() if w is worker]
        for call_id in calls:
            del self.waiting[call_id]
        return bool(calls)

    def unhold(self, worker):
        """Take a held worker out of the waiting table; False when a request took it first."""
        with self.lock:
            return self._unhold(worker)

    def take_waiting(self, call_ids, key):
        """The worker awaiting these tool results, else one awaiting results in this
        conversation (which the client answered with something else)."""
        with self.lock:
            found = next((self.waiting[c] for c in call_ids if c in self.waiting), None)
            if found is None and key is not None:
                found = next((w for w in self.waiting.values() if w.key == key), None)
            if found is not None:
                self._unhold(found)
        return found

    def oldest_held(self):
        with self.lock:
            return min(self.waiting.values(), key=lambda w: w.awaiting_since, default=None)

    def add_spare(self, worker):
        with self.lock:
            self.spares.append(worker)

    def take_spare(self, spawn):
        with self.lock:
            for worker in self.spares:
                if worker.spawn == spawn and worker.alive:
                    self.spares.remove(worker)
                    return worker
        return None

    def expired(self, idle_limit, result_limit):
        """(idle warm workers past idle_limit, held workers past result_limit, dead spares)."""
        now = time.monotonic()
        with self.lock:
            idle = [k for k, w in self.warm.items() if now - w.idle_since >= idle_limit
                    or not w.alive]
            idle = [self.warm.pop(k) for k in idle]
            held = {id(w): w for w in self.waiting.values()
                    if now - w.awaiting_since >= result_limit or not w.alive}
            dead = [w for w in self.spares if not w.alive]
            for worker in dead:
                self.spares.remove(worker)
        return idle, list(held.values()), dead

    def drain(self):
        with self.lock:
            everyone = list(self.warm.values()) + list(self.spares)
            everyone += list({id(w): w for w in self.waiting.values()}.values())
            self.warm.clear()
            self.waiting.clear()
            del self.spares[:]
        return everyone


# ---- the backend ------------------------------------------------------------------------

class ClaudeCodeBackend:
    name = "claude-code"
    auth_hint = "send the proxy's apiKey as Authorization: Bearer <key> or x-api-key"
    open_model_list = False  # the proxy's own key guards every route
    prompt_counted_as_sent = False  # the CLI adds its own system prompt and tools to every turn

    def __init__(self, config, metrics):
        self.config = config
        self.metrics = metrics
        self.sessions = ClaudeSessions(config["sessionTtlMs"], config["sessionFile"])
        self.slots = Slots(config["claudeMaxProcesses"])   # turns running (or awaiting tools)
        self.workers = ClaudeWorkers(config["claudeWarmProcesses"])
        self.spawner = ClaudeSpawner()
        self.processes = set()   # every live worker, whatever it is doing
        self.processes_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.wake = threading.Event()   # the sweeper: a spare was taken, or stop
        self.spare_failures = 0
        self.spare_retry_at = 0.0
        self.warm_first_line = CLAUDE_WARM_FIRST_LINE
        self.cli_path = None
        self.cli_version = None
        self.cli_error = None
        self.spawn_prefix = []

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self):
        self.check_cli()
        self.spawn_prefix = parent_death_prefix()
        self.sessions.load()
        mode = self.config["claudePermissionMode"]
        if mode == "bypassPermissions":
            log.warning("claudePermissionMode is bypassPermissions: every client can make Claude "
                        "Code run any command and edit any file as this user, without asking")
            if hasattr(os, "geteuid") and os.geteuid() == 0 and os.environ.get("IS_SANDBOX") != "1":
                log.warning("running as root: the CLI refuses bypassPermissions as root unless "
                            "IS_SANDBOX=1")
        if not self.config.get("apiKey"):
            log.error("no apiKey is configured: every request will get 401 (start with "
                      "`python3 proxy.py` once to generate one, or set API_KEY)")
        self.metrics.sources.append(self._gauges)
        threading.Thread(target=self._sweep, name="claude-sweeper", daemon=True).start()

    def stop(self):
        self.stop_event.set()
        self.wake.set()
        self.workers.drain()
        with self.processes_lock:
            running = list(self.processes)
        threads = [threading.Thread(target=self._reap, args=(w,), daemon=True) for w in running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(3 * self.config["claudeKillGraceMs"] / 1000 + 5)
        self.spawner.stop()
        self.sessions.save()

    def _sweep(self):
        """Sessions past their TTL, warm processes idle too long, turns whose client never sent
        its tool results, and the spares topped up."""
        config = self.config
        idle, results = config["claudeIdleTimeoutMs"] / 1000, config["claudeToolResultTimeoutMs"]
        interval = max(0.05, min(1.0, idle / 4, results / 4000))
        next_sessions = 0.0
        while not self.stop_event.is_set():
            try:
                if time.monotonic() >= next_sessions:
                    self.sessions.sweep()
                    next_sessions = time.monotonic() + max(1.0, min(60.0, self.sessions.ttl / 2))
                self._sweep_workers(idle, results / 1000)
                self._top_up_spares()
            except Exception:   # never let the sweeper die
                log.exception("claude sweep failed")
            self.wake.wait(interval)
            self.wake.clear()

    def _sweep_workers(self, idle, results):
        closing, held, dead = self.workers.expired(idle, results)
        for worker in held:
            self._give_up_waiting(worker)
        for worker in closing + dead:
            self._close_later(worker)
        if dead:   # a spare that exits unused would otherwise be restarted every second
            self.spare_failures += len(dead)
            delay = min(300, 2 ** self.spare_failures)
            self.spare_retry_at = time.monotonic() + delay
            log.warning("a spare Claude Code process exited before it was used (%d in a row); "
                        "the next one starts in %d s", self.spare_failures, delay)

    def _preempt_held(self):
        """Every slot is taken and a request has waited claudeQueueWaitMs: a turn that has
        waited longest for its client's tool results gives its slot up, rather than a 429."""
        worker = self.workers.oldest_held()
        return worker is not None and self._give_up_waiting(
            worker, "was waiting for tool results and its slot was needed", "preempted")

    def _give_up_waiting(self, worker, why="got no tool result within claudeToolResultTimeoutMs",
                         metric="tool_result_timeouts"):
        """A turn whose client did not send its tool results: the calls are answered with an
        error and the turn interrupted, under the conversation's lock, so a late request for it
        waits and then finds the process warm. True when it was given up."""
        lock = self.sessions.locks.enter(worker.key)
        try:
            if not lock.acquire(blocking=False):
                return False   # a request for this conversation is running: it decides
            try:
                if not self.workers.unhold(worker):
                    return False
                log.info("claude pid %s %s; the turn is interrupted", worker.pid, why)
                self.metrics.count("claude_%s_total" % metric, {})
                worker.answer({}, "cc-proxy: the client did not send this tool call's result "
                              "in time")
                run = ClaudeRun(slot=worker.slot, worker=worker, delivered=True, how="tools")
                worker.slot = False
                self._settle(run)
                return True
            finally:
                lock.release()
        finally:
            self.sessions.locks.leave(worker.key)

    def _top_up_spares(self):
        want = self.config["claudeSpareProcesses"] if self.workers.warm_limit else 0
        if not want or not self.cli_path or self.stop_event.is_set() \
                or time.monotonic() < self.spare_retry_at:
            return
        spawn = self._spare_spawn()
        while self.workers.counts()["spare"] < want and not self.stop_event.is_set():
            try:
                worker = self._spawn(spawn, str(uuid.uuid4()), False)
            except ProxyError as err:
                log.warning("cannot start a spare Claude Code process: %s", err.message)
                return
            self.metrics.count("claude_spawns_total", {"start": "spare"})
            self.workers.add_spare(worker)

    def _spare_spawn(self):
        """A spare is started for a new conversation with the default settings: default model,
        the default working directory, no system text, no client tools."""
        request = Request(model=self._model_name(""))
        return claude_spawn(self.config, request, self._default_dir())

    def _default_dir(self):
        return os.path.realpath(os.path.expanduser(self.config["claudeWorkingDir"] or os.getcwd()))

    def _gauges(self):
        counts = self.workers.counts()
        return {"claude_warm_processes": counts["warm"], "claude_spare_processes": counts["spare"],
                "claude_awaiting_tool_results": counts["awaitingTools"],
                "claude_turns_running": self.slots.count}

    def check_cli(self):
        """Find the CLI and ask its version, with errors a new user can act on."""
        configured = os.path.expanduser(self.config["claudePath"] or "claude")
        self.cli_path, self.cli_version, self.cli_error = None, None, None
        if os.sep in configured:
            if not os.path.exists(configured):
                self.cli_error = "claudePath %s does not exist" % configured
            elif os.path.isdir(configured) or not os.access(configured, os.X_OK):
                self.cli_error = "claudePath %s is not an executable file (chmod +x?)" % configured
            else:
                self.cli_path = os.path.abspath(configured)
        else:
            found = shutil.which(configured)
            if found:
                self.cli_path = found
            else:
                self.cli_error = ("Claude Code CLI %r not found on PATH: install it (npm install "
                                  "-g @anthropic-ai/claude-code), log in once with `claude`, "
                                  "or set claudePath" % configured)
        if self.cli_path:
            try:
                done = subprocess.run([self.cli_path, "--version"], env=claude_env(),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, timeout=30)
                output = done.stdout.decode("utf-8", "replace").strip()
                if done.returncode == 0 and output:
                    self.cli_version = output.splitlines()[0].replace("(Claude Code)", "").strip()
                else:
                    self.cli_error = "`%s --version` failed (exit %s): %s" % (
                        self.cli_path, done.returncode,
                        redact(done.stderr.decode("utf-8", "replace").strip())[:300])
            except subprocess.TimeoutExpired:
                self.cli_error = "`%s --version` did not answer within 30 s" % self.cli_path
            except OSError as e:
                self.cli_error = "cannot run %s: %s" % (self.cli_path, e.strerror or e)
        if self.cli_error:
            log.error("%s", self.cli_error)
        else:
            log.info("Claude Code CLI %s at %s", self.cli_version, self.cli_path)

    # ---- before anything runs -----------------------------------------------------------
    def authenticate(self, headers):
        expected = self.config.get("apiKey") or ""
        if not expected:
            raise ProxyError(401, "authentication", "this proxy has no apiKey configured; the "
                             "operator must set one (API_KEY) before clients can use it",
                             code="invalid_api_key")
        if not key_matches([headers.get("x-api-key") or "", bearer_token(headers)], expected):
            raise ProxyError(401, "authentication", "invalid or missing API key: " + self.auth_hint,
                             code="invalid_api_key")
        return "proxy-key"

    def _model_name(self, asked):
        default = self.config["defaultModel"] or CLAUDE_DEFAULT_MODEL
        model = map_model(asked, self.config["modelMap"], default)
        if model.lower() in CLAUDE_ALIASES or model.lower() == "default":
            model = model.lower()
        elif model.lower() in ("claude", "claude-code"):
            model = default
        if not _CLAUDE_MODEL_NAME.match(model):
            raise bad_request("model %r is not a valid Claude model name" % model, "model")
        return model

    def prepare(self, request):
        request.model = self._model_name(request.model)
        if request.tools and self.config["claudeClientTools"] == "off":
            if request.tool_choice == "required" or isinstance(request.tool_choice, dict):
                raise bad_request("claudeClientTools is off: the Claude Code backend runs its own "
                                  "tools, so a forced tool_choice cannot be honoured",
                                  "tool_choice")
            request.dropped_tools.extend(t["name"] for t in request.tools)
            request.tools = []
        elif request.tools and request.tool_choice == "none":
            request.tools = []   # not offered this turn: the model answers in text, and
            request.options["claude_agent"] = True   # the CLI's own tools stay off all the same
        request.options["claude"] = self.plan(request)

    def plan(self, request):
        """Where the CLI runs, what it is sent, and which session it continues."""
        named = request.working_dir
        allowed = allowed_dirs(self.config)
        default_dir = self._default_dir()
        messages = request.messages
        if named:
            cwd, reason = check_working_dir(named, allowed)
            if reason:
                raise bad_request("X-Working-Dir: " + reason, "X-Working-Dir")
            reply = None
        elif self.config["claudeAskWorkingDir"]:
            cwd, messages, reply = working_dir_dialogue(messages, default_dir, allowed)
        else:
            cwd, reply = default_dir, None
        if reply is not None:
            return {"reply": reply}
        earlier, trailing = split_trailing_turn(messages)
        if not trailing:
            raise bad_request("the last message must come from the user (the Claude Code backend "
                              "cannot continue an assistant prefill)", "messages")
        blocks = claude_user_blocks(trailing)
        if not blocks:
            raise bad_request("the last user message has no text or image content", "messages")
        results = {part["call_id"]: mcp_tool_result(part) for message in trailing
                   for part in message["parts"] if part["type"] == "tool_result"}
        beside = [part["text"] for message in trailing for part in message["parts"]
                  if part["type"] == "text" and part["text"].strip()] if results else []
        hint = claude_tool_choice_hint(request)
        explicit = (request.explicit_session or "").strip() or None
        session_hint = None if explicit else (request.session_id or "").strip() or None
        after_cut = None
        if explicit is not None:
            lookup = conversation_key(cwd, explicit=explicit)
        elif earlier:
            lookup = conversation_key(cwd, normalised_turns(earlier), namespace=session_hint)
            if earlier[-1]["role"] == "assistant":   # maybe an answer the client cut off
                after_cut = conversation_key(cwd, normalised_turns(earlier[:-1]) + [
                    CLAUDE_CUT_ANSWER], namespace=session_hint)
        else:
            lookup = None   # a new conversation: nothing to continue
        return {"reply": None, "cwd": cwd, "earlier": earlier, "trailing": trailing,
                "blocks": blocks + hint, "explicit": explicit, "hint": session_hint,
                "lookup": lookup, "after_cut": after_cut, "messages": messages,
                "results": results, "beside": beside}

    # ---- the run ------------------------------------------------------------------------
    def stream(self, request, exchange):
        plan = request.options.get("claude") or self.plan(request)
        if plan["reply"] is not None:
            yield [ModelUsed(request.model), TextDelta(plan["reply"]), UsageEvent(Usage()),
                   Finish("stop")]
            return
        tick = exchange.tick
        run = ClaudeRun()
        decoder = ClaudeStreamDecoder()
        try:
            if plan["lookup"]:
                yield from self._lock_session(plan["lookup"], run.held, tick)
            self._require_cli()
            self._continue_waiting(plan, run)
            if not run.slot:
                yield from self._take_slot(tick)
                run.slot = True
            entry = self._session_entry(plan)
            for _ in range(2):
                if run.worker is None:
                    self._start_turn(request, plan, run, entry)
                worker = run.worker
                decoder = ClaudeStreamDecoder(
                    use_deltas=request.stream, tool_notes=self.config["claudeToolNotes"],
                    client_prefix=CLAUDE_MCP_PREFIX if worker.tools else None,
                    client_calls=worker.client_calls)
                try:
                    rc = yield from self._pump(worker, decoder, request, tick, None if run.how in (
                        "cold", "resume", "tools") else self.warm_first_line)
                except ClaudeSilent:
                    rc = -1   # as good as dead: replaced below
                retry, entry = self._retry(run, decoder, rc, plan, entry, exchange.request_id)
                if not retry:
                    break
                self._reap(worker)
                run.worker = None
            if decoder.tool_stop:
                final = self._tool_stop(worker, decoder)
            else:
                final = self._finish(decoder, rc, worker, request, run.how == "resume")
                self._report(exchange, decoder.result, worker, run.how)
            self._remember(plan, decoder, worker, run.held)
            yield final
            run.delivered = True
        finally:
            try:
                if not run.delivered and run.worker is not None and decoder.produced:
                    self._remember(plan, decoder, run.worker, run.held, cut=True)
                self._settle(run)
            finally:
                for key, lock in reversed(run.held):
                    lock.release()
                    self.sessions.locks.leave(key)

    def _session_entry(self, plan):
        """The CLI session this request continues: by its history, else as the continuation of
        an answer the client cut off (it kept some part of it)."""
        for key in (plan["lookup"], plan["after_cut"]):
            entry = self.sessions.get(key) if key else None
            if entry is not None and entry["cwd"] == plan["cwd"]:
                plan["found"] = key
                return entry
        return None

    def _retry(self, run, decoder, rc, plan, entry, request_id):
        """-> (once more on another process?, the session entry it continues). A --resume of
        a session the CLI lost goes again as a transcript; a warm process that died or hung
        before answering, again on a fresh process resuming the session."""
        if decoder.produced or decoder.result is not None and run.how != "resume":
            return False, entry
        worker = run.worker
        if run.how == "resume" and self._resume_failed(decoder, rc):
            log.info("%s claude session %s is gone (cwd %s); replaying the history as a "
                     "transcript", request_id, worker.session_id, plan["cwd"])
            self.sessions.discard(plan["lookup"])
            return True, None
        if run.how not in ("warm", "spare") or rc is None:
            return False, entry
        log.info("%s claude pid %s died or hung between turns; starting a new process",
                 request_id, worker.pid)
        return True, entry or {"session": worker.session_id, "cwd": plan["cwd"]}

    def _continue_waiting(self, plan, run):
        """A request that carries the tool results a held turn waits for takes that turn over
        (and its slot). One that brings a new message instead cancels the held calls first."""
        worker = self.workers.take_waiting(list(plan["results"]), plan["lookup"])
        if worker is None:
            return
        run.slot, worker.slot = worker.slot, False
        if set(plan["results"]) & set(worker.awaiting):
            worker.answer(claude_results_with_text(plan["results"], worker.awaiting,
                                                   plan["beside"]),
                          "the client sent no result for this tool call")
            run.worker, run.how = worker, "tools"
            self.metrics.count("claude_turns_total", {"process": "tools"})
            return
        worker.answer({}, "the client did not run this tool call; it sent a new message instead")
        if self.workers.warm_limit and worker.interrupt():
            for old in self.workers.park(worker):   # the new turn finds it warm
                self._close_later(old)
        else:
            self._reap(worker)

    def _start_turn(self, request, plan, run, entry):
        """The process for a new turn -- this conversation's warm one, a spare, or a new one
        (resuming the session when there is one) -- and the turn's user line written to it."""
        spawn = claude_spawn(self.config, request, plan["cwd"])
        worker, how = None, "warm"
        found = plan.get("found") or plan["lookup"]
        if found:
            worker, stale = self.workers.take(found, spawn)
            if stale is not None:   # its fixed settings changed: a new process resumes its session
                entry = entry or {"session": stale.session_id, "cwd": stale.spawn.cwd}
                self._reap(stale)
        if worker is None and entry is None and not plan["earlier"]:
            worker, how = self.workers.take_spare(spawn), "spare"
            if worker is not None:
                self.spare_failures = 0
                self.wake.set()   # the sweeper starts the next spare
        blocks = plan["blocks"]
        if worker is None:
            resume = entry is not None
            if not resume and plan["earlier"]:   # a conversation the CLI never saw, or lost
                blocks = [{"type": "text", "text": claude_transcript(plan["earlier"])}] + blocks
            worker = self._spawn(spawn, entry["session"] if resume else str(uuid.uuid4()), resume)
            how = "resume" if resume else "cold"
            self.metrics.count("claude_runs_total", {"session": "resume" if resume else (
                "transcript" if plan["earlier"] else "new")})
            self.metrics.count("claude_spawns_total", {"start": how})
        self.metrics.count("claude_turns_total", {"process": how})
        run.worker, run.how = worker, how
        worker.begin_turn(blocks)   # a CLI that stopped reading shows as the end of its output
        if not self.workers.warm_limit and not worker.tools:
            worker.proc.close_stdin()   # a process per request: it exits after this answer

    def _tool_stop(self, worker, decoder):
        """The answer ends at the client's tool calls; the CLI's turn waits for their results."""
        worker.awaiting = [call.call_id for call in decoder.calls]
        worker.reported.add(decoder.streamed_usage)
        final = decoder.held + [UsageEvent(decoder.streamed_usage), Finish("tool_calls")]
        del decoder.held[:]
        return final

    def _settle(self, run):
        """After a request: a turn awaiting tool results is held for the client's next request;
        an unfinished turn is interrupted; the process goes back warm, or is closed."""
        try:
            self._settle_worker(run)
        finally:
            if run.slot:
                run.slot = False
                self.slots.release()

    def _settle_worker(self, run):
        worker = run.worker
        if worker is not None and worker.awaiting and run.delivered and worker.alive:
            worker.slot, run.slot = run.slot, False   # running a tool counts as running
            self.workers.hold(worker)
        elif worker is not None:
            if worker.awaiting:
                worker.answer({}, "the client went away before it got this tool call")
            warm = self.workers.warm_limit > 0 and not self.stop_event.is_set()
            if warm and worker.turn_open and worker.alive and not worker.interrupt():
                log.warning("claude pid %s did not answer an interrupt; closing it", worker.pid)
            if warm and worker.alive and not worker.turn_open and worker.key:
                for old in self.workers.park(worker):
                    self._close_later(old)
            else:
                self._reap(worker)

    def _close_later(self, worker):
        threading.Thread(target=self._reap, args=(worker,), name="claude-close",
                         daemon=True).start()

    def _require_cli(self):
        if not self.cli_path:
            self.check_cli()
            if not self.cli_path:
                raise ProxyError(502, "upstream", self.cli_error or "Claude Code CLI not found",
                                 code="cli_not_found")

    def _report(self, exchange, result, worker, how):
        """The turn's cost to the client (X-Claude-Cost-Usd) and the metrics; a log line."""
        cost = claude_turn_cost(result, worker)
        if cost is not None:
            exchange.cost_usd = cost
            exchange.response_headers["X-Claude-Cost-Usd"] = "%.6f" % cost
            self.metrics.count("claude_cost_usd_total", {}, cost)
        log.info("%s claude session=%s process=%s turns=%s cost_usd=%s duration_ms=%s",
                 exchange.request_id, worker.session_id, how, result.get("num_turns"), cost,
                 result.get("duration_ms"))

    def _lock_session(self, key, held, tick):
        """One request per conversation at a time; the others queue (ticking) behind it."""
        lock = self.sessions.locks.enter(key)
        deadline = time.monotonic() + self.config["claudeTimeoutMs"] / 1000 + 10
        try:
            while not lock.acquire(timeout=tick):
                if time.monotonic() >= deadline:
                    raise ProxyError(429, "rate_limit", "this conversation is busy with an earlier "
                                     "request; retry when it has finished", retry_after=5,
                                     code="session_busy")
                yield []
        except BaseException:
            self.sessions.locks.leave(key)
            raise
        held.append((key, lock))

    def _take_slot(self, tick):
        wait = self.config["claudeQueueWaitMs"] / 1000
        deadline = time.monotonic() + wait
        while not self.slots.acquire(min(tick, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                if self._preempt_held():
                    continue   # its slot is free now: take it, if nobody was quicker
                self.metrics.count("claude_busy_total", {})
                raise ProxyError(429, "rate_limit", "all %d Claude Code processes are busy "
                                 "(claudeMaxProcesses); retry shortly" % self.slots.limit,
                                 retry_after=max(1, int(wait) or 1), code="cli_busy")
            yield []

    def _spawn(self, spawn, session_id, resume):
        if self.stop_event.is_set():
            raise ProxyError(503, "overloaded", "the proxy is shutting down", retry_after=1)
        system_file = None
        if len(spawn.system.encode("utf-8", "replace")) > CLAUDE_SYSTEM_ARG_LIMIT:
            fd, system_file = tempfile.mkstemp(prefix="cc-proxy-system-", suffix=".txt")
            with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
                f.write(spawn.system)
        argv = claude_argv(self.cli_path, spawn, session_id, resume, system_file)
        try:
            worker = ClaudeWorker(spawn, session_id, self.spawn_prefix + argv, claude_env(),
                                  self.spawner.popen, self.config, system_file)
        except OSError as e:
            self._drop_file(system_file)
            if isinstance(e, FileNotFoundError):
                self.cli_path = None
            why = {FileNotFoundError: "not found at %s", PermissionError: "at %s is not "
                   "executable"}.get(type(e))
            raise ProxyError(502, "upstream", "Claude Code CLI " + why % argv[0] if why else
                             "cannot start the Claude Code CLI: %s" % (e.strerror or e),
                             code="cli_not_found" if why else None)
        with self.processes_lock:
            self.processes.add(worker)
        self.metrics.gauge("claude_processes", {}, 1)
        if self.stop_event.is_set():   # stop() may have listed the processes before this one
            self._reap(worker)
            raise ProxyError(503, "overloaded", "the proxy is shutting down", retry_after=1)
        return worker

    @staticmethod
    def _drop_file(path):
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _reap(self, worker):
        try:
            worker.close()
        finally:
            with self.processes_lock:
                if worker in self.processes:
                    self.processes.discard(worker)
                    self.metrics.gauge("claude_processes", {}, -1)
            self.metrics.observe("claude_run_seconds", {}, time.monotonic() - worker.proc.started)

    def _pump(self, worker, decoder, request, tick, first_line_wait=None):
        """Lines -> batches until the turn's result line, the client's tool calls, or EOF; []
        while the CLI is silent. Returns the exit code when the CLI ended without a result.
        first_line_wait: a warm process that prints nothing this long is taken for hung."""
        proc = worker.proc
        # non-content events (the model) wait for content: a bare ModelUsed batch would commit
        # the response before an error
        held = decoder.held
        limits = ClaudeTurnLimits(self.config, request, first_line_wait)
        last_yield = time.monotonic()
        stop_by = None   # a tools/call with no message_delta after it (a non-streamed message)
        while True:
            now = time.monotonic()
            overdue = limits.overdue(now)
            if overdue:
                raise self._timeout(overdue, proc) if overdue != "silent" else ClaudeSilent()
            if stop_by is not None and now >= stop_by:
                decoder.tool_stop = True
                batch, ended = [], False
            else:
                try:
                    line = proc.lines.get(timeout=limits.wait(now, tick, stop_by))
                except queue.Empty:
                    last_yield = time.monotonic()
                    yield []
                    continue
                batch, ended, asked = self._drain(decoder, worker, line)
                limits.heard()
                if asked and stop_by is None:
                    stop_by = time.monotonic() + CLAUDE_TOOL_STOP_GRACE
            if not decoder.produced:
                held.extend(batch)
                batch = []
            elif held:
                batch[:0] = held
                del held[:]
            if decoder.result is not None or decoder.tool_stop:
                if decoder.result is not None:
                    worker.end_turn()
                if batch:
                    yield batch
                return None
            if ended:
                if batch:
                    yield batch
                rc = proc.wait(proc.exit_wait)
                return rc if rc is not None else -1
            if batch or time.monotonic() - last_yield >= tick:
                last_yield = time.monotonic()
                yield batch

    @staticmethod
    def _drain(decoder, worker, line):
        """`line` and what else is waiting, through the decoder -> (batch, ended, whether the CLI
        asked for one of this answer's client tool calls)."""
        batch, asked, proc = [], False, worker.proc
        while True:
            if line is None:
                return batch, True, asked
            if type(line) is ClaudeCallAsked and line.call_id not in decoder.client_calls:
                # a call no client was given (a sub-agent's, say): its tool_use lines came first
                worker.refuse(line.call_id)
            elif type(line) is ClaudeCallAsked:
                asked |= decoder.open_call is None and any(
                    c.call_id == line.call_id for c in decoder.calls)
            else:
                batch.extend(decoder.feed(line))
                if decoder.result is not None or decoder.tool_stop:
                    return batch, False, asked
            try:
                line = proc.lines.get_nowait()
            except queue.Empty:
                return batch, False, asked

    def _timeout(self, what, proc):
        self.metrics.count("claude_timeouts_total", {})
        proc.close()   # at once: the client must not wait for the grace periods twice
        return ProxyError(504, "timeout", "the Claude Code CLI %s and was stopped" % what,
                          retry_after=5, code="cli_timeout")

    @staticmethod
    def _resume_failed(decoder, rc):
        """--resume of a session the CLI does not have: an error_during_execution result with no
        turn taken, or an exit before it even started (seen from another cwd or a wiped HOME)."""
        result = decoder.result
        if result is not None:
            return result.get("subtype") == "error_during_execution" and not result.get("num_turns")
        return rc not in (None, 0) and not decoder.init_seen

    def _finish(self, decoder, rc, worker, request, resume):
        """The last batch of a turn that ended: usage (less what answers with tool calls already
        reported), finish reason, or the right ProxyError."""
        result = decoder.result
        proc = worker.proc
        if result is None:
            stderr = proc.stderr_text()
            if rc:
                raise ProxyError(502, "upstream",
                                 "the Claude Code CLI exited with status %s without an answer%s"
                                 % (rc, (": " + stderr) if stderr else ""), code="cli_crashed",
                                 retryable=not resume and not decoder.produced)
            raise ProxyError(502, "upstream", "the Claude Code CLI ended without a result%s"
                             % ((": " + stderr) if stderr else ""), code="cli_no_result")
        out = decoder.held
        subtype = result.get("subtype")
        finish = CLAUDE_FINISH.get(result.get("stop_reason") or "end_turn", "stop")
        if result.get("is_error"):
            status = result.get("api_error_status")
            status = status if isinstance(status, int) and not isinstance(status, bool) else None
            if subtype in ("error_max_turns", "error_max_budget_usd"):
                why = ("it reached the limit of %d agentic turns (claudeMaxTurns)"
                       % self.config["claudeMaxTurns"]
                       if subtype == "error_max_turns" else "it reached its cost budget")
                decoder._text(out, "[cc-proxy: Claude Code stopped because %s; say \"continue\" to "
                              "let it go on.]" % why, True)
                finish = "length"
            elif decoder.synthetic_error == "max_output_tokens" and status is None:
                decoder._text(out, "[cc-proxy: the answer was cut at the model's output token "
                              "limit.]", True)
                finish = "length"
            elif subtype == "success" or decoder.synthetic_error:
                err = classify_claude_error(status, decoder.synthetic_error,
                                            result.get("result") or decoder.synthetic_text,
                                            decoder.retry_after)
                err.retryable = err.retryable and not resume and not decoder.produced
                raise err
            else:
                errors = result.get("errors") if isinstance(result.get("errors"), list) else []
                stderr = proc.stderr_text()
                detail = "; ".join(str(e) for e in errors) or stderr or subtype or "unknown error"
                raise ProxyError(502, "upstream",
                                 "the Claude Code CLI failed: %s" % redact(detail)[:500],
                                 code="cli_error")
        if not decoder.answer:
            text = result.get("result") if isinstance(result.get("result"), str) else ""
            decoder._text(out, text.strip() or "(Claude Code finished without a text answer.)",
                          True)
        out.append(UsageEvent(claude_turn_usage(result, worker).add(worker.reported, -1)))
        out.append(Finish(finish))
        return out

    def _remember(self, plan, decoder, worker, held, cut=False):
        """Store the session under the key the next turn will look it up by, before the client
        can send that turn; hold that key's lock until this request has settled its worker.
        cut: the client went away during the answer and keeps some unknown part of it."""
        if plan["explicit"] is not None:
            key = plan["lookup"]
        else:
            if cut:
                turns = normalised_turns(plan["messages"]) + [CLAUDE_CUT_ANSWER]
            else:
                turns = normalised_turns(plan["messages"] + [{"role": "assistant", "parts": [
                    {"type": "text", "text": "".join(decoder.answer)}] + [
                    {"type": "tool_call", "id": c.call_id, "name": c.name, "arguments": {}}
                    for c in decoder.calls]}])
            key = conversation_key(plan["cwd"], turns, namespace=plan["hint"])
            found = plan.get("found") or plan["lookup"]
            if found and found != key:
                self.sessions.discard(found)   # that history continues under the new key
            if all(k != key for k, _ in held):
                lock = self.sessions.locks.enter(key)
                if lock.acquire(blocking=False):
                    held.append((key, lock))
                else:
                    self.sessions.locks.leave(key)
        worker.key = key
        self.sessions.put(key, worker.session_id, plan["cwd"])

    # ---- the rest of the interface ------------------------------------------------------
    def list_models(self, key):
        efforts = tuple(e for e in EFFORT_ORDER if e != "minimal")
        seen, models = set(), []

        def add(model_id, label):
            if model_id.lower() not in seen:
                seen.add(model_id.lower())
                models.append(ModelInfo(model_id, True, efforts, 200000, label))
        for alias in ("sonnet", "opus", "haiku"):
            add(alias, "Claude %s (latest, alias)" % alias.capitalize())
        for model_id, label in CLAUDE_KNOWN_MODELS:
            add(model_id, label)
        if self.config["defaultModel"]:
            add(self.config["defaultModel"], self.config["defaultModel"])
        for pattern in self.config["modelMap"]:
            if "*" not in pattern and "?" not in pattern:
                add(pattern, pattern)
        return models

    def health(self):
        counts = self.workers.counts()
        with self.processes_lock:
            live = len(self.processes)
        info = {"claude": self.cli_path, "claudeVersion": self.cli_version,
                "claudeProcesses": self.slots.count, "claudeSessions": len(self.sessions),
                "claudeLiveProcesses": live, "claudeWarm": counts["warm"],
                "claudeSpare": counts["spare"], "claudeAwaitingTools": counts["awaitingTools"]}
        if self.cli_error:
            info["claudeError"] = self.cli_error
        return info


BACKENDS = {"commandcode": CommandCodeBackend, "claude-code": ClaudeCodeBackend}


# =====================================================================================
# 9. HTTP server: threads, routing, auth, CORS, request ids, byte writer, metrics, access log
# =====================================================================================

class Metrics:
    """Counters, gauges and histograms in Prometheus text format. Labels never carry keys or
    prompts."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.defaultdict(float)
        self.gauges = collections.defaultdict(float)
        self.histograms = {}
        self.sources = []   # callables -> {gauge name: value}, read at render time

    @staticmethod
    def _key(name, labels):
        return (name, tuple(sorted(labels.items())))

    def count(self, name, labels, value=1):
        with self.lock:
            self.counters[self._key(name, labels)] += value

    def gauge(self, name, labels, delta):
        with self.lock:
            self.gauges[self._key(name, labels)] += delta

    def observe(self, name, labels, seconds):
        with self.lock:
            key = self._key(name, labels)
            buckets = self.histograms.setdefault(key, [0] * len(self.BUCKETS) + [0, 0.0])
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            buckets[-2] += 1
            buckets[-1] += seconds

    def render(self):
        def labels_text(labels, extra=()):
            items = list(labels) + list(extra)
            if not items:
                return ""
            return "{" + ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')
                                                .replace("\n", " ")) for k, v in items) + "}"
        lines = []
        read = {}
        for source in self.sources:
            read.update((self._key(name, {}), value) for name, value in source().items())
        with self.lock:
            gauges = self.gauges
            if read:
                gauges = dict(gauges)
                gauges.update(read)
            for kind, table in (("counter", self.counters), ("gauge", gauges)):
                seen = set()
                for (name, labels), value in sorted(table.items()):
                    full = "ccproxy_" + name
                    if full not in seen:
                        lines.append("# TYPE %s %s" % (full, kind))
                        seen.add(full)
                    lines.append("%s%s %s" % (full, labels_text(labels), repr(float(value))))
            seen = set()
            for (name, labels), buckets in sorted(self.histograms.items()):
                full = "ccproxy_" + name
                if full not in seen:
                    lines.append("# TYPE %s histogram" % full)
                    seen.add(full)
                for bound, count in zip(self.BUCKETS, buckets):
                    lines.append("%s_bucket%s %d"
                                 % (full, labels_text(labels, [("le", bound)]), count))
                lines.append("%s_bucket%s %d"
                             % (full, labels_text(labels, [("le", "+Inf")]), buckets[-2]))
                lines.append("%s_count%s %d" % (full, labels_text(labels), buckets[-2]))
                lines.append("%s_sum%s %r" % (full, labels_text(labels), buckets[-1]))
        return "\n".join(lines) + "\n"


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;[^\r\n]*)?\r?\n")
_DIGITS = re.compile(r"[0-9]{1,19}")


def request_head_problem(headers):
    """Why a request head is refused with 400, or None: header lines that do not parse, and body
    framing that two parsers could read two ways (RFC 9112 sections 5 and 6)."""
    if headers.defects or any(not name.strip() for name in headers.keys()):
        return "malformed header line"
    codings = ",".join(headers.get_all("transfer-encoding") or ())
    lengths = {value.strip() for value in headers.get_all("content-length") or ()}
    if codings and lengths:   # a request smuggling vector: never guess which one frames the body
        return "Content-Length together with Transfer-Encoding"
    if codings and [c.strip().lower() for c in codings.split(",")] != ["chunked"]:
        return "unsupported Transfer-Encoding %r (only chunked)" % codings[:40]
    if len(lengths) > 1 or not all(_DIGITS.fullmatch(value) for value in lengths):
        return "invalid Content-Length"
    return None


def etag_matches(if_none_match, etag):
    """Does an If-None-Match header name this entity tag? Weakly compared, as RFC 9110 (13.1.2)
    has it for this header: W/"x" matches "x", and * matches any."""
    tags = [tag.strip() for tag in (if_none_match or "").split(",")]
    return "*" in tags or etag in (tag[2:] if tag.startswith("W/") else tag for tag in tags)


def route_path(target):
    """The route a request target names: no query, no trailing slash, /v1 added when missing
    (clients configured without the /v1 suffix)."""
    path = urllib.parse.urlsplit(target).path.rstrip("/") or "/"
    if not path.startswith("/v1/") and path not in UNVERSIONED_ROUTES:
        path = "/v1" + path
    return path


def frontend_for(frontends, path, headers, query=None):
    """The front end whose shape an answer to this request takes: the one owning the route, else
    the one the headers or query speak (anthropic-version, Codex's client_version), else the
    first (OpenAI Chat Completions)."""
    return (next((f for f in frontends if f.owns(path)), None)
            or next((f for f in frontends if f.spoken_by(headers, query or {})), frontends[0]))


def read_request_body(rfile, headers, limit):
    """A request's body, framed by Content-Length or chunked (checked with the head); ProxyError
    413 past `limit` (what is refused is not read), 400 for a chunk that does not parse."""
    if headers.get("transfer-encoding"):
        return _read_chunked(rfile, limit)
    length = int(headers.get("content-length") or 0)
    if length > limit:
        raise _too_large(limit)
    data = rfile.read(length) if length else b""
    if len(data) < length:
        raise ClientGone()
    return data


def _read_chunked(rfile, limit):
    data = bytearray()
    while True:
        line = rfile.readline(1024)
        match = _CHUNK_SIZE_LINE.fullmatch(line)
        if not match:
            raise ClientGone() if not line else _unframed("invalid chunk size line")
        size = int(match.group(1), 16)
        if size == 0:
            break
        if len(data) + size > limit:
            raise _too_large(limit)
        chunk = rfile.read(size)
        if len(chunk) < size:
            raise ClientGone()
        data += chunk
        if rfile.readline(3) not in (b"\r\n", b"\n"):
            raise _unframed("chunk data not followed by CRLF")
    for _ in range(64):   # the trailer section, up to its empty line; trailers are ignored
        line = rfile.readline(8192)
        if line in (b"\r\n", b"\n"):
            return bytes(data)
        if not line:
            raise ClientGone()
    raise _unframed("too many trailer fields")


def _unframed(message):
    return bad_request(message + " (request body framing, RFC 9112 section 6)")


def _too_large(limit):
    return ProxyError(413, "request_too_large",
                      "request body is larger than maxBodyBytes (%d bytes)" % limit)


class SocketWriter:
    """The handlers' wfile: writes collect until flush(), so a status line, its headers and the
    first body bytes leave in one send. close() drops what a gone client was not sent.

    A socket with a timeout is non-blocking underneath, and its sendall() polls before every
    send: two system calls, each a turn at the GIL for 200 streaming threads. So what fits the
    socket buffer goes out in one write(); only the rest waits, in sendall (POSIX; elsewhere
    sendall does it all)."""

    def __init__(self, sock):
        self.sock = sock
        self.direct = os.name == "posix" and bool(sock.gettimeout())
        self.pending = []
        self.closed = False

    def write(self, data):
        self.pending.append(bytes(data))
        return len(data)

    def flush(self):
        if self.pending:
            data = b"".join(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.pending = []
            sent = 0
            if self.direct:
                try:   # fileno() each time: -1 once closed, never a number reused since
                    sent = os.write(self.sock.fileno(), data)
                except BlockingIOError:
                    pass
            if sent < len(data):
                self.sock.sendall(data[sent:] if sent else data)

    def close(self):
        self.pending = []
        self.closed = True


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cc-proxy/" + __version__
    sys_version = ""

    def version_string(self):
        return self.server_version   # http.server would append " " + sys_version
    timeout = 120   # a client that sends or reads nothing for this long is let go

    # ---- plumbing ---------------------------------------------------------------------
    def setup(self):
        super().setup()
        self.wfile = SocketWriter(self.connection)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.idle = True   # waiting for a request line: what a drain may close under it
        self.server.connections.add(self)

    def log_message(self, format, *args):
        pass  # one access line per request is written by access_log instead

    def handle_one_request(self):
        self.path = "-"   # until a request line names one (the access log reads it)
        self.body_read = False
        self.started = time.monotonic()
        self.status_sent = None
        self.bytes_sent = 0
        self.route_name = "-"
        self.model_name = "-"
        self.exchange = None   # a model request's, once decoded
        self.model_route = False
        self.client_model = None
        self.streamed = False
        self.credential = None
        self.error_kind = None
        self.cors = True       # the dashboard routes send no CORS headers
        self.first_byte = None
        self.chunked = True
        self.request_id = None
        if not self.server.connections.wait_for_request(self):
            self.close_connection = True   # the server is draining: no new request on this one
            return
        try:
            super().handle_one_request()
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        if self.exchange and not self.status_sent:
            self.status_sent = self.exchange.status
        if self.request_id and self.status_sent:
            access_log(self)
            if self.model_route and self.server.ledger is not None:
                self.server.ledger.record(ledger_row(self, self.server.ledger))

    def parse_request(self):
        self.server.connections.request_started(self)
        if not super().parse_request():
            return False
        given = self.headers.get("x-request-id", "")
        self.request_id = given if _REQUEST_ID.match(given) else new_id("req_")
        problem = request_head_problem(self.headers)
        if problem:
            self.send_error(400, problem)   # closes: where this request's body ends is unknown
            return False
        if self.server.connections.draining:   # read after the drain began: an answer to retry on
            self.close_connection = True
            self.send_failure(ProxyError(503, "api_error",
                                         "cc-proxy is shutting down; retry the request",
                                         retry_after=1, code="shutting_down"))
            return False
        return True

    def handle_expect_100(self):
        ok = super().handle_expect_100()
        self.wfile.flush()   # the client waits for this interim answer before it sends the body
        return ok

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, header too large, unknown method), as JSON
        in the shape of the protocol the request was for."""
        self.request_id = self.request_id or new_id("req_")
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # else http.server writes no status line at all
        try:
            self.send_failure(ProxyError(code, "invalid_request", message or "bad request"))
        except OSError:
            pass

    def _common_headers(self):
        self.send_header("X-Request-Id", self.request_id)
        origin = self.server.config["corsOrigin"] if self.cors else ""
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Expose-Headers",
                             "X-Request-Id, Request-Id, Retry-After, x-should-retry, "
                             "x-cc-proxy-dropped-tools, X-Claude-Cost-Usd")
            if origin != "*":
                self.send_header("Vary", "Origin")

    def _send_head(self, status, content_type, length=None, extra=None):
        """Status line and headers, into the buffered wfile: they go out with the first flush."""
        self.send_response(status)
        self.status_sent = status
        if content_type is not None:   # None: a 304, which describes no body
            self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self._common_headers()
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.server.connections.draining:
            self.close_connection = True   # the last answer on this connection
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _close_if_body_unread(self):
        headers = getattr(self, "headers", None)  # absent when the request line itself was bad
        if not self.body_read and headers and (
                headers.get("content-length", "0").strip() not in ("", "0")
                or headers.get("transfer-encoding")):
            self.close_connection = True  # its unread body would be taken for the next request

    def send_json(self, status, obj, extra=None):
        self._close_if_body_unread()
        self.send_body(status, "application/json", json_dumps(obj).encode("utf-8", "replace"),
                       extra)

    def send_json_tagged(self, obj):
        """200 with a strong ETag (a hash of the body), or 304 and no body when If-None-Match
        names it already: a client keeping what it fetched revalidates for a few bytes."""
        data = json_dumps(obj).encode("utf-8", "replace")
        etag = '"%s"' % hashlib.sha256(data).hexdigest()[:32]
        self._close_if_body_unread()
        if etag_matches(self.headers.get("if-none-match"), etag):
            return self._send_head(304, None, None, {"ETag": etag})
        self.send_body(200, "application/json", data, {"ETag": etag})

    def send_body(self, status, content_type, data, extra=None):
        self._send_head(status, content_type, len(data), extra)
        if self.command != "HEAD":
            self.wfile.write(data)
        self.bytes_sent += len(data)

    def send_failure(self, err, frontend=None):
        """Before the status line: a real HTTP status, in the client protocol's error shape."""
        self.error_kind = err.kind
        headers = err.headers()
        if frontend is None:
            frontend = frontend_for(self.server.frontends, route_path(self.path) if self.path != "-"
                                    else "-", getattr(self, "headers", None))
        if frontend.request_id_header:
            headers[frontend.request_id_header] = self.request_id
        status = frontend.overloaded_status if err.kind == "overloaded" else err.status
        self.send_json(status, frontend.error_body(err), headers)

    def read_body(self):
        """The request body; its framing headers were checked with the head. After a refused
        body the connection closes: where the next request would begin is unknown."""
        try:
            data = read_request_body(self.rfile, self.headers, self.server.config["maxBodyBytes"])
        except ProxyError:
            self.close_connection = True
            raise
        self.body_read = True
        return data

    # ---- routing ----------------------------------------------------------------------
    def do_OPTIONS(self):
        origin = self.server.config["corsOrigin"]
        self.send_response(204)
        self.status_sent = 204
        self._common_headers()
        if origin:
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers",
                             self.headers.get("access-control-request-headers") or "*")
            self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._route("GET")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def _route(self, method):
        path = route_path(self.path)
        self.route_name = path
        try:
            route = self.server.routes.get(path) or next(
                (r for r in self.server.prefix_routes
                 if path.startswith(r.path) and len(path) > len(r.path)),
                None)
            if route is None:
                raise ProxyError(404, "not_found", "no route for %s %s" % (self.command, path))
            handler = route.methods.get(method)
            if handler is None:
                allow = ", ".join(m + (", HEAD" if m == "GET" else "") for m in route.methods)
                raise ProxyError(405, "invalid_request", "use %s for %s" % (allow, path),
                                 allow=allow)
            handler(self, path[len(route.path):])
        except ProxyError as err:
            self.send_failure(err)
        except (ClientGone, ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception:
            log.exception("request %s failed", self.request_id)
            if not self.status_sent:
                self.send_failure(ProxyError(500, "api_error",
                                             "internal proxy error (request id %s)"
                                             % self.request_id))
            self.close_connection = True

    def authenticate(self):
        return self.server.backend.authenticate(self.headers)

    def query(self):
        """The request target's query parameters: name -> [values]."""
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

    def client_address_seen(self):
        """The client's address, as trustedProxies let it be told (see client_ip)."""
        headers = getattr(self, "headers", None)   # absent when the request line was bad
        return client_ip(self.client_address[0], headers and headers.get("x-forwarded-for"),
                         self.server.config["trustedProxies"])

    # ---- model requests: decode, then the pipeline answers through the methods below -----
    def model_request(self, frontend):
        server = self.server
        self.route_name = frontend.name
        self.model_route = True
        try:
            raw = self.read_body()  # first: a keep-alive connection must not keep unread bytes
            credential = self.credential = self.authenticate()
            request = frontend.decode(parse_json_body(raw), self.headers)
            self.client_model, self.streamed = request.client_model or request.model, request.stream
            request.explicit_session = self.headers.get("x-session-id")
            request.working_dir = self.headers.get("x-working-dir")
            server.backend.prepare(request)
        except ProxyError as err:
            return self.send_failure(err, frontend)
        self.model_name = request.model
        self.exchange = server.pipeline.exchange(frontend, self.request_id, credential)
        server.pipeline.run(frontend, request, self.exchange, self)

    def gone(self):
        """True once the client has closed its side."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def start_stream(self, headers):
        self.chunked = self.request_version != "HTTP/1.0"
        if not self.chunked:
            self.close_connection = True   # the end of the stream is the end of the connection
        headers = dict(headers, **{"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if self.chunked:
            headers["Transfer-Encoding"] = "chunked"
        self._send_head(200, "text/event-stream; charset=utf-8", None, headers)

    def send(self, data):
        """Stream bytes; the status line waits in the buffer and leaves with the first of them."""
        framed = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        try:
            self.wfile.write(framed)
            self.wfile.flush()
        except (OSError, ValueError):
            raise ClientGone() from None
        self.bytes_sent += len(data)
        if self.first_byte is None:
            self.first_byte = time.monotonic()

    def end_stream(self):
        if self.chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True

    def send_answer(self, body, headers):
        self.first_byte = time.monotonic()
        self.send_json(200, body, headers)


def client_ip(peer, forwarded_for, trusted):
    """The peer address, or X-Forwarded-For's nearest untrusted hop when the peer is a trusted
    proxy."""
    def is_trusted(address):
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in trusted)
    if not trusted or not is_trusted(peer):
        return peer
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer


def access_log(handler):
    """One line and the request metrics per answered request; never a key or a prompt."""
    server, exchange = handler.server, handler.exchange
    total = time.monotonic() - handler.started
    first = (handler.first_byte - handler.started) * 1000 if handler.first_byte else None
    usage = (exchange and exchange.usage) or Usage()
    route = handler.route_name
    server.metrics.count("requests_total", {"route": route, "backend": server.backend.name,
                                            "status": handler.status_sent})
    if exchange:
        server.metrics.observe("request_seconds", {"route": route}, total)
        if first is not None:
            server.metrics.observe("first_byte_seconds", {"route": route}, first / 1000)
    if not log.isEnabledFor(logging.INFO):
        return
    log.info("%s %s %s %s backend=%s model=%s status=%s bytes=%d first_byte_ms=%s total_ms=%d "
             "tokens_in=%d cached=%d out=%d", handler.request_id, handler.client_address_seen(),
             handler.command, urllib.parse.urlsplit(handler.path).path, server.backend.name,
             handler.model_name, handler.status_sent, handler.bytes_sent,
             "%d" % first if first is not None else "-", total * 1000, usage.input,
             usage.cache_read, usage.output)


class Connections:
    """The server's open client connections, for a graceful stop: when the drain begins, idle
    keep-alive connections are closed, answers in flight end with `Connection: close`, and a
    request read after it is answered 503; the process exits once every connection has closed."""

    def __init__(self):
        self.open = {}   # client socket -> its handler
        self.changed = threading.Condition()
        self.draining = False

    def add(self, handler):
        with self.changed:
            self.open[handler.connection] = handler

    def discard_socket(self, sock):
        with self.changed:
            self.open.pop(sock, None)
            self.changed.notify_all()

    def wait_for_request(self, handler):
        """Mark the connection idle before it reads its next request line; False when draining."""
        with self.changed:
            handler.idle = not self.draining
            return handler.idle

    def request_started(self, handler):
        """A request line was read: a drain no longer closes this connection under it."""
        with self.changed:
            handler.idle = False

    def drain(self, inflight, grace, linger=2.0):
        """Close idle connections, give model requests in flight up to `grace` s, then the last
        answers (503s, short routes) up to `linger` s more to be written; True if all closed."""
        with self.changed:
            self.draining = True
            idle = [h for h in self.open.values() if h.idle]
        for handler in idle:
            try:   # its blocked read for a request line sees end-of-file and the handler ends
                handler.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        inflight.wait_idle(grace)
        with self.changed:
            return self.changed.wait_for(lambda: not self.open, linger)


# The server's own routes; each front end adds its own (FrontEnd.routes()).
def index_route(handler, _):
    handler.send_json(200, {"name": "cc-proxy", "version": __version__,
                            "backend": handler.server.backend.name})


def health_route(handler, _):
    handler.send_json(200, handler.server.health())


def metrics_route(handler, _):
    data = handler.server.metrics.render().encode()
    handler.send_body(200, "text/plain; version=0.0.4; charset=utf-8", data)


def models_route(handler, model_id):
    """GET /v1/models[/{id}], in the shape of the protocol the client speaks, with a strong ETag
    (Codex keeps its catalog's; If-None-Match gets a 304)."""
    model_id = urllib.parse.unquote(model_id) if model_id else None
    backend = handler.server.backend
    key = None
    try:
        key = handler.authenticate()
    except ProxyError:
        if not backend.open_model_list:
            raise
    models = backend.list_models(key)
    if model_id is not None:
        models = [m for m in models if m.id == model_id or m.id.lower() == model_id.lower()]
        if not models:
            raise ProxyError(404, "not_found", "model %r not found" % model_id)
    query = handler.query()
    frontend = frontend_for(handler.server.frontends, "/v1/models", handler.headers, query)
    if model_id is not None:
        return handler.send_json_tagged(frontend.model_object(models[0], backend.name))
    return handler.send_json_tagged(frontend.model_list(models, backend.name, query))


class Route(NamedTuple):
    path: str       # the whole path, or for prefix routes what comes before a path parameter
    methods: dict   # method -> handler(request handler, the rest of the path)


SERVER_ROUTES = [("/", "GET", index_route), ("/health", "GET", health_route),
                 ("/metrics", "GET", metrics_route), ("/v1/models", "GET", models_route),
                 ("/v1/models/", "GET", models_route)]
UNVERSIONED_ROUTES = ("/", "/health", "/metrics", "/dashboard", "/dashboard/data")


def route_table(frontends, more=()):
    """The one routing table: the server's own routes, each front end's, and `more` (the
    dashboard's, section 10) -> (exact, prefix)."""
    table = {}
    for frontend_routes in [SERVER_ROUTES, list(more)] + [f.routes() for f in frontends]:
        for path, method, handler in frontend_routes:
            table.setdefault(path, Route(path, {})).methods[method] = handler
    exact = {p: r for p, r in table.items() if not p.endswith("/") or p == "/"}
    return exact, tuple(r for p, r in table.items() if p not in exact)


class HandlerThreads:
    """The threads that serve client connections, kept for the next one: starting a thread waits
    until the new thread runs, which under load means waiting behind every streaming thread for
    the GIL, so a burst that starts 200 costs its last requests hundreds of ms. Kept threads
    serve the next burst without a start; one idle `idle_seconds` exits."""

    def __init__(self, serve, idle_seconds=60.0):
        self.serve = serve   # serve(request, client_address)
        self.idle_seconds = idle_seconds
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.jobs = collections.deque()
        self.count = 0   # threads alive
        self.idle = 0    # of which waiting for a connection
        self.closed = False

    def submit(self, request, client_address):
        with self.lock:
            self.jobs.append((request, client_address))
            start = self.idle < len(self.jobs)
            if start:
                self.count += 1
            else:
                self.ready.notify()
        if start:
            try:
                threading.Thread(target=self._work, name="http-handler", daemon=True).start()
            except RuntimeError:   # no thread to be had
                with self.lock:
                    self.count -= 1
                    queued = (request, client_address) in self.jobs
                    if queued:
                        self.jobs.remove((request, client_address))
                if queued:   # else a kept thread took it meanwhile
                    raise    # the server closes this connection

    def busy(self):
        with self.lock:
            return self.count - self.idle

    def close(self):
        """Idle threads exit now, busy ones after their connection."""
        with self.lock:
            self.closed = True
            self.ready.notify_all()

    def _work(self):
        while True:
            with self.lock:
                self.idle += 1
                self.ready.wait_for(lambda: self.jobs or self.closed, self.idle_seconds)
                self.idle -= 1
                if not self.jobs:
                    self.count -= 1
                    return
                job = self.jobs.popleft()
            self.serve(*job)


class ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, config):
        self.config = config
        self.metrics = Metrics()
        self.connections = Connections()
        self.handler_threads = HandlerThreads(self.process_request_thread)
        # each server its own front ends: the Responses store (previous_response_id) is per server
        self.frontends = (ChatCompletions(),
                          OpenAIResponses(codex_instructions=codex_instructions(config)),
                          AnthropicMessages())
        self.routes, self.prefix_routes = route_table(self.frontends, DASHBOARD_ROUTES)
        self.backend = make_backend(config, self.metrics)
        self.pipeline = Pipeline(config, self.backend, self.metrics)
        self.started_at = time.time()
        host = config["host"]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        path = ledger_path(config)
        self.ledger = (UsageLedger(path, config["usageRetentionDays"], self.metrics)
                       if path else None)
        super().__init__((host, config["port"]), ProxyHandler)
        self.backend.start()
        if self.ledger is not None:
            self.ledger.start()

    def health(self):
        return {"status": "ok", "version": __version__, "backend": self.backend.name,
                "uptime_s": round(time.time() - self.started_at, 1),
                "in_flight": self.pipeline.inflight.count,
                **self.backend.health()}

    def process_request(self, request, client_address):
        self.handler_threads.submit(request, client_address)

    def shutdown_request(self, request):
        super().shutdown_request(request)   # the socket is closed only here, after the handler
        self.connections.discard_socket(request)

    def server_close(self):
        self.handler_threads.close()
        self.backend.stop()
        if self.ledger is not None:
            self.ledger.stop()   # what is queued is written before the process exits
        super().server_close()


def make_backend(config, metrics):
    if config["backend"] not in BACKENDS:
        raise ConfigError("backend %r is not available in this build" % config["backend"])
    return BACKENDS[config["backend"]](config, metrics)


def make_server(config):
    """A bound server (port 0 = any free port); call serve_forever() to run it."""
    return ProxyServer(config)


# =====================================================================================
# 10. Usage ledger and dashboard: one sqlite row per model request, and the page that reads it
# =====================================================================================

# ---- usage ledger: one sqlite row per model request, written off the hot path ----------

LEDGER_COLUMNS = (
    ("ts", "REAL NOT NULL"), ("request_id", "TEXT"), ("route", "TEXT"), ("backend", "TEXT"),
    ("client_model", "TEXT"), ("backend_model", "TEXT"), ("status", "INTEGER"),
    ("error_kind", "TEXT"), ("stream", "INTEGER"), ("input_uncached", "INTEGER"),
    ("cache_read", "INTEGER"), ("cache_write", "INTEGER"), ("output", "INTEGER"),
    ("reasoning", "INTEGER"), ("first_byte_ms", "REAL"), ("total_ms", "REAL"),
    ("retries", "INTEGER"), ("cost_usd", "REAL"), ("client", "TEXT"), ("key_fp", "TEXT"))
LEDGER_FIELDS = tuple(name for name, _ in LEDGER_COLUMNS)
_LEDGER_INSERT = "INSERT INTO requests (%s) VALUES (%s)" % (
    ", ".join(LEDGER_FIELDS), ", ".join("?" * len(LEDGER_FIELDS)))

# The client's family from its User-Agent: first match wins.
CLIENT_FAMILIES = (("claude-cli/", "claude-cli"), ("codex", "codex"),
                   ("openai/python", "openai-python"),
                   ("anthropic/python", "anthropic-python"), ("openai/js", "openai-node"),
                   ("anthropic/js", "anthropic-node"), ("opencode", "opencode"), ("aider", "aider"),
                   ("curl/", "curl"), ("python-requests", "python-requests"),
                   ("python-httpx", "httpx"), ("mozilla/", "browser"))


def client_family(user_agent):
    agent = (user_agent or "").lower()
    return next((family for needle, family in CLIENT_FAMILIES if needle in agent),
                "other" if agent else "unknown")


def ledger_path(config):
    """usageDb, relative to the config file's directory; None when the ledger is off."""
    return config_relative_path(config, "usageDb")


def open_ledger(path, readonly=False):
    """A connection to the ledger database; the schema and the fingerprint secret are created
    on first use (a read-only open of a missing file raises sqlite3.OperationalError)."""
    if readonly:
        return sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path), uri=True, timeout=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    conn = sqlite3.connect(path, timeout=2, isolation_level=None)
    with contextlib.suppress(OSError):   # fingerprints are for the operator's eyes only
        os.chmod(path, 0o600)
    conn.execute("PRAGMA journal_mode=WAL")
    # WAL: no fsync per batch; a crash keeps the file whole
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS requests (%s)"
                 % ", ".join("%s %s" % column for column in LEDGER_COLUMNS))
    conn.execute("CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)")
    conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB)")
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('fingerprint_secret', ?)",
                 (secrets.token_bytes(32),))
    return conn


class UsageLedger:
    """Rows go through a bounded queue to one writer thread that commits them in batches; a full
    queue drops rows (counted), and a database that is locked, read-only, corrupt or full is
    logged and counted, never felt by a request. stop() writes what is queued."""

    BATCH = 500
    FLUSH_SECONDS = 0.25   # the writer wakes on a clock, not per row: no hand-off per request

    def __init__(self, path, retention_days, metrics, queue_size=10000):
        self.path, self.metrics = path, metrics
        self.retention = retention_days * 86400
        self.rows = queue.Queue(queue_size)
        self.secret = secrets.token_bytes(32)   # replaced by the database's own when it opens
        self.thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self.stopping = threading.Event()
        self.dropped = self.errors = 0

    def start(self):
        try:
            conn = open_ledger(self.path)
            try:
                self.secret = conn.execute(
                    "SELECT value FROM meta WHERE name = 'fingerprint_secret'").fetchone()[0]
                self._prune(conn)
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as e:
            self._failed("cannot open", e)
        self.thread.start()

    def fingerprint(self, credential):
        """A keyed hash: stable across restarts, tells one key's rows apart, reveals no key."""
        if not credential:
            return None
        return hmac.new(self.secret, credential.encode("utf-8", "replace"),
                        hashlib.sha256).hexdigest()[:16]

    def record(self, row):
        try:
            self.rows.put_nowait(row)
        except queue.Full:
            self.dropped += 1
            self.metrics.count("usage_ledger_dropped_total", {})

    def stop(self, timeout=5.0):
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _failed(self, what, error):
        self.errors += 1
        self.metrics.count("usage_ledger_errors_total", {})
        log.warning("usage ledger %s: %s %s", what, type(error).__name__, error)

    def _prune(self, conn):
        conn.execute("DELETE FROM requests WHERE ts < ?", (time.time() - self.retention,))

    def _run(self):
        conn, next_prune, stopping = None, time.monotonic() + 3600, False
        while not stopping:
            stopping = self.stopping.wait(self.FLUSH_SECONDS)   # after stop(): one last drain
            while True:
                rows = []
                while len(rows) < self.BATCH and not self.rows.empty():
                    row = self.rows.get_nowait()
                    rows.append(tuple(row.get(f) for f in LEDGER_FIELDS))
                prune = time.monotonic() >= next_prune
                if rows or prune:
                    conn = self._write(conn, rows, prune)
                    next_prune = next_prune + 3600 if prune else next_prune
                if len(rows) < self.BATCH:
                    break
        if conn is not None:
            conn.close()

    def _write(self, conn, rows, prune):
        try:
            conn = conn or open_ledger(self.path)
            with contextlib.closing(conn.cursor()) as cursor:
                cursor.execute("BEGIN")
                cursor.executemany(_LEDGER_INSERT, rows)
                cursor.execute("COMMIT")
            if prune:
                self._prune(conn)
            return conn
        except Exception as e:   # locked, read-only, full, a value sqlite refuses: never fatal
            self._failed("dropped %d row(s)" % len(rows), e)
            if conn is not None:
                conn.close()
            return None


def ledger_row(handler, ledger):
    """What the ledger keeps of one model request: figures, never a prompt, answer or key."""
    exchange, started = handler.exchange, handler.started
    usage = (exchange and exchange.usage) or Usage()
    status = handler.status_sent
    error_kind = (exchange and exchange.error_kind) or handler.error_kind
    if error_kind == "client_disconnected":
        status = 499
    return {"ts": time.time(), "request_id": handler.request_id, "route": handler.route_name,
            "backend": handler.server.backend.name, "client_model": handler.client_model,
            "backend_model": (exchange and exchange.backend_model) or handler.model_name,
            "status": status, "error_kind": error_kind, "stream": int(handler.streamed),
            "input_uncached": usage.uncached_input, "cache_read": usage.cache_read,
            "cache_write": usage.cache_write, "output": usage.output, "reasoning": usage.reasoning,
            "first_byte_ms": (round((handler.first_byte - started) * 1000, 2)
                              if handler.first_byte else None),
            "total_ms": round((time.monotonic() - started) * 1000, 2),
            "retries": exchange.retries if exchange else 0,
            "cost_usd": exchange.cost_usd if exchange else None,
            "client": client_family(handler.headers.get("user-agent") if handler.headers else ""),
            "key_fp": ledger.fingerprint(exchange.credential if exchange else handler.credential)}


def ledger_rows(path, since):
    """Rows since a Unix time, oldest first, as dicts (read-only: the CLI and the dashboard)."""
    with contextlib.closing(open_ledger(path, readonly=True)) as conn:
        cursor = conn.execute("SELECT %s FROM requests WHERE ts >= ? ORDER BY ts"
                              % ", ".join(LEDGER_FIELDS), (since,))
        return [dict(zip(LEDGER_FIELDS, row)) for row in cursor]


def percentile(values, fraction):
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def usage_summary(rows):
    """Totals of a group of ledger rows: requests, errors, tokens, cache hit rate, latency."""
    tokens = {f: sum(r[f] or 0 for r in rows)
              for f in ("input_uncached", "cache_read", "cache_write", "output", "reasoning")}
    prompt = tokens["input_uncached"] + tokens["cache_read"] + tokens["cache_write"]
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    return {"requests": len(rows),
            "errors": sum(1 for r in rows if (r["status"] or 0) >= 400 or r["error_kind"]),
            **tokens, "cache_hit_rate": round(tokens["cache_read"] / prompt, 4) if prompt else None,
            "p50_ms": percentile([r["total_ms"] for r in rows], 0.5),
            "p95_ms": percentile([r["total_ms"] for r in rows], 0.95),
            "cost_usd": round(sum(costs), 6) if costs else None}


USAGE_GROUPS = {"day": lambda r: time.strftime("%Y-%m-%d", time.localtime(r["ts"])),
                "model": lambda r: r["client_model"] or "(no model)",
                "client": lambda r: r["client"] or "-",
                "key": lambda r: r["key_fp"] or "-"}


def usage_groups(rows, by):
    groups = collections.OrderedDict()
    for row in rows:
        groups.setdefault(USAGE_GROUPS[by](row), []).append(row)
    return [dict(usage_summary(members), **{by: name}) for name, members in groups.items()]


def parse_since(text, now=None):
    """'90m', '24h', '7d', '2w' or seconds -> the Unix time that long ago."""
    match = re.fullmatch(r"\s*([0-9]{1,9})\s*([smhdw]?)\s*", text or "")
    if not match:
        raise ValueError("expected a duration like 24h, 7d or 2w, not %r" % text)
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return (time.time() if now is None else now) - int(match.group(1)) * unit


# ---- dashboard: GET /dashboard (one self-contained page) and GET /dashboard/data -------

DASHBOARD_COOKIE = "cc_proxy_dashboard"
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
KEY_NEEDED = "the dashboard needs its key: open /dashboard?key=... once, or send it as Bearer"


def _is_ip_literal(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def dashboard_refusal(handler):
    """Why this client may not see the dashboard, or None. Only the proxy's own host names are
    answered (DNS rebinding); with dashboardKey set, only a client presenting it (Bearer or the
    cookie set by ?key=), else only loopback clients (behind trustedProxies: the forwarded one)."""
    config, headers = handler.server.config, handler.headers
    try:
        host = urllib.parse.urlsplit("//" + (headers.get("host") or "")).hostname or ""
    except ValueError:   # e.g. an unclosed [ of an IPv6 literal
        host = ""
    if not (host in _LOCAL_HOSTS + (config["host"].strip("[]"), handler.server.server_address[0])
            or _is_ip_literal(host)):   # rebinding needs a name: an address literal is safe
        return "this page is served only under the proxy's own address or localhost"
    key = config["dashboardKey"]
    if key:
        cookies = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            cookies.load(headers.get("cookie") or "")
        cookie = (urllib.parse.unquote(cookies[DASHBOARD_COOKIE].value)
                  if DASHBOARD_COOKIE in cookies else "")
        return None if key_matches([cookie, bearer_token(headers)], key) else KEY_NEEDED
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(handler.client_address_seen()).is_loopback:
            return None
    return "the dashboard is served to loopback clients only (set dashboardKey to open it)"


def _dashboard_admit(handler, login=False):
    """True to answer; False when the answer (a login redirect) was sent; else a 403."""
    handler.cors = False   # a page elsewhere must not read it, whatever corsOrigin says
    refusal = dashboard_refusal(handler)
    if refusal is None:
        return True
    if login and refusal is KEY_NEEDED and dashboard_login(handler):
        return False
    raise ProxyError(403, "permission", refusal)


def dashboard_route(handler, _):
    if _dashboard_admit(handler, login=True):
        handler.send_body(200, "text/html; charset=utf-8", DASHBOARD_HTML.encode(), PAGE_HEADERS)


def dashboard_login(handler):
    """GET /dashboard?key=K: a cookie for the page, then the page without the key in its URL."""
    key = handler.server.config["dashboardKey"]
    if not (key and key_matches([(handler.query().get("key") or [""])[0]], key)):
        return False
    cookie = "%s=%s; Path=/dashboard; HttpOnly; SameSite=Strict" % (
        DASHBOARD_COOKIE, urllib.parse.quote(key, safe=""))
    handler.send_body(303, "text/plain; charset=utf-8", b"see /dashboard\n",
                      {"Location": "/dashboard", "Set-Cookie": cookie, "Cache-Control": "no-store"})
    return True


PAGE_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src data:"}


def dashboard_data_route(handler, _):
    if not _dashboard_admit(handler):
        return
    try:
        since = parse_since((handler.query().get("since") or ["24h"])[0])
    except ValueError as e:
        raise bad_request(str(e), "since") from None
    handler.send_json(200, dashboard_data(handler.server, since), PAGE_HEADERS)


DASHBOARD_ROUTES = (("/dashboard", "GET", dashboard_route),
                    ("/dashboard/data", "GET", dashboard_data_route))


def dashboard_data(server, since):
    """What the page draws: the server's state now, and the ledger since `since`."""
    health = server.health()
    data = {"version": __version__, "backend": server.backend.name, "status": health["status"],
            "uptime_s": health["uptime_s"], "in_flight": health["in_flight"],
            "claude": {k: health[k] for k in ("claudeProcesses", "claudeSessions") if k in health},
            "since": since, "now": time.time(), "ledger": None}
    ledger = server.ledger
    if ledger is None:
        return data
    try:
        rows = ledger_rows(ledger.path, since)
    except sqlite3.Error as e:
        data["ledger"] = {"error": "the usage database cannot be read (%s)" % type(e).__name__}
        return data
    span = max(1.0, data["now"] - since)
    bucket = next((b for b in (60, 300, 900, 3600, 21600, 86400) if span / b <= 96), 604800)
    first = int(since // bucket * bucket)   # every bucket of the range, empty ones too
    series = collections.OrderedDict((t, {}) for t in range(first, int(data["now"]) + 1, bucket))
    for row in rows:
        slot = series.setdefault(int(row["ts"] // bucket * bucket), {})
        model = slot.setdefault(row["client_model"] or "(no model)", {"requests": 0, "tokens": 0})
        model["requests"] += 1
        model["tokens"] += sum(row[f] or 0 for f in ("input_uncached", "cache_read",
                                                     "cache_write", "output"))
    kinds = collections.Counter(r["error_kind"] or "http_%s" % r["status"] for r in rows
                                if r["error_kind"] or (r["status"] or 0) >= 400)
    data["ledger"] = {
        "dropped": ledger.dropped, "errors": ledger.errors, "totals": usage_summary(rows),
        "bucket_s": bucket, "series": [{"t": t, "models": m} for t, m in series.items()],
        "models": sorted(usage_groups(rows, "model"), key=lambda g: -g["requests"]),
        "clients": sorted(usage_groups(rows, "client"), key=lambda g: -g["requests"])[:10],
        "errors_by_kind": dict(kinds.most_common()),
        "recent": [{f: r[f] for f in ("ts", "route", "client_model", "status", "error_kind",
                                      "stream", "input_uncached", "cache_read", "output",
                                      "first_byte_ms", "total_ms", "client")}
                   for r in rows[-50:][::-1]]}
    return data


DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cc-proxy usage</title>
<style>
:root{--fg:#1d2430;--mute:#667085;--line:#e4e7ec;--bg:#f6f7f9;--card:#fff;--bad:#c0392b}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,sans-serif;color:var(--fg);
background:var(--bg)}header{display:flex;flex-wrap:wrap;gap:.5em 1.5em;align-items:baseline;
padding:12px 16px;background:var(--card);border-bottom:1px solid var(--line)}
h1{font-size:18px;margin:0}h2{font-size:14px;margin:0 0 8px;color:var(--mute);font-weight:600}
.state{color:var(--mute)}.state b{color:var(--fg);font-weight:600}
main{padding:12px 16px;display:grid;gap:12px;
grid-template-columns:repeat(auto-fit,minmax(320px,1fr))}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px;
min-width:0}.wide{grid-column:1/-1}.cards{display:grid;gap:8px;
grid-template-columns:repeat(auto-fit,minmax(120px,1fr))}.card b{display:block;font-size:20px}
.card span{color:var(--mute);font-size:12px}select{font:inherit;padding:2px 4px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{padding:4px 6px;text-align:right;
border-bottom:1px solid var(--line);white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{color:var(--mute);font-weight:600}.scroll{overflow-x:auto}.bad{color:var(--bad)}
.note{color:var(--mute);margin:4px 0}.legend span{display:inline-block;margin-right:10px;
font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;
border-radius:2px}svg{width:100%;height:170px;display:block}
@media (max-width:640px){.opt{display:none}main{padding:8px}header{padding:10px 8px}}
</style></head><body>
<header><h1>cc-proxy usage</h1><div class="state" id="state">loading...</div>
<label class="state">range <select id="since"><option value="1h">last hour</option>
<option value="24h" selected>last 24 hours</option><option value="7d">last 7 days</option>
<option value="30d">last 30 days</option><option value="90d">last 90 days</option></select></label>
</header>
<main>
<section class="wide"><div class="cards" id="cards"></div><p class="note" id="note"></p></section>
<section><h2>Requests over time, by model</h2><svg id="requests"></svg>
<div class="legend" id="legend"></div></section>
<section><h2>Tokens over time, by model (input, cached and output)</h2><svg id="tokens"></svg>
</section>
<section><h2>Errors by kind</h2><div id="errors"></div></section>
<section><h2>Top clients</h2><div class="scroll" id="clients"></div></section>
<section class="wide"><h2>By model</h2><div class="scroll" id="models"></div></section>
<section class="wide"><h2>Last requests (live)</h2><div class="scroll" id="recent"></div></section>
</main>
<script>
"use strict";
const COLORS = ["#3b82f6", "#f59e0b", "#10b981", "#8b5cf6", "#ef4444", "#14b8a6", "#64748b"];
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function num(n) {
  if (n === null || n === undefined) return "-";
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n * 100) / 100);
}
const pct = (x) => x === null || x === undefined ? "-" : (x * 100).toFixed(1) + "%";
const ms = (x) => x === null || x === undefined ? "-" : x >= 1000 ? (x / 1000).toFixed(2) + " s"
  : Math.round(x) + " ms";
const when = (t) => new Date(t * 1000).toLocaleString();
const shortTime = (t) => new Date(t * 1000).toLocaleString([], {month: "short", day: "numeric",
  hour: "2-digit", minute: "2-digit"});
function since(s) {
  return s < 120 ? Math.round(s) + " s" : s < 7200 ? Math.round(s / 60) + " min"
    : s < 172800 ? Math.round(s / 3600) + " h" : Math.round(s / 86400) + " days";
}
function table(target, head, rows) {   // a head "*name" is a column narrow screens leave out
  const t = el("table"), tr = el("tr"), opt = head.map((h) => h[0] === "*");
  head.forEach((h, i) => tr.appendChild(el("th", opt[i] ? h.slice(1) : h, opt[i] ? "opt" : "")));
  t.appendChild(tr);
  rows.forEach((r) => {
    const row = el("tr");
    r.forEach((c, i) => {
      const td = c instanceof Node ? wrap(c) : el("td", c);
      if (opt[i]) td.className = "opt";
      row.appendChild(td);
    });
    t.appendChild(row);
  });
  target.replaceChildren(rows.length ? t : el("p", "nothing in this range", "note"));
}
function wrap(node) { const td = el("td"); td.appendChild(node); return td; }
function bars(svg, series, keys, value) {
  const NS = svg.namespaceURI, W = 400, H = 170, pad = 22, left = 34;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.replaceChildren();
  const totals = series.map((s) => keys.reduce((a, k) => a + value(s, k), 0));
  const top = Math.max(1, ...totals), w = (W - left) / Math.max(1, series.length);
  const label = (text, x, y, anchor) => {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "12");
    t.setAttribute("fill", "#667085"); t.setAttribute("text-anchor", anchor || "start");
    t.textContent = text; svg.appendChild(t);
  };
  if (!totals.some((v) => v > 0)) {
    label("no requests in this range", W / 2, H / 2, "middle");
    return;
  }
  series.forEach((s, i) => {
    let y = H - pad;
    keys.forEach((k, j) => {
      const h = value(s, k) / top * (H - 2 * pad);
      if (h <= 0) return;
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", left + i * w + 0.5); r.setAttribute("width", Math.max(1, w - 1));
      r.setAttribute("y", y - h); r.setAttribute("height", h);
      r.setAttribute("fill", COLORS[j % COLORS.length]);
      const tip = document.createElementNS(NS, "title");
      tip.textContent = when(s.t) + "  " + k + ": " + num(value(s, k));
      r.appendChild(tip); svg.appendChild(r); y -= h;
    });
  });
  label(num(top), 0, pad);
  label("0", 0, H - pad);
  label(shortTime(series[0].t), left, H - 4);
  label("now", W, H - 4, "end");
}
function render(d) {
  const c = d.claude || {};
  $("state").replaceChildren(...[["backend", d.backend], ["status", d.status],
    ["in flight", d.in_flight], ["CLI processes", c.claudeProcesses],
    ["sessions", c.claudeSessions], ["version", d.version],
    ["up", since(d.uptime_s)]].filter(([, v]) => v !== undefined).map(([k, v]) => {
      const s = el("span", k + " "); s.appendChild(el("b", v)); s.append("  "); return s; }));
  const L = d.ledger;
  if (!L || L.error) {
    $("note").textContent = L ? L.error : "The usage ledger is off (usageDb is empty).";
    return;
  }
  const T = L.totals;
  $("cards").replaceChildren(...[["requests", num(T.requests)],
    ["errors", T.requests ? num(T.errors) + " (" + pct(T.errors / T.requests) + ")" : "0"],
    ["input tokens", num(T.input_uncached + T.cache_read + T.cache_write)],
    ["cache hit rate", pct(T.cache_hit_rate)], ["output tokens", num(T.output)],
    ["latency p50", ms(T.p50_ms)], ["latency p95", ms(T.p95_ms)],
    ["CLI cost", T.cost_usd === null ? "-" : "$" + T.cost_usd.toFixed(4)]].map(([k, v]) => {
      const e = el("div", null, "card"); e.appendChild(el("b", v)); e.appendChild(el("span", k));
      return e; }));
  $("note").textContent = T.requests ? (L.dropped || L.errors ? "ledger: " + L.dropped +
    " rows dropped, " + L.errors + " write errors" : "") :
    "No requests recorded in this range yet: point a client at " + location.origin + "/v1.";
  const models = L.models.map((m) => m.model).slice(0, 6);
  const other = (s, k) => k === "other" ? Object.entries(s.models)
    .filter(([m]) => !models.includes(m)).reduce((a, [, v]) => a + v.requests, 0)
    : (s.models[k] || {}).requests || 0;
  const keys = L.models.length > 6 ? models.concat(["other"]) : models;
  bars($("requests"), L.series, keys, other);
  $("legend").replaceChildren(...keys.map((k, j) => {
    const s = el("span"), i = el("i"); i.style.background = COLORS[j % COLORS.length];
    s.appendChild(i); s.append(k); return s; }));
  const tokens = (s, k) => k === "other" ? Object.entries(s.models)
    .filter(([m]) => !models.includes(m)).reduce((a, [, v]) => a + v.tokens, 0)
    : (s.models[k] || {}).tokens || 0;
  bars($("tokens"), L.series, keys, tokens);
  table($("errors"), ["kind", "requests", "share"], Object.entries(L.errors_by_kind)
    .map(([k, n]) => [k, n, pct(n / T.requests)]));
  table($("clients"), ["client", "requests", "errors", "*tokens in", "p50"], L.clients.map((g) =>
    [g.client, g.requests, g.errors, num(g.input_uncached + g.cache_read), ms(g.p50_ms)]));
  table($("models"), ["model", "requests", "errors", "*input", "*cached", "*output", "*hit rate",
    "p50", "*p95"], L.models.map((g) => [g.model, g.requests, g.errors, num(g.input_uncached),
    num(g.cache_read), num(g.output), pct(g.cache_hit_rate), ms(g.p50_ms), ms(g.p95_ms)]));
  const status = (r) => el("span", r.status + (r.error_kind ? " " + r.error_kind : ""),
    r.status >= 400 || r.error_kind ? "bad" : "");
  table($("recent"), ["time", "*route", "model", "status", "*in", "*cached", "*out",
    "*first byte", "total", "*client"], L.recent.map((r) => [
    new Date(r.ts * 1000).toLocaleTimeString(), r.route + (r.stream ? " (stream)" : ""),
    r.client_model || "(no model)", status(r), num(r.input_uncached), num(r.cache_read),
    num(r.output), ms(r.first_byte_ms), ms(r.total_ms), r.client]));
}
async function refresh() {
  try {
    const r = await fetch("dashboard/data?since=" + encodeURIComponent($("since").value),
                          {credentials: "same-origin", cache: "no-store"});
    if (!r.ok) throw new Error((await r.json()).error.message);
    render(await r.json());
  } catch (e) { $("state").textContent = "cannot load the data: " + e.message; }
}
$("since").addEventListener("change", refresh);
refresh();
setInterval(refresh, 3000);
</script></body></html>
"""


# =====================================================================================
# 11. Command line: start, config, service, usage, version, help
# =====================================================================================

def _shown(setting, value, mask=True):
    if setting.secret and mask and value:
        return "******** (set, %d characters)" % len(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value)
    return str(value)


def _setting_named(name):
    setting = resolve_setting(name)
    if setting is None:
        print("cc-proxy: unknown config key %r (see: python3 proxy.py config help)" % name,
              file=sys.stderr)
        raise SystemExit(2)
    return setting


def _config_path(path, rest):
    print(path)


def _config_help(path, rest):
    row = "%-24s %-28s %-8s %-28s %s"
    print(row % ("key", "env", "type", "default", "meaning"))
    for s in SETTINGS:
        allowed = getattr(s.parse, "allowed", None)
        kind = s.kind + ("(" + "|".join(allowed) + ")" if allowed else "")
        print(row % (s.key, s.env, kind, _shown(s, s.default, False) or '""', s.help))
    print("\nSizes: 10mb, 512kb or bytes. Durations: milliseconds. Environment overrides the file.")


def _config_list(path, rest):
    sources = {}
    config = load_config(path, sources=sources)
    for s in SETTINGS:
        print("%-24s %-32s (%s)" % (s.key, _shown(s, config[s.key]) or '""', sources[s.key]))


def _config_get(path, rest):
    if len(rest) != 1:
        raise ConfigError("usage: config get KEY")
    setting = _setting_named(rest[0])
    print(_shown(setting, load_config(path)[setting.key], mask=False))


def _config_set(path, rest):
    if len(rest) != 2:
        raise ConfigError("usage: config set KEY VALUE")
    setting, raw = _setting_named(rest[0]), rest[1]
    try:
        value = setting.parse(raw)
    except ValueError as e:
        print("cc-proxy: invalid value for %s: %s" % (setting.key, e), file=sys.stderr)
        return 2
    data = read_config_file(path)
    for alias in (setting.env, setting.key):
        data.pop(alias, None)
    data[setting.key] = raw.strip() if setting.kind in ("size", "list") else value
    write_json_atomic(path, data)
    print("%s = %s  (%s)" % (setting.key, _shown(setting, value), path))
    if setting.env in os.environ:
        print("note: the environment variable %s overrides this value" % setting.env)


def _config_reset(path, rest):
    if len(rest) != 1:
        raise ConfigError("usage: config reset KEY")
    setting = _setting_named(rest[0])
    data = read_config_file(path)
    if any(data.pop(alias, None) is not None for alias in (setting.key, setting.env)):
        write_json_atomic(path, data)
    print("%s reset to its default (%s)" % (setting.key, _shown(setting, setting.default) or '""'))


CONFIG_ACTIONS = {"path": _config_path, "help": _config_help, "list": _config_list,
                  "get": _config_get, "set": _config_set, "reset": _config_reset}


def command_config(args):
    """config set/get/list/reset/path/help: edit the config file, validating every value."""
    path = os.path.abspath(args.config or default_config_path())
    try:
        return CONFIG_ACTIONS[args.action](path, args.rest) or 0
    except ConfigError as e:
        print("cc-proxy: %s" % e, file=sys.stderr)
        return 2


# ---- service install: systemd user unit (Linux), LaunchAgent (macOS) -----------------

SERVICE_NAME = "cc-proxy"
LAUNCHD_LABEL = "com.cc-proxy"


def systemd_quote(arg):
    """One ExecStart argument, quoted as systemd.syntax(7) reads it (and % escaped for
    specifiers)."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return '"%s"' % escaped


def service_command_line(config_path):
    return [sys.executable, os.path.abspath(__file__), "start",
            "--config", os.path.abspath(config_path)]


def systemd_unit(config_path):
    return "\n".join([
        "[Unit]",
        "Description=cc-proxy: OpenAI/Anthropic API in front of Command Code or Claude Code",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_quote(a) for a in service_command_line(config_path)),
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=45",
        "KillMode=mixed",
        "Environment=PYTHONUNBUFFERED=1",
        "NoNewPrivileges=yes",
        "UMask=0077",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "",
        "[Install]",
        "WantedBy=default.target",
        ""])


def launchd_plist(config_path):
    logs = os.path.expanduser("~/Library/Logs/cc-proxy")
    return {"Label": LAUNCHD_LABEL, "ProgramArguments": service_command_line(config_path),
            "RunAtLoad": True, "KeepAlive": True,
            "WorkingDirectory": os.path.dirname(os.path.abspath(__file__)),
            "StandardOutPath": os.path.join(logs, "cc-proxy.out.log"),
            "StandardErrorPath": os.path.join(logs, "cc-proxy.err.log"),
            "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"}}


def _run_tool(argv):
    """Run systemctl/launchctl; their own error is shown. Returns the exit code."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=60)
    except FileNotFoundError:
        print("cc-proxy: %s not found; is this a %s system? Run `python3 proxy.py start` instead."
              % (argv[0], "systemd" if argv[0] == "systemctl" else "launchd"), file=sys.stderr)
        return 127
    except subprocess.TimeoutExpired:
        print("cc-proxy: %s did not answer within 60 s" % " ".join(argv), file=sys.stderr)
        return 1
    output = done.stdout.decode("utf-8", "replace").rstrip()
    if output:
        print(output, file=sys.stderr if done.returncode else sys.stdout)
    if done.returncode:
        print("cc-proxy: `%s` failed (exit %d)" % (" ".join(argv), done.returncode),
              file=sys.stderr)
    return done.returncode


def systemd_service(action, config_path):
    unit_path = os.path.expanduser("~/.config/systemd/user/%s.service" % SERVICE_NAME)
    systemctl = ["systemctl", "--user"]
    if action == "install":
        os.makedirs(os.path.dirname(unit_path), exist_ok=True)
        with open(unit_path, "w", encoding="utf-8") as f:
            f.write(systemd_unit(config_path))
        print("wrote %s" % unit_path)
        code = (_run_tool(systemctl + ["daemon-reload"])
                or _run_tool(systemctl + ["enable", SERVICE_NAME]))
        if code == 0:
            print("installed. Start it: python3 proxy.py service start\n"
                  "To keep it running without a login session: loginctl enable-linger %s"
                  % os.environ.get("USER", "$USER"))
        return 1 if code else 0
    if action == "uninstall":
        _run_tool(systemctl + ["disable", "--now", SERVICE_NAME])
        if os.path.exists(unit_path):
            os.remove(unit_path)
            print("removed %s" % unit_path)
        return 1 if _run_tool(systemctl + ["daemon-reload"]) else 0
    if not os.path.exists(unit_path) and action != "status":
        return _not_installed()
    return 1 if _run_tool(systemctl + [action, SERVICE_NAME]) else 0


def _not_installed():
    print("cc-proxy: the service is not installed (python3 proxy.py service install)",
          file=sys.stderr)
    return 1


def launchd_service(action, config_path):
    import plistlib
    plist_path = os.path.expanduser("~/Library/LaunchAgents/%s.plist" % LAUNCHD_LABEL)
    domain = "gui/%d" % os.getuid()
    target = "%s/%s" % (domain, LAUNCHD_LABEL)
    if action == "install":
        plist = launchd_plist(config_path)
        os.makedirs(os.path.dirname(plist["StandardOutPath"]), exist_ok=True)
        os.makedirs(os.path.dirname(plist_path), exist_ok=True)
        with open(plist_path, "wb") as f:
            plistlib.dump(plist, f)
        print("wrote %s" % plist_path)
        return 1 if _run_tool(["launchctl", "bootstrap", domain, plist_path]) else 0
    if action == "uninstall":
        _run_tool(["launchctl", "bootout", target])
        if os.path.exists(plist_path):
            os.remove(plist_path)
            print("removed %s" % plist_path)
        return 0
    if not os.path.exists(plist_path):
        return _not_installed()
    if action == "status":
        return 1 if _run_tool(["launchctl", "print", target]) else 0
    if action == "stop":  # KeepAlive would restart a killed job: take it out of launchd instead
        return 1 if _run_tool(["launchctl", "bootout", target]) else 0
    loaded = shutil.which("launchctl") and subprocess.run(
        ["launchctl", "print", target], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL).returncode == 0
    if not loaded:
        return 1 if _run_tool(["launchctl", "bootstrap", domain, plist_path]) else 0
    kick = ["launchctl", "kickstart"] + (["-k"] if action == "restart" else [])
    return 1 if _run_tool(kick + [target]) else 0


SERVICE_MANAGERS = {"linux": systemd_service, "darwin": launchd_service}


def command_service(args):
    platform = "linux" if args.platform.startswith("linux") else args.platform
    manager = SERVICE_MANAGERS.get(platform)
    if manager is None:
        print("cc-proxy: no service manager support on %s; run `python3 proxy.py start` (e.g. from "
              "your system's task scheduler)" % platform, file=sys.stderr)
        return 1
    return manager(args.action, os.path.abspath(args.config or default_config_path()))


def command_start(args):
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("backend", args.backend))
                 if v is not None}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print("cc-proxy: %s" % e, file=sys.stderr)
        return 2
    setup_logging(config)
    if config["backend"] == "claude-code":
        ensure_api_key(config)
    try:
        server = make_server(config)
    except OSError as e:
        print("cc-proxy: cannot listen on %s:%s: %s"
              % (config["host"], config["port"], e.strerror or e), file=sys.stderr)
        return 1
    except ConfigError as e:
        print("cc-proxy: %s" % e, file=sys.stderr)
        return 2
    release_free_memory()
    host, port = server.server_address[:2]
    log.info("cc-proxy %s listening on http://%s:%s backend=%s config=%s", __version__,
             host if ":" not in host else "[%s]" % host, port, config["backend"],
             config["configPath"])
    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.25)
    # stop accepting, let requests in flight finish (up to a grace period), then stop the backend
    server.socket.close()
    if server.pipeline.inflight.count:
        log.info("shutting down: waiting up to %d s for %d request(s) in flight",
                 SHUTDOWN_GRACE_SECONDS, server.pipeline.inflight.count)
    server.connections.drain(server.pipeline.inflight, SHUTDOWN_GRACE_SECONDS)
    server.server_close()
    log.info("stopped")
    return 0


SHUTDOWN_GRACE_SECONDS = 30


def release_free_memory():
    """Hand the heap left over from compiling this file back to the OS (glibc only; ~5 MB idle
    RSS)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, ImportError):
        pass


USAGE_COLUMNS = (("requests", "requests", "%d"), ("errors", "errors", "%d"),
                 ("input_uncached", "input", "%d"), ("cache_read", "cached", "%d"),
                 ("cache_write", "cache write", "%d"), ("output", "output", "%d"),
                 ("cache_hit_rate", "hit rate", "%.1f%%"), ("p50_ms", "p50 ms", "%.0f"),
                 ("p95_ms", "p95 ms", "%.0f"), ("cost_usd", "cost $", "%.4f"))


def _usage_cell(value, fmt):
    if value is None:
        return "-"
    return fmt % (value * 100 if fmt.endswith("%%") else value)


def command_usage(args):
    """usage [--since 7d] [--by day|model|client|key] [--json]: the ledger, summed."""
    try:
        config = load_config(args.config)
        since = parse_since(args.since)
    except (ConfigError, ValueError) as e:
        print("cc-proxy: %s" % e, file=sys.stderr)
        return 2
    path = ledger_path(config)
    if path is None:
        print("cc-proxy: the usage ledger is off (usageDb is empty)", file=sys.stderr)
        return 1
    try:
        rows = ledger_rows(path, since) if os.path.exists(path) else []
    except sqlite3.Error as e:
        print("cc-proxy: cannot read %s: %s" % (path, e), file=sys.stderr)
        return 1
    groups, totals = usage_groups(rows, args.by), usage_summary(rows)
    if args.json:
        print(json.dumps({"since": since, "by": args.by, "groups": groups, "totals": totals},
                         indent=1))
        return 0
    width = max([len(args.by), 5] + [len(str(g[args.by])) for g in groups])
    print("%-*s " % (width, args.by) + " ".join("%12s" % label for _, label, _ in USAGE_COLUMNS))
    for name, row in [(g[args.by], g) for g in groups] + [("total", totals)]:
        print("%-*s " % (width, name) + " ".join(
            "%12s" % _usage_cell(row[key], fmt) for key, _, fmt in USAGE_COLUMNS))
    if not rows:
        print("(no requests recorded since %s in %s)"
              % (time.strftime("%Y-%m-%d %H:%M", time.localtime(since)), path))
    return 0


def command_version(args):
    print("cc-proxy %s (Python %s)" % (__version__, sys.version.split()[0]))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="proxy.py", description="cc-proxy: OpenAI/Anthropic API "
                                     "in front of Command Code or the Claude Code CLI")
    commands = parser.add_subparsers(dest="command",
                                     metavar="{start,config,service,usage,version,help}")
    start = commands.add_parser("start", help="run the server in the foreground (the default)")
    start.add_argument("--config", help="config file (default: $CC_PROXY_CONFIG or config.json "
                       "beside proxy.py)")
    start.add_argument("--host")
    start.add_argument("--port", type=int)
    start.add_argument("--backend", choices=("commandcode", "claude-code"))
    start.set_defaults(func=command_start)
    config = commands.add_parser("config", help="show or edit the config file: "
                                 "set/get/list/reset/path/help")
    config.add_argument("action", choices=tuple(CONFIG_ACTIONS))
    config.add_argument("rest", nargs="*", metavar="KEY [VALUE]")
    config.add_argument("--config", help="config file to edit")
    config.set_defaults(func=command_config)
    service = commands.add_parser("service", help="systemd user unit / LaunchAgent: install, "
                                  "uninstall, start, stop, restart, status")
    service.add_argument("action", choices=("install", "uninstall", "start", "stop", "restart",
                                            "status"))
    service.add_argument("--config", help="config file the service runs with")
    service.set_defaults(func=command_service)
    usage = commands.add_parser("usage", help="requests, tokens, cache hits, errors and latency "
                                "from the usage ledger")
    usage.add_argument("--since", default="7d", help="how far back: 24h, 7d, 2w (default 7d)")
    usage.add_argument("--by", choices=tuple(USAGE_GROUPS), default="day")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.add_argument("--config", help="config file whose usageDb to read")
    usage.set_defaults(func=command_usage)
    commands.add_parser("version", help="print the version").set_defaults(func=command_version)
    commands.add_parser("help", help="show this help").set_defaults(
        func=lambda a: parser.print_help() or 0)
    return parser


def main(argv=None, platform=sys.platform):
    """The command line; `platform` picks the service manager (systemd on linux, launchd on
    darwin)."""
    argv = list(sys.argv[1:] if argv is None else argv) or ["start"]
    # argparse cannot take an option between nargs="*" positionals (config set --config F
    # KEY VALUE): move "--config F" (or --config=F) right behind the command word.
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--config" and i + 1 < len(argv):
            argv[1:1] = [argv.pop(i), argv.pop(i)]
            break
        if arg.startswith("--config="):
            argv.insert(1, argv.pop(i))
            break
    try:
        args = build_parser().parse_args(argv)
        args.platform = platform
        status = args.func(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader went away (`config list | head -3`): stop quietly, as `ls | head` does, and
        # keep Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1


if __name__ == "__main__":
    sys.exit(main())
