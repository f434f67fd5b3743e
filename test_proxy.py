"""Black-box tests for cc-proxy.

Every test drives the proxy through real sockets on 127.0.0.1: the proxy is started with
`proxy.make_server(config)` and talks to a fake Command Code upstream (`FakeCommandCode`,
below) that speaks the NDJSON stream of `POST /alpha/generate`, replays per-test scripts and
records every request it receives. Nothing here touches the internet.

One harness serves every TestCase: `fake_upstream` (the fake Command Code, whose Reset/HangUp
replies are its fault modes), `fake_claude_launcher` (the fake `claude`), `start_proxy`
(the in-process proxy), `http_request` / `raw_request` (the HTTP client, both answering a
`Response` with its SSE views built on `parse_sse`) and `wait_for` (the one wait helper).

Run: python3 -m unittest -v
"""

import http.client
import json
import logging
import os
import random
import re
import select
import socket
import ssl
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import uuid
import concurrent.futures
import gc
import tracemalloc
from unittest import mock
import atexit
import base64
import contextlib
import io
import plistlib
import shlex
import shutil
import signal
import stat
import subprocess
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import proxy  # noqa: E402  (the module under test)

# In-process servers are not given a log handler (that is `proxy.py start`'s job); keep
# expected error records off the test output instead of Python's last-resort stderr handler.
logging.getLogger().addHandler(logging.NullHandler())


# ---------------------------------------------------------------------------------------
# Facts taken from the capture of the official CLI 1.64.0
# (testdata/captures/commandcode/01_text_default_model.jsonl); TestCaptureFixture checks
# them against that file.
# ---------------------------------------------------------------------------------------

CAPTURE_FILE = os.path.join(HERE, "testdata", "captures", "commandcode", "01_text_default_model.jsonl")
# A test CA and a certificate it signed for 127.0.0.1 (and its key), valid until 2126.
TLS_CA = os.path.join(HERE, "testdata", "tls", "ca.pem")
TLS_UPSTREAM_CERT = os.path.join(HERE, "testdata", "tls", "upstream.pem")
# Headers the CLI itself sets on /alpha/generate, in wire order (undici's own defaults such
# as accept / accept-encoding / host / content-length are left out).
CAPTURED_GENERATE_HEADER_ORDER = [
    "content-type", "user-agent", "x-command-code-version", "x-cli-environment",
    "x-project-slug", "x-taste-learning", "x-session-id", "authorization", "traceparent",
]
CAPTURED_ENVELOPE_KEYS = ["config", "memory", "taste", "skills", "permissionMode", "threadId",
                          "params"]
CAPTURED_PARAMS_ORDER = ["model", "messages", "tools", "system", "max_tokens", "stream",
                         "temperature", "reasoning_effort"]

KEY = "user_TESTKEY"
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
IMAGE_MODELS = ["claude-sonnet-5", "claude-sonnet-4-6", "claude-opus-5", "claude-opus-4-7",
                "gpt-5.5", "gpt-5.4", "moonshotai/Kimi-K3", "deepseek/deepseek-v4-flash-vision-exp",
                "deepseek/deepseek-v4.1-flash", "claude-haiku-4-5-20251001", "gpt-6-sol"]
PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJ"
           "RU5ErkJggg==")
TIMEOUT = 15  # every client socket read is bounded by this
TOTAL_TIMEOUT = 30  # and every response body as a whole


def unique_key():
    return "user_test_" + uuid.uuid4().hex[:12]


def wait_for(predicate, timeout=5.0, step=0.01):
    """Poll predicate() until it is truthy or `timeout` s pass -> its last value (the one wait
    helper: every other wait in this file is built on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


# ---------------------------------------------------------------------------------------
# NDJSON stream builders (AI SDK v6 parts, as in commandcode.md §6 / served_streams.ndjson)
# ---------------------------------------------------------------------------------------

def usage(inp=7400, cache_read=7168, cache_write=200, out=12, reasoning=0):
    return {"inputTokens": inp,
            "inputTokenDetails": {"noCacheTokens": inp - cache_read - cache_write,
                                  "cacheReadTokens": cache_read, "cacheWriteTokens": cache_write},
            "outputTokens": out,
            "outputTokenDetails": {"textTokens": out - reasoning, "reasoningTokens": reasoning},
            "totalTokens": inp + out, "reasoningTokens": reasoning, "cachedInputTokens": cache_read}


START = [{"type": "start"}, {"type": "start-step", "request": {}, "warnings": []}]


def text_parts(*chunks, part_id="txt-0"):
    return ([{"type": "text-start", "id": part_id}]
            + [{"type": "text-delta", "id": part_id, "text": c} for c in chunks]
            + [{"type": "text-end", "id": part_id}])


def reasoning_parts(*chunks, part_id="rs-0"):
    return ([{"type": "reasoning-start", "id": part_id}]
            + [{"type": "reasoning-delta", "id": part_id, "text": c} for c in chunks]
            + [{"type": "reasoning-end", "id": part_id}])


def tool_parts(call_id, name, args, fragments=None, streamed=True):
    """tool-input-start/delta*/end then the complete tool-call; streamed=False: tool-call only."""
    final = {"type": "tool-call", "toolCallId": call_id, "toolName": name, "input": args}
    if not streamed:
        return [final]
    text = json.dumps(args)
    if fragments is None:
        cut = max(1, len(text) // 2)
        fragments = [text[:cut], text[cut:]]
    assert "".join(fragments) == text
    return ([{"type": "tool-input-start", "id": call_id, "toolName": name}]
            + [{"type": "tool-input-delta", "id": call_id, "delta": f} for f in fragments]
            + [{"type": "tool-input-end", "id": call_id}, final])


def finish_parts(reason="stop", raw="end_turn", **usage_kw):
    u = usage(**usage_kw)
    return [{"type": "finish-step", "finishReason": reason, "rawFinishReason": raw, "usage": u,
             "providerMetadata": {}, "response": {"id": "resp_fake", "modelId": "x",
                                                  "timestamp": "2026-11-21T00:00:00.000Z"}},
            {"type": "finish", "finishReason": reason, "rawFinishReason": raw, "totalUsage": u}]


def stream(*parts, reason="stop", raw="end_turn", **usage_kw):
    lines = list(START)
    for p in parts:
        lines.extend(p if isinstance(p, list) else [p])
    return lines + finish_parts(reason, raw, **usage_kw)


def error_event(message, status=None, retryable=None):
    err = {"message": message}
    if status is not None:
        err["statusCode"] = status
    if retryable is not None:
        err["isRetryable"] = retryable
    return {"type": "error", "error": err}


# ---------------------------------------------------------------------------------------
# Fake Command Code upstream
# ---------------------------------------------------------------------------------------

class Sleep:
    """Pause before the next line (the connection is watched: a peer close ends the reply)."""

    def __init__(self, seconds):
        self.seconds = seconds


Stall = Sleep  # a long Sleep; named for readability in idle-timeout tests


class Reset:
    """Abort the connection with a TCP RST at this point. As a whole reply (in place of a Reply):
    read the request, then reset before a single response byte."""


class HangUp:
    """As a whole reply: read the request, then close the connection (FIN) before a single
    response byte."""


class Raw:
    """Write these bytes verbatim (no newline added)."""

    def __init__(self, data):
        self.data = data if isinstance(data, bytes) else data.encode("utf-8")


class Reply:
    """One answer to POST /alpha/generate.

    lines: dicts (one JSON line each), str (a raw line, newline added), Sleep, Reset, Raw.
    body: for error replies, a dict/str sent with Content-Length instead of a stream."""

    def __init__(self, status=200, lines=(), headers=(), body=None, content_type=None,
                 framing="chunked"):
        self.status = status
        self.lines = list(lines)
        self.headers = list(headers.items() if isinstance(headers, dict) else headers)
        self.body = body
        self.content_type = content_type
        self.framing = framing


def ok(*parts, **kw):
    return Reply(200, stream(*parts, **kw))


def http_error(status, body, headers=()):
    return Reply(status, body=body, headers=headers)


def dripped(deltas, seconds):
    """An answer of `deltas` text deltas "x", `seconds` apart: a request that stays in flight a while."""
    parts = text_parts(*["x"] * deltas)
    paced = [parts[0]]
    for part in parts[1:]:
        paced += [Sleep(seconds), part]
    return Reply(200, stream(paced))


class _PeerGone(Exception):
    pass


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-commandcode"

    def log_message(self, *args):
        pass

    def setup(self):
        self.timeout = self.server.fake.idle_timeout   # None: keep-alive connections stay open
        super().setup()

    # -- request intake -----------------------------------------------------------------

    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _record(self):
        raw = self._read_body()
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            body = None
        rec = {"method": self.command, "path": self.path, "headers": list(self.headers.items()),
               "raw": raw, "body": body, "client_port": self.client_address[1],
               "received_at": time.monotonic(), "disconnected_at": None, "completed": False}
        self.server.fake._add(rec)
        return rec

    def do_GET(self):
        rec = self._record()
        if self.path.split("?")[0] == "/provider/v1/models":
            time.sleep(self.server.fake.model_list_delay)
            self._send_json(200, self.server.fake.provider_models)
        elif self.path == "/command-code/latest":  # the npm registry's answer for the CLI package
            self._send_json(*self.server.fake.registry_reply)
        else:
            self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})
        rec["completed"] = True

    def do_POST(self):
        rec = self._record()
        if self.path.split("?")[0] != "/alpha/generate":
            self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})
            return
        reply = self.server.fake._next_reply()
        if isinstance(reply, (Reset, HangUp)):
            self._abort(rst=isinstance(reply, Reset))
            return
        if reply.body is not None:
            body = reply.body if isinstance(reply.body, (bytes, str)) else json.dumps(reply.body)
            self._send_json(reply.status, body, reply.headers)
            rec["completed"] = True
            return
        try:
            self._stream(reply, rec)
            rec["completed"] = True
        except _PeerGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            if rec["disconnected_at"] is None:
                rec["disconnected_at"] = time.monotonic()
            self.close_connection = True

    # -- reply writers --------------------------------------------------------------------

    def _send_json(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else (
            body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode("utf-8"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _write(self, data, chunked):
        if not data:
            return
        if chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)
        self.wfile.flush()

    def _wait(self, seconds, rec):
        """Sleep, but notice at once when the peer (the proxy) closes the connection."""
        deadline = time.monotonic() + seconds
        sock = self.connection
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.server.fake.stopping.is_set():
                return
            readable, _, _ = select.select([sock], [], [], min(remaining, 0.02))
            if readable:
                try:   # the TCP bytes themselves, under TLS too (an SSLSocket cannot peek)
                    peek = socket.socket.recv(sock, 1, socket.MSG_PEEK)
                except OSError:
                    peek = b""
                if not peek:
                    rec["disconnected_at"] = time.monotonic()
                    raise _PeerGone()
                time.sleep(min(remaining, 0.02))

    def _abort(self, rst):
        """Drop the connection: with a TCP RST (rst=True) or a plain close."""
        if rst:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.connection.close()
        self.close_connection = True

    def _stream(self, reply, rec):
        chunked = reply.framing == "chunked"
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type or "application/x-ndjson")
        for k, v in reply.headers:
            self.send_header(k, v)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()
        for item in reply.lines:
            if isinstance(item, Sleep):
                self._wait(item.seconds, rec)
            elif isinstance(item, Reset):
                self.wfile.flush()
                self._abort(rst=True)
                raise _PeerGone()
            elif isinstance(item, Raw):
                self._write(item.data, chunked)
            elif isinstance(item, str):
                self._write((item + "\n").encode("utf-8"), chunked)
            else:
                self._write((json.dumps(item) + "\n").encode("utf-8"), chunked)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024   # a burst of 200 connections is not dropped and retried

    def handle_error(self, request, client_address):
        pass  # resets and broken pipes are part of the tests


class FakeCommandCode:
    """A loopback stand-in for api.commandcode.ai that records everything it receives."""

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.requests = []
        self.replies = deque()
        self.default_reply = lambda: ok(text_parts("Hello", " world"))
        self.model_list_delay = 0   # seconds before /provider/v1/models answers
        self.idle_timeout = None    # seconds after which the fake closes an idle connection
        self.provider_models = {"object": "list", "data": [
            {"id": "fake/provider-model-x", "name": "Fake X", "context_length": 100000,
             "supported_endpoints": ["/v1/chat/completions"]},
            {"id": "claude-sonnet-5", "name": "Claude Sonnet 5", "context_length": 1000000,
             "supported_endpoints": ["/v1/messages"]}]}
        self.registry_reply = (200, {"name": "command-code", "version": "1.70.2"})
        self.tls = False   # serve HTTPS with testdata/tls/upstream.pem (trusted via ca.pem)
        self.server = _UpstreamServer(("127.0.0.1", 0), _UpstreamHandler)
        self.server.fake = self
        self.thread = None

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http",
                                      self.server.server_address[1])

    def start(self):
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(TLS_UPSTREAM_CERT)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.requests = []
            self.replies = deque()

    def script(self, *replies):
        with self.lock:
            self.replies = deque(replies)

    def _next_reply(self):
        with self.lock:
            if self.replies:
                return self.replies.popleft()
        return self.default_reply()

    def _add(self, rec):
        with self.changed:
            self.requests.append(rec)
            self.changed.notify_all()

    def generates(self):
        with self.lock:
            return [r for r in self.requests if r["path"].split("?")[0] == "/alpha/generate"]


def fake_upstream(cleanup, **attrs):
    """A started FakeCommandCode (attrs such as default_reply set first), stopped through
    `cleanup` (a test's addCleanup or a class's addClassCleanup)."""
    fake = FakeCommandCode()
    for name, value in attrs.items():
        setattr(fake, name, value)
    fake.start()
    cleanup(fake.stop)
    return fake


def header_map(rec):
    return {k.lower(): v for k, v in rec["headers"]}


# ---------------------------------------------------------------------------------------
# Client side helpers
# ---------------------------------------------------------------------------------------

def parse_sse(data):
    """Raw SSE bytes -> ([(event, data)], [comment lines])."""
    text = data.decode("utf-8").replace("\r\n", "\n")
    events, comments = [], []
    for block in text.split("\n\n"):
        name, datas = None, []
        for line in block.split("\n"):
            if not line:
                continue
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                value = line[5:]
                datas.append(value[1:] if value.startswith(" ") else value)
        if name is not None or datas:
            events.append((name, "\n".join(datas)))
    return events, comments


FRONTS = ("chat", "messages", "responses")
PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}


class Response:
    """One HTTP answer as the client saw it, with thin views for each protocol on top."""

    def __init__(self, status, headers, data, elapsed, head_lines=(), status_line=None):
        self.status = status
        self.headers = headers  # an http.client.HTTPMessage: .get() is case-insensitive
        self.data = data
        self.elapsed = elapsed
        self.head_lines = list(head_lines)  # raw header lines, for raw_request's answers
        self.status_line = status_line
        self.closed = None  # raw_request(..., wait_for_close=True): the server closed afterwards

    def json(self):
        return json.loads(self.data.decode("utf-8"))

    def sse(self):
        return parse_sse(self.data)[0]

    def comments(self):
        return parse_sse(self.data)[1]

    def chunks(self):
        """Chat Completions chunks (the JSON of every data line except [DONE])."""
        return [json.loads(d) for _, d in self.sse() if d.strip() and d.strip() != "[DONE]"]

    def typed_events(self):
        """(event name, parsed data) for Anthropic / Responses streams."""
        out = []
        for name, d in self.sse():
            if d.strip():
                out.append((name, json.loads(d)))
        return out

    def done(self):
        return any(d.strip() == "[DONE]" for _, d in self.sse())

    def stream_text(self, front):
        """The answer text a client sees in a stream of `front` (chat, messages, responses)."""
        if front == "chat":
            return chunk_content(self.chunks())
        out = ""
        for name, data in self.typed_events():
            if front == "messages":
                if (data.get("type") == "content_block_delta"
                        and data["delta"].get("type") == "text_delta"):
                    out += data["delta"]["text"]
            elif name == "response.output_text.delta":
                out += data["delta"]
        return out

    def body_text(self, front):
        """The answer text of a non-streaming body of `front`."""
        body = self.json()
        if front == "chat":
            return body["choices"][0]["message"]["content"] or ""
        if front == "messages":
            return "".join(b.get("text", "") for b in body["content"] if b.get("type") == "text")
        return body["output_text"]

    def header(self, name):
        return self.headers.get(name)

    def header_values(self, name):
        return self.headers.get_all(name) or []

    def __repr__(self):
        return "<Response %s %r>" % (self.status, self.data[:600])


def http_request(port, method, path, body=None, headers=None, timeout=TIMEOUT, conn=None):
    """The one HTTP client: a dict/list body is sent as JSON, str/bytes as they are; `conn`
    (an http.client.HTTPConnection) reuses a keep-alive connection and leaves it open."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.monotonic()
    try:
        h = {}
        if body is not None:
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode("utf-8")
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        # A per-recv timeout is not enough: keep-alive comments could keep a broken stream
        # open forever, so the whole body must also arrive within a total deadline.
        parts = []
        while True:
            if time.monotonic() - t0 > TOTAL_TIMEOUT:
                raise AssertionError("response to %s %s not finished within %ss; got %r"
                                     % (method, path, TOTAL_TIMEOUT, b"".join(parts)[-300:]))
            piece = resp.read1(65536)
            if not piece:
                break
            parts.append(piece)
        parts.append(resp.read())  # b"", but marks the answer complete for a reused `conn`
        return Response(resp.status, resp.headers, b"".join(parts), time.monotonic() - t0)
    finally:
        if own:
            conn.close()


def free_port():
    """A loopback port nothing listens on (connections to it are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def raw_head(front, length=None, key=KEY, extra=""):
    """Request head bytes for a POST to a front end (the body is the caller's business)."""
    head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Authorization: Bearer %s\r\n" % (PATHS[front], key))
    if front == "messages":
        head += "anthropic-version: 2023-06-01\r\n"
    if length is not None:
        head += "Content-Length: %d\r\n" % length
    return (head + extra + "\r\n").encode("latin-1")


def send_request(port, front, body, key=KEY, extra="", timeout=TIMEOUT, sock=None):
    """POST a JSON body to a front end on a raw socket and return the socket unread (for tests
    that hang up, or stop reading, part way)."""
    data = json.dumps(body).encode()
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(raw_head(front, len(data), key, extra) + data)
    return sock


def read_until(sock, marker, timeout=TIMEOUT):
    """Raw bytes from sock until `marker` has arrived (or the peer closed, or timeout)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def read_response(sock, deadline, pending=b""):
    """One HTTP response read from a raw socket (after the bytes already read, `pending`):
    chunked, Content-Length or read-to-close -> Response; AssertionError past the deadline."""
    t0 = time.monotonic()
    buf = pending
    status = 100
    while 100 <= status < 200:   # interim responses (100 Continue) come before the real one
        while b"\r\n\r\n" not in buf:
            if time.monotonic() > deadline:
                raise AssertionError("no response head before the deadline: %r" % buf[:300])
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            piece = sock.recv(65536)
            if not piece:
                raise AssertionError("connection closed without a response (dropped): %r"
                                     % buf[:300])
            buf += piece
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"^HTTP/\d\.\d (\d{3})( |$)", lines[0])
        if not m:
            raise AssertionError("not an HTTP status line: %r" % lines[0])
        status = int(m.group(1))
    headers = http.client.HTTPMessage()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name] = value.strip()

    def answer(data):
        return Response(status, headers, data, time.monotonic() - t0, lines[1:], lines[0])

    body = buf
    length = next((int(v) for v in headers.get_all("content-length") or []), None)
    chunked = any("chunked" in v.lower() for v in headers.get_all("transfer-encoding") or [])

    def more():
        if time.monotonic() > deadline:
            raise AssertionError("response body not complete before the deadline")
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        return sock.recv(65536)

    if length is not None:
        while len(body) < length:
            piece = more()
            if not piece:
                break
            body += piece
        return answer(body[:length])
    if chunked:
        while not body.endswith(b"0\r\n\r\n"):
            piece = more()
            if not piece:
                break
            body += piece
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        return answer(out)
    while True:
        piece = more()
        if not piece:
            return answer(body)
        body += piece


def raw_request(port, raw, timeout=5, wait_for_close=False):
    """Send raw bytes (a malformed request, say) on a new connection and read one answer with
    read_response. wait_for_close: also look (for up to 2 s) whether the server then closed the
    connection -> Response.closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        resp = read_response(s, time.monotonic() + timeout)
        if wait_for_close:
            s.settimeout(2)
            try:
                resp.closed = s.recv(1) == b""
            except ConnectionResetError:
                resp.closed = True
            except socket.timeout:
                resp.closed = False
    return resp


# ---------------------------------------------------------------------------------------
# The proxy under test, in process
# ---------------------------------------------------------------------------------------

NO_CONFIG_FILE = "/nonexistent/cc-proxy-test-config.json"


def proxy_config(**overrides):
    """Settings from the defaults and `overrides` only: no config file, no environment."""
    return proxy.load_config(NO_CONFIG_FILE, {}, overrides)


def start_proxy(config):
    """The one way to run the proxy in process: proxy.make_server(config) served on a thread
    -> (server, stop); the caller registers stop() as its cleanup."""
    server = proxy.make_server(config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(10)
    return server, stop


BASE_OVERRIDES = {
    "port": 0, "host": "127.0.0.1", "ccVersion": "1.64.0", "useProviderModels": False,
    "usageDb": "",   # the ledger's own tests give it a database; the others keep none
    "logLevel": "error", "projectSlug": "my-app", "upstreamRetries": 2,
    "streamIdleTimeoutMs": 10000, "nonStreamIdleTimeoutMs": 10000, "keepAliveIntervalMs": 15000,
    "upstreamRetryBackoffMs": 20,   # retries are tested by count and outcome, not by their spacing
}


class ProxyTestCase(unittest.TestCase):
    """Starts a fake upstream and a proxy per test class; resets the upstream per test."""

    proxy_overrides = {}
    api_base = None  # None = the fake upstream
    upstream_tls = False

    @classmethod
    def setUpClass(cls):
        cls.upstream = fake_upstream(cls.addClassCleanup, tls=cls.upstream_tls)
        overrides = dict(BASE_OVERRIDES)
        overrides["apiBase"] = cls.api_base or cls.upstream.url
        overrides.update(cls.proxy_overrides)
        cls.config = proxy_config(**overrides)
        cls.server, cls.stop_proxy = start_proxy(cls.config)
        cls.port = cls.server.server_address[1]

    @classmethod
    def tearDownClass(cls):
        cls.stop_proxy()  # the upstream is stopped by its class cleanup, after this

    def setUp(self):
        self.upstream.reset()

    # -- generic requests -----------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, key=KEY, key_header="authorization",
                timeout=TIMEOUT):
        h = {}
        if key is not None:
            if key_header == "authorization":
                h["Authorization"] = "Bearer " + key
            else:
                h[key_header] = key
        h.update(headers or {})
        return http_request(self.port, method, path, body, h, timeout)

    def chat(self, messages=None, stream=False, model="claude-sonnet-5", key=KEY, headers=None,
             **extra):
        body = {"model": model,
                "messages": messages or [{"role": "user", "content": "Say hello"}],
                "stream": stream}
        body.update(extra)
        return self.request("POST", "/v1/chat/completions", body, headers, key)

    def messages(self, messages=None, stream=False, model="claude-sonnet-5", key=KEY,
                 headers=None, path="/v1/messages", key_header="x-api-key", **extra):
        body = {"model": model, "max_tokens": 1024,
                "messages": messages or [{"role": "user", "content": "Say hello"}]}
        if stream:
            body["stream"] = True
        body.update(extra)
        h = {"anthropic-version": "2023-06-01"}
        h.update(headers or {})
        return self.request("POST", path, body, h, key, key_header=key_header)

    def responses(self, input="Say hello", stream=False, model="claude-sonnet-5", key=KEY,
                  headers=None, **extra):
        body = {"model": model, "input": input}
        if stream:
            body["stream"] = True
        body.update(extra)
        return self.request("POST", "/v1/responses", body, headers, key)

    # -- upstream inspection --------------------------------------------------------------

    def last_generate(self):
        gens = wait_for(self.upstream.generates, 2.0)
        self.assertTrue(gens, "the proxy made no POST /alpha/generate")
        return gens[-1]

    def upstream_params(self):
        return self.last_generate()["body"]["params"]

    def system_text(self, params):
        system = params.get("system")
        if isinstance(system, str):
            return system
        self.assertIsInstance(system, list)
        return "".join(p.get("text", "") for p in system)

    # -- assertions -----------------------------------------------------------------------

    def assertOpenAIError(self, resp, status):
        self.assertEqual(resp.status, status, resp)
        body = resp.json()
        self.assertIsInstance(body.get("error"), dict, body)
        self.assertIsInstance(body["error"].get("message"), str)
        self.assertTrue(body["error"]["message"])
        self.assertIn("type", body["error"])
        self.assertIn("code", body["error"])
        return body["error"]

    def assertAnthropicError(self, resp, status, kind):
        self.assertEqual(resp.status, status, resp)
        body = resp.json()
        self.assertEqual(body.get("type"), "error", body)
        self.assertEqual(body["error"]["type"], kind, body)
        self.assertIsInstance(body["error"]["message"], str)
        return body["error"]

    def assertDisconnectClosesUpstream(self, front, body):
        """A client that hangs up mid-stream: the upstream connection is closed within 3 s."""
        self.upstream.script(Reply(200, START + text_parts("partial")[:2] + [Stall(10)]
                                   + finish_parts()))
        s = send_request(self.port, front, body)
        buf = read_until(s, b"partial")
        self.assertIn(b"partial", buf)
        closed_at = time.monotonic()
        s.close()
        rec = self.upstream.generates()[0]
        gone = wait_for(lambda: rec["disconnected_at"], 5)
        self.assertTrue(gone, "upstream never saw the connection close")
        self.assertLess(rec["disconnected_at"] - closed_at, 3.0)

    def assertNoUpstreamCall(self):
        time.sleep(0.05)
        self.assertEqual(self.upstream.generates(), [])

    def assertRelativeOrder(self, actual, reference):
        present = [k for k in reference if k in actual]
        self.assertEqual([k for k in actual if k in reference], present,
                         "order differs from capture")


def chunk_content(chunks, field="content"):
    out = ""
    for c in chunks:
        for ch in c.get("choices", []):
            v = (ch.get("delta") or {}).get(field)
            if v:
                out += v
    return out


def finish_reasons(chunks):
    return [ch.get("finish_reason") for c in chunks for ch in c.get("choices", [])
            if ch.get("finish_reason")]


def tool_call_deltas(chunks):
    out = []
    for c in chunks:
        for ch in c.get("choices", []):
            for tc in (ch.get("delta") or {}).get("tool_calls") or []:
                out.append(tc)
    return out


# =======================================================================================
# Capture fixture
# =======================================================================================

class TestCaptureFixture(unittest.TestCase):
    def test_embedded_header_order_and_envelope_match_capture_file(self):
        with open(CAPTURE_FILE, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        gen = [r for r in recs if r["path"] == "/alpha/generate"][0]
        names = [k.lower() for k, _ in gen["headers"]]
        self.assertEqual([n for n in names if n in CAPTURED_GENERATE_HEADER_ORDER],
                         CAPTURED_GENERATE_HEADER_ORDER)
        self.assertEqual(list(gen["body"].keys()), CAPTURED_ENVELOPE_KEYS)
        params = list(gen["body"]["params"].keys())
        self.assertEqual(params, [k for k in CAPTURED_PARAMS_ORDER if k in params])
        h = {k.lower(): v for k, v in gen["headers"]}
        self.assertEqual(h["user-agent"], "cli")
        self.assertEqual(h["x-session-id"], gen["body"]["threadId"])


class TestFakeUpstreamSelfCheck(unittest.TestCase):
    """The fixture itself: scripts, recording, framing, resets and disconnect detection."""

    @classmethod
    def setUpClass(cls):
        cls.fake = fake_upstream(cls.addClassCleanup)
        cls.port = cls.fake.server.server_address[1]

    def setUp(self):
        self.fake.reset()

    def post(self, body=None):
        return http_request(self.port, "POST", "/alpha/generate", body or {"x": 1},
                            {"X-Order-A": "1", "x-order-b": "2"}, timeout=5)

    def test_records_ordered_headers_and_json_body_and_replays_script(self):
        self.fake.script(ok(text_parts("A")))
        r = self.post({"k": [1, 2]})
        self.assertEqual(r.status, 200)
        lines = [json.loads(x) for x in r.data.decode().splitlines()]
        self.assertEqual(lines[0], {"type": "start"})
        self.assertEqual(lines[-1]["type"], "finish")
        rec = self.fake.generates()[0]
        self.assertEqual(rec["body"], {"k": [1, 2]})
        names = [k for k, _ in rec["headers"]]
        self.assertLess(names.index("X-Order-A"), names.index("x-order-b"))
        self.assertTrue(wait_for(lambda: rec["completed"], 2))

    def test_default_reply_when_script_is_empty(self):
        r = self.post()
        self.assertIn(b"Hello", r.data)

    def test_error_reply_has_status_and_json_body(self):
        self.fake.script(http_error(429, {"error": {"code": "RATE_LIMITED"}},
                                    headers={"Retry-After": "3"}))
        r = self.post()
        self.assertEqual(r.status, 429)
        self.assertEqual(r.header("Retry-After"), "3")
        self.assertEqual(r.json()["error"]["code"], "RATE_LIMITED")

    def test_reset_breaks_the_client_read(self):
        self.fake.script(Reply(200, START + [Reset()]))
        with self.assertRaises((http.client.HTTPException, ConnectionError, OSError)):
            self.post()

    def test_wait_notices_peer_close(self):
        self.fake.script(Reply(200, START + [Stall(5)]))
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.sendall(b"POST /alpha/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertIn(b"start-step", read_until(s, b"start-step", 5))
        t0 = time.monotonic()
        s.close()
        rec = self.fake.generates()[0]
        self.assertTrue(wait_for(lambda: rec["disconnected_at"], 2))
        self.assertLess(rec["disconnected_at"] - t0, 1.0)

    def test_serves_a_provider_models_list(self):
        r = http_request(self.port, "GET", "/provider/v1/models", timeout=5)
        self.assertEqual(r.json()["object"], "list")


class TestConfig(unittest.TestCase):
    def test_layers_defaults_file_env_overrides(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.json")
            with open(path, "w") as f:
                json.dump({"port": 4001, "logLevel": "warn", "maxBodyBytes": "10mb"}, f)
            cfg = proxy.load_config(path=path, environ={"PORT": "4002"},
                                    overrides={"logLevel": "debug"})
        self.assertEqual(cfg["port"], 4002)
        self.assertEqual(cfg["logLevel"], "debug")
        self.assertEqual(cfg["maxBodyBytes"], 10 * 1024 * 1024)
        self.assertEqual(cfg["host"], "127.0.0.1")
        self.assertEqual(cfg["upstreamRetries"], 2)

    def test_missing_file_means_defaults(self):
        cfg = proxy.load_config(path=os.path.join(tempfile.gettempdir(), "nope-%s.json"
                                                  % uuid.uuid4().hex), environ={})
        self.assertEqual(cfg["port"], 3000)
        self.assertEqual(cfg["backend"], "commandcode")
        self.assertEqual(cfg["maxInFlight"], 64)
        self.assertEqual(cfg["apiBase"], "https://api.commandcode.ai")

    def test_invalid_value_is_rejected(self):
        with self.assertRaises(Exception):
            proxy.load_config(path=os.path.join(tempfile.gettempdir(), "nope.json"), environ={},
                              overrides={"port": "not-a-port"})


# =======================================================================================
# Upstream request: headers, envelope, params, messages, models, sessions
# =======================================================================================

class TestUpstreamHeaders(ProxyTestCase):
    def test_generate_headers_have_captured_names_and_values(self):
        r = self.chat()
        self.assertEqual(r.status, 200, r)
        rec = self.last_generate()
        self.assertEqual(rec["method"], "POST")
        self.assertEqual(rec["path"], "/alpha/generate")
        h = header_map(rec)
        self.assertEqual(h["user-agent"], "cli")
        self.assertEqual(h["x-command-code-version"], "1.64.0")
        self.assertEqual(h["x-cli-environment"], "production")
        self.assertEqual(h["x-project-slug"], "my-app")
        self.assertIn(h["x-taste-learning"], ("true", "false"))
        self.assertEqual(h["authorization"], "Bearer " + KEY)
        self.assertIn("application/json", h["content-type"])
        self.assertRegex(h["traceparent"], TRACEPARENT_RE)
        self.assertRegex(h["x-session-id"], UUID4_RE)

    def test_generate_headers_follow_captured_order(self):
        self.chat()
        names = [k.lower() for k, _ in self.last_generate()["headers"]]
        for name in CAPTURED_GENERATE_HEADER_ORDER:
            self.assertIn(name, names)
        self.assertRelativeOrder(names, CAPTURED_GENERATE_HEADER_ORDER)

    def test_session_id_header_equals_body_thread_id_and_is_uuid4(self):
        self.chat()
        rec = self.last_generate()
        self.assertRegex(header_map(rec)["x-session-id"], UUID4_RE)
        self.assertEqual(header_map(rec)["x-session-id"], rec["body"]["threadId"])

    def test_x_api_key_user_key_is_sent_upstream_as_bearer(self):
        key = unique_key()
        r = self.request("POST", "/v1/chat/completions",
                         {"model": "claude-sonnet-5",
                          "messages": [{"role": "user", "content": "x"}]},
                         key=key, key_header="x-api-key")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(header_map(self.last_generate())["authorization"], "Bearer " + key)

    def test_first_user_key_is_extracted_from_authorization_value(self):
        r = self.request("POST", "/v1/chat/completions",
                         {"model": "claude-sonnet-5",
                          "messages": [{"role": "user", "content": "x"}]},
                         key=None, headers={"Authorization": "Bearer user_abc-DEF_123"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(header_map(self.last_generate())["authorization"],
                         "Bearer user_abc-DEF_123")

    def test_traceparent_keeps_trace_id_and_changes_span_id_across_retry(self):
        self.upstream.script(http_error(500, {"error": {"message": "boom", "type": "api_error"}}),
                             ok(text_parts("Hi")))
        r = self.chat()
        self.assertEqual(r.status, 200, r)
        gens = self.upstream.generates()
        self.assertEqual(len(gens), 2)
        t1 = TRACEPARENT_RE.match(header_map(gens[0])["traceparent"])
        t2 = TRACEPARENT_RE.match(header_map(gens[1])["traceparent"])
        self.assertTrue(t1 and t2)
        self.assertEqual(t1.group(1), t2.group(1), "trace id must be shared by retries")
        self.assertNotEqual(t1.group(2), t2.group(2), "span id must be new per attempt")
        self.assertEqual(gens[0]["body"], gens[1]["body"], "a retry re-sends the same body")
        self.assertEqual(header_map(gens[0])["x-session-id"], header_map(gens[1])["x-session-id"])

    def test_separate_requests_get_separate_trace_ids(self):
        self.chat()
        self.chat()
        gens = self.upstream.generates()
        self.assertEqual(len(gens), 2)
        t1 = TRACEPARENT_RE.match(header_map(gens[0])["traceparent"]).group(1)
        t2 = TRACEPARENT_RE.match(header_map(gens[1])["traceparent"]).group(1)
        self.assertNotEqual(t1, t2)

    def test_upstream_connection_is_kept_alive_between_requests(self):
        self.assertEqual(self.chat().status, 200)
        self.assertEqual(self.chat().status, 200)
        gens = self.upstream.generates()
        self.assertEqual(len(gens), 2)
        self.assertEqual(gens[0]["client_port"], gens[1]["client_port"],
                         "second request should reuse the upstream connection")


class TestCommandCodeVersionFromNpm(ProxyTestCase):
    """Without ccVersion the proxy sends the CLI version npm lists as latest, fetched in the background."""

    proxy_overrides = {"ccVersion": ""}

    @classmethod
    def setUpClass(cls):
        cls.registry = fake_upstream(cls.addClassCleanup)
        registry_url = mock.patch.object(proxy.VersionWatcher, "REGISTRY_URL",
                                         cls.registry.url + "/command-code/latest")
        registry_url.start()
        cls.addClassCleanup(registry_url.stop)
        super().setUpClass()
        cls.fetched = wait_for(lambda: cls.server.backend.version.latest, 5.0)

    def setUp(self):
        super().setUp()
        self.registry.reset()

    def version_sent(self):
        self.assertEqual(self.chat().status, 200)
        return header_map(self.last_generate())["x-command-code-version"]

    def test_latest_version_from_the_registry_is_sent_upstream(self):
        self.assertEqual(self.fetched, "1.70.2")
        self.assertEqual(self.version_sent(), "1.70.2")

    def test_unusable_registry_answers_keep_the_last_good_version(self):
        good = self.registry.registry_reply
        self.addCleanup(setattr, self.registry, "registry_reply", good)
        watcher = proxy.VersionWatcher("")
        for reply in [good, (200, {"version": "not a version"}), (200, "<html>"), (503, {"error": "down"}),
                      (200, ["1.2.3"]), (200, '{"version": NaN}')]:
            self.registry.registry_reply = reply
            self.registry.reset()
            watcher.stop_event.clear()
            check = threading.Thread(target=watcher._run, daemon=True)  # one pass, then waits on stop_event
            check.start()
            self.assertTrue(wait_for(lambda: self.registry.requests, 5.0))
            watcher.stop_event.set()
            check.join(5)
            self.assertFalse(check.is_alive())
            self.assertEqual(watcher.version, "1.70.2", reply)

    def test_configured_version_wins_and_npm_is_not_asked(self):
        watcher = proxy.VersionWatcher("1.55.0")
        watcher.start()
        time.sleep(0.1)
        self.assertEqual(watcher.version, "1.55.0")
        self.assertEqual(self.registry.requests, [])


class TestUpstreamSession(ProxyTestCase):
    def session_of(self, rec):
        return header_map(rec)["x-session-id"]

    def test_same_key_keeps_same_session_across_requests(self):
        key = unique_key()
        self.chat(key=key)
        self.chat(key=key)
        gens = self.upstream.generates()
        self.assertEqual(self.session_of(gens[0]), self.session_of(gens[1]))
        self.assertEqual(gens[1]["body"]["threadId"], self.session_of(gens[1]))

    def test_different_keys_get_different_sessions(self):
        self.chat(key=unique_key())
        self.chat(key=unique_key())
        gens = self.upstream.generates()
        self.assertNotEqual(self.session_of(gens[0]), self.session_of(gens[1]))

    def test_same_key_shares_session_across_front_ends(self):
        key = unique_key()
        self.chat(key=key)
        self.messages(key=key)
        self.responses(key=key)
        sessions = {self.session_of(g) for g in self.upstream.generates()}
        self.assertEqual(len(self.upstream.generates()), 3)
        self.assertEqual(len(sessions), 1)

    def test_client_x_session_id_header_takes_precedence(self):
        sid = str(uuid.uuid4())
        self.chat(key=unique_key(), headers={"x-session-id": sid})
        rec = self.last_generate()
        self.assertEqual(self.session_of(rec), sid)
        self.assertEqual(rec["body"]["threadId"], sid)

    def test_client_x_claude_code_session_id_header_takes_precedence(self):
        sid = str(uuid.uuid4())
        self.chat(key=unique_key(), headers={"x-claude-code-session-id": sid})
        rec = self.last_generate()
        self.assertEqual(self.session_of(rec), sid)
        self.assertEqual(rec["body"]["threadId"], sid)


class TestUpstreamEnvelope(ProxyTestCase):
    def test_envelope_keys_in_captured_order(self):
        self.chat()
        body = self.last_generate()["body"]
        self.assertEqual(list(body.keys()), CAPTURED_ENVELOPE_KEYS)
        self.assertIsInstance(body["config"], dict)
        self.assertIsNone(body["memory"])
        self.assertIsNone(body["taste"])
        self.assertIsNone(body["skills"])
        self.assertIsInstance(body["permissionMode"], str)

    def test_config_snapshot_leaks_nothing_of_the_proxy_host(self):
        self.chat()
        config = json.dumps(self.last_generate()["body"]["config"])
        self.assertNotIn(HERE, config)
        self.assertNotIn(os.getcwd(), config)
        self.assertNotIn(socket.gethostname(), config)

    def test_params_keys_in_captured_order(self):
        self.chat(temperature=0.5, reasoning_effort="high",
                  tools=[{"type": "function", "function": {
                      "name": "f", "description": "d",
                      "parameters": {"type": "object", "properties": {}}}}])
        params = list(self.upstream_params().keys())
        for k in ("model", "messages", "system", "max_tokens", "stream"):
            self.assertIn(k, params)
        self.assertRelativeOrder(params, CAPTURED_PARAMS_ORDER)

    def test_params_stream_true_for_non_streaming_client(self):
        r = self.chat(stream=False)
        self.assertEqual(r.status, 200, r)
        self.assertIs(self.upstream_params()["stream"], True)

    def test_params_stream_true_for_streaming_client(self):
        self.chat(stream=True)
        self.assertIs(self.upstream_params()["stream"], True)

    def test_system_is_single_space_when_client_sends_none(self):
        self.chat()
        system = self.upstream_params()["system"]
        if isinstance(system, list):
            self.assertTrue(system)
            self.assertEqual("".join(p["text"] for p in system), " ")
        else:
            self.assertEqual(system, " ")

    def test_client_system_sent_as_text_parts_with_ephemeral_cache_control(self):
        self.chat(messages=[{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "hi"}])
        params = self.upstream_params()
        system = params["system"]
        self.assertIsInstance(system, list)
        for part in system:
            self.assertEqual(part["type"], "text")
        self.assertIn("You are terse.", "".join(p["text"] for p in system))
        self.assertTrue(any(p.get("cache_control") == {"type": "ephemeral"} for p in system))
        self.assertNotIn("system", [m["role"] for m in params["messages"]])

    def test_developer_message_goes_to_system(self):
        self.chat(messages=[{"role": "developer", "content": "DEV RULES"},
                            {"role": "user", "content": "hi"}])
        params = self.upstream_params()
        self.assertIn("DEV RULES", self.system_text(params))
        self.assertEqual([m["role"] for m in params["messages"]], ["user"])

    def test_response_format_json_object_adds_json_instruction(self):
        r = self.chat(response_format={"type": "json_object"})
        self.assertEqual(r.status, 200, r)
        self.assertIn("json", self.system_text(self.upstream_params()).lower())


class TestUpstreamMessages(ProxyTestCase):
    def test_user_string_content_becomes_text_part_array(self):
        self.chat(messages=[{"role": "user", "content": "Say hello"}])
        self.assertEqual(self.upstream_params()["messages"],
                         [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}])

    def test_user_content_parts_keep_order(self):
        self.chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "text", "text": "b"}]}])
        content = self.upstream_params()["messages"][0]["content"]
        self.assertEqual([p["text"] for p in content if p["type"] == "text"], ["a", "b"])

    def test_tool_call_history_uses_ai_sdk_shape(self):
        msgs = [{"role": "user", "content": "read a.txt"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "read_file", "arguments": "{\"path\": \"a.txt\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "file body"},
                {"role": "user", "content": "thanks"}]
        r = self.chat(messages=msgs)
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool", "user"])
        calls = [p for p in up[1]["content"] if p["type"] == "tool-call"]
        self.assertEqual(calls, [{"type": "tool-call", "toolCallId": "call_1",
                                  "toolName": "read_file", "input": {"path": "a.txt"}}])
        results = up[2]["content"]
        self.assertEqual(len(results), 1)
        self.assertEqual(results[0]["type"], "tool-result")
        self.assertEqual(results[0]["toolCallId"], "call_1")
        self.assertEqual(results[0]["toolName"], "read_file")
        self.assertEqual(results[0]["output"], {"type": "text", "value": "file body"})

    def test_reasoning_content_in_history_is_replayed_as_reasoning_part(self):
        msgs = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "answer", "reasoning_content": "I thought."},
                {"role": "user", "content": "more"}]
        self.chat(messages=msgs, model="deepseek/deepseek-v4-flash")
        assistant = self.upstream_params()["messages"][1]
        self.assertEqual(assistant["role"], "assistant")
        types = [p["type"] for p in assistant["content"]]
        self.assertIn("reasoning", types)
        self.assertLess(types.index("reasoning"), types.index("text"))
        reasoning = [p for p in assistant["content"] if p["type"] == "reasoning"][0]
        self.assertEqual(reasoning["text"], "I thought.")

    def test_assistant_text_and_tool_calls_keep_order_and_tool_parts_are_joined(self):
        msgs = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "ls", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1",
                 "content": [{"type": "text", "text": "line1"}, {"type": "text", "text": "line2"}]}]
        r = self.chat(messages=msgs)
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([p["type"] for p in up[1]["content"]], ["text", "tool-call"])
        self.assertEqual(up[1]["content"][1]["input"], {})
        value = up[2]["content"][0]["output"]["value"]
        self.assertIn("line1", value)
        self.assertIn("line2", value)
        self.assertLess(value.index("line1"), value.index("line2"))

    def test_tools_sent_as_name_description_input_schema_without_type(self):
        schema = {"type": "object", "properties": {"path": {"type": "string"}},
                  "required": ["path"]}
        self.chat(tools=[{"type": "function", "function": {
            "name": "read_file", "description": "Reads a file", "parameters": schema}}])
        tools = self.upstream_params()["tools"]
        self.assertEqual(tools, [{"name": "read_file", "description": "Reads a file",
                                  "input_schema": schema}])

    def test_tool_choice_none_sends_no_tools(self):
        r = self.chat(tool_choice="none", tools=[{"type": "function", "function": {
            "name": "read_file", "description": "d",
            "parameters": {"type": "object", "properties": {}}}}])
        self.assertEqual(r.status, 200, r)
        self.assertFalse(self.upstream_params().get("tools"))

    def test_image_data_url_sent_as_image_part_with_mime_type(self):
        url = "data:image/png;base64," + PNG_1PX
        self.chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": url}}]}])
        parts = self.upstream_params()["messages"][0]["content"]
        images = [p for p in parts if p["type"] == "image"]
        self.assertEqual(images, [{"type": "image", "image": url, "mimeType": "image/png"}])

    def test_http_image_url_passes_through_as_url(self):
        url = "https://example.invalid/cat.png"
        r = self.chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": url}}]}])
        self.assertEqual(r.status, 200, r)
        parts = self.upstream_params()["messages"][0]["content"]
        images = [p for p in parts if p["type"] == "image"]
        self.assertEqual(len(images), 1)
        self.assertEqual(images[0]["image"], url)

    def test_image_to_model_without_image_input_is_400_naming_image_models(self):
        url = "data:image/png;base64," + PNG_1PX
        r = self.chat(model="deepseek/deepseek-v4-flash", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": url}}]}])
        err = self.assertOpenAIError(r, 400)
        self.assertTrue(any(m in err["message"] for m in IMAGE_MODELS), err["message"])
        self.assertNoUpstreamCall()


class TestUpstreamParams(ProxyTestCase):
    def test_max_tokens_defaults_to_64000(self):
        self.chat()
        self.assertEqual(self.upstream_params()["max_tokens"], 64000)

    def test_max_tokens_clamped_to_200000(self):
        r = self.chat(max_tokens=500000)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.upstream_params()["max_tokens"], 200000)

    def test_max_completion_tokens_forwarded(self):
        self.chat(max_completion_tokens=1234)
        self.assertEqual(self.upstream_params()["max_tokens"], 1234)

    def test_temperature_and_top_p_forwarded(self):
        self.chat(temperature=0.3, top_p=0.9)
        params = self.upstream_params()
        self.assertEqual(params["temperature"], 0.3)
        self.assertEqual(params["top_p"], 0.9)

    def test_stop_sequences_are_forwarded_upstream(self):
        self.chat(stop=["END", "STOP"])
        self.assertEqual(self.upstream_params()["stop"], ["END", "STOP"])

    def test_reasoning_effort_low_clamped_to_high_for_deepseek_v4_flash(self):
        r = self.chat(model="deepseek/deepseek-v4-flash", reasoning_effort="low")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.upstream_params()["reasoning_effort"], "high")

    def test_reasoning_effort_kept_when_model_accepts_it(self):
        self.chat(model="claude-sonnet-5", reasoning_effort="medium")
        self.assertEqual(self.upstream_params()["reasoning_effort"], "medium")

    def test_reasoning_effort_not_sent_to_model_without_effort_levels(self):
        r = self.chat(model="moonshotai/Kimi-K2.6", reasoning_effort="high")
        self.assertEqual(r.status, 200, r)
        self.assertNotIn("reasoning_effort", self.upstream_params())

    def test_deprecated_model_id_canonicalised(self):
        self.chat(model="claude-sonnet-4-5-20250929")
        self.assertEqual(self.upstream_params()["model"], "claude-sonnet-4-6")

    def test_model_id_matched_case_insensitively(self):
        self.chat(model="DeepSeek/DeepSeek-V4-Flash")
        self.assertEqual(self.upstream_params()["model"], "deepseek/deepseek-v4-flash")


class TestModelMap(ProxyTestCase):
    proxy_overrides = {"modelMap": {"claude-haiku-*": "deepseek/deepseek-v4-flash",
                                    "my-alias": "moonshotai/Kimi-K3"},
                       "defaultModel": "moonshotai/Kimi-K3"}

    def test_default_model_used_when_request_names_none(self):
        r = self.request("POST", "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.upstream_params()["model"], "moonshotai/Kimi-K3")

    def test_glob_model_map_routes_client_id(self):
        r = self.messages(model="claude-haiku-4-5-20251001")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.upstream_params()["model"], "deepseek/deepseek-v4-flash")

    def test_exact_model_map_routes_client_id(self):
        r = self.chat(model="my-alias")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.upstream_params()["model"], "moonshotai/Kimi-K3")


# =======================================================================================
# Chat Completions front end
# =======================================================================================

class TestChatStreaming(ProxyTestCase):
    def test_streaming_response_carries_request_id(self):
        rid = "req-stream-" + uuid.uuid4().hex
        r = self.chat(stream=True, headers={"X-Request-Id": rid})
        self.assertEqual(r.header("X-Request-Id"), rid)

    def test_unicode_deltas_survive(self):
        self.upstream.script(ok(text_parts("héllo ", "世界 ", "🎉")))
        self.assertEqual(chunk_content(self.chat(stream=True).chunks()), "héllo 世界 🎉")

    def test_long_stream_is_delivered_completely(self):
        self.upstream.script(ok(text_parts(*["w%d " % i for i in range(3000)]), out=3000))
        r = self.chat(stream=True)
        self.assertEqual(chunk_content(r.chunks()), "".join("w%d " % i for i in range(3000)))
        self.assertTrue(r.done())
        self.assertLess(r.elapsed, 10)

    def test_concurrent_streams_do_not_mix(self):
        n = 6
        self.upstream.script(*[Reply(200, START + text_parts("R%d-a" % i)[:2] + [Sleep(0.1)]
                                     + text_parts("R%d-b" % i)[1:] + finish_parts())
                               for i in range(n)])
        results = [None] * n

        def run(i):
            results[i] = self.chat(stream=True, key=unique_key())
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        seen = set()
        for r in results:
            self.assertIsNotNone(r)
            self.assertEqual(r.status, 200, r)
            self.assertTrue(r.done())
            content = chunk_content(r.chunks())
            m = re.match(r"^R(\d)-aR\1-b$", content)
            self.assertTrue(m, content)
            seen.add(m.group(1))
        self.assertEqual(len(seen), n)

    def test_stream_sends_sse_chunks_and_done_on_success(self):
        r = self.chat(stream=True)
        self.assertEqual(r.status, 200, r)
        self.assertIn("text/event-stream", r.header("Content-Type"))
        chunks = r.chunks()
        self.assertTrue(chunks)
        for c in chunks:
            self.assertEqual(c["object"], "chat.completion.chunk")
            self.assertEqual(c["id"], chunks[0]["id"])
            self.assertIn("model", c)
        self.assertEqual(chunk_content(chunks), "Hello world")
        self.assertEqual(finish_reasons(chunks), ["stop"])
        self.assertTrue(r.done())
        last_data = [d for _, d in r.sse()][-1]
        self.assertEqual(last_data.strip(), "[DONE]")

    def test_stream_reasoning_arrives_as_reasoning_content(self):
        self.upstream.script(ok(reasoning_parts("Think ", "hard."), text_parts("Answer"),
                                reasoning=5, out=10))
        chunks = self.chat(stream=True).chunks()
        self.assertEqual(chunk_content(chunks, "reasoning_content"), "Think hard.")
        self.assertEqual(chunk_content(chunks), "Answer")

    def test_streamed_tool_call_first_delta_carries_index_id_type_and_name(self):
        args = {"file_path": "/home/dev/my-app/notes.txt"}
        self.upstream.script(ok(tool_parts("call_cap_1", "read_file", args),
                                reason="tool-calls", raw="tool_use"))
        deltas = tool_call_deltas(self.chat(stream=True).chunks())
        self.assertTrue(deltas)
        first = deltas[0]
        self.assertEqual(first["index"], 0)
        self.assertIsInstance(first["id"], str)
        self.assertTrue(first["id"])
        self.assertEqual(first["type"], "function")
        self.assertEqual(first["function"]["name"], "read_file")
        for later in deltas[1:]:
            self.assertEqual(later["index"], 0)

    def test_streamed_tool_call_arguments_are_upstream_fragments(self):
        args = {"file_path": "/home/dev/my-app/notes.txt"}
        text = json.dumps(args)
        fragments = [text[:7], text[7:20], text[20:]]
        self.upstream.script(ok(tool_parts("call_cap_1", "read_file", args, fragments),
                                reason="tool-calls", raw="tool_use"))
        deltas = tool_call_deltas(self.chat(stream=True).chunks())
        pieces = [d["function"]["arguments"] for d in deltas
                  if (d.get("function") or {}).get("arguments")]
        self.assertEqual("".join(pieces), text, "arguments must not be duplicated")
        self.assertGreaterEqual(len(pieces), 3, "argument fragments should be streamed")

    def test_lone_final_tool_call_sends_arguments_in_one_delta(self):
        args = {"cmd": "ls -la", "n": 3}
        self.upstream.script(ok(tool_parts("call_9", "exec", args, streamed=False),
                                reason="tool-calls", raw="tool_use"))
        chunks = self.chat(stream=True).chunks()
        deltas = tool_call_deltas(chunks)
        self.assertEqual(deltas[0]["function"]["name"], "exec")
        pieces = [d["function"]["arguments"] for d in deltas
                  if (d.get("function") or {}).get("arguments")]
        self.assertEqual(len(pieces), 1)
        self.assertEqual(json.loads(pieces[0]), args)

    def test_tool_call_finish_reason_is_tool_calls(self):
        self.upstream.script(ok(text_parts("Let me look."),
                                tool_parts("call_1", "read_file", {"p": 1}),
                                reason="tool-calls", raw="tool_use"))
        chunks = self.chat(stream=True).chunks()
        self.assertEqual(finish_reasons(chunks), ["tool_calls"])
        self.assertEqual(chunk_content(chunks), "Let me look.")

    def test_tool_call_input_given_as_json_string_is_not_double_encoded(self):
        self.upstream.script(ok({"type": "tool-call", "toolCallId": "call_s", "toolName": "f",
                                 "input": "{\"a\": 1}"}, reason="tool-calls", raw="tool_use"))
        call = self.chat().json()["choices"][0]["message"]["tool_calls"][0]
        self.assertEqual(json.loads(call["function"]["arguments"]), {"a": 1})

    def test_string_error_event_after_output_is_in_stream_error(self):
        self.upstream.script(Reply(200, START + text_parts("Part")[:2]
                                   + [{"type": "error", "error": "Gateway request failed"}]))
        r = self.chat(stream=True)
        self.assertTrue(any("error" in c for c in r.chunks()))
        self.assertFalse(r.done())

    def test_parallel_tool_calls_get_distinct_indexes(self):
        self.upstream.script(ok(tool_parts("call_a", "f", {"x": 1}),
                                tool_parts("call_b", "g", {"y": 2}),
                                reason="tool-calls", raw="tool_use"))
        deltas = tool_call_deltas(self.chat(stream=True).chunks())
        firsts = [d for d in deltas if d.get("id")]
        self.assertEqual([(d["index"], d["function"]["name"]) for d in firsts],
                         [(0, "f"), (1, "g")])
        by_index = {}
        for d in deltas:
            by_index.setdefault(d["index"], "")
            by_index[d["index"]] += (d.get("function") or {}).get("arguments") or ""
        self.assertEqual(json.loads(by_index[0]), {"x": 1})
        self.assertEqual(json.loads(by_index[1]), {"y": 2})

    def test_usage_rides_on_finish_chunk_without_include_usage(self):
        chunks = self.chat(stream=True).chunks()
        finishing = [c for c in chunks if finish_reasons([c])]
        self.assertEqual(len(finishing), 1)
        u = finishing[0].get("usage")
        self.assertIsInstance(u, dict, finishing[0])
        self.assertEqual(u["prompt_tokens"], 7400)
        self.assertEqual(u["completion_tokens"], 12)

    def test_include_usage_sends_final_chunk_with_empty_choices(self):
        self.upstream.script(ok(reasoning_parts("hm"), text_parts("Hi"), out=60, reasoning=40))
        r = self.chat(stream=True, stream_options={"include_usage": True})
        chunks = r.chunks()
        self.assertTrue(r.done())
        last = chunks[-1]
        self.assertEqual(last["choices"], [])
        u = last["usage"]
        self.assertEqual(u["prompt_tokens"], 7400)
        self.assertEqual(u["completion_tokens"], 60)
        self.assertEqual(u["total_tokens"], 7460)
        self.assertEqual(u["prompt_tokens_details"]["cached_tokens"], 7168)
        self.assertEqual(u["completion_tokens_details"]["reasoning_tokens"], 40)

    def test_error_event_after_output_is_in_stream_error_without_done(self):
        self.upstream.script(Reply(200, START + text_parts("Partial ans")[:2]
                                   + [error_event("Provider returned error: overloaded", 529,
                                                  False)]))
        r = self.chat(stream=True)
        self.assertEqual(r.status, 200)
        chunks = r.chunks()
        self.assertEqual(chunk_content(chunks), "Partial ans")
        self.assertTrue(any("error" in c for c in chunks), chunks)
        self.assertFalse(r.done())
        self.assertFalse(set(finish_reasons(chunks)) & {"stop", "tool_calls", "length"})

    def test_stream_ending_without_finish_is_error_without_done(self):
        self.upstream.script(Reply(200, START + text_parts("Cut off")))
        r = self.chat(stream=True)
        chunks = r.chunks()
        self.assertTrue(any("error" in c for c in chunks), chunks)
        self.assertFalse(r.done())
        self.assertFalse(set(finish_reasons(chunks)) & {"stop", "tool_calls", "length"})

    def test_connection_reset_after_output_is_error_without_done_and_not_retried(self):
        # The pause lets the proxy read (and forward) the text before the RST: an RST can
        # discard unread data, which would look like a reset before any byte.
        self.upstream.script(Reply(200, START + text_parts("Some text")[:2]
                                   + [Sleep(0.3), Reset()]))
        r = self.chat(stream=True)
        chunks = r.chunks()
        self.assertEqual(chunk_content(chunks), "Some text")
        self.assertTrue(any("error" in c for c in chunks), chunks)
        self.assertFalse(r.done())
        self.assertEqual(len(self.upstream.generates()), 1, "never retried after output")

    def test_early_upstream_error_is_real_http_status_for_streaming_client(self):
        self.upstream.script(http_error(401, {"error": {"message": "Invalid API key",
                                                        "type": "authentication_error"}}))
        r = self.chat(stream=True)
        self.assertOpenAIError(r, 401)

    def test_early_upstream_500_is_retried_then_real_502_for_streaming_client(self):
        self.upstream.script(*[http_error(500, {"error": {"message": "x",
                                                          "type": "api_error"}})] * 5)
        r = self.chat(stream=True)
        self.assertOpenAIError(r, 502)
        self.assertEqual(len(self.upstream.generates()), 3)

    def test_in_stream_error_chunk_has_openai_error_shape(self):
        self.upstream.script(Reply(200, START + text_parts("Partial")[:2]
                                   + [error_event("Provider returned error", 500, False)]))
        errors = [c["error"] for c in self.chat(stream=True).chunks() if "error" in c]
        self.assertEqual(len(errors), 1)
        self.assertIsInstance(errors[0]["message"], str)
        self.assertIn("type", errors[0])


class TestChatNonStreaming(ProxyTestCase):
    def test_non_stream_folds_stream_into_one_completion(self):
        r = self.chat()
        self.assertEqual(r.status, 200, r)
        self.assertIn("application/json", r.header("Content-Type"))
        body = r.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertIsInstance(body["id"], str)
        self.assertEqual(len(body["choices"]), 1)
        choice = body["choices"][0]
        self.assertEqual(choice["index"], 0)
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "Hello world")
        self.assertEqual(choice["finish_reason"], "stop")

    def test_non_stream_usage_fields(self):
        self.upstream.script(ok(reasoning_parts("x"), text_parts("Hi"), out=60, reasoning=40))
        u = self.chat().json()["usage"]
        self.assertEqual(u["prompt_tokens"], 7400)
        self.assertEqual(u["completion_tokens"], 60)
        self.assertEqual(u["total_tokens"], 7460)
        self.assertEqual(u["prompt_tokens_details"]["cached_tokens"], 7168)
        self.assertEqual(u["completion_tokens_details"]["reasoning_tokens"], 40)

    def test_non_stream_reasoning_content_in_message(self):
        self.upstream.script(ok(reasoning_parts("The user greets me; ", "answer briefly."),
                                text_parts("Hi! How can I help?")))
        msg = self.chat().json()["choices"][0]["message"]
        self.assertEqual(msg["reasoning_content"], "The user greets me; answer briefly.")
        self.assertEqual(msg["content"], "Hi! How can I help?")

    def test_non_stream_tool_calls_with_string_arguments(self):
        args = {"file_path": "/home/dev/my-app/notes.txt"}
        self.upstream.script(ok(text_parts("Let me read that file."),
                                tool_parts("call_cap_1", "read_file", args),
                                reason="tool-calls", raw="tool_use"))
        choice = self.chat().json()["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        calls = choice["message"]["tool_calls"]
        self.assertEqual(len(calls), 1)
        self.assertTrue(calls[0]["id"])
        self.assertEqual(calls[0]["type"], "function")
        self.assertEqual(calls[0]["function"]["name"], "read_file")
        self.assertIsInstance(calls[0]["function"]["arguments"], str)
        self.assertEqual(json.loads(calls[0]["function"]["arguments"]), args)

    def test_length_finish_maps_to_length(self):
        self.upstream.script(ok(text_parts("trunc"), reason="length", raw="max_tokens"))
        self.assertEqual(self.chat().json()["choices"][0]["finish_reason"], "length")


class TestChatValidation(ProxyTestCase):

    def test_error_before_the_body_is_read_leaves_a_clean_keep_alive_connection(self):
        # a 401/404 answered without reading the request body must not let that body be taken
        # for the next request on the same connection
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            for path, key, expected in (("/v1/chat/completions", "sk-nope", 401), ("/v1/nowhere", KEY, 404)):
                response = http_request(self.port, "POST", path, {"model": "m", "messages": []},
                                        {"Authorization": "Bearer " + key}, conn=conn)
                self.assertEqual(response.status, expected)
                health = http_request(self.port, "GET", "/health", conn=conn)
                self.assertEqual(health.status, 200)
                self.assertEqual(health.json()["status"], "ok")
        finally:
            conn.close()

    def test_n_greater_than_one_is_400(self):
        self.assertOpenAIError(self.chat(n=2), 400)
        self.assertNoUpstreamCall()

    def test_logprobs_is_400(self):
        self.assertOpenAIError(self.chat(logprobs=True), 400)
        self.assertNoUpstreamCall()

    def test_n_one_and_logprobs_false_are_accepted(self):
        self.assertEqual(self.chat(n=1, logprobs=False).status, 200)

    def test_malformed_json_is_400(self):
        r = self.request("POST", "/v1/chat/completions", b'{"model": "x", "messages": [')
        self.assertOpenAIError(r, 400)
        self.assertNoUpstreamCall()

    def test_messages_of_wrong_type_is_400_naming_the_field(self):
        r = self.request("POST", "/v1/chat/completions",
                         {"model": "claude-sonnet-5", "messages": "hello"})
        err = self.assertOpenAIError(r, 400)
        self.assertIn("messages", err["message"])
        self.assertNoUpstreamCall()

    def test_temperature_of_wrong_type_is_400_naming_the_field(self):
        err = self.assertOpenAIError(self.chat(temperature="hot"), 400)
        self.assertIn("temperature", err["message"])
        self.assertNoUpstreamCall()

    def test_missing_key_is_401_and_upstream_not_called(self):
        self.assertOpenAIError(self.chat(key=None), 401)
        self.assertNoUpstreamCall()

    def test_sk_key_is_401_and_upstream_not_called(self):
        self.assertOpenAIError(self.chat(key="sk-proj-abcdef123456"), 401)
        self.assertNoUpstreamCall()

    def test_client_request_id_is_echoed(self):
        rid = "req-test-" + uuid.uuid4().hex
        r = self.chat(headers={"X-Request-Id": rid})
        self.assertEqual(r.header("X-Request-Id"), rid)

    def test_request_id_generated_when_absent_even_on_errors(self):
        self.assertTrue(self.chat().header("X-Request-Id"))
        self.assertTrue(self.chat(key=None).header("X-Request-Id"))

    def test_unknown_route_is_404(self):
        r = self.request("GET", "/v1/nothing-here")
        self.assertEqual(r.status, 404)

    def test_lone_surrogate_in_client_json_is_replaced_before_upstream(self):
        raw = (b'{"model": "claude-sonnet-5", "messages": [{"role": "user", '
               b'"content": "bad \\ud800 pair"}]}')
        r = self.request("POST", "/v1/chat/completions", raw)
        self.assertEqual(r.status, 200, r)
        rec = self.last_generate()
        rec["raw"].decode("utf-8")  # strict: must be valid UTF-8
        text = rec["body"]["params"]["messages"][0]["content"][0]["text"]
        self.assertTrue(text.startswith("bad ") and text.endswith(" pair"))
        self.assertNotIn("\ud800", text)

    def test_unsupported_method_on_model_route_is_not_200(self):
        r = self.request("GET", "/v1/chat/completions")
        self.assertIn(r.status, (404, 405), r)


# =======================================================================================
# Upstream errors and retries
# =======================================================================================

class TestUpstreamErrors(ProxyTestCase):
    def test_upstream_401_is_401_and_not_retried(self):
        self.upstream.script(*[http_error(401, {"error": {"message": "Invalid API key",
                                                          "type": "authentication_error"}})] * 3)
        self.assertOpenAIError(self.chat(), 401)
        self.assertEqual(len(self.upstream.generates()), 1)

    def test_upstream_403_model_not_in_plan_is_403(self):
        self.upstream.script(*[http_error(403, {"error": {
            "message": "MODEL_NOT_IN_PLAN: claude-opus-5", "type": "permission_error",
            "code": "MODEL_NOT_IN_PLAN"}})] * 3)
        self.assertOpenAIError(self.chat(model="claude-opus-5"), 403)
        self.assertEqual(len(self.upstream.generates()), 1)

    def test_upstream_403_upgrade_required_is_502_naming_ccversion(self):
        self.upstream.script(*[http_error(403, {"error": {
            "message": "Please upgrade Command Code to the latest version",
            "type": "upgrade_required", "code": "upgrade_required"}})] * 3)
        err = self.assertOpenAIError(self.chat(), 502)
        self.assertIn("ccVersion", err["message"])

    def test_upstream_429_usage_window_is_429_with_retry_after_and_no_retry_hint(self):
        reset = int(time.time()) + 120
        self.upstream.script(*[http_error(429, {"error": {
            "message": "You have reached the usage limit for your plan",
            "type": "rate_limit_error", "code": "RATE_LIMITED",
            "rateLimit": {"window": "fiveHour", "reset": reset}}},
            headers={"Retry-After": "30"})] * 3)
        r = self.chat()
        self.assertOpenAIError(r, 429)
        ra = int(r.header("Retry-After"))
        self.assertTrue(60 <= ra <= 125, "Retry-After from rateLimit.reset, got %d" % ra)
        self.assertEqual(r.header("x-should-retry"), "false")
        self.assertEqual(len(self.upstream.generates()), 1)

    def test_upstream_plain_429_is_429_with_retry_after(self):
        self.upstream.script(*[http_error(429, {"error": {"message": "Too many requests",
                                                          "type": "rate_limit_error"}},
                                          headers={"Retry-After": "7"})] * 3)
        r = self.chat()
        self.assertOpenAIError(r, 429)
        self.assertTrue(r.header("Retry-After"))
        self.assertGreaterEqual(int(r.header("Retry-After")), 1)

    def test_credits_exhausted_is_429_insufficient_quota(self):
        self.upstream.script(*[http_error(402, {"error": {
            "message": "PREMIUM_CREDITS_EXHAUSTED: premium requests used",
            "type": "payment_required"}})] * 3)
        r = self.chat()
        err = self.assertOpenAIError(r, 429)
        self.assertIn("insufficient_quota", (err.get("type"), err.get("code")))
        self.assertEqual(r.header("x-should-retry"), "false")

    def test_inband_credits_exhausted_before_output_is_429_insufficient_quota(self):
        self.upstream.script(*[Reply(200, START + [error_event(
            "PREMIUM_CREDITS_EXHAUSTED: premium requests used", 402, False)])] * 3)
        err = self.assertOpenAIError(self.chat(), 429)
        self.assertIn("insufficient_quota", (err.get("type"), err.get("code")))

    def test_upstream_500_is_retried_then_502(self):
        self.upstream.script(*[http_error(500, {"error": {"message": "Internal server error",
                                                          "type": "api_error"}})] * 5)
        self.assertOpenAIError(self.chat(), 502)
        self.assertEqual(len(self.upstream.generates()), 3, "1 attempt + upstreamRetries(2)")

    def test_upstream_500_then_success_is_200(self):
        self.upstream.script(http_error(500, {"error": {"message": "x", "type": "api_error"}}),
                             ok(text_parts("Recovered")))
        r = self.chat()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "Recovered")
        self.assertEqual(len(self.upstream.generates()), 2)

    def test_connection_reset_before_output_is_retried(self):
        self.upstream.script(Reply(200, START + [Sleep(0.1), Reset()]), ok(text_parts("Again")))
        r = self.chat(stream=True)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(chunk_content(r.chunks()), "Again")
        self.assertTrue(r.done())
        self.assertEqual(len(self.upstream.generates()), 2)

    def test_upstream_529_is_retried_then_503(self):
        self.upstream.script(*[http_error(529, {"error": {"message": "Overloaded",
                                                          "type": "overloaded_error"}})] * 5)
        self.assertOpenAIError(self.chat(), 503)
        self.assertEqual(len(self.upstream.generates()), 3)

    def test_inband_529_error_before_output_is_503(self):
        self.upstream.script(*[Reply(200, START + [error_event("overloaded", 529, False)])] * 5)
        self.assertOpenAIError(self.chat(), 503)

    def test_zero_output_is_502_with_retry_after(self):
        self.upstream.script(*[ok(out=0)] * 5)
        r = self.chat()
        self.assertOpenAIError(r, 502)
        self.assertTrue(r.header("Retry-After"))

    def test_retry_that_returns_nothing_after_a_failed_partial_attempt_is_502_empty_response(self):
        # The first attempt's "partial" was never sent (non-streaming), so it cannot count as
        # the answer's output: the retry's empty finish is the same 502 two empty attempts give.
        for front in FRONTS:
            with self.subTest(front=front):
                self.upstream.reset()
                self.upstream.script(res_partial_then(error_event("upstream exploded", 500)),
                                     *[ok(out=0)] * 4)
                r = getattr(self, front)(stream=False)
                self.assertEqual(r.status, 502, r)
                self.assertTrue(r.header("Retry-After"), r)
                err = r.json()["error"]
                self.assertIn("without any output", err["message"])
                if front != "messages":
                    self.assertEqual(err["code"], "empty_response")
                self.assertEqual(len(self.upstream.generates()), 3)

    def test_zero_output_streaming_is_not_a_normal_ending(self):
        self.upstream.script(*[ok(out=0)] * 5)
        r = self.chat(stream=True)
        self.assertFalse(r.done())
        if r.status == 200:
            self.assertTrue(any("error" in c for c in r.chunks()), r)
        else:
            self.assertEqual(r.status, 502, r)
            self.assertTrue(r.header("Retry-After"))

    def test_stream_without_finish_non_streaming_client_is_error(self):
        self.upstream.script(*[Reply(200, START + text_parts("Cut"))] * 5)
        r = self.chat()
        self.assertGreaterEqual(r.status, 500, r)
        self.assertIn("error", r.json())

    def test_garbled_error_body_still_maps_status(self):
        self.upstream.script(*[http_error(401, "<html>nope</html>")] * 3)
        self.assertOpenAIError(self.chat(), 401)


class TestUpstreamPoolAfterAbnormalEnds(ProxyTestCase):
    """An upstream stream that ends abnormally must not leave a dead connection in the pool.

    Retries are off so a poisoned pool shows up as a failed next request instead of being
    hidden by an internal retry."""

    proxy_overrides = {"upstreamRetries": 0}

    def check_next_request_succeeds(self, bad_reply, stream=False):
        for _ in range(3):
            self.upstream.reset()
            self.upstream.script(bad_reply)
            first = self.chat(stream=stream)
            self.assertTrue(first.status >= 400 or not first.done(), first)
            second = self.chat(key=unique_key())
            self.assertEqual(second.status, 200, second)
            self.assertEqual(second.json()["choices"][0]["message"]["content"], "Hello world")

    def test_next_request_succeeds_after_inband_error_event(self):
        self.check_next_request_succeeds(
            Reply(200, START + [error_event("Invalid input", 400, False)]))

    def test_next_request_succeeds_after_stream_ended_without_finish(self):
        self.check_next_request_succeeds(Reply(200, START + text_parts("Cut")))

    def test_next_request_succeeds_after_error_event_mid_stream(self):
        self.check_next_request_succeeds(
            Reply(200, START + text_parts("Partial")[:2] + [error_event("boom", 500, False)]),
            stream=True)


class TestChunkedBodyFraming(unittest.TestCase):
    """The upstream body's chunked framing, undone by the proxy as bytes arrive."""

    BODY = (b"5;name=value\r\nhello\r\n1 ; x\r\n,\r\n6\r\n world\r\n"
            b"0\r\nTrailer: yes\r\n\r\n")

    def test_a_body_fed_a_byte_at_a_time_yields_its_payload_and_ends(self):
        framing = proxy.ChunkedBody()
        payload = b"".join(framing.feed(self.BODY[i:i + 1]) for i in range(len(self.BODY)))
        self.assertEqual(payload, b"hello, world")
        self.assertTrue(framing.done)
        self.assertEqual(framing.buffer, b"")

    def test_a_body_in_one_piece_is_one_payload_and_bytes_past_it_are_kept_aside(self):
        framing = proxy.ChunkedBody()
        self.assertEqual(framing.feed(self.BODY + b"HTTP/1.1 200"), b"hello, world")
        self.assertTrue(framing.done)
        self.assertEqual(framing.buffer, b"HTTP/1.1 200")   # the connection is not reused

    def test_size_lines_that_are_not_plain_hex_are_refused(self):
        for line in (b"-1", b"+5", b"0x5", b"1_0", b"zz", b"", b"5" * 17):
            with self.assertRaises(ValueError, msg=line):
                proxy.ChunkedBody().feed(line + b"\r\nhello\r\n")
        with self.assertRaises(ValueError):
            proxy.ChunkedBody().feed(b"1" * 5000)   # no end of line in sight

    def test_a_chunk_not_followed_by_crlf_is_refused(self):
        with self.assertRaises(ValueError):
            proxy.ChunkedBody().feed(b"5\r\nhelloXX0\r\n\r\n")


class TestUpstreamRequestIsOneWrite(unittest.TestCase):
    def test_the_request_head_and_its_body_leave_in_one_send(self):
        """http.client sends a head and its body in two calls: with Nagle off, two packets (two
        TLS records), an upstream blocked in recv() woken for the head alone."""
        near, far = socket.socketpair()
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        sends = []

        class Recording:   # the real socket, with each sendall() call noted
            def sendall(self, data):
                sends.append(bytes(data))
                near.sendall(data)

            def __getattr__(self, name):
                return getattr(near, name)
        conn = proxy.UpstreamHTTPConnection("127.0.0.1", 9)
        conn.sock = Recording()
        conn.request("POST", "/alpha/generate", b'{"params": {}}',
                     {"content-type": "application/json"})
        self.assertEqual(len(sends), 1, sends)
        self.assertTrue(sends[0].startswith(b"POST /alpha/generate HTTP/1.1\r\n"))
        self.assertTrue(sends[0].endswith(b'\r\n\r\n{"params": {}}'))
        far.settimeout(2)
        self.assertEqual(far.recv(65536), sends[0])


class TestUpstreamOverTls(ProxyTestCase):
    """api.commandcode.ai is HTTPS: the body is read from a non-blocking TLS socket, where a
    readable socket may hold part of a record and decrypted bytes may wait inside TLS. The fake
    upstream serves HTTPS with a test CA's certificate, trusted through upstreamCaFile."""

    upstream_tls = True
    proxy_overrides = {"upstreamCaFile": TLS_CA, "upstreamRetries": 0}

    def test_streamed_and_plain_answers_arrive_whole(self):
        r = self.chat(stream=True)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(chunk_content(r.chunks()), "Hello world")
        self.assertTrue(r.done())
        self.assertEqual(self.chat().json()["choices"][0]["message"]["content"], "Hello world")

    def test_thousands_of_events_and_a_megabyte_line_cross_tls_records_intact(self):
        texts = ["%d," % i for i in range(3000)] + ["y" * (1024 * 1024)]
        self.upstream.script(ok(text_parts(*texts)))
        r = self.chat(stream=True)
        self.assertEqual(chunk_content(r.chunks()), "".join(texts))
        self.assertTrue(r.done())

    def test_events_apart_in_time_arrive_and_the_connection_is_kept_alive(self):
        self.upstream.script(dripped(5, 0.05))
        r = self.chat(stream=True)
        self.assertEqual(chunk_content(r.chunks()), "xxxxx")
        self.assertEqual(self.chat().status, 200)
        gens = self.upstream.generates()
        self.assertEqual(gens[0]["client_port"], gens[1]["client_port"])

    def test_client_disconnect_closes_the_tls_connection_promptly(self):
        self.assertDisconnectClosesUpstream("chat", {
            "model": "claude-sonnet-5", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})

    def test_an_untrusted_certificate_is_a_502_that_says_so(self):
        server, stop = start_proxy(proxy_config(**dict(
            BASE_OVERRIDES, apiBase=self.upstream.url, upstreamRetries=0)))
        self.addCleanup(stop)
        body = {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}]}
        r = http_request(server.server_address[1], "POST", "/v1/chat/completions", body,
                         {"Authorization": "Bearer " + KEY})
        self.assertIn("SSLCertVerificationError", self.assertOpenAIError(r, 502)["message"])
        self.assertEqual(self.upstream.generates(), [])

    def test_a_ca_file_that_cannot_be_loaded_is_a_config_error(self):
        for path in ("/nonexistent/ca.pem", CAPTURE_FILE):
            with self.assertRaises(proxy.ConfigError) as caught:
                proxy.make_server(proxy_config(**dict(BASE_OVERRIDES, apiBase=self.upstream.url,
                                                      upstreamCaFile=path)))
            self.assertIn("upstreamCaFile", str(caught.exception))


class TestConnectionRefused(ProxyTestCase):
    @classmethod
    def setUpClass(cls):
        cls.api_base = "http://127.0.0.1:%d" % free_port()
        super().setUpClass()

    def test_connection_refused_is_retried_then_gateway_error(self):
        r = self.chat()
        self.assertIn(r.status, (502, 503, 504), r)
        self.assertOpenAIError(r, r.status)
        self.assertLess(r.elapsed, 10)


class TestTolerantNdjson(ProxyTestCase):
    def body(self, reply):
        self.upstream.script(reply)
        r = self.chat()
        self.assertEqual(r.status, 200, r)
        return r.json()["choices"][0]

    def test_blank_lines_are_ignored(self):
        lines = []
        for item in stream(text_parts("Hello", " there")):
            lines += ["", item, "   "]
        self.assertEqual(self.body(Reply(200, lines))["message"]["content"], "Hello there")

    def test_data_prefixed_lines_are_parsed(self):
        lines = ["data: " + json.dumps(i) for i in stream(text_parts("Pre", "fixed"))]
        self.assertEqual(self.body(Reply(200, lines))["message"]["content"], "Prefixed")

    def test_garbage_lines_are_skipped(self):
        items = stream(text_parts("Still", " fine"))
        lines = items[:3] + ["this is not json", "{broken", "<html>"] + items[3:]
        self.assertEqual(self.body(Reply(200, lines))["message"]["content"], "Still fine")

    def test_final_line_without_newline_is_parsed(self):
        items = stream(text_parts("Last"))
        lines = items[:-1] + [Raw(json.dumps(items[-1]))]
        choice = self.body(Reply(200, lines))
        self.assertEqual(choice["message"]["content"], "Last")
        self.assertEqual(choice["finish_reason"], "stop")

    def test_lines_split_across_network_writes_are_joined(self):
        data = "".join(json.dumps(i) + "\n" for i in stream(text_parts("Split", " up")))
        pieces = [Raw(data[i:i + 7]) for i in range(0, len(data), 7)]
        self.assertEqual(self.body(Reply(200, pieces))["message"]["content"], "Split up")

    def test_multibyte_utf8_split_across_network_writes(self):
        items = stream(text_parts("héllo ", "世界 ", "🎉"))
        data = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode("utf-8")
        pieces = [Raw(data[i:i + 5]) for i in range(0, len(data), 5)]
        self.assertEqual(self.body(Reply(200, pieces))["message"]["content"], "héllo 世界 🎉")

    def test_connection_close_framing_is_accepted(self):
        reply = Reply(200, stream(text_parts("Closed")), framing="close")
        self.assertEqual(self.body(reply)["message"]["content"], "Closed")

    def test_unknown_event_types_are_ignored(self):
        items = stream(text_parts("Ok"))
        lines = items[:2] + [{"type": "provider-metadata", "providerMetadata": {}},
                             {"type": "source", "id": "s"},
                             {"type": "raw", "rawValue": 1}] + items[2:]
        self.assertEqual(self.body(Reply(200, lines))["message"]["content"], "Ok")


# =======================================================================================
# Idle timeouts, keep-alives, client disconnect
# =======================================================================================

class TestIdleTimeoutAndKeepAlive(ProxyTestCase):
    proxy_overrides = {"streamIdleTimeoutMs": 500, "nonStreamIdleTimeoutMs": 500,
                       "keepAliveIntervalMs": 100, "upstreamRetries": 0}

    def test_sse_keepalive_comments_during_upstream_silence(self):
        self.upstream.script(Reply(200, START + text_parts("a")[:2] + [Sleep(0.3)]
                                   + text_parts("b")[1:] + finish_parts()))
        r = self.chat(stream=True)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.comments(), "expected ':' comment lines during silence")
        self.assertEqual(chunk_content(r.chunks()), "ab")
        self.assertTrue(r.done())
        raw = r.data.decode()
        self.assertLess(raw.index("\n:"), raw.index('"b"'))

    def test_anthropic_ping_events_during_upstream_silence(self):
        self.upstream.script(Reply(200, START + text_parts("a")[:2] + [Sleep(0.3)]
                                   + text_parts("b")[1:] + finish_parts()))
        r = self.messages(stream=True)
        names = [n for n, _ in r.typed_events()]
        self.assertIn("ping", names)
        self.assertEqual(names[-1], "message_stop")

    def test_stall_after_output_ends_stream_with_error_and_no_done(self):
        self.upstream.script(Reply(200, START + text_parts("partial")[:2] + [Stall(8)]
                                   + finish_parts()))
        r = self.chat(stream=True)
        self.assertLess(r.elapsed, 6)
        chunks = r.chunks()
        self.assertEqual(chunk_content(chunks), "partial")
        self.assertTrue(any("error" in c for c in chunks), chunks)
        self.assertFalse(r.done())
        rec = self.upstream.generates()[0]
        self.assertTrue(wait_for(lambda: rec["disconnected_at"], 3),
                        "the stalled upstream connection should be closed")

    def test_stall_before_output_non_streaming_is_error_status(self):
        self.upstream.script(Reply(200, START + [Stall(8)] + stream(text_parts("late"))[2:]))
        r = self.chat(key=unique_key())
        self.assertLess(r.elapsed, 6)
        self.assertGreaterEqual(r.status, 400, r)
        self.assertIn("error", r.json())

    def test_three_consecutive_timeouts_suggest_reducing_context(self):
        key = unique_key()
        last = None
        for _ in range(3):
            self.upstream.script(Reply(200, START + [Stall(8)]))
            last = self.chat(key=key)
            self.assertGreaterEqual(last.status, 400)
        self.assertIn("context", last.json()["error"]["message"].lower())


class TestStreamAndNonStreamIdleTimeoutsAreSeparate(ProxyTestCase):
    proxy_overrides = {"streamIdleTimeoutMs": 400, "nonStreamIdleTimeoutMs": 1500,
                       "keepAliveIntervalMs": 100, "upstreamRetries": 0}

    def silent_reply(self):
        return Reply(200, START + text_parts("a")[:2] + [Sleep(0.8)] + text_parts("b")[1:]
                     + finish_parts())

    def test_non_streaming_client_tolerates_silence_below_its_timeout(self):
        self.upstream.script(self.silent_reply())
        r = self.chat(key=unique_key())
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "ab")

    def test_streaming_client_times_out_on_the_same_silence(self):
        self.upstream.script(self.silent_reply())
        r = self.chat(stream=True, key=unique_key())
        self.assertFalse(r.done())
        self.assertTrue(any("error" in c for c in r.chunks()))


class TestClientDisconnect(ProxyTestCase):
    proxy_overrides = {"keepAliveIntervalMs": 100}

    def test_chat_client_disconnect_closes_upstream_connection_promptly(self):
        self.assertDisconnectClosesUpstream("chat", {
            "model": "claude-sonnet-5", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})

    def test_anthropic_client_disconnect_closes_upstream_connection_promptly(self):
        self.assertDisconnectClosesUpstream("messages", {
            "model": "claude-sonnet-5", "stream": True, "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]})

    def test_responses_client_disconnect_closes_upstream_connection_promptly(self):
        self.assertDisconnectClosesUpstream("responses", {
            "model": "claude-sonnet-5", "stream": True, "input": "hi"})

    def test_non_streaming_client_disconnect_closes_upstream_connection_promptly(self):
        self.upstream.script(Reply(200, START + text_parts("partial")[:2] + [Stall(10)]
                                   + finish_parts()))
        s = send_request(self.port, "chat", {"model": "claude-sonnet-5",
                                             "messages": [{"role": "user", "content": "hi"}]})
        self.assertTrue(wait_for(self.upstream.generates, 5))
        rec = self.upstream.generates()[0]
        time.sleep(0.2)  # the upstream is now silent and the proxy is waiting on it
        closed_at = time.monotonic()
        s.close()
        gone = wait_for(lambda: rec["disconnected_at"], 5)
        self.assertTrue(gone, "upstream never saw the connection close")
        self.assertLess(rec["disconnected_at"] - closed_at, 3.0)

    def test_hang_up_is_noticed_within_half_a_second_while_the_upstream_keeps_talking(self):
        # A delta every 50 ms: the backend never goes silent, so only a check on every batch
        # (not one during upstream silence) notices the client has gone.
        for front in FRONTS:
            for streaming in (False, True):
                with self.subTest(front=front, stream=streaming):
                    self.upstream.reset()
                    self.upstream.script(dripped(200, 0.05))
                    s = send_request(self.port, front, res_minimal_body(front, streaming))
                    self.assertTrue(wait_for(self.upstream.generates, 5))
                    rec = self.upstream.generates()[0]
                    time.sleep(0.3)   # the upstream is talking and the proxy relaying or folding
                    closed_at = time.monotonic()
                    s.close()
                    self.assertTrue(wait_for(lambda: rec["disconnected_at"], 5),
                                    "upstream never saw the connection close")
                    self.assertLess(rec["disconnected_at"] - closed_at, 0.8)
                    self.assertFalse(rec["completed"])

    def test_next_request_works_after_a_client_disconnect(self):
        self.assertDisconnectClosesUpstream("chat", {
            "model": "claude-sonnet-5", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})
        self.upstream.reset()
        r = self.chat(stream=True)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(chunk_content(r.chunks()), "Hello world")
        self.assertTrue(r.done())


# =======================================================================================
# Limits
# =======================================================================================

class TestLimits(ProxyTestCase):
    proxy_overrides = {"maxBodyBytes": 4000, "maxInFlight": 1}

    def test_body_larger_than_max_body_bytes_is_413(self):
        r = self.chat(messages=[{"role": "user", "content": "x" * 10000}])
        self.assertEqual(r.status, 413, r)
        self.assertNoUpstreamCall()

    def test_an_internal_failure_after_admission_gives_its_in_flight_slot_back(self):
        # maxInFlight is 1 here: a leaked slot would turn every later request into a 503.
        with self.assertLogs("cc-proxy", "ERROR"), \
                mock.patch.object(proxy, "estimate_request_tokens", side_effect=RuntimeError("boom")):
            r = self.chat()
        self.assertEqual(r.status, 500, r)
        self.assertNotIn(b"boom", r.data)
        self.assertEqual(self.server.pipeline.inflight.count, 0)
        self.assertEqual(self.chat().status, 200)

    def test_max_in_flight_overflow_is_503_with_retry_after(self):
        self.upstream.script(Reply(200, START + text_parts("slow")[:2] + [Sleep(1.0)]
                                   + text_parts("x")[2:] + finish_parts()))
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("first", self.chat()))
        t.start()
        try:
            self.assertTrue(wait_for(self.upstream.generates, 5))
            second = self.chat()
            self.assertEqual(second.status, 503, second)
            self.assertTrue(second.header("Retry-After"))
        finally:
            t.join(TIMEOUT)
        self.assertEqual(results["first"].status, 200, results["first"])
        # The slot is freed right after the first answer's last byte; allow that moment.
        tries = []
        wait_for(lambda: tries.append(self.chat()) or tries[-1].status != 503, 1.0, step=0.02)
        self.assertEqual(tries[-1].status, 200, "slot must be released after completion: %r"
                         % tries[-1])

    def test_health_is_not_limited_by_in_flight(self):
        self.assertEqual(self.request("GET", "/health", key=None).status, 200)


# =======================================================================================
# Models, health, CORS
# =======================================================================================

class TestModelsAndHealth(ProxyTestCase):
    def test_health_answers_ok_without_auth(self):
        r = self.request("GET", "/health", key=None)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["status"], "ok")
        self.assertTrue(r.header("X-Request-Id"))
        self.assertEqual(r.header("Server"), "cc-proxy/" + proxy.__version__)   # no trailing space

    def test_models_list_in_openai_shape(self):
        r = self.request("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["object"], "list")
        ids = [m["id"] for m in body["data"]]
        self.assertIn("deepseek/deepseek-v4-flash", ids)
        self.assertIn("claude-sonnet-5", ids)
        for m in body["data"]:
            self.assertEqual(m["object"], "model")

    def test_single_model_in_openai_shape(self):
        r = self.request("GET", "/v1/models/claude-sonnet-5")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["id"], "claude-sonnet-5")
        self.assertEqual(r.json()["object"], "model")

    def test_single_model_with_slash_in_id(self):
        r = self.request("GET", "/v1/models/deepseek/deepseek-v4-flash")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["id"], "deepseek/deepseek-v4-flash")

    def test_unknown_model_is_404(self):
        r = self.request("GET", "/v1/models/no-such-model-xyz")
        self.assertEqual(r.status, 404, r)

    def test_models_list_in_anthropic_shape_with_anthropic_version(self):
        r = self.request("GET", "/v1/models", headers={"anthropic-version": "2023-06-01"},
                         key_header="x-api-key")
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertIn("has_more", body)
        self.assertIn("first_id", body)
        self.assertIn("last_id", body)
        self.assertTrue(body["data"])
        for m in body["data"]:
            self.assertEqual(m["type"], "model")
            self.assertIn("display_name", m)
            self.assertIn("created_at", m)
        self.assertEqual(body["first_id"], body["data"][0]["id"])
        self.assertEqual(body["last_id"], body["data"][-1]["id"])

    def anthropic_models(self, query=""):
        return self.request("GET", "/v1/models" + query, key_header="x-api-key",
                            headers={"anthropic-version": "2023-06-01"})

    def test_anthropic_model_list_pages_by_limit_after_id_and_before_id(self):
        everything = self.anthropic_models("?limit=1000").json()
        ids = [m["id"] for m in everything["data"]]
        self.assertFalse(everything["has_more"])
        self.assertEqual(len(ids), len(proxy.CC_CATALOG))
        self.assertEqual(len(self.anthropic_models().json()["data"]), min(20, len(ids)))
        first = self.anthropic_models("?limit=3").json()
        self.assertEqual([m["id"] for m in first["data"]], ids[:3])
        self.assertEqual((first["has_more"], first["first_id"], first["last_id"]),
                         (True, ids[0], ids[2]))
        after = self.anthropic_models("?limit=3&after_id=" + urllib.parse.quote(ids[2])).json()
        self.assertEqual([m["id"] for m in after["data"]], ids[3:6])
        before = self.anthropic_models("?limit=2&before_id=" + urllib.parse.quote(ids[5])).json()
        self.assertEqual([m["id"] for m in before["data"]], ids[3:5])
        last = self.anthropic_models("?limit=5&after_id=" + urllib.parse.quote(ids[-2])).json()
        self.assertEqual(([m["id"] for m in last["data"]], last["has_more"]), ([ids[-1]], False))
        for bad in ("?limit=0", "?limit=1001", "?limit=x", "?after_id=nope"):
            self.assertEqual(self.anthropic_models(bad).status, 400, bad)

    def test_single_model_in_anthropic_shape(self):
        r = self.request("GET", "/v1/models/claude-sonnet-5",
                         headers={"anthropic-version": "2023-06-01"}, key_header="x-api-key")
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["type"], "model")
        self.assertEqual(body["id"], "claude-sonnet-5")
        self.assertIn("display_name", body)

    def test_cors_preflight_is_answered_with_allow_headers(self):
        r = self.request("OPTIONS", "/v1/chat/completions", key=None,
                         headers={"Origin": "http://localhost:5173",
                                  "Access-Control-Request-Method": "POST"})
        self.assertIn(r.status, (200, 204))
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")
        self.assertIn("POST", r.header("Access-Control-Allow-Methods") or "")

    def test_cors_header_on_normal_responses(self):
        r = self.chat(headers={"Origin": "http://localhost:5173"})
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")

    def test_metrics_in_prometheus_text_format(self):
        self.chat()
        r = self.request("GET", "/metrics", key=None)
        self.assertEqual(r.status, 200, r)
        self.assertIn("text/plain", r.header("Content-Type"))
        text = r.data.decode()
        self.assertIn("# TYPE", text)
        self.assertRegex(text, r"(?m)^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [0-9.eE+-]+$")


class TestModelMapAliasesAreListed(ProxyTestCase):
    proxy_overrides = {"modelMap": {"claude-cc-deepseek": "deepseek/deepseek-v4-flash",
                                    "claude-haiku-*": "gpt-5.5"}}

    def test_a_plain_alias_is_listed_under_its_name_with_its_targets_label_globs_are_not(self):
        data = self.request("GET", "/v1/models?limit=1000", key_header="x-api-key",
                            headers={"anthropic-version": "2023-06-01"}).json()["data"]
        by_id = {m["id"]: m for m in data}
        self.assertIn("claude-cc-deepseek", by_id)
        self.assertIn(proxy.CC_CATALOG["deepseek/deepseek-v4-flash"].label,
                      by_id["claude-cc-deepseek"]["display_name"])
        self.assertFalse(any("*" in i for i in by_id))
        self.assertIn("claude-cc-deepseek",
                      [m["id"] for m in self.request("GET", "/v1/models").json()["data"]])


class TestProviderModelsNeverBlockAListing(ProxyTestCase):
    proxy_overrides = {"useProviderModels": True}

    def test_a_slow_provider_list_does_not_delay_v1_models(self):
        self.upstream.model_list_delay = 3.0
        self.addCleanup(setattr, self.upstream, "model_list_delay", 0)
        started = time.monotonic()
        r = self.request("GET", "/v1/models", key=unique_key())
        self.assertEqual(r.status, 200, r)
        self.assertLess(time.monotonic() - started, 2.0)   # Claude Code gives discovery 3 s
        self.assertIn("claude-sonnet-5", [m["id"] for m in r.json()["data"]])


class TestProviderModels(ProxyTestCase):
    proxy_overrides = {"useProviderModels": True}

    def setUp(self):
        pass  # keep the upstream's history: the list may have been fetched at start-up

    def test_models_list_built_from_provider_models(self):
        ids = []

        def listed():
            r = self.request("GET", "/v1/models")
            self.assertEqual(r.status, 200, r)
            ids[:] = [m["id"] for m in r.json()["data"]]
            return "fake/provider-model-x" in ids
        wait_for(listed, 5, step=0.1)
        self.assertIn("fake/provider-model-x", ids)
        paths = [rec["path"] for rec in self.upstream.requests]
        self.assertIn("/provider/v1/models", [p.split("?")[0] for p in paths])


# What Codex's ModelInfo (codex-rs protocol/src/openai_models.rs) requires of a catalog entry, in
# old versions and new: field -> accepted JSON types. One missing, or of another type, and Codex
# refuses the whole catalog (newer ones take model_messages.instructions_template instead of
# base_instructions).
CODEX_REQUIRED_FIELDS = {
    "slug": (str,), "display_name": (str,), "supported_reasoning_levels": (list,),
    "shell_type": (str,), "visibility": (str,), "supported_in_api": (bool,), "priority": (int,),
    "base_instructions": (str,), "supports_reasoning_summaries": (bool,),
    "support_verbosity": (bool,), "truncation_policy": (dict,),
    "supports_parallel_tool_calls": (bool,), "experimental_supported_tools": (list,)}
CODEX_OPTIONAL_FIELDS = {
    "description": (str, type(None)), "upgrade": (dict, type(None)),
    "default_verbosity": (str, type(None)), "apply_patch_tool_type": (str, type(None)),
    "context_window": (int,), "input_modalities": (list,), "default_reasoning_level": (str,)}
CODEX_REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
CODEX_VERSION_QUERY = "?client_version=0.171.0"


class TestCodexModelCatalog(ProxyTestCase):
    """GET /v1/models?client_version=...: Codex's catalog, built from the same model list, with a
    strong ETag and 304 for If-None-Match."""

    instructions = "The operator's system prompt for Codex.\n"
    proxy_overrides = {"modelMap": {"codex-sonnet": "claude-sonnet-5",
                                    "mystery": "vendor/unknown-model"}}

    @classmethod
    def setUpClass(cls):
        cls.prompt_file = cls.write_prompt(cls.addClassCleanup, cls.instructions)
        cls.proxy_overrides = dict(cls.proxy_overrides, codexInstructionsFile=cls.prompt_file)
        super().setUpClass()

    @staticmethod
    def write_prompt(cleanup, text):
        """A codexInstructionsFile holding `text`, removed through `cleanup`."""
        folder = tempfile.mkdtemp(prefix="cc-proxy-codex-")
        cleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "codex-prompt.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def catalog(self, port=None, headers=None):
        h = {"Authorization": "Bearer " + KEY}
        h.update(headers or {})
        return http_request(port or self.port, "GET", "/v1/models" + CODEX_VERSION_QUERY,
                            headers=h)

    def entries(self):
        r = self.catalog()
        self.assertEqual(r.status, 200, r)
        return {m["slug"]: m for m in r.json()["models"]}

    def other_proxy(self, **overrides):
        """A second proxy on the same fake upstream -> its port."""
        config = dict(BASE_OVERRIDES, apiBase=self.upstream.url, **overrides)
        server, stop = start_proxy(proxy_config(**config))
        self.addCleanup(stop)
        return server.server_address[1]

    def test_every_entry_has_the_fields_and_types_codex_requires(self):
        r = self.catalog()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Content-Type"), "application/json")
        body = r.json()
        self.assertEqual(list(body), ["models"])
        for entry in body["models"]:
            for name, types in CODEX_REQUIRED_FIELDS.items():
                self.assertIn(name, entry, entry["slug"])
                self.assertIn(type(entry[name]), types, (entry["slug"], name))
            for name, types in CODEX_OPTIONAL_FIELDS.items():
                if name in entry:
                    self.assertIn(type(entry[name]), types, (entry["slug"], name))
            self.assertIn(entry["shell_type"], ("default", "shell_command"))
            self.assertIn(entry["visibility"], ("list", "hide", "none"))
            self.assertIn(entry["truncation_policy"]["mode"], ("bytes", "tokens"))
            self.assertIs(type(entry["truncation_policy"]["limit"]), int)
            self.assertTrue(set(entry["input_modalities"]) <= {"text", "image"})
            self.assertGreater(entry["context_window"], 0)
            # Codex sends it as its whole system prompt: the operator's text, never another
            self.assertEqual(entry["base_instructions"], self.instructions)
        self.assertEqual(len({m["priority"] for m in body["models"]}), len(body["models"]))

    def test_it_lists_the_same_models_as_the_plain_list_where_their_metadata_is_known(self):
        slugs = set(self.entries())
        plain = {m["id"] for m in self.request("GET", "/v1/models").json()["data"]}
        self.assertEqual(slugs, {m.id for m in proxy.CC_CATALOG.values()} | {"codex-sonnet"})
        self.assertIn("mystery", plain)          # an alias of a model nothing is known of:
        self.assertNotIn("mystery", slugs)       # Codex keeps its fallback for it
        self.assertEqual(slugs, plain - {"mystery"})

    def test_each_model_offers_its_own_reasoning_levels_in_codex_names(self):
        entries = self.entries()
        for slug, entry in entries.items():
            info = proxy.CC_CATALOG.get(slug.lower()) or proxy.CC_CATALOG["claude-sonnet-5"]
            levels = [level["effort"] for level in entry["supported_reasoning_levels"]]
            self.assertEqual(levels, list(info.efforts), slug)
            self.assertTrue(set(levels) <= set(CODEX_REASONING_EFFORTS), slug)
            self.assertTrue(all(isinstance(level["description"], str) and level["description"]
                                for level in entry["supported_reasoning_levels"]), slug)
            self.assertEqual(entry["supports_reasoning_summaries"], bool(levels), slug)
            self.assertEqual(entry["input_modalities"],
                             ["text", "image"] if info.images else ["text"], slug)
            self.assertEqual(entry["context_window"], info.context, slug)
        sonnet, flash = entries["claude-sonnet-5"], entries["deepseek/deepseek-v4-flash"]
        self.assertEqual(sonnet["default_reasoning_level"], "medium")
        self.assertEqual([lv["effort"] for lv in flash["supported_reasoning_levels"]],
                         ["high", "max"])
        self.assertEqual(flash["default_reasoning_level"], "high")   # nearest to medium it takes
        kimi = entries["moonshotai/Kimi-K2.6"]
        self.assertEqual(kimi["supported_reasoning_levels"], [])
        self.assertNotIn("default_reasoning_level", kimi)
        self.assertEqual(entries["codex-sonnet"]["supported_reasoning_levels"],
                         sonnet["supported_reasoning_levels"])

    def test_the_etag_is_strong_and_stable(self):
        first, second = self.catalog(), self.catalog()
        self.assertRegex(first.header("ETag") or "", r'^"[0-9a-f]{32}"$')   # strong: no W/
        self.assertEqual(first.header("ETag"), second.header("ETag"))
        self.assertEqual(first.data, second.data)

    def test_if_none_match_naming_the_etag_gets_304_with_no_body(self):
        etag = self.catalog().header("ETag")
        for given in (etag, "W/" + etag, '"stale", ' + etag, "*"):
            r = self.catalog(headers={"If-None-Match": given})
            self.assertEqual(r.status, 304, given)
            self.assertEqual(r.data, b"", given)
            self.assertEqual(r.header("ETag"), etag, given)
            self.assertIsNone(r.header("Content-Type"), given)
        stale = self.catalog(headers={"If-None-Match": '"stale"'})
        self.assertEqual(stale.status, 200)
        self.assertEqual(stale.header("ETag"), etag)
        self.assertTrue(stale.json()["models"])

    def test_a_different_catalog_has_a_different_etag(self):
        ours = self.catalog()
        more = self.catalog(self.other_proxy(codexInstructionsFile=self.prompt_file, modelMap={
            "codex-sonnet": "claude-sonnet-5", "codex-flash": "deepseek/deepseek-v4-flash"}))
        prompt = self.write_prompt(self.addCleanup, "Another prompt.\n")
        reworded = self.catalog(self.other_proxy(codexInstructionsFile=prompt,
                                                 modelMap=self.config["modelMap"]))
        self.assertIn("codex-flash", [m["slug"] for m in more.json()["models"]])
        etags = {ours.header("ETag"), more.header("ETag"), reworded.header("ETag")}
        self.assertEqual(len(etags), 3, etags)
        self.assertEqual(self.catalog(headers={"If-None-Match": more.header("ETag")}).status, 200)

    def test_the_plain_model_list_is_unchanged(self):
        for path in ("/v1/models", "/v1/models?limit=5"):
            r = self.request("GET", path)
            self.assertEqual(r.status, 200, r)
            body = r.json()
            self.assertEqual(list(body), ["object", "data"])
            self.assertEqual(body["data"][0], {"id": "claude-sonnet-5", "object": "model",
                                               "created": 0, "owned_by": "commandcode"})
        anthropic = self.request("GET", "/v1/models", key_header="x-api-key",
                                 headers={"anthropic-version": "2023-06-01"}).json()
        self.assertEqual(anthropic["data"][0]["type"], "model")

    def test_without_an_instructions_file_the_catalog_is_off(self):
        port = self.other_proxy()
        r = self.catalog(port)
        error = self.assertOpenAIError(r, 404)
        self.assertEqual(error["code"], "codex_catalog_off")
        self.assertIn("codexInstructionsFile", error["message"])
        self.assertEqual(http_request(port, "GET", "/v1/models").status, 200)

    def test_an_empty_or_missing_instructions_file_stops_the_start(self):
        for path in (self.write_prompt(self.addCleanup, " \n"), "/nonexistent/codex-prompt.md"):
            config = proxy_config(**dict(BASE_OVERRIDES, apiBase=self.upstream.url,
                                         codexInstructionsFile=path))
            with self.assertRaises(proxy.ConfigError) as caught:
                start_proxy(config)
            self.assertIn("codexInstructionsFile", str(caught.exception))


# =======================================================================================
# Anthropic Messages front end
# =======================================================================================

ANTHROPIC_ORDER_RE = re.compile(
    r"^message_start (ping )*"
    r"(content_block_start (content_block_delta |ping )*content_block_stop (ping )*)*"
    r"message_delta message_stop $")


class TestAnthropicStreaming(ProxyTestCase):
    def events(self, reply, **kw):
        self.upstream.script(reply)
        r = self.messages(stream=True, **kw)
        self.assertEqual(r.status, 200, r)
        self.assertIn("text/event-stream", r.header("Content-Type"))
        evs = r.typed_events()
        for name, data in evs:
            self.assertEqual(name, data.get("type"), "event: line must match data.type")
        return evs

    def assertOrder(self, evs):
        seq = "".join(n + " " for n, _ in evs)
        self.assertRegex(seq, ANTHROPIC_ORDER_RE)

    def blocks(self, evs):
        """index -> (start block, [deltas])"""
        out = {}
        for name, d in evs:
            if name == "content_block_start":
                out[d["index"]] = (d["content_block"], [])
            elif name == "content_block_delta":
                out[d["index"]][1].append(d["delta"])
        return out

    def test_text_stream_event_order_on_raw_bytes(self):
        evs = self.events(ok(text_parts("Hello", " world")))
        self.assertOrder(evs)
        blocks = self.blocks(evs)
        self.assertEqual(list(blocks), [0])
        self.assertEqual(blocks[0][0]["type"], "text")
        self.assertEqual("".join(d["text"] for d in blocks[0][1] if d["type"] == "text_delta"),
                         "Hello world")

    def test_message_start_carries_an_empty_assistant_message(self):
        evs = self.events(ok(text_parts("Hi")))
        msg = evs[0][1]["message"]
        self.assertTrue(msg["id"].startswith("msg_"))
        self.assertEqual(msg["type"], "message")
        self.assertEqual(msg["role"], "assistant")
        self.assertEqual(msg["content"], [])
        self.assertIn("model", msg)
        self.assertIsInstance(msg["usage"]["input_tokens"], int)

    def test_block_indexes_contiguous_and_blocks_not_interleaved(self):
        evs = self.events(ok(reasoning_parts("think"), text_parts("Let me look."),
                             tool_parts("toolu_1", "Read", {"file_path": "/a"}),
                             reason="tool-calls", raw="tool_use"))
        self.assertOrder(evs)
        open_index = None
        starts = []
        for name, d in evs:
            if name == "content_block_start":
                self.assertIsNone(open_index, "a block started before the previous stopped")
                open_index = d["index"]
                starts.append(d["index"])
            elif name == "content_block_delta":
                self.assertEqual(d["index"], open_index)
            elif name == "content_block_stop":
                self.assertEqual(d["index"], open_index)
                open_index = None
        self.assertEqual(starts, list(range(len(starts))))
        self.assertEqual([b[0]["type"] for b in self.blocks(evs).values()],
                         ["thinking", "text", "tool_use"])

    def test_thinking_block_has_thinking_deltas_then_signature_delta(self):
        evs = self.events(ok(reasoning_parts("The user greets me; ", "answer briefly."),
                             text_parts("Hi!")))
        self.assertOrder(evs)
        start, deltas = self.blocks(evs)[0]
        self.assertEqual(start["type"], "thinking")
        kinds = [d["type"] for d in deltas]
        self.assertIn("signature_delta", kinds)
        self.assertEqual(kinds[-1], "signature_delta")
        self.assertTrue(all(k == "thinking_delta" for k in kinds[:-1]))
        self.assertEqual("".join(d["thinking"] for d in deltas if d["type"] == "thinking_delta"),
                         "The user greets me; answer briefly.")
        sig = deltas[-1]["signature"]
        self.assertIsInstance(sig, str)
        self.assertTrue(sig)

    def test_interleaved_thinking_and_text_make_separate_blocks(self):
        evs = self.events(ok(reasoning_parts("t1", part_id="rs-0"),
                             text_parts("a", part_id="txt-0"),
                             reasoning_parts("t2", part_id="rs-1"),
                             text_parts("b", part_id="txt-1")))
        self.assertOrder(evs)
        blocks = self.blocks(evs)
        self.assertEqual(list(blocks), [0, 1, 2, 3])
        self.assertEqual([b[0]["type"] for b in blocks.values()],
                         ["thinking", "text", "thinking", "text"])

    def test_message_start_carries_positive_input_estimate(self):
        evs = self.events(ok(text_parts("Hi")))
        self.assertGreater(evs[0][1]["message"]["usage"]["input_tokens"], 0)

    def test_streaming_response_carries_request_id_header(self):
        self.upstream.script(ok(text_parts("Hi")))
        r = self.messages(stream=True)
        self.assertTrue(r.header("request-id") or r.header("X-Request-Id"))

    def test_tool_use_block_streams_input_json_delta_fragments(self):
        args = {"command": "ls -la", "description": "list"}
        text = json.dumps(args)
        frags = [text[:5], text[5:17], text[17:]]
        evs = self.events(ok(tool_parts("toolu_1", "Bash", args, frags),
                             reason="tool-calls", raw="tool_use"))
        self.assertOrder(evs)
        start, deltas = self.blocks(evs)[0]
        self.assertEqual(start["type"], "tool_use")
        self.assertEqual(start["name"], "Bash")
        self.assertTrue(start["id"])
        self.assertEqual(start["input"], {})
        self.assertTrue(all(d["type"] == "input_json_delta" for d in deltas))
        self.assertGreaterEqual(len(deltas), 3)
        self.assertEqual(json.loads("".join(d["partial_json"] for d in deltas)), args)
        message_delta = [d for n, d in evs if n == "message_delta"][0]
        self.assertEqual(message_delta["delta"]["stop_reason"], "tool_use")

    def test_lone_tool_call_sends_whole_json_in_one_fragment(self):
        args = {"file_path": "/tmp/x"}
        evs = self.events(ok(tool_parts("toolu_2", "Read", args, streamed=False),
                             reason="tool-calls", raw="tool_use"))
        self.assertOrder(evs)
        blocks = self.blocks(evs)
        self.assertEqual(len(blocks), 1, "no empty text block next to a tool call")
        start, deltas = blocks[0]
        self.assertEqual(start["type"], "tool_use")
        self.assertEqual(len(deltas), 1)
        self.assertEqual(json.loads(deltas[0]["partial_json"]), args)

    def test_usage_input_tokens_exclude_cache_reads_and_writes(self):
        evs = self.events(ok(text_parts("Hello")))
        u = [d for n, d in evs if n == "message_delta"][0]["usage"]
        self.assertEqual(u["input_tokens"], 32)
        self.assertEqual(u["cache_read_input_tokens"], 7168)
        self.assertEqual(u["cache_creation_input_tokens"], 200)
        self.assertEqual(u["output_tokens"], 12)

    def test_stop_reason_end_turn(self):
        evs = self.events(ok(text_parts("Hello")))
        self.assertEqual([d for n, d in evs if n == "message_delta"][0]["delta"]["stop_reason"],
                         "end_turn")

    def test_error_after_output_is_error_event_without_message_stop(self):
        evs = self.events(Reply(200, START + text_parts("Partial")[:2]
                                + [error_event("overloaded", 529, False)]))
        names = [n for n, _ in evs]
        self.assertIn("error", names)
        self.assertNotIn("message_stop", names)
        err = [d for n, d in evs if n == "error"][0]
        self.assertEqual(err["type"], "error")
        self.assertEqual(err["error"]["type"], "overloaded_error")
        self.assertIsInstance(err["error"]["message"], str)

    def test_beta_query_is_accepted(self):
        self.upstream.script(ok(text_parts("Hi")))
        r = self.messages(stream=True, path="/v1/messages?beta=true")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.typed_events()[-1][0], "message_stop")


class TestAnthropicNonStreaming(ProxyTestCase):
    def test_non_stream_message_shape(self):
        r = self.messages()
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["type"], "message")
        self.assertEqual(body["role"], "assistant")
        self.assertTrue(body["id"].startswith("msg_"))
        self.assertEqual(body["content"], [{"type": "text", "text": "Hello world"}])
        self.assertEqual(body["stop_reason"], "end_turn")
        self.assertIn("stop_sequence", body)
        self.assertEqual(body["usage"]["input_tokens"], 32)
        self.assertEqual(body["usage"]["cache_read_input_tokens"], 7168)
        self.assertEqual(body["usage"]["cache_creation_input_tokens"], 200)
        self.assertEqual(body["usage"]["output_tokens"], 12)

    def test_non_stream_thinking_block_with_signature(self):
        self.upstream.script(ok(reasoning_parts("hmm"), text_parts("Hi")))
        content = self.messages().json()["content"]
        self.assertEqual([b["type"] for b in content], ["thinking", "text"])
        self.assertEqual(content[0]["thinking"], "hmm")
        self.assertTrue(content[0]["signature"])

    def test_non_stream_tool_use_block(self):
        self.upstream.script(ok(tool_parts("toolu_1", "Read", {"file_path": "/a"}),
                                reason="tool-calls", raw="tool_use"))
        body = self.messages().json()
        self.assertEqual(body["stop_reason"], "tool_use")
        self.assertEqual(len(body["content"]), 1)
        block = body["content"][0]
        self.assertEqual(block["type"], "tool_use")
        self.assertEqual(block["name"], "Read")
        self.assertEqual(block["input"], {"file_path": "/a"})
        self.assertTrue(block["id"])

    def test_stop_reason_max_tokens(self):
        self.upstream.script(ok(text_parts("trunc"), reason="length", raw="max_tokens"))
        self.assertEqual(self.messages().json()["stop_reason"], "max_tokens")

    def test_stop_reason_refusal_for_content_filter(self):
        self.upstream.script(ok(text_parts("no"), reason="content-filter", raw="refusal"))
        self.assertEqual(self.messages().json()["stop_reason"], "refusal")

    def test_stop_reason_stop_sequence_names_the_sequence(self):
        self.upstream.script(ok(text_parts("1 2 3"), reason="stop", raw="stop_sequence"))
        body = self.messages(stop_sequences=["END"]).json()
        self.assertEqual(self.upstream_params()["stop"], ["END"])
        self.assertEqual(body["stop_reason"], "stop_sequence")
        self.assertEqual(body["stop_sequence"], "END")


class TestAnthropicRequestTranslation(ProxyTestCase):
    def test_system_string_sent_as_text_parts(self):
        self.messages(system="You are Claude Code.")
        system = self.upstream_params()["system"]
        self.assertIsInstance(system, list)
        self.assertIn("You are Claude Code.", "".join(p["text"] for p in system))

    def test_system_blocks_keep_cache_control(self):
        self.messages(system=[{"type": "text", "text": "BLOCK-A",
                               "cache_control": {"type": "ephemeral"}},
                              {"type": "text", "text": "BLOCK-B"}])
        system = self.upstream_params()["system"]
        text = "".join(p["text"] for p in system)
        self.assertLess(text.index("BLOCK-A"), text.index("BLOCK-B"))
        part_a = [p for p in system if "BLOCK-A" in p["text"]][0]
        self.assertEqual(part_a.get("cache_control"), {"type": "ephemeral"})

    def test_role_system_messages_are_folded_into_system_in_order(self):
        msgs = [{"role": "user", "content": "hi"},
                {"role": "system", "content": [{"type": "text", "text": "ENV-BLOCK"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "system", "content": "LATER-NOTE"},
                {"role": "user", "content": "go"}]
        r = self.messages(messages=msgs, system="BASE")
        self.assertEqual(r.status, 200, r)
        params = self.upstream_params()
        text = self.system_text(params)
        self.assertLess(text.index("BASE"), text.index("ENV-BLOCK"))
        self.assertLess(text.index("ENV-BLOCK"), text.index("LATER-NOTE"))
        self.assertEqual([m["role"] for m in params["messages"]], ["user", "assistant", "user"])

    def test_tool_without_input_schema_gets_empty_object_schema(self):
        r = self.messages(tools=[{"name": "DeferredToolPlaceholder", "description": "later",
                                  "defer_loading": True},
                                 {"name": "Bash", "description": "run",
                                  "input_schema": {"type": "object",
                                                   "properties": {"command": {"type": "string"}}}}])
        self.assertEqual(r.status, 200, r)
        tools = {t["name"]: t for t in self.upstream_params()["tools"]}
        self.assertEqual(tools["DeferredToolPlaceholder"]["input_schema"],
                         {"type": "object", "properties": {}})
        for t in tools.values():
            self.assertNotIn("type", t)

    def test_server_tools_are_dropped_and_named_in_a_header(self):
        r = self.messages(tools=[{"type": "web_search_20250305", "name": "web_search",
                                  "max_uses": 5},
                                 {"name": "Bash", "description": "run",
                                  "input_schema": {"type": "object", "properties": {}}}])
        self.assertEqual(r.status, 200, r)
        names = [t["name"] for t in self.upstream_params()["tools"]]
        self.assertEqual(names, ["Bash"])
        self.assertTrue(any("web_search" in v for _, v in r.headers.items()),
                        "dropped tool should be named in a response header")

    def test_thinking_budget_maps_to_effort(self):
        for budget, effort in ((12000, "high"), (6000, "medium"), (2000, "low")):
            self.upstream.reset()
            self.messages(model="claude-sonnet-5",
                          thinking={"type": "enabled", "budget_tokens": budget})
            self.assertEqual(self.upstream_params()["reasoning_effort"], effort, budget)

    def test_thinking_effort_is_clamped_to_model_levels(self):
        self.messages(model="deepseek/deepseek-v4-flash",
                      thinking={"type": "enabled", "budget_tokens": 2000})
        self.assertEqual(self.upstream_params()["reasoning_effort"], "high")

    def test_output_config_effort_is_used(self):
        self.messages(model="claude-sonnet-5", thinking={"type": "adaptive", "display": "omitted"},
                      output_config={"effort": "medium"})
        self.assertEqual(self.upstream_params()["reasoning_effort"], "medium")

    def test_context_management_and_output_config_travel_together_with_their_betas(self):
        # as Claude Code sends them: both fields, with their anthropic-beta values
        r = self.messages(model="claude-sonnet-5", thinking={"type": "adaptive"},
                          output_config={"effort": "high"},
                          context_management={"edits": [{"type": "clear_thinking_20251015",
                                                         "keep": "all"}]},
                          headers={"anthropic-beta": "claude-code-20250219,"
                                   "context-management-2025-06-27,effort-2025-11-24"})
        self.assertEqual(r.status, 200, r)
        params = self.upstream_params()
        self.assertEqual(params["reasoning_effort"], "high")
        # neither is forwarded on its own: the envelope has no such fields, so no half pair
        self.assertNotIn("context_management", params)
        self.assertNotIn("output_config", params)

    def test_thinking_disabled_sends_no_effort(self):
        self.messages(model="claude-sonnet-5", thinking={"type": "disabled"})
        self.assertNotIn("reasoning_effort", self.upstream_params())

    def test_tool_choice_none_sends_no_tools(self):
        r = self.messages(tool_choice={"type": "none"},
                          tools=[{"name": "Bash", "description": "run",
                                  "input_schema": {"type": "object", "properties": {}}}])
        self.assertEqual(r.status, 200, r)
        self.assertFalse(self.upstream_params().get("tools"))

    def test_tool_choice_any_and_tool_are_accepted(self):
        tools = [{"name": "Bash", "description": "run",
                  "input_schema": {"type": "object", "properties": {}}}]
        for choice in ({"type": "any"}, {"type": "tool", "name": "Bash"}, {"type": "auto"}):
            self.upstream.reset()
            r = self.messages(tool_choice=choice, tools=tools)
            self.assertEqual(r.status, 200, (choice, r))
            self.assertEqual([t["name"] for t in self.upstream_params()["tools"]], ["Bash"])

    def test_top_k_is_ignored_and_temperature_forwarded(self):
        r = self.messages(top_k=40, temperature=0.2)
        self.assertEqual(r.status, 200, r)
        params = self.upstream_params()
        self.assertNotIn("top_k", params)
        self.assertEqual(params["temperature"], 0.2)

    def test_metadata_user_id_json_session_becomes_upstream_session(self):
        sid = str(uuid.uuid4())
        user_id = json.dumps({"device_id": "ab" * 32, "account_uuid": "", "session_id": sid})
        self.messages(key=unique_key(), metadata={"user_id": user_id})
        rec = self.last_generate()
        self.assertEqual(header_map(rec)["x-session-id"], sid)
        self.assertEqual(rec["body"]["threadId"], sid)

    def test_metadata_user_id_legacy_session_becomes_upstream_session(self):
        sid = str(uuid.uuid4())
        self.messages(key=unique_key(),
                      metadata={"user_id": "user_%s_account__session_%s" % ("cd" * 32, sid)})
        rec = self.last_generate()
        self.assertEqual(header_map(rec)["x-session-id"], sid)
        self.assertEqual(rec["body"]["threadId"], sid)

    def test_tool_use_and_tool_result_translation(self):
        msgs = [{"role": "user", "content": "run it"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Running."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                     "input": {"command": "echo hi"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "hi"}]}]
        r = self.messages(messages=msgs)
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool"])
        self.assertIn({"type": "tool-call", "toolCallId": "toolu_1", "toolName": "Bash",
                       "input": {"command": "echo hi"}}, up[1]["content"])
        self.assertEqual(up[2]["content"], [{"type": "tool-result", "toolCallId": "toolu_1",
                                             "toolName": "Bash",
                                             "output": {"type": "text", "value": "hi"}}])

    def test_tool_result_with_image_becomes_placeholder_and_following_user_image(self):
        msgs = [{"role": "user", "content": "look at dot.png"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "Read",
                     "input": {"file_path": "dot.png"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                        {"type": "text", "text": "Read image"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                     "data": PNG_1PX}}]}]}]
        r = self.messages(messages=msgs, model="claude-sonnet-5")
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool", "user"])
        result = up[2]["content"][0]
        self.assertEqual(result["type"], "tool-result")
        self.assertEqual(result["output"]["type"], "text")
        self.assertIn("Read image", result["output"]["value"])
        self.assertGreater(len(result["output"]["value"]), len("Read image"),
                           "a placeholder for the image is expected in the result text")
        images = [p for p in up[3]["content"] if p["type"] == "image"]
        self.assertEqual(images, [{"type": "image", "image": "data:image/png;base64," + PNG_1PX,
                                   "mimeType": "image/png"}])

    def test_user_turn_with_tool_results_and_text_becomes_tool_then_user_message(self):
        msgs = [{"role": "user", "content": "do both"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_a", "name": "Read", "input": {"p": "a"}},
                    {"type": "tool_use", "id": "toolu_b", "name": "Bash", "input": {"c": "b"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_a",
                     "content": [{"type": "text", "text": "A1"}, {"type": "text", "text": "A2"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_b", "content": "failed",
                     "is_error": True},
                    {"type": "text", "text": "continue please"}]}]
        r = self.messages(messages=msgs)
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool", "user"])
        results = up[2]["content"]
        self.assertEqual([(x["toolCallId"], x["toolName"]) for x in results],
                         [("toolu_a", "Read"), ("toolu_b", "Bash")])
        self.assertEqual(results[0]["output"]["type"], "text")
        self.assertIn("A1", results[0]["output"]["value"])
        self.assertIn("A2", results[0]["output"]["value"])
        self.assertEqual(results[1]["output"]["type"], "text")
        self.assertIn("failed", results[1]["output"]["value"])
        self.assertEqual(up[3]["content"], [{"type": "text", "text": "continue please"}])

    def test_thinking_blocks_are_replayed_as_reasoning_without_signature(self):
        msgs = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "deep thought", "signature": "sig123"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "answer"}]},
                {"role": "user", "content": "again"}]
        r = self.messages(messages=msgs)
        self.assertEqual(r.status, 200, r)
        assistant = self.upstream_params()["messages"][1]
        reasoning = [p for p in assistant["content"] if p["type"] == "reasoning"]
        self.assertTrue(reasoning)
        self.assertEqual(reasoning[0]["text"], "deep thought")
        self.assertNotIn("signature", reasoning[0])

    def test_image_block_sent_as_image_part(self):
        r = self.messages(messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG_1PX}},
            {"type": "text", "text": "what?"}]}])
        self.assertEqual(r.status, 200, r)
        parts = self.upstream_params()["messages"][0]["content"]
        self.assertEqual(parts[0], {"type": "image", "image": "data:image/png;base64," + PNG_1PX,
                                    "mimeType": "image/png"})

    def test_deprecated_claude_id_canonicalised(self):
        self.messages(model="claude-sonnet-4-5-20250929")
        self.assertEqual(self.upstream_params()["model"], "claude-sonnet-4-6")

    def test_max_tokens_forwarded_and_clamped(self):
        self.messages(max_tokens=128000)
        self.assertEqual(self.upstream_params()["max_tokens"], 128000)
        self.upstream.reset()
        self.messages(max_tokens=900000)
        self.assertEqual(self.upstream_params()["max_tokens"], 200000)

    def test_bearer_auth_and_no_anthropic_version_are_accepted(self):
        r = self.request("POST", "/v1/messages", {"model": "claude-sonnet-5", "max_tokens": 50,
                                                  "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["type"], "message")


class TestAnthropicErrors(ProxyTestCase):
    def test_missing_key_is_authentication_error_with_request_id(self):
        r = self.messages(key=None)
        self.assertAnthropicError(r, 401, "authentication_error")
        self.assertTrue(r.header("request-id"))
        self.assertNoUpstreamCall()

    def test_upstream_errors_keep_anthropics_type_and_the_upstreams_own_message(self):
        too_long = "prompt is too long: 201234 tokens > 200000 maximum"
        cases = [(http_error(400, {"error": {"message": too_long}}), 400,
                  "invalid_request_error", too_long),
                 (Reply(200, START + [error_event(too_long, 400)]), 400,
                  "invalid_request_error", too_long),
                 (http_error(529, {"error": {"message": "Overloaded"}}), 529, "overloaded_error",
                  "Overloaded"),
                 (http_error(401, {"error": {"message": "bad key user_SECRET12345"}}), 401,
                  "authentication_error", "bad key user_***")]
        for reply, status, kind, message in cases:
            with self.subTest(kind=kind, message=message):
                self.upstream.script(*[reply] * 3)   # the retryable ones are retried first
                r = self.messages()
                err = self.assertAnthropicError(r, status, kind)
                self.assertEqual(err["message"], message)
                self.assertTrue(r.header("request-id"))
        self.upstream.script(http_error(400, {"error": {"message": too_long}}))
        chat = self.chat().json()["error"]["message"]   # other protocols keep the explanation
        self.assertEqual(chat, "Command Code rejected the request: " + too_long)

    def test_malformed_body_is_invalid_request_error(self):
        r = self.request("POST", "/v1/messages", {"model": "claude-sonnet-5", "max_tokens": 10,
                                                  "messages": "nope"},
                         {"anthropic-version": "2023-06-01"}, key_header="x-api-key")
        err = self.assertAnthropicError(r, 400, "invalid_request_error")
        self.assertIn("messages", err["message"])

    def test_upstream_403_model_not_in_plan_is_permission_error(self):
        self.upstream.script(http_error(403, {"error": {
            "message": "MODEL_NOT_IN_PLAN: claude-opus-5", "type": "permission_error",
            "code": "MODEL_NOT_IN_PLAN"}}))
        self.assertAnthropicError(self.messages(model="claude-opus-5"), 403, "permission_error")

    def test_upstream_429_is_rate_limit_error(self):
        self.upstream.script(*[http_error(429, {"error": {
            "message": "limit", "type": "rate_limit_error", "code": "RATE_LIMITED",
            "rateLimit": {"window": "fiveHour", "reset": int(time.time()) + 60}}})] * 3)
        r = self.messages(stream=True)
        self.assertAnthropicError(r, 429, "rate_limit_error")
        self.assertTrue(r.header("Retry-After"))

    def test_upstream_529_is_overloaded_error(self):
        self.upstream.script(*[http_error(529, {"error": {"message": "Overloaded",
                                                          "type": "overloaded_error"}})] * 5)
        r = self.messages()
        self.assertIn(r.status, (503, 529), r)
        self.assertAnthropicError(r, r.status, "overloaded_error")

    def test_upstream_500_is_api_error(self):
        self.upstream.script(*[http_error(500, {"error": {"message": "x",
                                                          "type": "api_error"}})] * 5)
        self.assertAnthropicError(self.messages(), 502, "api_error")

    def test_image_to_text_only_model_is_invalid_request_error(self):
        r = self.messages(model="deepseek/deepseek-v4-flash", messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG_1PX}}]}])
        err = self.assertAnthropicError(r, 400, "invalid_request_error")
        self.assertTrue(any(m in err["message"] for m in IMAGE_MODELS), err["message"])


class TestAnthropicCountTokens(ProxyTestCase):
    def count(self, body, key=KEY):
        return self.request("POST", "/v1/messages/count_tokens", body,
                            {"anthropic-version": "2023-06-01"}, key, key_header="x-api-key")

    def test_count_tokens_returns_positive_input_tokens_without_upstream_call(self):
        r = self.count({"model": "claude-sonnet-5",
                        "messages": [{"role": "user", "content": "Hello there, how are you?"}]})
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(list(body.keys()), ["input_tokens"])
        self.assertIsInstance(body["input_tokens"], int)
        self.assertGreater(body["input_tokens"], 0)
        self.assertNoUpstreamCall()

    def test_count_tokens_grows_with_system_tools_and_text(self):
        base = {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}]}
        small = self.count(base).json()["input_tokens"]
        big = dict(base, system="You are a helpful assistant. " * 50,
                   tools=[{"name": "Bash", "description": "Run a shell command " * 20,
                           "input_schema": {"type": "object", "properties": {}}}])
        self.assertGreater(self.count(big).json()["input_tokens"], small + 100)

    def test_count_tokens_is_cjk_aware(self):
        ascii_n = self.count({"model": "claude-sonnet-5", "messages": [
            {"role": "user", "content": "a" * 300}]}).json()["input_tokens"]
        cjk_n = self.count({"model": "claude-sonnet-5", "messages": [
            {"role": "user", "content": "汉" * 300}]}).json()["input_tokens"]
        self.assertGreater(cjk_n, ascii_n)

    def test_count_tokens_beta_query_accepted(self):
        r = self.request("POST", "/v1/messages/count_tokens?beta=true",
                         {"model": "claude-sonnet-5",
                          "messages": [{"role": "user", "content": "hi"}]},
                         {"anthropic-version": "2023-06-01"}, key_header="x-api-key")
        self.assertEqual(r.status, 200, r)
        self.assertGreater(r.json()["input_tokens"], 0)

    def test_count_tokens_counts_images(self):
        text_only = self.count({"model": "claude-sonnet-5", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what"}]}]}).json()
        with_image = self.count({"model": "claude-sonnet-5", "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "what"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG_1PX}}]}]}).json()
        self.assertGreater(with_image["input_tokens"], text_only["input_tokens"])

    def test_count_tokens_without_key_is_authentication_error(self):
        r = self.count({"model": "claude-sonnet-5",
                        "messages": [{"role": "user", "content": "hi"}]}, key=None)
        self.assertAnthropicError(r, 401, "authentication_error")


# =======================================================================================
# OpenAI Responses front end
# =======================================================================================

class TestResponsesStreaming(ProxyTestCase):
    def events(self, reply, **kw):
        self.upstream.script(reply)
        r = self.responses(stream=True, **kw)
        self.assertEqual(r.status, 200, r)
        self.assertIn("text/event-stream", r.header("Content-Type"))
        evs = r.typed_events()
        for name, d in evs:
            if name is not None:
                self.assertEqual(name, d["type"])
        return [d for _, d in evs]

    def test_text_stream_event_order_and_increasing_sequence_numbers(self):
        evs = self.events(ok(text_parts("Hello", " world")))
        types = [e["type"] for e in evs]
        self.assertEqual(types[0], "response.created")
        self.assertEqual(types[1], "response.in_progress")
        self.assertEqual(types[-1], "response.completed")
        expected = ["response.output_item.added", "response.content_part.added",
                    "response.output_text.delta", "response.output_text.done",
                    "response.content_part.done", "response.output_item.done"]
        positions = [types.index(t) for t in expected]
        self.assertEqual(positions, sorted(positions))
        seqs = [e["sequence_number"] for e in evs]
        self.assertEqual(seqs, sorted(set(seqs)), "sequence_number must strictly increase")
        text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
        self.assertEqual(text, "Hello world")
        done = [e for e in evs if e["type"] == "response.output_text.done"][0]
        self.assertEqual(done["text"], "Hello world")
        final = evs[-1]["response"]
        self.assertEqual(final["status"], "completed")
        self.assertEqual(final["output"][0]["type"], "message")
        self.assertEqual(final["output"][0]["content"][0]["type"], "output_text")
        self.assertEqual(final["output"][0]["content"][0]["text"], "Hello world")

    def test_every_response_object_repeats_the_request_settings(self):
        tools = [{"type": "function", "name": "exec_command", "description": "run",
                  "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}, "strict": False}]
        evs = self.events(ok(text_parts("Hi")), instructions="Be brief.", tools=tools, tool_choice="required",
                          temperature=0.2, max_output_tokens=900, reasoning={"effort": "high", "summary": "auto"})
        objects = [e["response"] for e in evs if "response" in e]
        self.assertEqual([o["status"] for o in objects], ["in_progress", "in_progress", "completed"])
        for o in objects:
            self.assertEqual(o["instructions"], "Be brief.")
            self.assertEqual(o["tools"], tools)
            self.assertEqual(o["tool_choice"], "required")
            self.assertEqual(o["temperature"], 0.2)
            self.assertEqual(o["top_p"], 1.0)
            self.assertEqual(o["max_output_tokens"], 900)
            self.assertEqual(o["reasoning"], {"effort": "high", "summary": "auto"})
            self.assertEqual(o["text"], {"format": {"type": "text"}})
            self.assertEqual(o["truncation"], "disabled")

    def test_completed_carries_usage(self):
        evs = self.events(ok(reasoning_parts("r"), text_parts("Hi"), out=60, reasoning=40))
        u = evs[-1]["response"]["usage"]
        self.assertEqual(u["input_tokens"], 7400)
        self.assertEqual(u["input_tokens_details"]["cached_tokens"], 7168)
        self.assertEqual(u["output_tokens"], 60)
        self.assertEqual(u["output_tokens_details"]["reasoning_tokens"], 40)
        self.assertEqual(u["total_tokens"], 7460)

    def test_stream_events_reference_consistent_item_ids_and_indexes(self):
        evs = self.events(ok(text_parts("Hel", "lo")))
        created = evs[0]["response"]
        self.assertEqual(created["status"], "in_progress")
        added = [e for e in evs if e["type"] == "response.output_item.added"][0]
        item_id = added["item"]["id"]
        self.assertEqual(added["output_index"], 0)
        for e in evs:
            if e["type"] in ("response.content_part.added", "response.output_text.delta",
                             "response.output_text.done", "response.content_part.done"):
                self.assertEqual(e["item_id"], item_id, e)
                self.assertEqual(e["output_index"], 0)
                self.assertEqual(e["content_index"], 0)
        self.assertEqual(evs[-1]["response"]["id"], created["id"])
        self.assertEqual(evs[-1]["response"]["output"][0]["id"], item_id)

    def test_function_call_stream_events(self):
        args = {"cmd": "ls -la"}
        text = json.dumps(args)
        evs = self.events(ok(tool_parts("call_1", "exec_command", args, [text[:4], text[4:]]),
                             reason="tool-calls", raw="tool_use"))
        types = [e["type"] for e in evs]
        added = [e for e in evs if e["type"] == "response.output_item.added"
                 and e["item"]["type"] == "function_call"][0]
        self.assertEqual(added["item"]["name"], "exec_command")
        self.assertTrue(added["item"]["call_id"])
        deltas = [e["delta"] for e in evs if e["type"] == "response.function_call_arguments.delta"]
        self.assertEqual("".join(deltas), text)
        args_done = [e for e in evs if e["type"] == "response.function_call_arguments.done"][0]
        self.assertEqual(json.loads(args_done["arguments"]), args)
        item_done = [e for e in evs if e["type"] == "response.output_item.done"
                     and e["item"]["type"] == "function_call"][0]
        self.assertEqual(json.loads(item_done["item"]["arguments"]), args)
        self.assertEqual(item_done["item"]["call_id"], added["item"]["call_id"])
        self.assertLess(types.index("response.function_call_arguments.done"),
                        types.index("response.completed"))
        out = evs[-1]["response"]["output"]
        self.assertEqual([o["type"] for o in out], ["function_call"])

    def test_reasoning_becomes_reasoning_item_with_summary(self):
        evs = self.events(ok(reasoning_parts("Think ", "first."), text_parts("Done")))
        self.assertTrue(any("reasoning" in e["type"] for e in evs))
        out = evs[-1]["response"]["output"]
        self.assertEqual([o["type"] for o in out], ["reasoning", "message"])
        summary = "".join(s["text"] for s in out[0]["summary"])
        self.assertEqual(summary, "Think first.")

    def test_upstream_error_after_output_is_failed_and_never_completed(self):
        evs = self.events(Reply(200, START + text_parts("Partial")[:2]
                                + [error_event("overloaded", 529, False)]))
        types = [e["type"] for e in evs]
        self.assertTrue("response.failed" in types or "error" in types, types)
        self.assertNotIn("response.completed", types)

    def test_stream_ending_without_finish_is_failed(self):
        evs = self.events(Reply(200, START + text_parts("Cut")))
        types = [e["type"] for e in evs]
        self.assertTrue("response.failed" in types or "error" in types, types)
        self.assertNotIn("response.completed", types)


class TestResponsesNonStreaming(ProxyTestCase):
    def test_non_stream_response_object(self):
        r = self.responses()
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["object"], "response")
        self.assertIsInstance(body["id"], str)
        self.assertEqual(body["status"], "completed")
        msg = [o for o in body["output"] if o["type"] == "message"][0]
        self.assertEqual(msg["role"], "assistant")
        self.assertEqual(msg["content"][0]["type"], "output_text")
        self.assertEqual(msg["content"][0]["text"], "Hello world")
        self.assertEqual(body["usage"]["input_tokens"], 7400)
        self.assertEqual((body["tools"], body["tool_choice"], body["instructions"], body["reasoning"]),
                         ([], "auto", None, {"effort": None, "summary": None}))

    def test_non_stream_function_call_item(self):
        self.upstream.script(ok(tool_parts("call_7", "exec_command", {"cmd": "pwd"}),
                                reason="tool-calls", raw="tool_use"))
        out = self.responses().json()["output"]
        calls = [o for o in out if o["type"] == "function_call"]
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0]["name"], "exec_command")
        self.assertTrue(calls[0]["call_id"])
        self.assertIsInstance(calls[0]["arguments"], str)
        self.assertEqual(json.loads(calls[0]["arguments"]), {"cmd": "pwd"})

    def test_upstream_error_before_output_is_http_error(self):
        self.upstream.script(*[http_error(401, {"error": {"message": "bad key",
                                                          "type": "authentication_error"}})])
        r = self.responses()
        self.assertEqual(r.status, 401, r)
        self.assertIn("error", r.json())

    def test_missing_key_is_401(self):
        r = self.responses(key=None)
        self.assertEqual(r.status, 401, r)
        self.assertNoUpstreamCall()

    def test_streaming_early_rate_limit_is_real_429(self):
        self.upstream.script(*[http_error(429, {"error": {
            "message": "limit", "type": "rate_limit_error", "code": "RATE_LIMITED",
            "rateLimit": {"window": "fiveHour", "reset": int(time.time()) + 60}}})] * 3)
        r = self.responses(stream=True)
        self.assertEqual(r.status, 429, r)
        self.assertTrue(r.header("Retry-After"))
        self.assertIn("error", r.json())


class TestResponsesRequestTranslation(ProxyTestCase):
    def test_string_input_becomes_user_text(self):
        self.responses(input="Say hello")
        self.assertEqual(self.upstream_params()["messages"],
                         [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}])

    def test_developer_system_messages_and_instructions_go_to_system(self):
        r = self.responses(instructions="INSTR-TEXT", input=[
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "DEV-ONE"}]},
            {"type": "message", "role": "system", "content": "SYS-TWO"},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "hello"}]}])
        self.assertEqual(r.status, 200, r)
        params = self.upstream_params()
        text = self.system_text(params)
        for needle in ("INSTR-TEXT", "DEV-ONE", "SYS-TWO"):
            self.assertIn(needle, text)
        self.assertEqual([m["role"] for m in params["messages"]], ["user"])

    def test_function_call_round_trip_becomes_tool_call_and_tool_result(self):
        r = self.responses(input=[
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "list files"}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
             "arguments": "{\"cmd\": \"ls\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a.txt\nb.txt"}])
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool"])
        self.assertEqual(up[1]["content"], [{"type": "tool-call", "toolCallId": "call_1",
                                             "toolName": "exec_command",
                                             "input": {"cmd": "ls"}}])
        self.assertEqual(up[2]["content"], [{"type": "tool-result", "toolCallId": "call_1",
                                             "toolName": "exec_command",
                                             "output": {"type": "text", "value": "a.txt\nb.txt"}}])

    def test_assistant_output_text_and_reasoning_items_are_replayed(self):
        r = self.responses(input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
            {"type": "reasoning", "id": "rs_1",
             "summary": [{"type": "summary_text", "text": "earlier thought"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "earlier answer"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q2"}]}])
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "user"])
        parts = {p["type"]: p for p in up[1]["content"]}
        self.assertEqual(parts["reasoning"]["text"], "earlier thought")
        self.assertEqual(parts["text"]["text"], "earlier answer")

    def test_input_image_sent_as_image_part(self):
        url = "data:image/png;base64," + PNG_1PX
        r = self.responses(input=[{"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what"}, {"type": "input_image", "image_url": url}]}])
        self.assertEqual(r.status, 200, r)
        parts = self.upstream_params()["messages"][0]["content"]
        self.assertIn({"type": "image", "image": url, "mimeType": "image/png"}, parts)

    def test_function_tools_flat_shape_translated(self):
        schema = {"type": "object", "properties": {"cmd": {"type": "string"}}}
        self.responses(tools=[{"type": "function", "name": "exec_command", "description": "run",
                               "parameters": schema}])
        self.assertEqual(self.upstream_params()["tools"],
                         [{"name": "exec_command", "description": "run", "input_schema": schema}])

    def test_non_function_tools_do_not_fail_and_namespace_contributes_functions(self):
        r = self.responses(tools=[
            {"type": "function", "name": "exec_command", "description": "run",
             "parameters": {"type": "object", "properties": {}}},
            {"type": "web_search", "external_web_access": True},
            {"type": "namespace", "name": "multi_agent_v1", "tools": [
                {"type": "function", "name": "spawn_agent", "description": "spawn",
                 "parameters": {"type": "object", "properties": {}}}]}])
        self.assertEqual(r.status, 200, r)
        names = [t["name"] for t in self.upstream_params()["tools"]]
        self.assertIn("exec_command", names)
        self.assertTrue(any("spawn_agent" in n for n in names), names)
        self.assertFalse(any("web_search" in n for n in names), names)
        self.assertTrue(any("web_search" in v for _, v in r.headers.items()),
                        "dropped tool should be named in a response header")

    def test_reasoning_effort_clamped(self):
        self.responses(model="deepseek/deepseek-v4-flash", reasoning={"effort": "low"})
        self.assertEqual(self.upstream_params()["reasoning_effort"], "high")

    def test_tool_choice_none_sends_no_tools(self):
        r = self.responses(tool_choice="none", tools=[
            {"type": "function", "name": "exec_command", "description": "run",
             "parameters": {"type": "object", "properties": {}}}])
        self.assertEqual(r.status, 200, r)
        self.assertFalse(self.upstream_params().get("tools"))

    def test_max_output_tokens_forwarded(self):
        self.responses(max_output_tokens=777)
        self.assertEqual(self.upstream_params()["max_tokens"], 777)

    def test_text_format_json_object_adds_json_instruction(self):
        r = self.responses(text={"format": {"type": "json_object"}})
        self.assertEqual(r.status, 200, r)
        self.assertIn("json", self.system_text(self.upstream_params()).lower())


APPLY_PATCH_TOOL = {"type": "custom", "name": "apply_patch",
                    "description": "Use the `apply_patch` tool to edit files.",
                    "format": {"type": "grammar", "syntax": "lark",
                               "definition": 'start: begin_patch hunk+ end_patch\n'
                                             'begin_patch: "*** Begin Patch" LF'}}
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello\n*** End Patch\n"


class TestResponsesCustomTools(ProxyTestCase):
    """Freeform (custom) tools, as Codex sends apply_patch: a one-string function upstream,
    custom_tool_call items back, custom_tool_call(_output) items accepted in input."""

    def call_patch(self, **kw):
        self.upstream.script(ok(tool_parts("call_patch", "apply_patch", {"input": PATCH}),
                                reason="tool-calls", raw="tool_use"))
        return self.responses(input="add hello.txt", tools=[APPLY_PATCH_TOOL], **kw)

    def test_a_custom_tool_goes_upstream_as_a_function_of_one_string_with_its_grammar(self):
        r = self.call_patch()
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("x-cc-proxy-dropped-tools"))
        tool = {t["name"]: t for t in self.upstream_params()["tools"]}["apply_patch"]
        self.assertEqual(tool["input_schema"]["required"], ["input"])
        self.assertEqual(tool["input_schema"]["properties"]["input"]["type"], "string")
        self.assertIn("Use the `apply_patch` tool", tool["description"])
        self.assertIn('start: begin_patch hunk+ end_patch', tool["description"])

    def test_the_answer_is_a_custom_tool_call_item_with_the_raw_input(self):
        item = self.call_patch().json()["output"][0]
        self.assertEqual({k: item[k] for k in ("type", "call_id", "name", "input", "status")},
                         {"type": "custom_tool_call", "call_id": "call_patch",
                          "name": "apply_patch", "input": PATCH, "status": "completed"})
        self.assertTrue(item["id"].startswith("ctc_"))

    def test_the_stream_has_custom_tool_call_input_delta_and_done_events(self):
        events = self.call_patch(stream=True).typed_events()
        names = [n for n, _ in events]
        self.assertNotIn("response.function_call_arguments.delta", names)
        start = names.index("response.output_item.added")
        self.assertEqual(names[start:start + 4], [
            "response.output_item.added", "response.custom_tool_call_input.delta",
            "response.custom_tool_call_input.done", "response.output_item.done"])
        added, delta, done, finished = [d for _, d in events[start:start + 4]]
        self.assertEqual((added["item"]["type"], added["item"]["input"]), ("custom_tool_call", ""))
        self.assertEqual("".join([delta["delta"]]), PATCH)
        self.assertEqual((done["input"], done["item_id"]), (PATCH, added["item"]["id"]))
        self.assertEqual(finished["item"]["input"], PATCH)
        final = events[-1][1]["response"]
        self.assertEqual(final["output"][0]["type"], "custom_tool_call")

    def test_custom_tool_call_and_its_output_come_back_as_a_call_and_a_result(self):
        r = self.responses(tools=[APPLY_PATCH_TOOL], input=[
            {"role": "user", "content": "add hello.txt"},
            {"type": "custom_tool_call", "call_id": "call_patch", "name": "apply_patch",
             "input": PATCH},
            {"type": "custom_tool_call_output", "call_id": "call_patch", "output": "Done!"}])
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool"])
        call = up[1]["content"][0]
        self.assertEqual((call["toolName"], call["input"]), ("apply_patch", {"input": PATCH}))
        self.assertEqual(up[2]["content"][0]["output"], {"type": "text", "value": "Done!"})
        bad = self.responses(input=[{"type": "custom_tool_call", "call_id": "c", "name": "x",
                                     "input": {"not": "a string"}}])
        self.assertEqual(bad.status, 400, bad)


class TestResponsesStore(ProxyTestCase):
    def test_previous_response_id_chains_history(self):
        first = self.responses(input="first question")
        self.assertEqual(first.status, 200, first)
        rid = first.json()["id"]
        self.upstream.reset()
        self.upstream.script(ok(text_parts("second answer")))
        second = self.responses(input="second question", previous_response_id=rid)
        self.assertEqual(second.status, 200, second)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "user"])
        self.assertEqual(up[0]["content"][0]["text"], "first question")
        self.assertIn("Hello world", json.dumps(up[1]["content"]))
        self.assertEqual(up[2]["content"][0]["text"], "second question")

    def test_chaining_carries_function_calls_for_the_next_turn(self):
        self.upstream.script(ok(tool_parts("call_x", "exec_command", {"cmd": "pwd"}),
                                reason="tool-calls", raw="tool_use"))
        first = self.responses(input="where am I", stream=True)
        rid = [d for _, d in first.typed_events()][-1]["response"]["id"]
        self.upstream.reset()
        r = self.responses(previous_response_id=rid, input=[
            {"type": "function_call_output", "call_id": "call_x", "output": "/home"}])
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool"])
        self.assertEqual(up[2]["content"][0]["toolName"], "exec_command")
        self.assertEqual(up[2]["content"][0]["output"], {"type": "text", "value": "/home"})

    def test_item_references_to_our_own_output_are_replayed_from_the_store(self):
        self.upstream.script(ok(text_parts("Let me look."),
                                tool_parts("call_ref", "exec_command", {"cmd": "ls"}),
                                reason="tool-calls", raw="tool_use"))
        first = self.responses(input="list the files")
        self.assertEqual(first.status, 200, first)
        ids = [item["id"] for item in first.json()["output"]]
        self.assertEqual([i.split("_")[0] for i in ids], ["msg", "fc"])
        self.upstream.reset()
        r = self.responses(input=[
            {"role": "user", "content": "list the files"},
            {"type": "item_reference", "id": ids[0]}, {"type": "item_reference", "id": ids[1]},
            {"type": "function_call_output", "call_id": "call_ref", "output": "a.txt"}])
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        self.assertEqual([m["role"] for m in up], ["user", "assistant", "tool"])
        self.assertIn("Let me look.", json.dumps(up[1]["content"]))
        call = [c for c in up[1]["content"] if c.get("type") == "tool-call"][0]
        self.assertEqual((call["toolCallId"], call["toolName"]), ("call_ref", "exec_command"))
        self.assertEqual(up[2]["content"][0]["toolName"], "exec_command")

    def test_an_item_reference_the_store_does_not_hold_is_400_naming_it(self):
        for item_id in ("msg_0123456789abcdef01234567_0", "not-an-id", 7):
            with self.subTest(item_id=item_id):
                r = self.responses(input=[{"type": "item_reference", "id": item_id}])
                self.assertEqual(r.status, 400, r)
                self.assertIn(repr(item_id), r.json()["error"]["message"])
                self.assertEqual(r.json()["error"]["param"], "input[0].id")
        self.assertNoUpstreamCall()

    def test_unknown_previous_response_id_is_400(self):
        r = self.responses(previous_response_id="resp_does_not_exist_123")
        self.assertEqual(r.status, 400, r)
        self.assertIn("error", r.json())
        self.assertNoUpstreamCall()

    def test_a_stored_response_can_be_fetched_by_id(self):
        rid = self.responses().json()["id"]
        r = self.request("GET", "/v1/responses/" + rid)
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["id"], rid)
        self.assertEqual(body["object"], "response")
        self.assertEqual(body["output"][0]["content"][0]["text"], "Hello world")

    def test_store_false_keeps_nothing(self):
        rid = self.responses(store=False).json()["id"]
        r = self.request("GET", "/v1/responses/" + rid)
        self.assertEqual(r.status, 404, r)
        r = self.responses(previous_response_id=rid)
        self.assertEqual(r.status, 400, r)

    def test_get_unknown_response_is_404(self):
        self.assertEqual(self.request("GET", "/v1/responses/resp_nope_404").status, 404)


# =======================================================================================
# Command line: `python3 proxy.py start` with a config file, logging without secrets
# =======================================================================================

class TestCommandLineStart(unittest.TestCase):
    def spawn_proxy(self, interpreter_options=(), overrides=None):
        """`python3 [options] proxy.py start --config F` against a fake upstream; returns (child, port, tmp)."""
        self.fake = fake_upstream(self.addCleanup)
        port = free_port()
        tmp = ops_tempdir(self)
        cfg = os.path.join(tmp, "config.json")
        with open(cfg, "w") as f:
            json.dump(dict({"port": port, "host": "127.0.0.1", "apiBase": self.fake.url, "ccVersion": "1.64.0",
                            "useProviderModels": False}, **(overrides or {})), f)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp}
        child, _ = ops_spawn_proxy(self, ["start", "--config", cfg], env, tmp, port, interpreter_options)
        return child, port, tmp

    @unittest.skipUnless(os.path.exists("/proc/self/cmdline") and sys.version_info >= (3, 10), "needs /proc, 3.10+")
    def test_start_reexecutes_itself_as_a_module_keeping_pid_options_arguments_and_cwd(self):
        child, port, tmp = self.spawn_proxy(interpreter_options=("-X", "utf8"))
        with open("/proc/%d/cmdline" % child.pid, "rb") as f:
            argv = f.read().decode().split("\0")[:-1]
        # same interpreter options and arguments, now `-m proxy`: what ps shows an operator
        self.assertEqual(argv[1:], ["-X", "utf8", "-m", "proxy", "start", "--config",
                                    os.path.join(tmp, "config.json")])
        self.assertEqual(os.path.realpath("/proc/%d/cwd" % child.pid), os.path.realpath(tmp))
        r = http_request(port, "POST", "/v1/chat/completions",
                         {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}]},
                         {"Authorization": "Bearer " + KEY})
        self.assertEqual(r.status, 200, r)
        child.send_signal(signal.SIGTERM)  # the pid we spawned is the server: service managers can stop it
        self.assertEqual(child.wait(10), 0)

    @unittest.skipUnless(os.path.exists("/proc/self/cmdline"), "needs /proc")
    def test_start_under_cprofile_is_not_reexecuted_and_writes_its_profile_on_sigterm(self):
        profile = os.path.join(ops_tempdir(self), "start.prof")
        child, port, tmp = self.spawn_proxy(interpreter_options=("-m", "cProfile", "-o", profile))
        with open("/proc/%d/cmdline" % child.pid, "rb") as f:
            argv = f.read().decode().split("\0")[:-1]
        self.assertEqual(argv[1:6], ["-m", "cProfile", "-o", profile, PROXY_PY])
        r = http_request(port, "POST", "/v1/chat/completions",
                         {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}]},
                         {"Authorization": "Bearer " + KEY})
        self.assertEqual(r.status, 200, r)
        child.send_signal(signal.SIGTERM)
        child.wait(10)
        self.assertGreater(os.path.getsize(profile), 1000)

    def test_start_keeps_a_usage_ledger_beside_its_config_written_on_sigterm_readable_after_kill(self):
        for stop in (signal.SIGTERM, signal.SIGKILL):
            with self.subTest(signal=stop.name):
                child, port, tmp = self.spawn_proxy()
                sent = ["req-start-%d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(6)]
                for i, rid in enumerate(sent):
                    if i == len(sent) - 1:   # the last one alone in the writer's next batch
                        time.sleep(3 * proxy.UsageLedger.FLUSH_SECONDS)
                    r = http_request(port, "POST", "/v1/chat/completions",
                                     {"model": "claude-sonnet-5",
                                      "messages": [{"role": "user", "content": "hi"}]},
                                     {"Authorization": "Bearer " + KEY, "X-Request-Id": rid})
                    self.assertEqual(r.status, 200, r)
                child.send_signal(stop)
                child.wait(10)
                if stop == signal.SIGTERM:
                    self.assertEqual(child.returncode, 0)
                db = os.path.join(tmp, "usage.sqlite3")   # the default usageDb, beside the config
                with contextlib.closing(sqlite3.connect(db)) as conn:
                    self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
                stored = [r["request_id"] for r in proxy.ledger_rows(db, 0)]
                if stop == signal.SIGTERM:
                    self.assertEqual(stored, sent)
                else:   # at most the last batch may be missing
                    self.assertEqual(stored, sent[:len(stored)])
                    self.assertGreaterEqual(len(stored), len(sent) - 1)

    def test_start_serves_from_config_file_and_logs_no_secrets(self):
        log_file = os.path.join(tempfile.gettempdir(), "cc-proxy-test-%s.log" % uuid.uuid4().hex)
        self.addCleanup(lambda: os.path.exists(log_file) and os.remove(log_file))
        child, port, tmp = self.spawn_proxy(overrides={"logLevel": "debug", "logFile": log_file})
        fake = self.fake
        secret_key = "user_SECRETKEY" + uuid.uuid4().hex[:10]
        prompt = "PROMPT-PRIVATE-" + uuid.uuid4().hex[:10]
        rid = "req-cli-" + uuid.uuid4().hex[:10]
        r = http_request(port, "POST", "/v1/chat/completions",
                         {"model": "claude-sonnet-5",
                          "messages": [{"role": "user", "content": prompt}]},
                         {"Authorization": "Bearer " + secret_key, "X-Request-Id": rid})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(header_map(fake.generates()[0])["authorization"], "Bearer " + secret_key)
        child.send_signal(signal.SIGTERM)
        child.wait(10)
        with open(log_file, encoding="utf-8", errors="replace") as f:
            log_text = f.read()
        with open(os.path.join(tmp, "proxy.out"), encoding="utf-8", errors="replace") as f:
            log_text += f.read()
        self.assertIn(rid, log_text, "access log line should carry the request id")
        self.assertNotIn("SECRETKEY", log_text)
        self.assertNotIn(prompt, log_text)


# =====================================================================================
# Operations: config CLI, service install, logs, request ids, CORS, health, metrics, shutdown
# =====================================================================================

PROXY_PY = os.path.abspath(proxy.__file__)
OPS_TIMEOUT = 15  # every client socket read and subprocess is bounded by this


# ---- shared helpers ------------------------------------------------------------------------

def ops_tempdir(test):
    """A temp dir removed when the test ends."""
    path = tempfile.mkdtemp(prefix="cc-proxy-ops-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def ops_clean_env(**extra):
    """This process's environment without CC_PROXY_CONFIG or any config variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k != "CC_PROXY_CONFIG" and k not in proxy.SETTINGS_BY_ENV}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def ops_run(args, env=None, timeout=OPS_TIMEOUT):
    """python3 proxy.py ARGS as a subprocess -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, PROXY_PY] + list(args), env=env or ops_clean_env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)


def ops_main(args, env=None, platform=sys.platform):
    """proxy.main(ARGS) in this process, with os.environ replaced by `env` -> CompletedProcess (text).

    The same code path as the subprocess, ~100x cheaper: used for the checks beyond the ones the issue
    asks to see through a real `python3 proxy.py` process."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env or ops_clean_env(), clear=True), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = proxy.main(list(args), platform=platform)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def ops_spawn_proxy(test, args, env, cwd, port, options=()):
    """`python3 [options] proxy.py ARGS` as a child killed when the test ends, once /health on `port`
    answers 200 -> (child, the file holding its stdout and stderr)."""
    out_path = os.path.join(cwd, "proxy.out")
    with open(out_path, "wb") as out:
        child = subprocess.Popen([sys.executable, *options, PROXY_PY, *args], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def stop_child():
        if child.poll() is None:
            child.kill()
            child.wait(5)
    test.addCleanup(stop_child)

    def healthy():
        try:
            return (child.poll() is None
                    and http_request(port, "GET", "/health", timeout=2).status == 200)
        except OSError:
            return child.poll() is not None   # stop waiting for a child that has died
    if wait_for(healthy, 10, step=0.05) and child.poll() is None:
        return child, out_path
    with open(out_path, encoding="utf-8", errors="replace") as f:
        test.fail("proxy.py %s did not come up: %s" % (" ".join(args), f.read()))


def ops_file_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def ops_chat_body(prompt="hi", stream=True, model="x"):
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


class OpsLogCapture(logging.Handler):
    """Every record of proxy.log as formatted text, at `level` (restored on exit)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
        self.lock_ = threading.Lock()
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record):
        text = self.format(record)
        with self.lock_:
            self.lines.append(text)

    def text(self):
        with self.lock_:
            return "\n".join(self.lines)

    def matching(self, needle):
        with self.lock_:
            return [line for line in self.lines if needle in line]

    def wait_for(self, needle, timeout=5.0):
        """Lines containing `needle`, waiting for the first (access lines follow the response)."""
        return wait_for(lambda: self.matching(needle), timeout)


@contextlib.contextmanager
def ops_capture_log(level=logging.DEBUG):
    handler = OpsLogCapture()
    old_level = proxy.log.level
    proxy.log.addHandler(handler)
    proxy.log.setLevel(level)
    try:
        yield handler
    finally:
        proxy.log.removeHandler(handler)
        proxy.log.setLevel(old_level)


# ---- a fake Command Code upstream that streams NDJSON slowly --------------------------------

# ---- an in-process proxy server -------------------------------------------------------------

OPS_BASE_OVERRIDES = {"port": 0, "apiBase": "http://127.0.0.1:9", "ccVersion": "1.64.0",
                      "useProviderModels": False, "logLevel": "error", "usageDb": ""}


def ops_start_server(test, **overrides):
    """A proxy.make_server on a free port, served on a thread until the test ends -> (server, port)."""
    server, stop = start_proxy(proxy_config(**dict(OPS_BASE_OVERRIDES, **overrides)))
    test.addCleanup(stop)
    return server, server.server_address[1]


# ---- Prometheus text format ---------------------------------------------------------------

_PROM_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_PROM_SAMPLE = re.compile(r"^(%s)(\{(.*)\})? (\S+)$" % _PROM_NAME)
_PROM_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_prometheus(text):
    """Prometheus text exposition -> ({(name, frozenset(labels.items())): value}, {family: type}).

    Raises AssertionError on any line that is not a valid comment or sample."""
    samples, types = {}, {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                assert re.fullmatch(_PROM_NAME, parts[2]), line
                assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                assert parts[2] not in types, "duplicate TYPE line: " + line
                types[parts[2]] = parts[3]
            continue
        m = _PROM_SAMPLE.match(line)
        assert m, "not a Prometheus sample line: %r" % line
        labels = {}
        rest = m.group(3) or ""
        pos = 0
        while pos < len(rest):
            lm = _PROM_LABEL.match(rest, pos)
            assert lm, "bad labels in %r" % line
            labels[lm.group(1)] = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), lm.group(2))
            pos = lm.end()
        value = float(m.group(4))  # raises on a non-number
        key = (m.group(1), frozenset(labels.items()))
        assert key not in samples, "duplicate sample: " + line
        samples[key] = value
    return samples, types


def prom_value(samples, name, **labels):
    want = {k: str(v) for k, v in labels.items()}
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and want.items() <= dict(sample_labels).items():
            total += value
    return total


# ---- systemd unit syntax ------------------------------------------------------------------

def parse_unit(text):
    """A unit file -> {section: {key: [values]}}; fails on lines that are neither."""
    sections, current = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line.startswith("[") and line.rstrip().endswith("]"):
            current = sections.setdefault(line.strip()[1:-1], {})
            continue
        assert current is not None and "=" in line, "not a unit line: %r" % line
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_split(command):
    """Split an ExecStart= value the way systemd.syntax(7) and systemd.service(5) do:
    whitespace-separated words, double or single quotes, C escapes, then %% -> % and $$ -> $.
    Fails on a lone % specifier or an unquoted $VAR (systemd would expand those)."""
    words, i, n = [], 0, len(command)
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", " ": " "}
    while i < n:
        while i < n and command[i] in " \t":
            i += 1
        if i >= n:
            break
        word, quote = [], None
        while i < n:
            c = command[i]
            if quote is None and c in " \t":
                break
            if quote is None and c in "\"'" and not word:
                quote = c
            elif quote is not None and c == quote:
                quote = None
                i += 1
                assert i >= n or command[i] in " \t", "text right after a closing quote"
                break
            elif c == "\\":
                i += 1
                assert i < n and command[i] in escapes, "unknown escape in %r" % command
                word.append(escapes[command[i]])
            else:
                word.append(c)
            i += 1
        assert quote is None, "unterminated quote in %r" % command
        raw = "".join(word)
        out, j = [], 0
        while j < len(raw):
            if raw[j] in "%$":
                assert j + 1 < len(raw) and raw[j + 1] == raw[j], \
                    "unescaped %r in %r: systemd would expand it" % (raw[j], raw)
                out.append(raw[j])
                j += 2
            else:
                out.append(raw[j])
                j += 1
        words.append("".join(out))
    return words


# =============================================================================================
# Config CLI
# =============================================================================================

class ConfigCliCase(unittest.TestCase):
    def setUp(self):
        self.dir = ops_tempdir(self)
        self.path = os.path.join(self.dir, "config.json")

    def config(self, *args, env=None, inproc=False):
        """config ARGS --config <tmp file>: a real subprocess, or proxy.main in-process (inproc=True)."""
        argv = ["config"] + list(args) + ["--config", self.path]
        return ops_main(argv, env) if inproc else ops_run(argv, env=env)

    def ok(self, *args, env=None, inproc=False):
        done = self.config(*args, env=env, inproc=inproc)
        self.assertEqual(done.returncode, 0, "config %s: %s%s" % (args, done.stdout, done.stderr))
        return done.stdout

    def write(self, data):
        with open(self.path, "w", encoding="utf-8") as f:
            if isinstance(data, str):
                f.write(data)
            else:
                json.dump(data, f)

    def read(self):
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def listed(self, env=None, inproc=False):
        """config list -> {key: (shown value, source)}."""
        rows = {}
        for line in self.ok("list", env=env, inproc=inproc).splitlines():
            m = re.match(r"^(\S+)\s+(.*?)\s+\((default|file|env|flag)\)\s*$", line)
            if m:
                rows[m.group(1)] = (m.group(2), m.group(3))
        return rows


class TestCommandsStopQuietlyWhenTheReaderGoesAway(ConfigCliCase):
    def test_every_printing_command_exits_without_a_traceback_on_a_closed_pipe(self):
        self.write({"port": 4000})
        for args in (["config", "list"], ["config", "get", "port"], ["config", "path"],
                     ["config", "help"], ["version"], ["help"], ["--help"]):
            with self.subTest(args=args):
                read_end, write_end = os.pipe()
                os.close(read_end)   # the reader is gone before the first line is written
                try:
                    done = subprocess.run([sys.executable, PROXY_PY] + args + ["--config", self.path]
                                          if args[0] == "config" else [sys.executable, PROXY_PY] + args,
                                          stdout=write_end, stderr=subprocess.PIPE,
                                          env=ops_clean_env(), timeout=OPS_TIMEOUT)
                finally:
                    os.close(write_end)
                self.assertEqual(done.stderr, b"")
                # 141 is what a shell reports for `ls | head`; argparse's own help swallows EPIPE
                self.assertIn(done.returncode, (0, 141) if "help" in args[-1] else (141,))


class TestConfigCommandGood(ConfigCliCase):
    def test_set_writes_typed_values_and_get_reads_them_back(self):
        self.ok("set", "port", "4000")
        self.ok("set", "backend", "claude-code")
        self.ok("set", "useProviderModels", "false")
        self.ok("set", "logLevel", "debug", inproc=True)
        self.ok("set", "claudePermissionMode", "acceptEdits", inproc=True)
        self.ok("set", "streamIdleTimeoutMs", "60000", inproc=True)
        data = self.read()
        self.assertEqual(data["port"], 4000)
        self.assertEqual(data["backend"], "claude-code")
        self.assertIs(data["useProviderModels"], False)
        self.assertEqual(data["streamIdleTimeoutMs"], 60000)
        self.assertEqual(self.ok("get", "port").strip(), "4000")
        self.assertEqual(self.ok("get", "backend").strip(), "claude-code")
        self.assertEqual(self.ok("get", "claudePermissionMode", inproc=True).strip(), "acceptEdits")
        self.assertEqual(proxy.load_config(self.path, {})["port"], 4000)

    def test_sizes_are_accepted_with_units_and_read_back_as_bytes(self):
        self.ok("set", "maxBodyBytes", "10mb")
        self.ok("set", "logMaxSize", "512kb", inproc=True)
        self.assertEqual(self.ok("get", "maxBodyBytes").strip(), str(10 * 1024 * 1024))
        self.assertEqual(self.ok("get", "logMaxSize", inproc=True).strip(), str(512 * 1024))
        config = proxy.load_config(self.path, {})
        self.assertEqual(config["maxBodyBytes"], 10 * 1024 * 1024)

    def test_model_map_json_is_stored_as_an_object(self):
        self.ok("set", "modelMap", '{"claude-haiku-*": "deepseek/deepseek-v4-flash", "gpt-4o": "gpt-5"}')
        self.assertEqual(self.read()["modelMap"], {"claude-haiku-*": "deepseek/deepseek-v4-flash",
                                                   "gpt-4o": "gpt-5"})
        self.assertEqual(json.loads(self.ok("get", "modelMap")),
                         {"claude-haiku-*": "deepseek/deepseek-v4-flash", "gpt-4o": "gpt-5"})

    def test_env_style_aliases_are_accepted_for_set_get_and_reset(self):
        self.ok("set", "API_KEY", "alias-key-value")
        self.ok("set", "MODEL_MAP", '{"a": "b"}')
        self.ok("set", "PORT", "4100", inproc=True)
        data = self.read()
        self.assertEqual(data.get("apiKey"), "alias-key-value")
        self.assertEqual(data.get("modelMap"), {"a": "b"})
        self.assertEqual(data.get("port"), 4100)
        for alias in ("API_KEY", "MODEL_MAP", "PORT"):
            self.assertNotIn(alias, data, "the file should hold camelCase keys only")
        self.assertEqual(self.ok("get", "API_KEY").strip(), "alias-key-value")
        self.assertEqual(self.ok("get", "PORT", inproc=True).strip(), "4100")
        self.ok("reset", "MODEL_MAP", inproc=True)
        self.assertNotIn("modelMap", self.read())

    def test_set_replaces_an_env_style_key_already_in_the_file(self):
        self.write({"PORT": 3500})
        self.ok("set", "port", "3600", inproc=True)
        self.assertEqual(self.read(), {"port": 3600})

    def test_unknown_keys_in_the_file_are_kept(self):
        self.write({"zzzCustom": {"nested": [1, 2]}, "aaNote": "keep me", "port": 3001})
        self.ok("set", "port", "3002")
        self.ok("set", "host", "0.0.0.0", inproc=True)
        self.ok("reset", "host", inproc=True)
        self.assertEqual(self.read(), {"zzzCustom": {"nested": [1, 2]}, "aaNote": "keep me", "port": 3002})

    def test_file_is_sorted_and_indented(self):
        self.write({"zzz": 1, "port": 3001})
        self.ok("set", "modelMap", '{"b": "y", "a": "x"}')
        self.ok("set", "backend", "claude-code", inproc=True)
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
        self.assertEqual(text, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        self.assertIn('\n  "backend": "claude-code",\n', text)
        self.assertLess(text.index('"a"'), text.index('"b"'))

    def test_write_is_atomic_no_temp_files_left_and_mode_kept(self):
        self.write({"port": 3001})
        os.chmod(self.path, 0o600)
        self.ok("set", "apiKey", "some-secret-key")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.dir)), ["config.json"])

    def test_set_creates_a_missing_file_and_directory(self):
        self.path = os.path.join(self.dir, "new", "dir", "config.json")
        self.ok("set", "port", "4001")
        self.assertEqual(self.read(), {"port": 4001})

    def test_reset_removes_the_key_and_get_shows_the_default(self):
        self.write({"port": 4000, "host": "0.0.0.0"})
        out = self.ok("reset", "port")
        self.assertIn("3000", out)
        self.assertEqual(self.read(), {"host": "0.0.0.0"})
        self.assertEqual(self.ok("get", "port", inproc=True).strip(), "3000")
        before = ops_file_bytes(self.path)
        self.ok("reset", "port", inproc=True)  # already default: nothing to do, file untouched
        self.assertEqual(ops_file_bytes(self.path), before)

    def test_path_prints_the_absolute_config_path(self):
        self.assertEqual(self.ok("path").strip(), os.path.abspath(self.path))
        env = ops_clean_env(CC_PROXY_CONFIG=self.path)
        done = ops_main(["config", "path"], env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), os.path.abspath(self.path))

    def test_help_lists_every_key_with_env_type_default_and_allowed_values(self):
        out = self.ok("help")
        rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
        for s in proxy.SETTINGS:
            self.assertIn(s.key, rows, "help misses " + s.key)
            self.assertIn(s.env, rows[s.key].split(), "help row of %s misses its env name" % s.key)
        self.assertIn("commandcode", rows["backend"])
        self.assertIn("claude-code", rows["backend"])
        for level in ("error", "warn", "info", "debug"):
            self.assertIn(level, rows["logLevel"])
        for mode in ("default", "acceptEdits", "plan", "dontAsk", "bypassPermissions"):
            self.assertIn(mode, rows["claudePermissionMode"])
        self.assertIn("3000", rows["port"])

    def test_api_key_is_masked_in_list_but_shown_by_get(self):
        secret = "sk-ops-" + uuid.uuid4().hex
        set_out = self.config("set", "apiKey", secret)
        self.assertEqual(set_out.returncode, 0, set_out.stderr)
        self.assertNotIn(secret, set_out.stdout + set_out.stderr, "set should not echo the secret")
        listed = self.config("list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertNotIn(secret, listed.stdout + listed.stderr)
        self.assertNotIn(secret[-12:], listed.stdout, "not even a tail of the secret")
        self.assertIn("apiKey", listed.stdout)
        self.assertEqual(self.ok("get", "apiKey").strip(), secret)

    def test_api_key_from_env_is_masked_in_list_too(self):
        secret = "env-secret-" + uuid.uuid4().hex
        rows = self.listed(env=ops_clean_env(API_KEY=secret), inproc=True)
        self.assertEqual(rows["apiKey"][1], "env")
        self.assertNotIn(secret, rows["apiKey"][0])

    def test_list_shows_default_file_and_env_sources(self):
        self.write({"host": "0.0.0.0", "logLevel": "debug", "someUnknownKey": 1})
        rows = self.listed(env=ops_clean_env(PORT="4000"))
        self.assertEqual(rows["port"], ("4000", "env"))
        self.assertEqual(rows["host"], ("0.0.0.0", "file"))
        self.assertEqual(rows["logLevel"], ("debug", "file"))
        self.assertEqual(rows["backend"], ("commandcode", "default"))
        for s in proxy.SETTINGS:
            self.assertIn(s.key, rows, "list misses " + s.key)
        rows = self.listed(inproc=True)  # the env var was for one run only
        self.assertEqual(rows["port"], ("3000", "default"))

    def test_set_notes_when_an_env_var_overrides_the_value(self):
        out = self.ok("set", "port", "4200", env=ops_clean_env(PORT="4000"), inproc=True)
        self.assertIn("PORT", out)
        self.assertEqual(self.read(), {"port": 4200})


class TestConfigCommandBad(ConfigCliCase):
    ORIGINAL = '{\n  "port": 3001,\n  "unknownThing": [1, 2, 3]\n}\n'

    def assertRejected(self, *args, original=ORIGINAL, mention=None, inproc=True):
        if original is None:
            if os.path.exists(self.path):
                os.remove(self.path)
        else:
            self.write(original)
        before = ops_file_bytes(self.path)
        done = self.config(*args, inproc=inproc)
        self.assertEqual(done.returncode, 2, "config %s should exit 2: %r %r" % (args, done.stdout, done.stderr))
        reason = done.stderr.strip()
        self.assertTrue(reason, "a reason on stderr")
        self.assertNotIn("\n", reason, "the reason should be one line: %r" % reason)
        self.assertNotIn("Traceback", done.stderr)
        if mention:
            self.assertIn(mention, reason)
        self.assertEqual(ops_file_bytes(self.path), before, "the file must be left byte-identical")
        self.assertEqual(sorted(os.listdir(self.dir)), [] if before is None else ["config.json"])
        return reason

    def test_port_not_a_number(self):
        self.assertRejected("set", "port", "abc", mention="port", inproc=False)

    def test_port_out_of_range(self):
        self.assertRejected("set", "port", "70000", mention="port")

    def test_backend_not_in_allowed_set(self):
        reason = self.assertRejected("set", "backend", "foo", mention="backend", inproc=False)
        self.assertIn("claude-code", reason, "the reason should name the allowed values")

    def test_log_level_not_in_allowed_set(self):
        self.assertRejected("set", "logLevel", "loud", mention="logLevel", inproc=False)

    def test_permission_mode_not_in_allowed_set(self):
        self.assertRejected("set", "claudePermissionMode", "yolo", mention="claudePermissionMode")

    def test_size_with_bad_unit(self):
        self.assertRejected("set", "maxBodyBytes", "10xb", mention="maxBodyBytes", inproc=False)

    def test_duration_with_unit_suffix_is_not_milliseconds(self):
        self.assertRejected("set", "claudeTimeoutMs", "5s", mention="claudeTimeoutMs")

    def test_bool_not_a_bool(self):
        self.assertRejected("set", "useProviderModels", "maybe", mention="useProviderModels")

    def test_model_map_not_json(self):
        self.assertRejected("set", "modelMap", "not-json", mention="modelMap", inproc=False)

    def test_model_map_json_but_not_an_object(self):
        self.assertRejected("set", "MODEL_MAP", '["a", "b"]', mention="modelMap")

    def test_api_base_not_a_url(self):
        self.assertRejected("set", "apiBase", "ftp:/nowhere", mention="apiBase")

    def test_bad_value_leaves_a_missing_file_missing(self):
        self.assertRejected("set", "port", "abc", original=None)

    def test_an_unknown_key_is_rejected_by_set_get_and_reset(self):
        self.assertRejected("set", "noSuchKey", "1", mention="noSuchKey")
        self.assertRejected("get", "noSuchKey", mention="noSuchKey")
        self.assertRejected("reset", "noSuchKey", mention="noSuchKey")

    def test_missing_arguments_are_rejected(self):
        self.assertRejected("set", "port")
        self.assertRejected("get")
        self.assertRejected("reset")

    def test_broken_file_is_reported_not_overwritten(self):
        self.assertRejected("set", "port", "4000", original="{not json at all", mention=self.path, inproc=False)
        self.assertRejected("list", original="{not json at all")
        self.assertRejected("set", "port", "4000", original="[1, 2]")

    def test_bad_value_in_the_environment_is_reported_by_list(self):
        self.write(self.ORIGINAL)
        done = self.config("list", env=ops_clean_env(PORT="abc"), inproc=True)
        self.assertEqual(done.returncode, 2, done)
        self.assertIn("port", done.stderr)
        self.assertNotIn("\n", done.stderr.strip())


# =============================================================================================
# Service: generated unit and plist text
# =============================================================================================

class TestSystemdUnitText(unittest.TestCase):
    def exec_start(self, unit):
        sections = parse_unit(unit)
        self.assertEqual(len(sections["Service"]["ExecStart"]), 1)
        return sections, systemd_split(sections["Service"]["ExecStart"][0])

    def test_unit_runs_absolute_python_on_absolute_proxy_with_config(self):
        config = os.path.join(ops_tempdir(self), "config.json")
        sections, argv = self.exec_start(proxy.systemd_unit(config))
        self.assertEqual(argv, [sys.executable, PROXY_PY, "start", "--config", config])
        self.assertTrue(os.path.isabs(argv[0]) and os.path.isabs(argv[1]) and os.path.isabs(argv[4]))
        service = sections["Service"]
        self.assertEqual(service["Restart"], ["on-failure"])
        self.assertEqual(sections["Install"]["WantedBy"], ["default.target"])
        self.assertIn("Unit", sections)
        self.assertTrue(sections["Unit"].get("Description"))

    def test_relative_config_path_becomes_absolute(self):
        here = os.getcwd()
        tmp = ops_tempdir(self)
        os.chdir(tmp)
        self.addCleanup(os.chdir, here)
        expected = os.path.abspath("rel/config.json")
        _, argv = self.exec_start(proxy.systemd_unit("rel/config.json"))
        self.assertEqual(argv[-1], expected)

    def test_unit_carries_no_secrets_only_the_config_path(self):
        tmp = ops_tempdir(self)
        config = os.path.join(tmp, "config.json")
        secret = "unit-secret-" + uuid.uuid4().hex
        with open(config, "w") as f:
            json.dump({"apiKey": secret}, f)
        with mock.patch.dict(os.environ, {"API_KEY": secret}):
            unit = proxy.systemd_unit(config)
        self.assertNotIn(secret, unit)

    def test_path_with_spaces_percent_dollar_and_quotes_round_trips(self):
        tmp = ops_tempdir(self)
        config = os.path.join(tmp, 'my dir', '100% "fun" $HOME \\ x.json')
        _, argv = self.exec_start(proxy.systemd_unit(config))
        self.assertEqual(argv[-1], config)
        self.assertEqual(argv[-2], "--config")

    def test_systemd_quote_escapes_specifiers(self):
        self.assertEqual(systemd_split(proxy.systemd_quote("a b%c$d")), ["a b%c$d"])
        self.assertIn("%%", proxy.systemd_quote("100%"))

    def test_systemd_analyze_verify_accepts_the_unit(self):
        analyze = shutil.which("systemd-analyze")
        if not analyze:
            self.skipTest("systemd-analyze not installed")
        tmp = ops_tempdir(self)
        config = os.path.join(tmp, "a dir", "100% conf.json")
        unit_path = os.path.join(tmp, "cc-proxy.service")
        with open(unit_path, "w", encoding="utf-8") as f:
            f.write(proxy.systemd_unit(config))
        done = None
        for mode in (["--user"], []):
            done = subprocess.run([analyze] + mode + ["verify", unit_path], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=OPS_TIMEOUT)
            if "Failed to initialize manager" not in done.stdout and \
                    "Failed to lookup RuntimeDirectory" not in done.stdout:
                break
        else:
            self.skipTest("systemd-analyze cannot run here: " + done.stdout.strip())
        self.assertEqual(done.returncode, 0, done.stdout)
        complaints = [line for line in done.stdout.splitlines() if "cc-proxy.service" in line]
        self.assertEqual(complaints, [], done.stdout)


class TestLaunchdPlistText(unittest.TestCase):
    def test_plist_round_trips_through_plistlib(self):
        home = ops_tempdir(self)
        config = os.path.join(home, "my dir", "config.json")
        with mock.patch.dict(os.environ, {"HOME": home}):
            plist = proxy.launchd_plist(config)
        data = plistlib.loads(plistlib.dumps(plist))
        self.assertEqual(data["Label"], proxy.LAUNCHD_LABEL)
        self.assertEqual(data["ProgramArguments"], [sys.executable, PROXY_PY, "start", "--config", config])
        self.assertIs(data["RunAtLoad"], True)
        self.assertTrue(data["KeepAlive"])
        logs = os.path.join(home, "Library", "Logs", "cc-proxy")
        self.assertEqual(os.path.dirname(data["StandardOutPath"]), logs)
        self.assertEqual(os.path.dirname(data["StandardErrorPath"]), logs)


# =============================================================================================
# Service commands against fake systemctl / launchctl
# =============================================================================================

# Records its argv (fields joined by \\x1f, one call a line), then prints $FAKE_TOOL_FAIL and exits 1,
# or prints "fake <name> ok" and exits 0.
FAKE_TOOL = """#!/bin/sh
name=$(basename "$0")
IFS=$(printf '\\037')
printf '%s\\n' "$name$IFS$*" >> "$FAKE_TOOL_LOG"
if [ -n "$FAKE_TOOL_FAIL" ]; then
    echo "$FAKE_TOOL_FAIL"
    exit 1
fi
echo "fake $name ok"
"""


class ServiceCase(unittest.TestCase):
    """HOME in a temp dir, a bin dir with fake tools first on PATH, their argv recorded in a log."""

    def setUp(self):
        self.home = ops_tempdir(self)
        self.bin = os.path.join(self.home, "fakebin")
        self.empty_bin = os.path.join(self.home, "emptybin")
        os.makedirs(self.bin)
        os.makedirs(self.empty_bin)
        self.tool_log = os.path.join(self.home, "tool-calls.jsonl")
        self.config_path = os.path.join(self.home, "cfg dir", "config.json")
        for tool in ("systemctl", "launchctl"):
            path = os.path.join(self.bin, tool)
            with open(path, "w") as f:
                f.write(FAKE_TOOL)
            os.chmod(path, 0o755)

    def env(self, fail=None, path=None):
        env = ops_clean_env(HOME=self.home, FAKE_TOOL_LOG=self.tool_log,
                            PATH=path if path is not None else self.bin + os.pathsep + os.environ.get("PATH", ""))
        env.pop("FAKE_TOOL_FAIL", None)
        if fail:
            env["FAKE_TOOL_FAIL"] = fail
        return env

    def calls(self):
        try:
            with open(self.tool_log) as f:
                return [line.rstrip("\n").split("\x1f") for line in f]
        except FileNotFoundError:
            return []

    def clear_calls(self):
        if os.path.exists(self.tool_log):
            os.remove(self.tool_log)


@unittest.skipUnless(sys.platform.startswith("linux"), "systemd path runs as a subprocess on Linux")
class TestServiceSystemd(ServiceCase):
    def service(self, action, fail=None, path=None):
        return ops_run(["service", action, "--config", self.config_path], env=self.env(fail, path))

    @property
    def unit_path(self):
        return os.path.join(self.home, ".config", "systemd", "user", "cc-proxy.service")

    def install(self):
        done = self.service("install")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        return done

    def test_install_writes_the_unit_and_runs_daemon_reload_and_enable(self):
        done = self.install()
        with open(self.unit_path, encoding="utf-8") as f:
            unit = f.read()
        argv = systemd_split(parse_unit(unit)["Service"]["ExecStart"][0])
        self.assertEqual(argv, [sys.executable, PROXY_PY, "start", "--config", self.config_path])
        calls = self.calls()
        self.assertIn(["systemctl", "--user", "daemon-reload"], calls)
        self.assertIn(["systemctl", "--user", "enable", "cc-proxy"], calls)
        self.assertLess(calls.index(["systemctl", "--user", "daemon-reload"]),
                        calls.index(["systemctl", "--user", "enable", "cc-proxy"]))
        self.assertIn("enable-linger", done.stdout + done.stderr, "install should say how to enable lingering")

    def test_start_stop_restart_status_call_systemctl_user(self):
        self.install()
        for action in ("start", "stop", "restart", "status"):
            self.clear_calls()
            done = self.service(action)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertEqual(self.calls(), [["systemctl", "--user", action, "cc-proxy"]])
            self.assertIn("fake systemctl ok", done.stdout + done.stderr, "the tool's output is shown")

    def test_uninstall_disables_and_removes_the_unit(self):
        self.install()
        self.clear_calls()
        done = self.service("uninstall")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertFalse(os.path.exists(self.unit_path))
        calls = self.calls()
        self.assertIn(["systemctl", "--user", "disable", "--now", "cc-proxy"], calls)
        self.assertEqual(calls[-1], ["systemctl", "--user", "daemon-reload"])

    def test_failing_systemctl_error_is_shown_and_exit_code_nonzero(self):
        message = "Failed to connect to bus: No medium found"
        done = self.service("install", fail=message)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(message, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        for action in ("restart",):
            done = self.service(action, fail=message)
            self.assertNotEqual(done.returncode, 0, action)
            self.assertIn(message, done.stderr, action)
            self.assertNotIn("Traceback", done.stderr)

    def test_missing_systemctl_gives_a_clear_message(self):
        for action in ("install", "status"):
            done = self.service(action, path=self.empty_bin)
            self.assertNotEqual(done.returncode, 0, action)
            self.assertIn("systemctl", done.stderr, action)
            self.assertIn("not found", done.stderr, action)
            self.assertNotIn("Traceback", done.stderr, action)
        self.assertEqual(self.calls(), [])

    def test_start_before_install_says_not_installed(self):
        done = self.service("start")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("install", done.stderr)
        self.assertEqual(self.calls(), [])


class InProcessServiceCase(ServiceCase):
    platform = None

    def run_main(self, *args, fail=None, path=None):
        """proxy.main([...], platform=self.platform) -> (exit code, stdout, stderr)."""
        done = ops_main(args, self.env(fail, path), platform=self.platform)
        return done.returncode, done.stdout, done.stderr


class TestServiceLaunchd(InProcessServiceCase):
    platform = "darwin"

    @property
    def plist_path(self):
        return os.path.join(self.home, "Library", "LaunchAgents", proxy.LAUNCHD_LABEL + ".plist")

    @property
    def target(self):
        return "gui/%d/%s" % (os.getuid(), proxy.LAUNCHD_LABEL)

    def install(self):
        code, out, err = self.run_main("service", "install", "--config", self.config_path)
        self.assertEqual(code, 0, out + err)
        return out, err

    def test_install_writes_plist_and_bootstraps_it(self):
        self.install()
        with open(self.plist_path, "rb") as f:
            data = plistlib.load(f)
        self.assertEqual(data["ProgramArguments"], [sys.executable, PROXY_PY, "start", "--config", self.config_path])
        self.assertIs(data["RunAtLoad"], True)
        self.assertTrue(data["KeepAlive"])
        self.assertTrue(data["StandardOutPath"].startswith(os.path.join(self.home, "Library", "Logs", "cc-proxy")))
        self.assertTrue(os.path.isdir(os.path.join(self.home, "Library", "Logs", "cc-proxy")))
        self.assertEqual(self.calls(), [["launchctl", "bootstrap", "gui/%d" % os.getuid(), self.plist_path]])

    def test_start_restart_status_use_kickstart_and_print(self):
        self.install()
        expected = {"start": ["launchctl", "kickstart", self.target],
                    "restart": ["launchctl", "kickstart", "-k", self.target],
                    "status": ["launchctl", "print", self.target]}
        for action, argv in expected.items():
            self.clear_calls()
            code, out, err = self.run_main("service", action, "--config", self.config_path)
            self.assertEqual(code, 0, out + err)
            self.assertIn(argv, self.calls(), action)

    def test_stop_boots_the_agent_out(self):
        # KeepAlive=true: launchd restarts a job that was merely killed, so stop must bootout.
        self.install()
        self.clear_calls()
        code, out, err = self.run_main("service", "stop", "--config", self.config_path)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(self.calls(), [["launchctl", "bootout", self.target]])

    def test_uninstall_boots_out_and_removes_the_plist(self):
        self.install()
        self.clear_calls()
        code, out, err = self.run_main("service", "uninstall", "--config", self.config_path)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(self.calls(), [["launchctl", "bootout", self.target]])
        self.assertFalse(os.path.exists(self.plist_path))

    def test_failing_launchctl_error_is_shown_and_exit_code_nonzero(self):
        message = "Bootstrap failed: 5: Input/output error"
        code, out, err = self.run_main("service", "install", "--config", self.config_path, fail=message)
        self.assertNotEqual(code, 0)
        self.assertIn(message, err)
        code, out, err = self.run_main("service", "status", "--config", self.config_path, fail=message)
        self.assertNotEqual(code, 0)
        self.assertIn(message, err)

    def test_missing_launchctl_gives_a_clear_message(self):
        code, out, err = self.run_main("service", "install", "--config", self.config_path, path=self.empty_bin)
        self.assertNotEqual(code, 0)
        self.assertIn("launchctl", err)
        self.assertIn("not found", err)


class TestServiceUnsupportedPlatform(InProcessServiceCase):
    platform = "win32"

    def test_every_action_says_start_is_the_way(self):
        for action in ("install", "uninstall", "start", "stop", "restart", "status"):
            code, out, err = self.run_main("service", action, "--config", self.config_path)
            self.assertNotEqual(code, 0, action)
            self.assertIn("start", out + err, action)
            self.assertIn("win32", out + err, action)
        self.assertEqual(self.calls(), [])
        self.assertEqual(sorted(os.listdir(self.home)), ["emptybin", "fakebin"], "nothing written under HOME")


# =============================================================================================
# Logs
# =============================================================================================

class TestLogRotation(unittest.TestCase):
    def setUp(self):
        saved = list(proxy.log.handlers), proxy.log.level

        def restore():
            for handler in proxy.log.handlers:
                if handler not in saved[0]:
                    handler.close()
            proxy.log.handlers[:] = saved[0]
            proxy.log.setLevel(saved[1])
        self.addCleanup(restore)

    def setup_logging(self, **overrides):
        config = proxy_config(**overrides)
        console = io.StringIO()
        with contextlib.redirect_stderr(console):
            proxy.setup_logging(config)
        return console

    def test_log_file_rotates_and_keeps_at_most_log_max_files(self):
        tmp = ops_tempdir(self)
        path = os.path.join(tmp, "nested", "logs", "cc-proxy.log")
        console = self.setup_logging(logFile=path, logMaxSize="2kb", logMaxFiles=2, logLevel="info")
        for i in range(300):
            proxy.log.info("line %04d %s", i, "x" * 80)
        names = sorted(os.listdir(os.path.dirname(path)))
        self.assertEqual(names, ["cc-proxy.log", "cc-proxy.log.1", "cc-proxy.log.2"])
        for name in names:
            self.assertLessEqual(os.path.getsize(os.path.join(os.path.dirname(path), name)), 2048 + 200)
        with open(path, encoding="utf-8") as f:
            self.assertIn("line 0299", f.read())
        self.assertIn("line 0299", console.getvalue(), "the console gets every line too")

    def test_level_filters_lines(self):
        tmp = ops_tempdir(self)
        path = os.path.join(tmp, "cc-proxy.log")
        self.setup_logging(logFile=path, logLevel="warn")
        proxy.log.info("INFO-LINE")
        proxy.log.debug("DEBUG-LINE")
        proxy.log.warning("WARN-LINE")
        proxy.log.error("ERROR-LINE")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("INFO-LINE", text)
        self.assertNotIn("DEBUG-LINE", text)
        self.assertIn("WARN-LINE", text)
        self.assertIn("ERROR-LINE", text)

    def test_redact_strips_keys(self):
        self.assertNotIn("SECRET", proxy.redact("key user_SECRETabc123 and sk-ant-SECRETxyz789"))


class TestAccessLog(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.upstream = fake_upstream(cls.addClassCleanup)

    def setUp(self):
        self.server, self.port = ops_start_server(self, apiBase=self.upstream.url, upstreamRetries=0)

    def test_one_access_line_per_request_with_id_method_path_status_and_no_secrets(self):
        key = "user_SECRET" + uuid.uuid4().hex[:12]
        prompt = "PROMPT-zebra-" + uuid.uuid4().hex[:8]
        with ops_capture_log(logging.DEBUG) as captured:
            rids = {}
            for stream in (True, False):
                rid = "ops-access-%s-%s" % (stream, uuid.uuid4().hex[:8])
                r = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(prompt, stream),
                                {"Authorization": "Bearer " + key, "X-Request-Id": rid})
                self.assertEqual(r.status, 200, r)
                rids[rid] = stream
            bad_rid = "ops-access-upstream-400"
            self.upstream.script(http_error(400, {"error": {"message": "UPSTREAM_BODY_zq9 the upstream's private words"}}))
            r = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(prompt, False),
                            {"Authorization": "Bearer " + key, "X-Request-Id": bad_rid})
            self.assertGreaterEqual(r.status, 400)
            health_rid = "ops-access-health"
            health = http_request(self.port, "GET", "/health", headers={"X-Request-Id": health_rid})
            self.assertEqual(health.status, 200)
            for rid in list(rids) + [bad_rid, health_rid]:
                captured.wait_for(rid)
            time.sleep(0.1)
            text = captured.text()
        for rid in rids:
            lines = [line for line in text.splitlines() if rid in line]
            self.assertEqual(len(lines), 1, "exactly one access line per request: %r" % lines)
            fields = lines[0].split()
            self.assertIn("POST", fields)
            self.assertIn("/v1/chat/completions", fields)
            self.assertIn("127.0.0.1", fields)
            self.assertIn("status=200", fields)
            self.assertIn("backend=commandcode", fields)
            self.assertIn("model=x", fields)
            self.assertTrue(any(f.startswith("total_ms=") for f in fields), lines[0])
            self.assertTrue(any(f.startswith("first_byte_ms=") for f in fields), lines[0])
            self.assertIn("tokens_in=7400", fields)  # the fake upstream's usage
            self.assertIn("cached=7168", fields)
            self.assertIn("out=12", fields)
        health = [line for line in text.splitlines() if health_rid in line]
        self.assertEqual(len(health), 1)
        self.assertIn("GET", health[0].split())
        self.assertIn("/health", health[0].split())
        self.assertIn("status=200", health[0].split())
        self.assertIn(bad_rid, text)
        self.assertNotIn("SECRET", text, "no key at any level")
        self.assertNotIn(key[5:], text)
        self.assertNotIn(prompt, text, "no prompt at any level")
        self.assertNotIn("UPSTREAM_BODY_zq9", text, "no upstream error body at any level")
        self.assertNotIn("private words", text)


# =============================================================================================
# HTTP niceties: request ids, CORS, /health, /metrics, X-Forwarded-For
# =============================================================================================

class TestRequestId(unittest.TestCase):
    def setUp(self):
        self.server, self.port = ops_start_server(self)

    def rid_of(self, raw_id):
        r = raw_request(self.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + raw_id
                        + b"\r\nConnection: close\r\n\r\n")
        self.assertIn(" 200 ", r.status_line + " ")
        values = r.header_values("x-request-id")
        self.assertEqual(len(values), 1, r.head_lines)
        return values[0], r.head_lines

    def test_valid_client_id_is_echoed(self):
        for rid in ("abc-123", "req_01HXYZ.part:2", "a" * 128):
            r = http_request(self.port, "GET", "/health", headers={"X-Request-Id": rid})
            self.assertEqual(r.header("X-Request-Id"), rid)

    def test_generated_when_missing_and_unique(self):
        seen = set()
        for _ in range(3):
            rid = http_request(self.port, "GET", "/health").header("X-Request-Id")
            self.assertTrue(rid and re.fullmatch(r"[A-Za-z0-9._:\-]{8,128}", rid), rid)
            seen.add(rid)
        self.assertEqual(len(seen), 3)

    def test_too_long_id_is_replaced(self):
        rid = "b" * 129
        r = http_request(self.port, "GET", "/health", headers={"X-Request-Id": rid})
        self.assertNotEqual(r.header("X-Request-Id"), rid)
        self.assertTrue(r.header("X-Request-Id"))
        huge = "c" * 5000
        r = http_request(self.port, "GET", "/health", headers={"X-Request-Id": huge})
        self.assertLessEqual(len(r.header("X-Request-Id")), 128)

    def test_id_with_cr_lf_is_replaced_and_nothing_is_injected(self):
        # An obs-folded header line: the server reads the value as "abc\r\n Injected-Header: evil".
        value, lines = self.rid_of(b"abc\r\n Injected-Header: evil")
        self.assertNotEqual(value, "abc", "the CR/LF-carrying id must be replaced, not echoed in part")
        self.assertTrue(re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", value), value)
        self.assertEqual([line for line in lines if "evil" in line], [], "nothing injected into the head")

    def test_id_with_spaces_or_control_characters_is_replaced(self):
        for raw in (b"has space", b"tab\there", b"quote\"x", b"nul\x01x"):
            value, _ = self.rid_of(raw)
            self.assertNotEqual(value.encode("latin-1"), raw)
            self.assertTrue(re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", value), value)

    def test_present_on_errors_preflight_and_metrics(self):
        r = http_request(self.port, "GET", "/no/such/route", headers={"X-Request-Id": "rid-404"})
        self.assertEqual(r.status, 404)
        self.assertEqual(r.header("X-Request-Id"), "rid-404")
        r = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(),
                        headers={"X-Request-Id": "rid-401"})
        self.assertEqual(r.status, 401)
        self.assertEqual(r.header("X-Request-Id"), "rid-401")
        r = http_request(self.port, "OPTIONS", "/v1/chat/completions",
                         headers={"X-Request-Id": "rid-options"})
        self.assertEqual(r.header("X-Request-Id"), "rid-options")
        self.assertTrue(http_request(self.port, "GET", "/metrics").header("X-Request-Id"))

    def test_malformed_request_line_gets_a_real_error_status_with_an_id(self):
        errors = []
        self.server.handle_error = lambda request, address: errors.append(sys.exc_info()[1])
        for raw, code in ((b"GARBAGE\r\n\r\n", 400), (b"GET / HTTP/9.9\r\n\r\n", 505)):
            r = raw_request(self.port, raw)
            self.assertRegex(r.status_line, r"^HTTP/1\.[01] %d " % code,
                             "a status line, not a bare body: %r" % r.status_line)
            self.assertTrue(r.header_values("x-request-id"), "even a malformed request gets an id")
        time.sleep(0.1)
        self.assertEqual(errors, [], "the handler raised while logging the malformed request")


class CorsCase(unittest.TestCase):
    cors = "*"

    def setUp(self):
        self.server, self.port = ops_start_server(self, corsOrigin=self.cors)

    def preflight(self, path="/v1/chat/completions"):
        return http_request(self.port, "OPTIONS", path, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-request-id"})


class TestCorsWildcard(CorsCase):
    cors = "*"

    def test_simple_request_carries_allow_origin_and_exposes_request_id(self):
        r = http_request(self.port, "GET", "/health", headers={"Origin": "https://app.example"})
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")
        self.assertIn("x-request-id", r.header("Access-Control-Expose-Headers").lower())

    def test_error_responses_carry_cors_too(self):
        r = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(),
                        headers={"Origin": "https://app.example"})
        self.assertEqual(r.status, 401)
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")

    def test_preflight_is_answered(self):
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/models"):
            r = self.preflight(path)
            self.assertIn(r.status, (200, 204), path)
            self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")
            methods = r.header("Access-Control-Allow-Methods") or ""
            self.assertIn("POST", methods)
            self.assertIn("OPTIONS", methods)
            allowed = (r.header("Access-Control-Allow-Headers") or "").lower()
            self.assertTrue(allowed == "*" or ("authorization" in allowed and "content-type" in allowed), allowed)
            self.assertTrue(r.header("Access-Control-Max-Age"))
            self.assertEqual(r.data, b"")


class TestCorsSpecificOrigin(CorsCase):
    cors = "https://app.example"

    def test_allow_origin_is_the_configured_origin_with_vary(self):
        r = http_request(self.port, "GET", "/health", headers={"Origin": "https://app.example"})
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "https://app.example")
        self.assertIn("origin", (r.header("Vary") or "").lower())
        r = self.preflight()
        self.assertIn(r.status, (200, 204))
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "https://app.example")
        self.assertIn("POST", r.header("Access-Control-Allow-Methods") or "")


class TestCorsDisabled(CorsCase):
    cors = ""

    def test_no_cors_headers_anywhere(self):
        for r in (http_request(self.port, "GET", "/health", headers={"Origin": "https://app.example"}),
                  http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(),
                              headers={"Origin": "https://app.example"}),
                  self.preflight()):
            cors = [name for name in r.headers.keys() if name.lower().startswith("access-control-")]
            self.assertEqual(cors, [], r)
            self.assertTrue(r.header("X-Request-Id"))


class TestHealthAndMetrics(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.upstream = fake_upstream(cls.addClassCleanup)

    def setUp(self):
        self.upstream.reset()
        self.server, self.port = ops_start_server(self, apiBase=self.upstream.url, upstreamRetries=0)

    def metrics(self):
        r = http_request(self.port, "GET", "/metrics")
        self.assertEqual(r.status, 200)
        self.assertTrue(r.header("Content-Type").startswith("text/plain"), r.header("Content-Type"))
        return parse_prometheus(r.data.decode("utf-8"))

    def wait_metric(self, name, at_least, timeout=5.0, **labels):
        seen = []

        def reached():
            samples, types = self.metrics()
            seen[:] = [prom_value(samples, name, **labels), samples, types]
            return seen[0] >= at_least
        wait_for(reached, timeout, step=0.05)
        return tuple(seen)

    def in_flight(self):
        return http_request(self.port, "GET", "/health").json()["in_flight"]

    def test_health_reports_status_version_backend_uptime_and_in_flight(self):
        r = http_request(self.port, "GET", "/health")
        self.assertEqual(r.status, 200)
        self.assertTrue(r.header("Content-Type").startswith("application/json"))
        body = r.json()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["version"], proxy.__version__)
        self.assertEqual(body["backend"], "commandcode")
        self.assertIsInstance(body["uptime_s"], (int, float))
        self.assertGreaterEqual(body["uptime_s"], 0)
        self.assertEqual(body["in_flight"], 0)

    def test_health_needs_no_auth_and_counts_in_flight(self):
        self.upstream.script(dripped(5, 0.15))
        result = {}

        def slow():
            result["r"] = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(),
                                      {"Authorization": "Bearer user_TEST"})
        t = threading.Thread(target=slow)
        t.start()
        seen = []
        wait_for(lambda: not t.is_alive() or seen.append(self.in_flight()) or any(seen), 3,
                 step=0.03)
        seen = max(seen or [0])
        t.join(OPS_TIMEOUT)
        self.assertEqual(result["r"].status, 200)
        self.assertEqual(seen, 1)
        # the client has its whole answer a moment before the handler thread counts the request done
        self.assertTrue(wait_for(lambda: self.in_flight() == 0, 2))
        self.assertTrue(http_request(self.port, "GET", "/health").json().get("lastUpstreamOk"),
                        "health should say when the upstream was last reachable")

    def test_metrics_parse_and_count_a_real_request(self):
        samples, types = self.metrics()
        before = prom_value(samples, "ccproxy_requests_total", route="chat", status="200")
        before_401 = prom_value(samples, "ccproxy_requests_total", route="chat", status="401")
        key = "user_METRICSKEY" + uuid.uuid4().hex[:8]
        prompt = "METRICS-PROMPT-" + uuid.uuid4().hex[:8]
        r = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(prompt),
                        {"Authorization": "Bearer " + key})
        self.assertEqual(r.status, 200)
        self.assertIn(b"data: [DONE]", r.data)
        after, samples, types = self.wait_metric("ccproxy_requests_total", before + 1, route="chat", status="200")
        self.assertEqual(after, before + 1)
        self.assertEqual(types.get("ccproxy_requests_total"), "counter")
        labelled = [dict(l) for (n, l) in samples if n == "ccproxy_requests_total" and dict(l).get("route") == "chat"]
        self.assertTrue(all(set(l) >= {"route", "backend", "status"} for l in labelled), labelled)
        self.assertEqual(prom_value(samples, "ccproxy_requests_total", route="chat", backend="commandcode",
                                    status="200"), after)
        # a refused request is counted under its own status
        r = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body())
        self.assertEqual(r.status, 401)
        after_401, samples, types = self.wait_metric("ccproxy_requests_total", before_401 + 1, route="chat",
                                                     status="401")
        self.assertEqual(after_401, before_401 + 1)
        # latency histograms, tokens by model, in-flight gauge
        self.assertEqual(types.get("ccproxy_request_seconds"), "histogram")
        self.assertEqual(types.get("ccproxy_first_byte_seconds"), "histogram")
        count = prom_value(samples, "ccproxy_request_seconds_count", route="chat")
        self.assertGreaterEqual(count, 1)
        self.assertEqual(prom_value(samples, "ccproxy_request_seconds_bucket", route="chat", le="+Inf"), count)
        self.assertGreaterEqual(prom_value(samples, "ccproxy_tokens_total", model="x", kind="input"), 1)
        self.assertGreaterEqual(prom_value(samples, "ccproxy_tokens_total", model="x", kind="output"), 1)
        self.assertIn("ccproxy_in_flight", types)
        self.assertEqual(prom_value(samples, "ccproxy_in_flight"), 0)
        text = http_request(self.port, "GET", "/metrics").data.decode()
        self.assertNotIn("METRICSKEY", text, "no label carries a key")
        self.assertNotIn(prompt, text, "no label carries a prompt")

    def test_histogram_buckets_are_cumulative(self):
        http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(),
                     {"Authorization": "Bearer user_TEST"})
        _, samples, _ = self.wait_metric("ccproxy_request_seconds_count", 1, route="chat")
        buckets = sorted(((float(dict(l)["le"]), v) for (n, l), v in samples.items()
                          if n == "ccproxy_request_seconds_bucket" and dict(l).get("route") == "chat"),
                         key=lambda b: b[0])
        self.assertTrue(buckets)
        values = [v for _, v in buckets]
        self.assertEqual(values, sorted(values), "bucket counts must be cumulative")
        self.assertEqual(buckets[-1][0], float("inf"))


class TestForwardedFor(unittest.TestCase):
    def access_client(self, port, xff):
        rid = "ops-xff-" + uuid.uuid4().hex[:10]
        with ops_capture_log(logging.INFO) as captured:
            r = http_request(port, "GET", "/health",
                             headers={"X-Request-Id": rid, "X-Forwarded-For": xff})
            self.assertEqual(r.status, 200)
            lines = captured.wait_for(rid)
        self.assertEqual(len(lines), 1, lines)
        fields = lines[0].split()
        return fields[fields.index(rid) + 1]

    def test_ignored_without_trusted_proxies(self):
        _, port = ops_start_server(self)
        self.assertEqual(self.access_client(port, "203.0.113.7"), "127.0.0.1")

    def test_ignored_when_peer_is_not_trusted(self):
        _, port = ops_start_server(self, trustedProxies="10.0.0.0/8, 192.0.2.1")
        self.assertEqual(self.access_client(port, "203.0.113.7"), "127.0.0.1")

    def test_used_when_peer_is_trusted(self):
        _, port = ops_start_server(self, trustedProxies="127.0.0.1")
        self.assertEqual(self.access_client(port, "203.0.113.7"), "203.0.113.7")

    def test_nearest_untrusted_hop_wins(self):
        _, port = ops_start_server(self, trustedProxies="127.0.0.0/8, 10.0.0.0/8")
        self.assertEqual(self.access_client(port, "198.51.100.1, 203.0.113.7, 10.1.2.3"), "203.0.113.7")

    def test_client_ip_is_the_nearest_untrusted_hop_behind_trusted_peers(self):
        def handler(peer, trusted, xff):
            return proxy.client_ip(peer, xff, proxy.parse_networks(trusted))
        self.assertEqual(handler("127.0.0.1", "", "1.2.3.4"), "127.0.0.1")
        self.assertEqual(handler("127.0.0.1", "10.0.0.0/8", "1.2.3.4"), "127.0.0.1")
        self.assertEqual(handler("10.0.0.5", "10.0.0.0/8", "1.2.3.4"), "1.2.3.4")
        self.assertEqual(handler("10.0.0.5", "10.0.0.0/8", None), "10.0.0.5")
        self.assertEqual(handler("10.0.0.5", "10.0.0.0/8", "1.2.3.4, 10.0.0.9"), "1.2.3.4")
        self.assertEqual(handler("::1", "::1", "2001:db8::7"), "2001:db8::7")


# =============================================================================================
# Graceful shutdown of `python3 proxy.py start`
# =============================================================================================

class TestGracefulShutdown(unittest.TestCase):
    def setUp(self):
        self.upstream = fake_upstream(self.addCleanup,
                                      default_reply=lambda: dripped(8, 0.2))  # ~1.8 s per answer
        self.tmp = ops_tempdir(self)
        self.port = free_port()
        env = ops_clean_env(CC_API_BASE=self.upstream.url, CC_VERSION="1.64.0", CC_USE_PROVIDER_MODELS="false",
                            LOG_LEVEL="info", HOME=self.tmp)
        self.child, self.out_path = ops_spawn_proxy(
            self, ["start", "--port", str(self.port), "--config", os.path.join(self.tmp, "none.json")], env,
            self.tmp, self.port)

    def output(self):
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def refused(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    def stream_in_thread(self, first_line):
        """A streaming chat on a thread; first_line is set once its first data line arrived."""
        result = {"response": None, "error": None, "done_at": None}

        def run():
            try:
                with send_request(self.port, "chat", ops_chat_body(), key="user_TEST",
                                  timeout=OPS_TIMEOUT) as sock:
                    got = read_until(sock, b"data:", OPS_TIMEOUT)
                    if b"data:" in got:
                        first_line.set()
                    result["response"] = read_response(sock, time.monotonic() + OPS_TIMEOUT, got)
            except Exception as e:  # noqa: BLE001 - reported by the test
                result["error"] = e
            finally:
                result["done_at"] = time.monotonic()
                first_line.set()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, result

    def test_sigterm_mid_stream_finishes_the_request_refuses_new_ones_and_exits_0(self):
        first = threading.Event()
        thread, result = self.stream_in_thread(first)
        self.assertTrue(first.wait(10), "the stream never started")
        self.assertIsNone(result["error"])
        self.child.send_signal(signal.SIGTERM)
        refused_at = time.monotonic() if wait_for(self.refused, 1.2, step=0.05) else None
        self.assertIsNotNone(refused_at, "new connections should be refused soon after SIGTERM")
        self.assertTrue(thread.is_alive(), "the request was still in flight when new connections were refused")
        thread.join(OPS_TIMEOUT)
        self.assertFalse(thread.is_alive())
        self.assertIsNone(result["error"], "the in-flight stream was cut: %r\n%s" % (result["error"], self.output()))
        resp = result["response"]
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.sse()[-1][1], "[DONE]", resp.sse()[-5:])
        self.assertEqual(chunk_content(resp.chunks()), "x" * 8, "every delta arrived")
        self.assertEqual(self.child.wait(10), 0, self.output())
        self.assertGreater(result["done_at"], refused_at)

    def test_drain_closes_idle_keep_alive_connections_and_never_drops_a_request_it_read(self):
        first = threading.Event()
        thread, result = self.stream_in_thread(first)   # keeps the drain going for ~1.8 s
        self.assertTrue(first.wait(10), "the stream never started")
        idle = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=OPS_TIMEOUT)
            self.addCleanup(sock.close)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            r = read_response(sock, time.monotonic() + 5)
            self.assertEqual(r.status, 200)
            self.assertNotIn("connection: close", [l.lower() for l in r.head_lines])
            idle.append(sock)
        slow = socket.create_connection(("127.0.0.1", self.port), timeout=OPS_TIMEOUT)
        self.addCleanup(slow.close)
        slow.sendall(b"GET /health HTTP/1.1\r\n")   # the rest of its head comes during the drain
        time.sleep(0.2)
        self.child.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        def closed_by_server(sock):
            readable, _, _ = select.select([sock], [], [], 0)
            try:
                return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except ConnectionResetError:
                return True
        self.assertTrue(wait_for(lambda: all(closed_by_server(s) for s in idle), 1.0),
                        "idle keep-alive connections must be closed when the drain begins")
        slow.sendall(b"Host: x\r\n\r\n")
        r = read_response(slow, time.monotonic() + 5)
        self.assertEqual(r.status, 503, r)
        self.assertIn("connection: close", [l.lower() for l in r.head_lines])
        self.assertEqual(r.json()["error"]["code"], "shutting_down")
        # around the end of the drain every idle connection tries one more request: it either
        # sees the close before sending, or gets a whole answer -- never silence after sending
        time.sleep(max(0.0, signalled + 1.2 - time.monotonic()))
        for sock in idle:
            if closed_by_server(sock):
                continue
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(read_response(sock, time.monotonic() + 5).status, (200, 503))
        thread.join(OPS_TIMEOUT)
        self.assertIsNone(result["error"], self.output())
        self.assertEqual(self.child.wait(10), 0, self.output())

    def test_an_answer_finished_during_the_drain_says_connection_close(self):
        done = {}

        def call():
            r = http_request(self.port, "POST", "/v1/chat/completions", ops_chat_body(stream=False),
                             {"Authorization": "Bearer user_TEST"}, timeout=OPS_TIMEOUT)
            done.update(status=r.status, connection=r.header("Connection"), body=r.json())
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        self.assertTrue(wait_for(self.upstream.generates, 5))
        self.child.send_signal(signal.SIGTERM)
        thread.join(OPS_TIMEOUT)
        self.assertEqual(done.get("status"), 200, self.output())
        self.assertEqual(done["connection"], "close")
        self.assertEqual(done["body"]["choices"][0]["message"]["content"], "x" * 8)
        self.assertEqual(self.child.wait(10), 0, self.output())

    def test_sigint_when_idle_exits_0_promptly(self):
        t0 = time.monotonic()
        self.child.send_signal(signal.SIGINT)
        self.assertEqual(self.child.wait(10), 0, self.output())
        self.assertLess(time.monotonic() - t0, 5)
        self.assertNotIn("Traceback", self.output())
        self.assertTrue(self.refused())


# =====================================================================================
# Claude Code CLI backend, driven through a fake `claude` (testdata/fake_claude.py)
# =====================================================================================


def fake_claude_launcher(script=os.path.join(HERE, "testdata", "fake_claude.py")):
    """The fake `claude`, started through `sh` with this interpreter's absolute path: its own
    `#!/usr/bin/env python3` may hit a version manager's shim, ~60 ms more per CLI start."""
    folder = tempfile.mkdtemp(prefix="cc-proxy-fake-claude-")
    atexit.register(shutil.rmtree, folder, True)
    launcher = os.path.join(folder, "claude")
    with open(launcher, "w") as f:
        f.write('#!/bin/sh\nexec %s %s "$@"\n' % (shlex.quote(sys.executable), shlex.quote(script)))
    os.chmod(launcher, 0o755)
    return launcher


FAKE_CLAUDE = fake_claude_launcher()
CLAUDE_KEY = "test-key"
CCP_ENV = ("CLAUDE_FAKE_RECORD", "CLAUDE_FAKE_STATE", "CLAUDE_FAKE_SCENARIO", "CLAUDE_FAKE_DELAY",
           "CLAUDE_CODE_MAX_RETRIES")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ClaudeCodeCase(unittest.TestCase):
    overrides = {}

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ccp-test-")
        self.work = os.path.join(self.tmp, "work")
        os.mkdir(self.work)
        self.record_path = os.path.join(self.tmp, "record.jsonl")
        self.state = os.path.join(self.tmp, "state")
        os.mkdir(self.state)
        self.saved_env = {k: os.environ.get(k) for k in CCP_ENV}
        for name in CCP_ENV:
            os.environ.pop(name, None)
        os.environ["CLAUDE_FAKE_RECORD"] = self.record_path
        os.environ["CLAUDE_FAKE_STATE"] = self.state
        self.server = None
        self.start_server()

    def tearDown(self):
        self.stop_server()
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        leftovers = [p for p in self.pids() if alive(p)]
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.assertEqual(leftovers, [], "CLI processes outlived the test")

    # ---- server ---------------------------------------------------------------------------
    def config(self, **extra):
        overrides = {"port": 0, "backend": "claude-code", "apiKey": CLAUDE_KEY, "claudePath": FAKE_CLAUDE, "logLevel": "error",
                     "claudeWorkingDir": self.work, "claudeAskWorkingDir": False, "upstreamRetries": 0,
                     "keepAliveIntervalMs": 1000, "upstreamRetryBackoffMs": 20,
                     "claudeKillGraceMs": 300, "claudeExitWaitMs": 2000,   # quicker stops of the fake
                     "usageDb": "", "claudeWarmProcesses": 0, "claudeSpareProcesses": 0}
        overrides.update(self.overrides)
        overrides.update(extra)
        return proxy_config(**overrides)

    def start_server(self, **extra):
        self.server, self._stop_proxy = start_proxy(self.config(**extra))
        self.port = self.server.server_address[1]

    def stop_server(self):
        if self.server is not None:
            self._stop_proxy()
            self.server = None

    # ---- HTTP -----------------------------------------------------------------------------
    def request(self, method, path, body=None, headers=None, key=CLAUDE_KEY):
        sent = {"authorization": "Bearer " + key} if key else {}
        sent.update(headers or {})
        return http_request(self.port, method, path, body, sent, timeout=30)

    def chat(self, messages, stream=False, headers=None, key=CLAUDE_KEY, **fields):
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": fields.pop("model", "sonnet"), "messages": messages, "stream": stream}
        body.update(fields)
        return self.request("POST", "/v1/chat/completions", body, headers, key)

    def messages(self, messages, stream=False, headers=None, key=CLAUDE_KEY, **fields):
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": fields.pop("model", "sonnet"), "max_tokens": 1024, "messages": messages, "stream": stream}
        body.update(fields)
        return self.request("POST", "/v1/messages", body, dict({"anthropic-version": "2023-06-01"}, **(headers or {})),
                            key)

    def chat_text(self, messages, **kw):
        r = self.chat(messages, **kw)
        self.assertEqual(r.status, 200, r)
        return r.json()["choices"][0]["message"]["content"]

    # ---- the fake's record ----------------------------------------------------------------
    def records(self, event="start"):
        try:
            with open(self.record_path) as f:
                items = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []
        return [i for i in items if event is None or i["event"] == event]

    def runs(self):
        return self.records("start")

    def last_run(self):
        runs = self.runs()
        self.assertTrue(runs, "the CLI was not run")
        return runs[-1]

    def pids(self):
        pids = [r["pid"] for r in self.records(None)]
        pids += [r["child"] for r in self.records("grandchild")]
        return sorted(set(pids))

    def signals(self, pid):
        return [r["signal"] for r in self.records("signal") if r["pid"] == pid]

    @staticmethod
    def option(argv, name):
        return argv[argv.index(name) + 1] if name in argv else None

    @staticmethod
    def stdin_message(run):
        lines = run["stdin"].splitlines()
        return json.loads(lines[0])


# =====================================================================================
class TestClaudeCodeAnswers(ClaudeCodeCase):
    def test_non_streaming_chat_runs_the_cli_with_the_prompt_on_stdin_only(self):
        r = self.chat("hello there")
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["choices"][0]["message"]["content"], "ECHO: hello there")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual(body["model"], "claude-sonnet-5")   # what the CLI really used
        self.assertEqual(body["usage"]["prompt_tokens"], 12 + 13904)
        self.assertEqual(body["usage"]["prompt_tokens_details"]["cached_tokens"], 13904)
        self.assertEqual(body["usage"]["completion_tokens"], 15)
        run = self.last_run()
        argv = run["argv"]
        for flag in ("-p", "--verbose", "--include-partial-messages"):
            self.assertIn(flag, argv)
        self.assertEqual(self.option(argv, "--input-format"), "stream-json")
        self.assertEqual(self.option(argv, "--output-format"), "stream-json")
        self.assertEqual(self.option(argv, "--model"), "sonnet")
        self.assertEqual(self.option(argv, "--permission-mode"), "default")
        self.assertEqual(self.option(argv, "--max-turns"), "25")
        self.assertEqual(str(uuid.UUID(self.option(argv, "--session-id"))), self.option(argv, "--session-id"))
        self.assertNotIn("--resume", argv)
        self.assertFalse(any("hello" in a for a in argv), "the prompt must not be in argv")
        self.assertEqual(run["cwd"], os.path.realpath(self.work))
        self.assertTrue(run["stdin"].endswith("\n"))
        self.assertEqual(len(run["stdin"].splitlines()), 1)
        self.assertEqual(self.stdin_message(run), {"type": "user", "message": {
            "role": "user", "content": [{"type": "text", "text": "hello there"}]}})
        self.assertFalse(alive(run["pid"]))

    def test_streaming_chat_relays_text_finish_and_usage_without_tool_calls(self):
        r = self.chat("stream me", stream=True, stream_options={"include_usage": True})
        self.assertEqual(r.status, 200)
        self.assertTrue(r.header("content-type").startswith("text/event-stream"))
        chunks = r.chunks()
        self.assertTrue(r.done())
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        self.assertEqual(text, "ECHO: stream me")
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        self.assertEqual(finishes, ["stop"])
        self.assertEqual([c for c in chunks if not c["choices"]][0]["usage"]["prompt_tokens"], 13916)
        self.assertFalse(any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"]))

    def test_claude_cost_is_reported_in_x_claude_cost_usd(self):
        r = self.chat("cost?")
        self.assertEqual(r.header("x-claude-cost-usd"), "0.007387")

    def test_messages_answer_carries_text_stop_reason_and_usage(self):
        r = self.messages("hi")
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["content"], [{"type": "text", "text": "ECHO: hi"}])
        self.assertEqual(body["stop_reason"], "end_turn")
        self.assertEqual(body["usage"]["input_tokens"], 12)
        self.assertEqual(body["usage"]["cache_read_input_tokens"], 13904)
        self.assertEqual(body["usage"]["output_tokens"], 15)

    def test_messages_stream_has_anthropic_events_text_and_usage(self):
        r = self.messages("hi", stream=True)
        self.assertEqual(r.status, 200)
        events = r.typed_events()
        names = [e[0] for e in events if e[0] != "ping"]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(names[-2:], ["message_delta", "message_stop"])
        text = "".join(e[1]["delta"]["text"] for e in events if e[0] == "content_block_delta"
                       and e[1]["delta"]["type"] == "text_delta")
        self.assertEqual(text, "ECHO: hi")
        delta = [e[1] for e in events if e[0] == "message_delta"][0]
        self.assertEqual(delta["delta"]["stop_reason"], "end_turn")
        self.assertEqual(delta["usage"]["cache_read_input_tokens"], 13904)

    def test_thinking_passes_through_with_the_real_signature(self):
        r = self.messages("scenario:thinking", stream=True)
        events = r.typed_events()
        starts = [e[1]["content_block"]["type"] for e in events if e[0] == "content_block_start"]
        self.assertEqual(starts, ["thinking", "text"])
        thinking = "".join(e[1]["delta"].get("thinking", "") for e in events if e[0] == "content_block_delta")
        self.assertEqual(thinking, "The user asks 2+2. That is 4.")
        signatures = [e[1]["delta"]["signature"] for e in events if e[0] == "content_block_delta"
                      and e[1]["delta"]["type"] == "signature_delta"]
        self.assertEqual(signatures, ["EqQBCkYIBxgCKkDfakeSignatureI3VcX3YhVtAdJQ4StmTaxq6bzdmQHpQBg3VkeN26"])
        r = self.chat("scenario:thinking")
        message = r.json()["choices"][0]["message"]
        self.assertEqual(message["reasoning_content"], "The user asks 2+2. That is 4.")
        self.assertEqual(message["content"], "2 + 2 = 4.")
        r = self.messages("scenario:thinking")
        content = r.json()["content"]
        self.assertEqual(content[0]["signature"], signatures[0])

    def test_cli_tool_activity_is_notes_never_tool_calls(self):
        r = self.chat("scenario:tool")
        message = r.json()["choices"][0]["message"]
        self.assertNotIn("tool_calls", message)
        self.assertEqual(message["content"], "I'll run that for you.\n\nTool result was: hi")
        self.assertIn("\u23fa Bash(echo hi)", message["reasoning_content"])
        self.assertIn("\u23bf  hi", message["reasoning_content"])
        self.assertEqual(r.json()["choices"][0]["finish_reason"], "stop")
        r = self.chat("scenario:tool", stream=True)
        chunks = r.chunks()
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        self.assertFalse(any("tool_calls" in d for d in deltas))
        self.assertEqual("".join(d.get("content") or "" for d in deltas), "I'll run that for you.\n\nTool result was: hi")
        r = self.messages("scenario:tool", stream=True)
        starts = [e[1]["content_block"]["type"] for e in r.typed_events()
                  if e[0] == "content_block_start"]
        self.assertNotIn("tool_use", starts)
        self.assertEqual(self.messages("scenario:tool").json()["stop_reason"], "end_turn")

    def test_tool_notes_can_be_turned_off(self):
        self.stop_server()
        self.start_server(claudeToolNotes=False)
        message = self.chat("scenario:tool").json()["choices"][0]["message"]
        self.assertNotIn("reasoning_content", message)
        self.assertEqual(message["content"], "I'll run that for you.\n\nTool result was: hi")

    def test_a_stream_the_cli_replaced_is_reconciled_with_its_final_answer(self):
        # j_stream_cut_midway: deltas said one thing, the CLI's non-streaming fallback another
        self.assertEqual(self.chat_text("scenario:cut"), "Hello! How can I help you today?")
        chunks = self.chat("scenario:cut", stream=True).chunks()
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        self.assertEqual(text, "Partial answer that gets cut\n\nHello! How can I help you today?")
        self.assertEqual(self.chat_text("scenario:sse_overloaded"), "Hello! How can I help you today?")

    def test_max_turns_and_max_tokens_end_with_length(self):
        r = self.chat("scenario:max_turns")
        self.assertEqual(r.status, 200, r)
        choice = r.json()["choices"][0]
        self.assertEqual(choice["finish_reason"], "length")
        self.assertIn("I'll run that for you.", choice["message"]["content"])
        self.assertIn("claudeMaxTurns", choice["message"]["content"])
        r = self.messages("scenario:max_tokens")
        body = r.json()
        self.assertEqual(body["stop_reason"], "max_tokens")
        self.assertIn("output token limit", body["content"][-1]["text"])

    def test_system_prompt_model_effort_and_images_reach_the_cli(self):
        png = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAEklEQVR4nGP4z8CAFWEXHbQSACj/P8Fu7N9hAAAAAElFTkSuQmCC"
        r = self.chat([{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [
                                         {"type": "text", "text": "What colour?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}]}],
                                    model="opus", reasoning_effort="low")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["model"], "claude-opus-4-8")
        run = self.last_run()
        self.assertEqual(self.option(run["argv"], "--append-system-prompt"), "Be brief.")
        self.assertEqual(self.option(run["argv"], "--model"), "opus")
        self.assertEqual(self.option(run["argv"], "--effort"), "low")
        content = self.stdin_message(run)["message"]["content"]
        self.assertEqual(content[1], {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": png}})
        self.stop_server()
        self.start_server(claudeSystemPromptMode="replace", modelMap={"gpt-*": "haiku"},
                          claudePermissionMode="acceptEdits", claudeMaxTurns=3)
        self.assertEqual(self.chat([{"role": "system", "content": "Pirate."}, {"role": "user", "content": "x"}],
                                   model="gpt-4o").status, 200)
        argv = self.last_run()["argv"]
        self.assertEqual(self.option(argv, "--system-prompt"), "Pirate.")
        self.assertNotIn("--append-system-prompt", argv)
        self.assertEqual(self.option(argv, "--model"), "haiku")
        self.assertEqual(self.option(argv, "--permission-mode"), "acceptEdits")
        self.assertEqual(self.option(argv, "--max-turns"), "3")
        r = self.chat("x", model="--dangerously-skip-permissions")
        self.assertEqual(r.status, 400, r)

    def test_with_client_tools_off_they_are_dropped_or_refused(self):
        self.stop_server()
        self.start_server(claudeClientTools="off")
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        r = self.chat("weather?", tools=[tool])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-cc-proxy-dropped-tools"), "get_weather")
        r = self.chat("weather?", tools=[tool], tool_choice={"type": "function",
                                                                          "function": {"name": "get_weather"}})
        self.assertEqual(r.status, 400)
        self.assertIn("tool_choice", r.json()["error"]["message"])
        r = self.messages("w?", tools=[{"name": "w", "input_schema": {"type": "object"}}],
                                        tool_choice={"type": "any"})
        self.assertEqual(r.status, 400)
        self.assertEqual(r.json()["type"], "error")

    def test_cli_environment_is_built_explicitly_without_unrelated_variables(self):
        saved = {k: os.environ.get(k) for k in ("UNRELATED_SECRET", "ANTHROPIC_BASE_URL", "AWS_REGION", "CLAUDECODE",
                                                "CLAUDE_PATH", "DISABLE_TELEMETRY")}
        os.environ.update({"UNRELATED_SECRET": "x", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
                           "AWS_REGION": "eu-west-1", "CLAUDECODE": "1", "CLAUDE_PATH": "/elsewhere"})
        os.environ.pop("DISABLE_TELEMETRY", None)
        try:
            self.chat_text("env")
            env = self.last_run()["env"]
            os.environ["CLAUDE_CODE_MAX_RETRIES"] = "5"
            self.chat_text("env again")
            env2 = self.last_run()["env"]
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.assertNotIn("UNRELATED_SECRET", env)
        self.assertNotIn("CLAUDECODE", env)
        self.assertNotIn("CLAUDE_PATH", env)   # the proxy's own settings stay with the proxy
        self.assertEqual(env["ANTHROPIC_BASE_URL"], "http://127.0.0.1:9")
        self.assertEqual(env["AWS_REGION"], "eu-west-1")
        for name in ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
                     "DISABLE_AUTOUPDATER"):
            self.assertEqual(env[name], "1")
        self.assertEqual(env["CLAUDE_CODE_MAX_RETRIES"], "1")
        self.assertEqual(env2["CLAUDE_CODE_MAX_RETRIES"], "5")
        self.assertIn("PATH", env)
        self.assertIn("HOME", env)
        allowed = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TMPDIR", "TZ", "TERM", "PWD"}
        strays = [k for k in env if k not in allowed and not k.startswith(
            ("ANTHROPIC_", "CLAUDE_", "LC_", "DISABLE_", "AWS_", "VERTEX_", "AZURE_", "GOOGLE_", "CLOUD_ML_"))
            and k not in proxy.CLAUDE_ENV_NAMES]
        self.assertEqual(strays, [])


# =====================================================================================
class TestClaudeCodeSessions(ClaudeCodeCase):
    def test_second_turn_resumes_and_sends_only_the_new_turn(self):
        self.assertEqual(self.chat_text("My name is Ada."), "ECHO: My name is Ada.")
        first = self.last_run()
        session = self.option(first["argv"], "--session-id")
        # the client echoes the history in another shape: content array, different whitespace
        history = [{"role": "user", "content": [{"type": "text", "text": "My name is  Ada.\n"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "ECHO:\nMy name is Ada."}]},
                   {"role": "user", "content": "What is my name?"}]
        self.assertEqual(self.chat_text(history), "ECHO: What is my name?")
        second = self.last_run()
        self.assertEqual(self.option(second["argv"], "--resume"), session)
        self.assertNotIn("--session-id", second["argv"])
        self.assertEqual(self.stdin_message(second)["message"]["content"],
                         [{"type": "text", "text": "What is my name?"}])
        # third turn through the Anthropic front end continues the same session
        history += [{"role": "assistant", "content": "ECHO: What is my name?"}, {"role": "user", "content": "Thanks"}]
        r = self.messages(history)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.option(self.last_run()["argv"], "--resume"), session)

    def test_regenerating_an_old_turn_does_not_resume_a_moved_on_session(self):
        self.chat_text("one")
        history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "ECHO: one"},
                   {"role": "user", "content": "two"}]
        self.chat_text(history)
        self.assertIn("--resume", self.last_run()["argv"])
        self.chat_text(history)   # the same turn again (regenerate): that history was consumed
        run = self.last_run()
        self.assertIn("--session-id", run["argv"])
        self.assertIn("<conversation_history>", self.stdin_message(run)["message"]["content"][0]["text"])

    def test_unknown_history_falls_back_to_a_transcript(self):
        history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "something from another server"},
                   {"role": "user", "content": "next question"}]
        self.assertTrue(self.chat_text(history).endswith("next question"))
        run = self.last_run()
        self.assertIn("--session-id", run["argv"])
        content = self.stdin_message(run)["message"]["content"]
        self.assertIn("User: hi", content[0]["text"])
        self.assertIn("Assistant: something from another server", content[0]["text"])
        self.assertEqual(content[1], {"type": "text", "text": "next question"})
        # and that conversation now has a session: the next turn resumes it
        history += [{"role": "assistant", "content": self.chat(history).json()["choices"][0]["message"]
                     ["content"]}, {"role": "user", "content": "more"}]
        self.chat_text(history)
        self.assertIn("--resume", self.last_run()["argv"])

    def test_explicit_session_id_header(self):
        headers = {"x-session-id": "client-conv-1"}
        self.chat_text("first", headers=headers)
        session = self.option(self.last_run()["argv"], "--session-id")
        self.chat_text("second", headers=headers)   # only the new message, as stateful clients send
        run = self.last_run()
        self.assertEqual(self.option(run["argv"], "--resume"), session)
        self.assertEqual(self.stdin_message(run)["message"]["content"], [{"type": "text", "text": "second"}])
        # Claude Code as a client: its metadata session namespaces the history hash
        metadata = {"user_id": json.dumps({"device_id": "d", "session_id": "cc-session-9"})}
        other = {"user_id": json.dumps({"device_id": "d", "session_id": "cc-session-10"})}
        self.messages("a", metadata=metadata)
        s2 = self.option(self.last_run()["argv"], "--session-id")
        self.messages("a", metadata=other)
        s3 = self.option(self.last_run()["argv"], "--session-id")
        self.messages("write a title for this chat", metadata=metadata)   # a side request: not resumed
        self.assertIn("--session-id", self.last_run()["argv"])
        turn2 = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ECHO: a"},
                 {"role": "user", "content": "b"}]
        self.messages(turn2, metadata=metadata)
        self.assertEqual(self.option(self.last_run()["argv"], "--resume"), s2)
        self.messages(turn2, metadata=other)
        self.assertEqual(self.option(self.last_run()["argv"], "--resume"), s3)

    def test_session_the_cli_lost_falls_back_to_a_new_session(self):
        self.chat_text("remember me", headers={"x-session-id": "lost-1"})
        session = self.option(self.last_run()["argv"], "--session-id")
        os.unlink(os.path.join(self.state, "sessions.json"))   # the CLI's HOME was wiped
        history = [{"role": "user", "content": "remember me"}, {"role": "assistant", "content": "ECHO: remember me"},
                   {"role": "user", "content": "still there?"}]
        r = self.chat(history, headers={"x-session-id": "lost-1"})
        self.assertEqual(r.status, 200, r)
        runs = self.runs()
        self.assertEqual(self.option(runs[-2]["argv"], "--resume"), session)
        self.assertIn("--session-id", runs[-1]["argv"])
        self.assertIn("<conversation_history>", self.stdin_message(runs[-1])["message"]["content"][0]["text"])
        self.chat_text("and now?", headers={"x-session-id": "lost-1"})
        self.assertEqual(self.option(self.last_run()["argv"], "--resume"),
                         self.option(runs[-1]["argv"], "--session-id"))

    def test_concurrent_requests_to_one_session_queue(self):
        headers = {"x-session-id": "busy-1"}
        self.chat_text("start", headers=headers)
        session = self.option(self.last_run()["argv"], "--session-id")
        results = []

        def turn(text):
            results.append(self.chat(text + " scenario:slow", headers=headers).status)
        threads = [threading.Thread(target=turn, args=("t%d" % i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual(results, [200, 200])
        starts = {r["pid"]: r for r in self.records("start") if r["scenario"] == "slow"}
        ends = {r["pid"]: r for r in self.records("end") if r["pid"] in starts}
        self.assertEqual(len(starts), 2)
        spans = sorted((starts[p]["time"], ends[p]["time"]) for p in starts)
        self.assertLessEqual(spans[0][1], spans[1][0], "two CLI runs of one session overlapped")
        for run in starts.values():
            self.assertEqual(self.option(run["argv"], "--resume"), session)

    def test_session_file_survives_a_restart_and_a_corrupt_file_is_ignored(self):
        path = os.path.join(self.tmp, "sessions.json")
        self.stop_server()
        self.start_server(sessionFile=path)
        self.chat_text("persist me")
        session = self.option(self.last_run()["argv"], "--session-id")
        self.stop_server()
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual([e["session"] for e in saved["sessions"].values()], [session])
        self.assertNotIn("persist me", json.dumps(saved))   # keys are hashes, no prompt text
        self.assertEqual([n for n in os.listdir(self.tmp) if n.endswith(".tmp")], [])
        self.start_server(sessionFile=path)
        self.chat_text([{"role": "user", "content": "persist me"}, {"role": "assistant", "content": "ECHO: persist me"},
                        {"role": "user", "content": "after restart"}])
        self.assertEqual(self.option(self.last_run()["argv"], "--resume"), session)
        self.stop_server()
        with open(path, "w") as f:
            f.write("{not json")
        with self.assertLogs("cc-proxy", "WARNING") as logs:
            self.start_server(sessionFile=path)
        self.assertTrue(any("corrupt" in line for line in logs.output))
        self.assertEqual(self.chat_text("works"), "ECHO: works")
        self.assertEqual(self.request("GET", "/health", key=None).status, 200)

    def test_sessions_expire_after_session_ttl_ms(self):
        self.stop_server()
        self.start_server(sessionTtlMs=1000)
        self.chat_text("short lived")
        time.sleep(1.1)
        self.chat_text([{"role": "user", "content": "short lived"}, {"role": "assistant", "content": "ECHO: short lived"},
                        {"role": "user", "content": "later"}])
        self.assertIn("--session-id", self.last_run()["argv"])


# =====================================================================================
class TestClaudeCodeWorkingDirectory(ClaudeCodeCase):
    overrides = {"claudeAskWorkingDir": True}

    def test_working_directory_is_asked_for_checked_and_kept_for_the_conversation(self):
        target = os.path.join(self.tmp, "project")
        os.mkdir(target)
        link = os.path.join(self.tmp, "link-to-project")
        os.symlink(target, link)
        ask = self.chat_text("fix the bug")
        self.assertTrue(ask.startswith("\U0001F4C2 cc-proxy:"), ask)
        self.assertEqual(self.runs(), [])
        history = [{"role": "user", "content": "fix the bug"}, {"role": "assistant", "content": ask}]
        for bad, why in (("/no/such/dir", "not an existing directory"), ("/proc", "refused"),
                         ("/proc/self/cwd", "refused"), ("relative/path", None)):
            reply = self.chat_text(history + [{"role": "user", "content": bad}])
            if why:
                self.assertTrue(reply.startswith("\u274C cc-proxy:"), reply)
                self.assertIn(why, reply)
            else:
                self.assertTrue(reply.startswith("\U0001F4C2"), reply)   # not a path: asked again
        confirm = self.chat_text(history + [{"role": "user", "content": link}])
        self.assertTrue(confirm.startswith("\u2705 cc-proxy:"), confirm)
        self.assertIn(os.path.realpath(target), confirm)
        self.assertEqual(self.runs(), [])
        history += [{"role": "user", "content": link}, {"role": "assistant", "content": confirm},
                    {"role": "user", "content": "go ahead"}]
        answer = self.chat_text(history)
        run = self.last_run()
        self.assertEqual(run["cwd"], os.path.realpath(target))
        sent = self.stdin_message(run)["message"]["content"]
        self.assertEqual([b["text"] for b in sent], ["fix the bug", "go ahead"])
        # the rest of the conversation stays there and resumes the session
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
        self.chat_text(history)
        run2 = self.last_run()
        self.assertEqual(run2["cwd"], os.path.realpath(target))
        self.assertEqual(self.option(run2["argv"], "--resume"), self.option(run["argv"], "--session-id"))

    def test_header_and_real_conversations_skip_the_question(self):
        target = os.path.join(self.tmp, "p2")
        os.mkdir(target)
        self.assertEqual(self.chat_text("hi", headers={"x-working-dir": target}), "ECHO: hi")
        self.assertEqual(self.last_run()["cwd"], os.path.realpath(target))
        r = self.chat("hi", headers={"x-working-dir": "/proc"})
        self.assertEqual(r.status, 400, r)
        self.chat_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "real answer"},
                        {"role": "user", "content": "b"}])
        self.assertEqual(self.last_run()["cwd"], os.path.realpath(self.work))

    def test_directories_outside_claude_allowed_dirs_are_refused(self):
        self.stop_server()
        allowed = os.path.join(self.tmp, "allowed")
        os.makedirs(os.path.join(allowed, "inside"))
        self.start_server(claudeAllowedDirs=allowed)
        ask = self.chat_text("x")
        history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": ask}]
        reply = self.chat_text(history + [{"role": "user", "content": self.work}])
        self.assertIn("outside the allowed directories", reply)
        reply = self.chat_text(history + [{"role": "user", "content": os.path.join(allowed, "inside")}])
        self.assertTrue(reply.startswith("\u2705"), reply)
        self.assertEqual(self.chat("y", headers={"x-working-dir": self.work}).status, 400)


# =====================================================================================
class TestClaudeCodeErrors(ClaudeCodeCase):
    def assertChatError(self, scenario, status, kind=None, retry_after=None, contains=None):
        r = self.chat("scenario:" + scenario)
        self.assertEqual(r.status, status, r)
        body = r.json()
        self.assertIn("error", body)
        if kind:
            self.assertEqual(body["error"]["type"], kind)
        if retry_after is not None:
            self.assertEqual(r.header("retry-after"), retry_after)
        if contains:
            self.assertIn(contains, body["error"]["message"])
        return body

    def test_cli_errors_map_to_http_statuses_and_error_types(self):
        self.assertChatError("429", 429, "rate_limit_error", retry_after="1")
        self.assertChatError("401", 401, "authentication_error")
        self.assertChatError("403", 403, "permission_error")
        self.assertChatError("404", 404, "not_found_error", contains="gpt-4o")
        self.assertChatError("400", 400, "invalid_request_error")
        self.assertChatError("500", 502)
        self.assertChatError("529", 503)
        self.assertChatError("refused", 502)
        self.assertChatError("malformed", 502)
        body = self.assertChatError("nocreds", 502, contains="not logged in")
        self.assertEqual(body["error"]["code"], "cli_not_logged_in")

    def test_errors_on_the_messages_route_have_the_anthropic_shape_and_status(self):
        r = self.messages("scenario:429")
        self.assertEqual(r.status, 429)
        self.assertEqual(r.json()["error"]["type"], "rate_limit_error")
        self.assertEqual(r.header("retry-after"), "1")
        r = self.messages("scenario:529", stream=True)
        self.assertEqual(r.status, 529, r)   # Anthropic's own overloaded status (the OpenAI side gets 503)
        self.assertEqual(r.json()["error"]["type"], "overloaded_error")
        r = self.chat("scenario:429", stream=True)
        self.assertEqual(r.status, 429)

    def test_crashes_carry_stderr_without_secrets(self):
        body = self.assertChatError("crash", 502, contains="panic: the fake CLI crashed")
        self.assertNotIn("abcdefghijklmnop", body["error"]["message"])
        self.assertChatError("usage_error", 502, contains="unknown option")
        self.assertChatError("noresult", 502, contains="without a result")

    def test_server_errors_are_retried_on_new_sessions(self):
        self.stop_server()
        self.start_server(upstreamRetries=1)
        self.assertChatError("500", 502)
        runs = self.runs()
        self.assertEqual(len(runs), 2)
        self.assertNotEqual(self.option(runs[0]["argv"], "--session-id"), self.option(runs[1]["argv"], "--session-id"))
        self.assertChatError("429", 429)
        self.assertEqual(len(self.runs()), 3)   # a 429 is not retried by the proxy

    def test_a_missing_cli_is_reported_in_health_and_answers_502(self):
        self.stop_server()
        with self.assertLogs("cc-proxy", "ERROR"):
            self.start_server(claudePath=os.path.join(self.tmp, "nope", "claude"))
        health = self.request("GET", "/health", key=None).json()
        self.assertIsNone(health["claude"])
        self.assertIn("does not exist", health["claudeError"])
        self.assertChatError("x", 502, contains="does not exist")


# =====================================================================================
class TestClaudeCodeProcessLimits(ClaudeCodeCase):
    overrides = {"keepAliveIntervalMs": 200}

    @unittest.skipUnless(proxy.parent_death_prefix(), "needs Linux and util-linux setpriv with --pdeathsig")
    def test_cli_child_is_stopped_when_the_proxy_itself_is_killed(self):
        cfg = os.path.join(self.tmp, "config.json")
        port = free_port()
        with open(cfg, "w") as f:
            json.dump({"port": port, "backend": "claude-code", "apiKey": CLAUDE_KEY, "claudePath": FAKE_CLAUDE,
                       "claudeWorkingDir": self.work, "claudeAskWorkingDir": False,
                       "sessionFile": os.path.join(self.tmp, "sessions.json")}, f)
        env = ops_clean_env(HOME=self.tmp, CLAUDE_FAKE_RECORD=self.record_path, CLAUDE_FAKE_STATE=self.state,
                            CLAUDE_FAKE_STAY_ORPHANED="1")
        server, _ = ops_spawn_proxy(self, ["start", "--config", cfg], env, self.tmp, port)
        client = send_request(port, "chat", {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "scenario:hang"}]}, key=CLAUDE_KEY, timeout=OPS_TIMEOUT)
        self.addCleanup(client.close)
        self.assertTrue(wait_for(lambda: self.records("hanging"), 10), "the CLI did not start its run")
        cli = self.records("hanging")[0]["pid"]
        self.addCleanup(lambda: alive(cli) and os.kill(cli, signal.SIGKILL))
        time.sleep(0.3)   # an orphaned fake stays 20 s: still alive now means the prefix is what ends it
        self.assertTrue(alive(cli))
        server.kill()  # SIGKILL: the proxy gets no chance to stop its children itself
        server.wait(5)
        self.assertTrue(wait_for(lambda: not alive(cli), 5), "the CLI outlived the killed proxy")

    def test_claude_timeout_interrupts_the_cli_and_answers_504(self):
        self.stop_server()
        self.start_server(claudeTimeoutMs=700)
        started = time.monotonic()
        r = self.chat("scenario:hang")
        self.assertEqual(r.status, 504, r)
        self.assertLess(time.monotonic() - started, 4)
        pid = self.last_run()["pid"]
        self.assertFalse(alive(pid))
        self.assertEqual(self.signals(pid)[:1], ["SIGINT"])

    def test_stubborn_child_gets_sigterm_then_sigkill(self):
        self.stop_server()
        self.start_server(claudeTimeoutMs=500)
        r = self.chat("scenario:stubborn", stream=True)
        self.assertIn(r.status, (200, 504))
        pid = self.last_run()["pid"]
        self.assertFalse(alive(pid))
        self.assertEqual(self.signals(pid), ["SIGINT", "SIGTERM"])
        if r.status == 200:
            self.assertIn(b"cli_timeout", r.data)   # committed by a keep-alive: the error is in the stream

    def test_a_silent_cli_is_stopped_at_the_idle_limit_with_504(self):
        self.stop_server()
        self.start_server(nonStreamIdleTimeoutMs=600)
        r = self.chat("scenario:stall")
        self.assertEqual(r.status, 504, r)
        self.assertIn("printed nothing", r.json()["error"]["message"])
        self.assertFalse(alive(self.last_run()["pid"]))

    def test_client_disconnect_kills_the_child_and_its_group(self):
        for scenario in ("stall", "grandchild"):
            sock = send_request(self.port, "chat", {"model": "sonnet", "stream": True, "messages": [
                {"role": "user", "content": "scenario:" + scenario}]}, key=CLAUDE_KEY, timeout=10)
            if scenario == "stall":
                self.assertIn(b"Hello!", read_until(sock, b"Hello!", 10))
            else:
                self.assertTrue(wait_for(lambda: self.records("grandchild")))
            sock.close()
            run = [r for r in self.runs() if r["scenario"] == scenario][-1]
            self.assertTrue(wait_for(lambda: not alive(run["pid"]), 5), "the CLI outlived its request")
            self.assertIn("SIGINT", self.signals(run["pid"]))
            if scenario == "grandchild":
                child = self.records("grandchild")[-1]["child"]
                self.assertTrue(wait_for(lambda: not alive(child), 5), "a tool subprocess outlived its request")

    def test_process_limit_queues_then_429(self):
        self.stop_server()
        self.start_server(claudeMaxProcesses=1, claudeQueueWaitMs=300)
        first = []
        thread = threading.Thread(target=lambda: first.append(self.chat("a scenario:slow").status))
        thread.start()
        self.assertTrue(wait_for(lambda: self.runs()))
        r = self.chat("b")
        self.assertEqual(r.status, 429, r)
        self.assertIsNotNone(r.header("retry-after"))
        self.assertEqual(r.json()["error"]["code"], "cli_busy")
        thread.join(10)
        self.assertEqual(first, [200])
        self.stop_server()
        self.start_server(claudeMaxProcesses=1, claudeQueueWaitMs=5000)
        results = []
        threads = [threading.Thread(
            target=lambda i=i: results.append(self.chat("q%d scenario:slow" % i).status))
            for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        self.assertEqual(results, [200, 200])

    def test_backend_stop_kills_running_cli_children(self):
        done = []
        thread = threading.Thread(target=lambda: done.append(self.chat("scenario:hang")))
        thread.start()
        self.assertTrue(wait_for(lambda: self.records("hanging")), "the CLI did not start its run")
        pid = self.records("hanging")[-1]["pid"]
        self.assertTrue(alive(pid))
        self.server.backend.stop()
        self.assertFalse(alive(pid))
        self.assertTrue(self.signals(pid), "the CLI was not signalled by the backend's stop")
        thread.join(10)
        self.assertTrue(done)
        # killed under the request: an error, never an empty 200
        self.assertEqual(done[0].status, 502, done[0])


# =====================================================================================
class ClaudeWarmCase(ClaudeCodeCase):
    """The Claude Code backend with warm processes (its default), spares off unless a test
    turns them on."""
    overrides = {"claudeWarmProcesses": 4}

    def turns(self):
        return self.records("turn")

    def health(self):
        return self.request("GET", "/health").json()

    def turn_text(self, turn):
        return json.loads(turn["stdin"])["message"]["content"][-1]["text"]

    def two_turns(self, first="hello", second="hello again", **fields):
        r1 = self.chat_text(first, **fields)
        history = [{"role": "user", "content": first}, {"role": "assistant", "content": r1},
                   {"role": "user", "content": second}]
        return r1, self.chat_text(history, **fields)


class TestClaudeCodeWarmConversations(ClaudeWarmCase):
    def test_the_next_turn_is_one_more_user_line_on_the_same_process(self):
        r1, r2 = self.two_turns()
        self.assertEqual((r1, r2), ("ECHO: hello", "ECHO: hello again"))
        self.assertEqual(len(self.runs()), 1, "the second turn spawned a process")
        turns = self.turns()
        self.assertEqual([t["pid"] for t in turns], [turns[0]["pid"]] * 2)
        self.assertEqual(self.turn_text(turns[1]), "hello again")   # no history, no --resume
        self.assertTrue(alive(turns[0]["pid"]), "the warm process was closed")
        self.assertEqual(self.health()["claudeWarm"], 1)

    def test_each_turn_reports_its_own_usage_and_cost_not_the_process_total(self):
        first = self.chat("hello")
        history = [{"role": "user", "content": "hello"},
                   {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                   {"role": "user", "content": "hello again"}]
        second = self.chat(history)
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual(second.json()["usage"], first.json()["usage"])
        self.assertEqual(second.header("x-claude-cost-usd"), first.header("x-claude-cost-usd"))

    def test_an_explicit_session_continues_on_its_warm_process(self):
        headers = {"x-session-id": "conv-1"}
        self.chat_text("one", headers=headers)
        self.chat_text("two", headers=headers)
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual([self.turn_text(t) for t in self.turns()], ["one", "two"])

    def test_a_changed_system_prompt_starts_a_new_process_that_resumes_the_session(self):
        first = self.chat_text([{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hi"}])
        self.chat_text([{"role": "system", "content": "be verbose"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": first}, {"role": "user", "content": "more"}])
        runs = self.runs()
        self.assertEqual(len(runs), 2)
        session = self.option(runs[0]["argv"], "--session-id")
        self.assertEqual(self.option(runs[1]["argv"], "--resume"), session)
        self.assertEqual(self.option(runs[1]["argv"], "--append-system-prompt"), "be verbose")
        self.assertTrue(wait_for(lambda: not alive(runs[0]["pid"]), 10), "the stale process lives on")

    def test_past_the_limit_the_least_recently_used_warm_process_is_closed(self):
        self.stop_server()
        self.start_server(claudeWarmProcesses=2)
        for prompt in ("first", "second", "third"):
            self.chat_text(prompt)
        pids = {self.turn_text(t): t["pid"] for t in self.turns()}
        self.assertTrue(wait_for(lambda: not alive(pids["first"]), 10))
        self.assertTrue(alive(pids["second"]) and alive(pids["third"]))
        self.assertEqual(self.health()["claudeWarm"], 2)

    def test_a_warm_process_idle_past_the_idle_timeout_is_closed(self):
        self.stop_server()
        self.start_server(claudeIdleTimeoutMs=300)
        self.chat_text("hello")
        pid = self.turns()[0]["pid"]
        self.assertTrue(wait_for(lambda: not alive(pid), 10), "an idle warm process was kept")
        self.assertEqual(self.health()["claudeWarm"], 0)

    def test_a_client_disconnect_interrupts_the_turn_and_the_process_stays_warm(self):
        sock = send_request(self.port, "chat", {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "scenario:stall"}]}, key=CLAUDE_KEY, timeout=10)
        self.assertIn(b"Hello!", read_until(sock, b"Hello!", 10))
        sock.close()
        self.assertTrue(wait_for(lambda: self.records("interrupt"), 10), "no interrupt was sent")
        pid = self.turns()[0]["pid"]
        self.assertTrue(wait_for(lambda: self.health()["claudeWarm"] == 1, 10))
        # the client keeps what it read of the cut answer, which may be less than was sent
        history = [{"role": "user", "content": "scenario:stall"}, {"role": "assistant", "content": "Hel"},
                   {"role": "user", "content": "next"}]
        self.assertEqual(self.chat_text(history), "ECHO: next")
        self.assertEqual(self.turns()[-1]["pid"], pid)
        self.assertEqual(self.signals(pid), [])
        self.assertEqual(len(self.runs()), 1)

    def test_an_unanswered_interrupt_escalates_to_signals(self):
        sock = send_request(self.port, "chat", {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "scenario:deaf"}]}, key=CLAUDE_KEY, timeout=10)
        self.assertTrue(wait_for(lambda: self.records("hanging"), 10))
        sock.close()
        pid = self.runs()[0]["pid"]
        self.assertTrue(wait_for(lambda: not alive(pid), 15), "a deaf CLI outlived its request")
        self.assertIn("SIGINT", self.signals(pid))
        self.assertEqual(self.health()["claudeWarm"], 0)

    def test_a_warm_process_that_died_is_replaced_by_one_resuming_the_session(self):
        first = self.chat_text("hello")
        dead = self.runs()[0]
        os.kill(dead["pid"], signal.SIGKILL)
        wait_for(lambda: not alive(dead["pid"]))
        answer = self.chat_text([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                 {"role": "user", "content": "still there?"}])
        self.assertEqual(answer, "ECHO: still there?")
        runs = self.runs()
        self.assertEqual(len(runs), 2)
        self.assertEqual(self.option(runs[1]["argv"], "--resume"), self.option(dead["argv"], "--session-id"))

    def test_a_warm_process_that_hangs_is_replaced_by_one_resuming_the_session(self):
        first = self.chat_text("hello")
        hung = self.runs()[0]["pid"]
        os.kill(hung, signal.SIGSTOP)
        self.server.backend.warm_first_line = 0.5
        try:
            answer = self.chat_text([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                     {"role": "user", "content": "still there?"}])
        finally:
            if alive(hung):
                os.kill(hung, signal.SIGCONT)
        self.assertEqual(answer, "ECHO: still there?")
        self.assertIn("--resume", self.runs()[-1]["argv"])
        self.assertTrue(wait_for(lambda: not alive(hung), 10))

    def test_with_no_warm_processes_no_spare_is_started(self):
        self.stop_server()
        self.start_server(claudeWarmProcesses=0, claudeSpareProcesses=1)
        self.assertEqual(self.chat_text("hello"), "ECHO: hello")
        self.assertTrue(wait_for(lambda: not any(alive(r["pid"]) for r in self.runs())))
        self.assertEqual((self.health()["claudeSpare"], len(self.runs())), (0, 1))

    def test_a_warm_process_that_exits_after_its_answer_is_replaced(self):
        first = self.chat_text("scenario:exit_after_result")
        history = [{"role": "user", "content": "scenario:exit_after_result"},
                   {"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
        self.assertEqual(self.chat_text(history), "ECHO: again")
        self.assertEqual(len(self.runs()), 2)
        self.assertIn("--resume", self.runs()[1]["argv"])

    def test_stopping_the_proxy_closes_every_warm_process(self):
        self.chat_text("one")
        self.chat_text("two")
        pids = [t["pid"] for t in self.turns()]
        self.assertTrue(all(alive(p) for p in pids))
        self.stop_server()
        self.assertTrue(wait_for(lambda: not any(alive(p) for p in pids), 10))

    def test_health_and_metrics_count_warm_turns_and_spawns(self):
        self.two_turns()
        metrics = self.request("GET", "/metrics").data.decode()
        self.assertIn('ccproxy_claude_turns_total{process="cold"} 1.0', metrics)
        self.assertIn('ccproxy_claude_turns_total{process="warm"} 1.0', metrics)
        self.assertIn('ccproxy_claude_spawns_total{start="cold"} 1.0', metrics)
        self.assertIn("ccproxy_claude_warm_processes 1.0", metrics)
        health = self.health()
        self.assertEqual((health["claudeWarm"], health["claudeLiveProcesses"], health["claudeProcesses"]),
                         (1, 1, 0))


class TestClaudeCodeSpares(ClaudeWarmCase):
    overrides = {"claudeWarmProcesses": 4, "claudeSpareProcesses": 1}

    def turns_by(self, process):
        metrics = self.request("GET", "/metrics").data.decode()
        found = re.search(r'ccproxy_claude_turns_total\{process="%s"\} ([0-9.]+)' % process, metrics)
        return float(found.group(1)) if found else 0

    def run_of(self, pid):
        return [r for r in self.runs() if r["pid"] == pid][0]

    def test_a_spare_started_ahead_serves_a_new_conversation_and_is_replaced(self):
        self.assertTrue(wait_for(lambda: self.health()["claudeSpare"] == 1, 10))
        self.assertEqual(self.health()["claudeLiveProcesses"], 1)
        self.assertEqual(self.chat_text("hello"), "ECHO: hello")
        self.assertEqual(self.turns_by("spare"), 1)
        self.assertEqual(self.turns_by("cold"), 0)
        self.assertEqual(self.option(self.run_of(self.turns()[0]["pid"])["argv"], "--model"), "sonnet")
        self.assertTrue(wait_for(lambda: self.health()["claudeSpare"] == 1, 10), "no new spare was started")
        self.assertEqual(self.health()["claudeLiveProcesses"], 2)   # the conversation's, and the new spare

    def test_a_request_whose_settings_differ_from_the_spare_gets_its_own_process(self):
        self.assertTrue(wait_for(lambda: self.health()["claudeSpare"] == 1, 10))
        self.chat_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
        run = self.run_of(self.turns()[0]["pid"])
        self.assertEqual(self.option(run["argv"], "--append-system-prompt"), "be brief")
        self.assertEqual((self.turns_by("spare"), self.turns_by("cold")), (0, 1))
        self.assertEqual(self.health()["claudeSpare"], 1)


CLAUDE_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}}}}


def claude_tool(name):
    return dict(CLAUDE_TOOL, function=dict(CLAUDE_TOOL["function"], name=name))


class TestClaudeCodeClientTools(ClaudeWarmCase):
    def call_weather(self, stream=False, tools=(CLAUDE_TOOL,), prompt="scenario:client_tool call:get_weather"):
        return self.chat(prompt, stream=stream, tools=list(tools))

    def test_the_tools_are_an_sdk_mcp_server_and_the_cli_builtins_are_off(self):
        r = self.call_weather()
        self.assertEqual(r.status, 200, r)
        argv = self.last_run()["argv"]
        self.assertEqual(json.loads(self.option(argv, "--mcp-config")),
                         {"mcpServers": {"client": {"type": "sdk", "name": "client"}}})
        self.assertIn("--strict-mcp-config", argv)
        self.assertEqual(self.option(argv, "--allowedTools"), "mcp__client__get_weather")
        self.assertEqual(self.option(argv, "--tools"), "")
        self.assertEqual(self.option(argv, "--max-turns"), "1000")   # the client's loop decides
        listed = self.records("mcp_tools")[0]["tools"]
        self.assertEqual(listed, [{"name": "get_weather", "description": "Weather for a city",
                                   "inputSchema": CLAUDE_TOOL["function"]["parameters"]}])
        self.assertIsNone(r.header("x-cc-proxy-dropped-tools"))

    def test_openai_chat_tool_round_trip_streamed(self):
        r = self.call_weather(stream=True)
        chunks = r.chunks()
        calls = [c for ch in chunks if ch["choices"] for c in ch["choices"][0]["delta"].get("tool_calls") or []]
        self.assertEqual(calls[0]["function"]["name"], "get_weather")
        call_id = calls[0]["id"]
        self.assertTrue(call_id.startswith("toolu_fake_"))
        self.assertEqual("".join(c["function"].get("arguments") or "" for c in calls), '{"q": "get_weather 0"}')
        self.assertEqual({c["index"] for c in calls}, {0})
        self.assertEqual([ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1], "tool_calls")
        self.assertTrue(r.done())
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        self.assertEqual(text, "I'll run that for you.")
        self.assertEqual(self.records("tool_result"), [], "the CLI's tools/call was answered early")
        history = [{"role": "user", "content": "scenario:client_tool call:get_weather"},
                   {"role": "assistant", "content": text, "tool_calls": [
                       {"id": call_id, "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"q": "get_weather 0"}'}}]},
                   {"role": "tool", "tool_call_id": call_id, "content": "rainy in Paris"}]
        r2 = self.chat(history, stream=True, tools=[CLAUDE_TOOL])
        text2 = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in r2.chunks() if ch["choices"])
        self.assertEqual(text2, "Tool results: rainy in Paris")
        self.assertEqual([ch["choices"][0]["finish_reason"] for ch in r2.chunks() if ch["choices"]][-1], "stop")
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual(self.records("tool_result")[0]["id"], call_id)
        self.assertTrue(wait_for(lambda: self.health()["claudeWarm"] == 1))

    def test_openai_chat_tool_round_trip_non_streamed(self):
        body = self.call_weather().json()
        message = body["choices"][0]["message"]
        self.assertEqual(body["choices"][0]["finish_reason"], "tool_calls")
        call = message["tool_calls"][0]
        self.assertEqual((call["function"]["name"], json.loads(call["function"]["arguments"])),
                         ("get_weather", {"q": "get_weather 0"}))
        self.assertEqual(self.health()["claudeAwaitingTools"], 1)
        history = [{"role": "user", "content": "scenario:client_tool call:get_weather"}, message,
                   {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        body2 = self.chat(history, tools=[CLAUDE_TOOL]).json()
        self.assertEqual(body2["choices"][0]["message"]["content"], "Tool results: sunny")
        self.assertEqual(body2["choices"][0]["finish_reason"], "stop")
        self.assertEqual(self.health()["claudeAwaitingTools"], 0)

    def test_anthropic_tool_use_round_trip_with_an_error_result(self):
        tools = [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}]
        prompt = "scenario:client_tool call:get_weather"
        r = self.messages(prompt, stream=True, tools=tools)
        events = [e for _, e in r.typed_events()]
        start = [e for e in events if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"]
        self.assertEqual(start[0]["content_block"]["name"], "get_weather")
        tool_id = start[0]["content_block"]["id"]
        partial = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
                          and e["delta"]["type"] == "input_json_delta")
        self.assertEqual(json.loads(partial), {"q": "get_weather 0"})
        self.assertEqual([e for e in events if e["type"] == "message_delta"][-1]["delta"]["stop_reason"], "tool_use")
        history = [{"role": "user", "content": prompt},
                   {"role": "assistant", "content": [{"type": "text", "text": "I'll run that for you."},
                                                     {"type": "tool_use", "id": tool_id, "name": "get_weather",
                                                      "input": {"q": "get_weather 0"}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "is_error": True,
                                                 "content": "no network"}]}]
        body = self.messages(history, tools=tools).json()
        self.assertEqual(body["content"][-1]["text"], "Tool results: error: no network")
        self.assertEqual(body["stop_reason"], "end_turn")
        self.assertTrue(self.records("tool_result")[0]["result"]["isError"])

    def test_responses_function_call_round_trip(self):
        tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
        prompt = "scenario:client_tool call:get_weather"
        r = self.request("POST", "/v1/responses", {"model": "sonnet", "input": prompt, "tools": tools,
                                                   "stream": True})
        events = [e for _, e in r.typed_events()]
        done = [e for e in events if e["type"] == "response.output_item.done"
                and e["item"]["type"] == "function_call"]
        self.assertEqual(done[0]["item"]["name"], "get_weather")
        call_id = done[0]["item"]["call_id"]
        self.assertEqual(events[-1]["type"], "response.completed")
        body = self.request("POST", "/v1/responses", {
            "model": "sonnet", "tools": tools, "input": [
                {"role": "user", "content": prompt},
                {"type": "function_call", "call_id": call_id, "name": "get_weather",
                 "arguments": done[0]["item"]["arguments"]},
                {"type": "function_call_output", "call_id": call_id, "output": "cloudy"}]}).json()
        self.assertEqual(body["output"][-1]["content"][0]["text"], "Tool results: cloudy")
        self.assertEqual(len(self.runs()), 1)

    def test_text_beside_the_results_reaches_the_cli_and_an_empty_result_is_no_output(self):
        tools = [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}]
        prompt = "scenario:client_tool call:get_weather"
        body = self.messages(prompt, tools=tools).json()
        self.assertEqual(body["stop_reason"], "tool_use")
        tool_id = body["content"][-1]["id"]
        history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": body["content"]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": ""},
                                                {"type": "text", "text": "also: PINEAPPLE"}]}]
        answer = self.messages(history, tools=tools).json()["content"][-1]["text"]
        self.assertEqual(answer, "Tool results: (no output)\nalso: PINEAPPLE")

    def test_a_tools_call_the_client_was_never_given_is_answered_with_an_error(self):
        self.assertEqual(self.chat_text("scenario:hidden_tool_call", tools=[CLAUDE_TOOL]),
                         "hidden call answered, isError=True")

    def test_responses_function_call_non_streamed(self):
        tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
        body = self.request("POST", "/v1/responses", {
            "model": "sonnet", "input": "scenario:client_tool call:get_weather", "tools": tools}).json()
        calls = [item for item in body["output"] if item["type"] == "function_call"]
        self.assertEqual([(c["name"], json.loads(c["arguments"])) for c in calls],
                         [("get_weather", {"q": "get_weather 0"})])
        self.assertTrue(calls[0]["call_id"].startswith("toolu_fake_"))
        self.assertEqual(body["status"], "completed")
        self.assertEqual(self.health()["claudeAwaitingTools"], 1)

    def test_parallel_calls_are_one_answer_and_results_go_back_in_turn(self):
        tools = [claude_tool("alpha"), claude_tool("beta")]
        prompt = "scenario:client_tool call:alpha call:beta"
        body = self.chat(prompt, tools=tools).json()
        calls = body["choices"][0]["message"]["tool_calls"]
        self.assertEqual([c["function"]["name"] for c in calls], ["alpha", "beta"])
        history = [{"role": "user", "content": prompt}, body["choices"][0]["message"],
                   {"role": "tool", "tool_call_id": calls[0]["id"], "content": "A"},
                   {"role": "tool", "tool_call_id": calls[1]["id"], "content": "B"}]
        self.assertEqual(self.chat_text(history, tools=tools), "Tool results: A | B")
        self.assertEqual([r["id"] for r in self.records("tool_result")], [calls[0]["id"], calls[1]["id"]])

    def test_a_result_the_client_left_out_is_answered_as_an_error(self):
        tools = [claude_tool("alpha"), claude_tool("beta")]
        prompt = "scenario:client_tool call:alpha call:beta"
        message = self.chat(prompt, tools=tools).json()["choices"][0]["message"]
        history = [{"role": "user", "content": prompt}, message,
                   {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "A"}]
        answer = self.chat_text(history, tools=tools)
        self.assertTrue(answer.startswith("Tool results: A | error: "), answer)
        self.assertTrue(self.records("tool_result")[1]["result"]["isError"])

    def test_a_new_message_instead_of_results_cancels_the_calls(self):
        headers = {"x-session-id": "tools-1"}
        r = self.chat("scenario:client_tool call:get_weather", tools=[CLAUDE_TOOL], headers=headers)
        self.assertEqual(r.json()["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(self.chat_text("never mind", tools=[CLAUDE_TOOL], headers=headers), "ECHO: never mind")
        self.assertTrue(self.records("tool_result")[0]["result"]["isError"])
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual(self.health()["claudeAwaitingTools"], 0)

    def test_with_no_warm_processes_a_cancelled_tool_turn_leaves_no_process_behind(self):
        self.stop_server()
        self.start_server(claudeWarmProcesses=0)
        headers = {"x-session-id": "tools-0"}
        r = self.chat("scenario:client_tool call:get_weather", tools=[CLAUDE_TOOL], headers=headers)
        self.assertEqual(r.json()["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(self.chat_text("never mind", tools=[CLAUDE_TOOL], headers=headers), "ECHO: never mind")
        self.assertTrue(wait_for(lambda: self.health()["claudeLiveProcesses"] == 0, 10))
        self.assertFalse(any(alive(r["pid"]) for r in self.runs()))

    def test_calls_the_client_abandons_time_out_and_the_process_goes_back_warm(self):
        self.stop_server()
        self.start_server(claudeToolResultTimeoutMs=300)
        self.assertEqual(self.call_weather().json()["choices"][0]["finish_reason"], "tool_calls")
        self.assertTrue(wait_for(lambda: self.records("tool_result"), 10), "the held call was never answered")
        self.assertTrue(self.records("tool_result")[0]["result"]["isError"])
        self.assertTrue(wait_for(lambda: self.health()["claudeWarm"] == 1, 10))
        health = self.health()
        self.assertEqual((health["claudeAwaitingTools"], health["claudeProcesses"]), (0, 0))

    def test_a_turn_awaiting_tool_results_holds_its_slot_until_a_waiting_request_needs_it(self):
        self.stop_server()
        self.start_server(claudeMaxProcesses=1, claudeQueueWaitMs=300)
        self.assertEqual(self.call_weather().json()["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(self.health()["claudeProcesses"], 1)   # running a tool counts as running
        self.assertEqual(self.chat_text("another conversation"), "ECHO: another conversation")
        self.assertTrue(self.records("tool_result")[0]["result"]["isError"])
        metrics = self.request("GET", "/metrics").data.decode()
        self.assertIn("ccproxy_claude_preempted_total 1.0", metrics)

    def test_tool_choice_none_offers_no_tools_and_a_forced_choice_is_asked_in_words(self):
        self.chat("plain", tools=[CLAUDE_TOOL], tool_choice="none")
        self.assertNotIn("--mcp-config", self.last_run()["argv"])
        self.assertEqual(self.option(self.last_run()["argv"], "--tools"), "")   # built-ins stay off
        self.chat("scenario:client_tool call:get_weather", tools=[CLAUDE_TOOL],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
        texts = [b["text"] for b in json.loads(self.turns()[-1]["stdin"])["message"]["content"]]
        self.assertIn("calling the tool mcp__client__get_weather", texts[-1])


class TestClaudeCodeAuthAndModels(ClaudeCodeCase):
    def test_requests_without_the_api_key_are_401_and_never_run_the_cli(self):
        for key, extra in ((None, {}), ("wrong", {}), (None, {"x-api-key": "wrong"})):
            r = self.chat("hi", key=key, headers=extra)
            self.assertEqual(r.status, 401, r)
            self.assertEqual(r.json()["error"]["type"], "authentication_error")
        r = self.messages("hi", key="wrong")
        self.assertEqual(r.status, 401)
        self.assertEqual(r.json()["error"]["type"], "authentication_error")
        self.assertEqual(self.request("GET", "/v1/models", key=None).status, 401)
        self.assertEqual(self.runs(), [])
        self.assertEqual(self.chat("hi", key=None, headers={"x-api-key": CLAUDE_KEY}).status, 200)
        self.assertEqual(self.chat("hi", key=CLAUDE_KEY, headers={"x-api-key": "wrong"}).status, 200)

    def test_models_list_claude_aliases_and_health_shows_the_cli(self):
        r = self.request("GET", "/v1/models")
        ids = [m["id"] for m in r.json()["data"]]
        for model in ("sonnet", "opus", "haiku", "claude-opus-4-8", "claude-sonnet-5"):
            self.assertIn(model, ids)
        health = self.request("GET", "/health", key=None).json()
        self.assertEqual(health["claude"], FAKE_CLAUDE)
        self.assertEqual(health["claudeVersion"], "2.1.197")

    def test_ensure_api_key_generates_saves_and_then_reuses_a_key(self):
        path = os.path.join(self.tmp, "config.json")
        with open(path, "w") as f:
            json.dump({"port": 4321, "unknownKey": 1}, f)
        config = proxy.load_config(path, {}, {"backend": "claude-code"})
        out = io.StringIO()
        key = proxy.ensure_api_key(config, out)
        self.assertTrue(key.startswith("sk-ccp-") and len(key) > 30)
        self.assertIn(key, out.getvalue())
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual(saved, {"port": 4321, "unknownKey": 1, "apiKey": key})
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        again = proxy.load_config(path, {}, {})
        out2 = io.StringIO()
        self.assertEqual(proxy.ensure_api_key(again, out2), key)
        self.assertEqual(out2.getvalue(), "")

# =====================================================================================
# Resilience: upstream faults x front ends, hostile clients, backpressure, leaks, concurrency
# =====================================================================================

RES_COMBOS = [(front, streaming) for front in FRONTS for streaming in (False, True)]
RES_HANG_LIMIT = 8.0  # no single fault case may take longer than this (a hang is a failure)
RES_GATEWAY = (502, 503, 504)


def res_minimal_body(front, stream=False, text="Say hello"):
    if front == "chat":
        body = {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": text}]}
    elif front == "messages":
        body = {"model": "claude-sonnet-5", "max_tokens": 256,
                "messages": [{"role": "user", "content": text}]}
    else:
        body = {"model": "claude-sonnet-5", "input": text}
    if stream:
        body["stream"] = True
    return body


def res_headers(front, key=KEY):
    h = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
    if front == "messages":
        h["anthropic-version"] = "2023-06-01"
    return h


def res_strict_json(raw):
    """The upstream must receive strict JSON: UTF-8, no NaN/Infinity, no lone surrogates."""
    def no_constant(name):
        raise AssertionError("upstream got non-standard JSON constant %s: %r" % (name, raw[:300]))
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except ValueError as e:
        raise AssertionError("upstream got invalid JSON (%s): %r" % (e, raw[:300])) from None

    def walk(v):
        if isinstance(v, str):
            if re.search("[\ud800-\udfff]", v):
                raise AssertionError("upstream got a lone surrogate in %r" % v[:80])
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
    walk(doc)
    return doc


class _ExcRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


class ResilienceCase(ProxyTestCase):
    """ProxyTestCase plus 'never a traceback': exceptions logged by the proxy, escaping a handler
    (socketserver.handle_error) or killing a thread are all recorded and fail the test."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The fixture's accept backlog (5) is sized for one client at a time; with several
        # simultaneous requests a dropped SYN costs a 1 s retransmit, longer than the idle limits.
        cls.upstream.server.socket.listen(128)
        cls.exc_log = _ExcRecorder()
        logging.getLogger("cc-proxy").addHandler(cls.exc_log)
        cls.escaped = []
        cls.server.handle_error = lambda request, address: cls.escaped.append(sys.exc_info()[1])
        cls._old_hook = threading.excepthook

        def hook(args):
            cls.escaped.append(args.exc_value)
            cls._old_hook(args)
        threading.excepthook = hook

    @classmethod
    def tearDownClass(cls):
        threading.excepthook = cls._old_hook
        logging.getLogger("cc-proxy").removeHandler(cls.exc_log)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.exc_log.records.clear()
        del self.escaped[:]

    def assertNoTraceback(self, resp=None):
        if resp is not None:
            self.assertNotIn(b"Traceback", resp.data)
        logged = ["%s: %s" % (r.getMessage(), r.exc_info[1] if r.exc_info else "")
                  for r in self.exc_log.records]
        self.assertEqual(logged, [], "the proxy logged an exception")
        self.assertEqual(self.escaped, [], "an exception escaped a handler or a thread")

    # -- requests ---------------------------------------------------------------------------
    def call(self, front, streaming, key=None, **kw):
        key = key or unique_key()
        return getattr(self, front)(stream=streaming, key=key, **kw)

    def post_raw(self, front, raw, headers=None, key=KEY):
        h = res_headers(front, key)
        h.update(headers or {})
        return http_request(self.port, "POST", PATHS[front], raw, h)

    # -- protocol-level assertions --------------------------------------------------------
    def assertProtocolError(self, resp, front, statuses):
        statuses = tuple(statuses)
        if front == "messages" and 503 in statuses:
            statuses += (529,)  # Anthropic's overloaded status
        self.assertIn(resp.status, statuses, resp)
        self.assertTrue((resp.header("Content-Type") or "").startswith("application/json"), resp)
        body = resp.json()
        if front == "messages":
            self.assertEqual(body.get("type"), "error", body)
            self.assertIsInstance(body.get("error"), dict, body)
            self.assertIsInstance(body["error"].get("type"), str, body)
            err = body["error"]
        else:
            err = body.get("error")
            self.assertIsInstance(err, dict, body)
            self.assertIn("type", err, body)
            self.assertIn("code", err, body)
        self.assertIsInstance(err.get("message"), str, body)
        self.assertTrue(err["message"], body)
        self.assertNotIn("Traceback", err["message"])
        self.assertTrue(resp.header("X-Request-Id"), resp)
        return err

    def assertCleanAnswer(self, resp, front, streaming, text):
        self.assertEqual(resp.status, 200, resp)
        if not streaming:
            body = resp.json()
            self.assertEqual(resp.body_text(front), text)
            if front == "chat":
                self.assertEqual(body["choices"][0]["finish_reason"], "stop")
            elif front == "messages":
                self.assertEqual(body["stop_reason"], "end_turn")
            else:
                self.assertEqual(body["status"], "completed")
            return
        self.assertTrue(resp.header("Content-Type").startswith("text/event-stream"), resp)
        self.assertEqual(resp.stream_text(front), text)
        if front == "chat":
            chunks = resp.chunks()
            self.assertTrue(resp.done(), resp)
            self.assertEqual(finish_reasons(chunks), ["stop"])
            self.assertFalse(any("error" in c for c in chunks))
        else:
            names = [n for n, _ in resp.typed_events()]
            self.assertNotIn("error", names)
            self.assertNotIn("response.failed", names)
            self.assertEqual(names[-1], "message_stop" if front == "messages" else "response.completed")

    def assertFailedAfterOutput(self, resp, front, prefix):
        """An in-stream error as the last event, what was streamed before it, and no normal ending."""
        self.assertEqual(resp.status, 200, resp)
        self.assertTrue(resp.header("Content-Type").startswith("text/event-stream"), resp)
        self.assertEqual(resp.stream_text(front), prefix)
        if front == "chat":
            chunks = resp.chunks()
            self.assertFalse(resp.done(), "a failed stream must not end with [DONE]")
            self.assertEqual(finish_reasons(chunks), [], "no fake finish_reason on a failed stream")
            self.assertIn("error", chunks[-1], chunks[-1])
            self.assertTrue(chunks[-1]["error"].get("message"))
        else:
            events = resp.typed_events()
            names = [n for n, _ in events]
            if front == "messages":
                self.assertNotIn("message_stop", names)
                self.assertFalse(any(d.get("type") == "message_delta" for _, d in events),
                                 "no stop_reason on a failed stream")
                self.assertEqual(names[-1], "error", names)
                self.assertEqual(events[-1][1].get("type"), "error")
                self.assertTrue(events[-1][1]["error"].get("message"))
            else:
                self.assertNotIn("response.completed", names)
                self.assertNotIn("response.incomplete", names)
                self.assertEqual(names[-1], "response.failed", names)
                self.assertEqual(events[-1][1]["response"]["status"], "failed")
                self.assertTrue(events[-1][1]["response"]["error"]["message"])

    # -- the front end x stream mode table --------------------------------------------------
    def matrix(self, make_reply, check, parallel=False, combos=RES_COMBOS):
        """One request per (front end, stream mode), each answered by a fresh make_reply();
        check(front, streaming, response). parallel=True runs the six at once (same reply)."""
        if parallel:
            self.upstream.script(*[make_reply() for _ in combos])
            with concurrent.futures.ThreadPoolExecutor(len(combos)) as pool:
                futures = [pool.submit(self.call, f, s) for f, s in combos]
                results = []
                for fu in futures:
                    try:
                        results.append(fu.result())
                    except Exception as e:  # noqa: BLE001 - reported per sub-test below
                        results.append(e)
            for (front, streaming), resp in zip(combos, results):
                with self.subTest(front=front, stream=streaming):
                    if isinstance(resp, Exception):
                        raise resp
                    self.assertLess(resp.elapsed, RES_HANG_LIMIT, resp)
                    check(front, streaming, resp)
                    self.assertNoTraceback(resp)
            return
        for front, streaming in combos:
            with self.subTest(front=front, stream=streaming):
                self.upstream.reset()
                self.exc_log.records.clear()
                del self.escaped[:]
                self.upstream.script(make_reply())
                resp = self.call(front, streaming)
                self.assertLess(resp.elapsed, RES_HANG_LIMIT, resp)
                check(front, streaming, resp)
                self.assertNoTraceback(resp)


def res_partial_then(*tail):
    """Output ("partial") then the given tail items."""
    return Reply(200, START + text_parts("partial")[:2] + list(tail))


# =======================================================================================
# Upstream faults x every front end x both stream modes
# =======================================================================================

class TestResilienceUpstreamFaults(ResilienceCase):
    """Retries are off so each scripted fault maps to exactly one client-visible result."""

    proxy_overrides = {"upstreamRetries": 0, "streamIdleTimeoutMs": 500, "nonStreamIdleTimeoutMs": 500}

    def error_before_output(self, statuses=RES_GATEWAY):
        return lambda front, streaming, r: self.assertProtocolError(r, front, statuses)

    def error_after_output(self, statuses=RES_GATEWAY):
        def check(front, streaming, r):
            if streaming:
                self.assertFailedAfterOutput(r, front, "partial")
            else:
                self.assertProtocolError(r, front, statuses)
        return check

    def answer(self, text):
        return lambda front, streaming, r: self.assertCleanAnswer(r, front, streaming, text)

    def test_reset_mid_stream_is_an_error_after_output(self):
        self.matrix(lambda: res_partial_then(Sleep(0.05), Reset()), self.error_after_output())

    def test_reset_after_headers_before_output_is_a_gateway_error(self):
        self.matrix(lambda: Reply(200, START + [Reset()]), self.error_before_output())

    def test_stall_before_output_is_idle_timeout(self):
        def check(front, streaming, r):
            self.assertProtocolError(r, front, (504,))
            self.assertLess(r.elapsed, 4)
        self.matrix(lambda: Reply(200, START + [Stall(6)] + stream(text_parts("late"))[2:]), check,
                    parallel=True)
        gens = self.upstream.generates()
        self.assertEqual(len(gens), len(RES_COMBOS))
        self.assertTrue(wait_for(lambda: all(g["disconnected_at"] for g in gens), 3),
                        "the stalled upstream connections were not closed")

    def test_stall_after_output_is_idle_timeout(self):
        def check(front, streaming, r):
            self.error_after_output((504,))(front, streaming, r)
            self.assertLess(r.elapsed, 4)
        self.matrix(lambda: res_partial_then(Stall(6), *finish_parts()), check, parallel=True)

    def test_slow_drip_50ms_apart_succeeds(self):
        words = ["w%d " % i for i in range(12)]
        lines = START + [{"type": "text-start", "id": "t"}]
        for w in words:
            lines += [Sleep(0.05), {"type": "text-delta", "id": "t", "text": w}]
        lines += [Sleep(0.05), {"type": "text-end", "id": "t"}] + finish_parts()
        self.matrix(lambda: Reply(200, lines), self.answer("".join(words)), parallel=True)

    def test_ten_megabyte_single_line_succeeds(self):
        # CommandCodeStreamDecoder.MAX_LINE is 64 MiB: a 10 MiB line is a legal (if huge) delta.
        big = "0123456789abcdef" * (10 * 1024 * 1024 // 16)
        line = Raw(json.dumps({"type": "text-delta", "id": "t", "text": big}).encode() + b"\n")
        reply = lambda: Reply(200, START + [{"type": "text-start", "id": "t"}, line,
                                            {"type": "text-end", "id": "t"}] + finish_parts())
        self.matrix(reply, self.answer(big))

    def test_line_over_max_line_is_a_clean_error(self):
        # Over the decoder's limit: a clean 502 before output, never unbounded buffering.
        with mock.patch.object(proxy.CommandCodeStreamDecoder, "MAX_LINE", 256 * 1024):
            piece = Raw(b'{"type":"text-delta","id":"t","text":"' + b"x" * 65536)
            self.matrix(lambda: Reply(200, START + [piece] * 8 + [Raw(b'"}\n')] + finish_parts()),
                        self.error_before_output((502,)))

    def test_garbage_and_non_json_lines_are_skipped(self):
        garbage = ["this is not json", "{broken", "<html><body>oops</body></html>", "[1, 2, 3]", "42",
                   "null", '"a string"', "true", "data: {not json", "event: message", ": comment",
                   '{"type": ["text-delta"], "text": "LIST-TYPED"}', '{"type": {"x": 1}}',
                   '{"type": 7}', '{"type": null}', '{"no_type": 1}',
                   '{"type": "text-delta", "id": "t", "text": {"nested": "obj"}}',
                   '{"type": "text-delta", "id": "t", "text": 12345}',
                   '{"type": "finish-step", "usage": "not an object"}',
                   '{"type": "tool-input-delta", "id": "never-started", "delta": "x"}',
                   Raw(b"\xff\xfe\x00\x01 binary \xc3\x28 junk\n"), Raw(b"\x00\x00\x00\n"),
                   "x" * 200000]
        items = stream(text_parts("Still", " fine"))
        lines = items[:3] + garbage + items[3:4] + garbage[::-1] + items[4:]
        self.matrix(lambda: Reply(200, lines), self.answer("Still fine"))

    def test_html_page_with_status_200(self):
        html = ("<!DOCTYPE html>\n<html><head><title>Just a moment...</title></head>\n"
                "<body><h1>Checking your browser</h1>\n<p>Please wait</p></body></html>\n")
        self.matrix(lambda: Reply(200, [Raw(html)], content_type="text/html; charset=utf-8",
                                  framing="close"),
                    self.error_before_output())

    def test_html_page_as_200_json_body(self):
        self.matrix(lambda: Reply(200, body="<html><body>maintenance</body></html>"),
                    self.error_before_output())

    def test_truncated_without_finish_before_output(self):
        self.matrix(lambda: Reply(200, START), self.error_before_output())

    def test_truncated_without_finish_after_output(self):
        self.matrix(lambda: Reply(200, START + text_parts("partial")), self.error_after_output())

    def test_truncated_by_connection_close_after_output(self):
        self.matrix(lambda: Reply(200, START + text_parts("partial"), framing="close"),
                    self.error_after_output())

    def test_truncated_mid_line_after_output(self):
        cut = Raw(json.dumps(finish_parts()[0])[:40])  # half a finish-step line, then EOF
        self.matrix(lambda: Reply(200, START + text_parts("partial") + [cut], framing="close"),
                    self.error_after_output())

    def test_error_event_before_output(self):
        self.matrix(lambda: Reply(200, START + [error_event("upstream exploded", 500)]),
                    self.error_before_output((502,)))

    def test_error_event_before_output_client_error_status(self):
        self.matrix(lambda: Reply(200, START + [error_event("prompt is too long", 400)]),
                    self.error_before_output((400,)))

    def test_error_event_after_output(self):
        self.matrix(lambda: res_partial_then(error_event("upstream exploded", 500), *finish_parts()),
                    self.error_after_output((502,)))

    def test_finish_with_error_reason_after_output(self):
        self.matrix(lambda: res_partial_then({"type": "finish", "finishReason": "error"}),
                    self.error_after_output((502,)))

    def test_abort_event_after_output(self):
        self.matrix(lambda: res_partial_then({"type": "abort"}), self.error_after_output((502,)))

    def test_wrong_content_type_on_valid_stream_succeeds(self):
        self.matrix(lambda: Reply(200, stream(text_parts("Typed", " wrong")),
                                  content_type="text/html; charset=utf-8"),
                    self.answer("Typed wrong"))


class TestResilienceResetBeforeHeaders(ResilienceCase):
    """The upstream reads the request, then resets the connection without a response byte."""

    proxy_overrides = {"upstreamRetries": 0}
    hang_up = Reset

    def test_no_response_head_is_a_gateway_error(self):
        def check(front, streaming, r):
            self.assertProtocolError(r, front, RES_GATEWAY)
            self.assertEqual(len(self.upstream.generates()), 1, "one upstream attempt per request")
        self.matrix(self.hang_up, check)


class TestResilienceCloseBeforeHeaders(TestResilienceResetBeforeHeaders):
    """The same with a plain close (FIN) instead of a reset."""

    hang_up = HangUp


class TestResilienceConnectionRefused(ResilienceCase):
    proxy_overrides = {"upstreamRetries": 1}

    @classmethod
    def setUpClass(cls):
        cls.api_base = "http://127.0.0.1:%d" % free_port()
        super().setUpClass()

    def test_connection_refused_every_front_end_and_mode(self):
        def check(front, streaming, r):
            self.assertProtocolError(r, front, RES_GATEWAY)
            self.assertLess(r.elapsed, 5)
            self.assertTrue(r.header("Retry-After"), r)
        self.matrix(lambda: None, check)


# =======================================================================================
# Hostile clients
# =======================================================================================

RES_WRONG_TYPES = {
    "chat": [("model", 5), ("messages", "hello"), ("messages", {}), ("messages", [5]),
             ("messages", [{"role": 5, "content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
             ("messages", [{"role": "user", "content": [5]}]),
             ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
             ("messages", [{"role": "assistant", "content": "x", "tool_calls": "x"}]),
             ("messages", [{"role": "assistant", "content": "x", "tool_calls": [{"function": 5}]}]),
             ("messages", [{"role": "tool", "content": "x", "tool_call_id": 5}]),
             ("temperature", "hot"), ("temperature", [1]), ("top_p", {}), ("max_tokens", "10"),
             ("max_tokens", 1.5), ("max_tokens", 0), ("max_tokens", True), ("max_completion_tokens", "x"),
             ("stream", "yes"), ("n", "1"), ("tools", {}), ("tools", [5]), ("tools", [{"function": 5}]),
             ("tools", [{"function": {"name": 5}}]), ("tool_choice", 5), ("tool_choice", ["auto"]),
             ("tool_choice", {"type": "function", "function": "get_weather"}), ("stop", 5), ("stop", [5]),
             ("reasoning_effort", 5), ("reasoning_effort", "ultra"), ("response_format", "json"),
             ("response_format", {"type": 5}), ("response_format", {"type": "json_schema", "json_schema": "x"}),
             ("stream_options", "x"), ("parallel_tool_calls", "no"), ("logprobs", "x"), ("functions", {})],
    "messages": [("model", 5), ("max_tokens", "1"), ("max_tokens", 0), ("max_tokens", 2.5), ("system", 5),
                 ("system", [5]), ("system", [{"type": "text", "text": 5}]), ("messages", "x"),
                 ("messages", [5]), ("messages", [{"role": "user", "content": 5}]),
                 ("messages", [{"role": "robot", "content": "x"}]),
                 ("messages", [{"role": "user", "content": [5]}]),
                 ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
                 ("messages", [{"role": "user", "content": [{"type": "image", "source": "x"}]}]),
                 ("messages", [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 5}]}]),
                 ("messages", [{"role": "assistant", "content": [{"type": "tool_use", "id": 5, "name": "x"}]}]),
                 ("tools", {}), ("tools", [5]), ("tools", [{"name": 5}]), ("tool_choice", "auto"),
                 ("tool_choice", {"type": 5}), ("top_k", "x"), ("stop_sequences", "x"),
                 ("stop_sequences", [5]), ("thinking", "x"), ("thinking", {"type": "sometimes"}),
                 ("metadata", "x"), ("temperature", "x"), ("stream", "x"), ("output_config", "x")],
    "responses": [("model", 5), ("input", 5), ("input", {}), ("input", [5]),
                  ("input", [{"role": "user", "content": 5}]), ("input", [{"role": "robot", "content": "x"}]),
                  ("input", [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": 5}]}]),
                  ("input", [{"type": "message", "role": "user", "content": [5]}]),
                  ("input", [{"type": "function_call", "call_id": 5, "name": "x"}]),
                  ("input", [{"type": "function_call_output", "call_id": 5, "output": "x"}]),
                  ("instructions", 5), ("tools", {}), ("tools", [5]), ("tools", [{"type": "function", "name": 5}]),
                  ("tool_choice", 5), ("reasoning", "x"), ("reasoning", {"effort": "ultra"}), ("text", "x"),
                  ("text", {"format": "json"}), ("text", {"format": {"type": 5}}), ("store", "x"),
                  ("metadata", "x"), ("max_output_tokens", "x"), ("max_output_tokens", 0),
                  ("previous_response_id", 5), ("parallel_tool_calls", "x"), ("prompt_cache_key", 5),
                  ("temperature", "x"), ("stream", "x")],
}


def res_rich_body(front):
    """A valid body that uses most documented fields, for structural fuzzing."""
    tool_schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    if front == "chat":
        return {"model": "claude-sonnet-5", "stream": False, "temperature": 0.5, "top_p": 0.9,
                "max_tokens": 100, "stop": ["END"], "reasoning_effort": "low", "n": 1,
                "response_format": {"type": "json_object"}, "stream_options": {"include_usage": True},
                "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                                             "parameters": tool_schema}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": True,
                "messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": "ok", "tool_calls": [
                                 {"id": "c1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": "{\"city\":\"x\"}"}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                             {"role": "user", "content": "and now?"}]}
    if front == "messages":
        return {"model": "claude-sonnet-5", "max_tokens": 100, "temperature": 0.5, "top_k": 5,
                "stop_sequences": ["END"], "system": [{"type": "text", "text": "be brief"}],
                "thinking": {"type": "enabled", "budget_tokens": 2000}, "metadata": {"user_id": "u"},
                "tools": [{"name": "get_weather", "description": "d", "input_schema": tool_schema}],
                "tool_choice": {"type": "auto"},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": [
                                 {"type": "thinking", "thinking": "hmm", "signature": "s"},
                                 {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "x"}}]},
                             {"role": "user", "content": [
                                 {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                 {"type": "text", "text": "and now?"}]}]}
    return {"model": "claude-sonnet-5", "instructions": "be brief", "max_output_tokens": 100,
            "temperature": 0.5, "reasoning": {"effort": "low"}, "store": False,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": tool_schema}},
            "tools": [{"type": "function", "name": "get_weather", "description": "d", "parameters": tool_schema}],
            "tool_choice": "auto", "parallel_tool_calls": True, "metadata": {"a": "b"},
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                      {"type": "function_call", "call_id": "c1", "name": "get_weather",
                       "arguments": "{\"city\":\"x\"}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                      {"role": "user", "content": "and now?"}]}


def res_paths(value, prefix=()):
    """Every JSON path inside value (dict keys and list indexes)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from res_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield prefix + (i,)
            yield from res_paths(v, prefix + (i,))


def res_replaced(value, path, new):
    if not path:
        return new
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[path[0]] = res_replaced(value[path[0]], path[1:], new)
    return copy


class TestResilienceHostileClients(ResilienceCase):
    proxy_overrides = {"maxBodyBytes": 1024 * 1024, "upstreamRetries": 0}

    def assertRejected(self, resp, front, status=400):
        self.assertProtocolError(resp, front, (status,))
        self.assertNoTraceback(resp)

    def test_malformed_json_every_front_end(self):
        bodies = [b'{"model": "x", "messages": [', b"", b"   ", b"null", b"[]", b'"text"', b"42",
                  b'{"a": 1}{"b": 2}', b"{'single': 'quotes'}", b'{"a": 1,}', b"{\"a\": \x01}",
                  b'{"model": "x"', b"\xef\xbb\xbf{}"]
        for front in FRONTS:
            for raw in bodies:
                with self.subTest(front=front, body=raw[:30]):
                    self.upstream.reset()
                    self.assertRejected(self.post_raw(front, raw), front)
                    self.assertEqual(self.upstream.generates(), [])

    def test_wrong_types_for_documented_fields_are_400(self):
        for front, cases in RES_WRONG_TYPES.items():
            for field, value in cases:
                with self.subTest(front=front, field=field, value=value):
                    self.upstream.reset()
                    self.exc_log.records.clear()
                    body = res_minimal_body(front)
                    body[field] = value
                    self.assertRejected(self.post_raw(front, body), front)
                    self.assertEqual(self.upstream.generates(), [], "a rejected request went upstream")

    def test_structural_type_fuzz_never_500(self):
        """Every value of a rich valid body replaced by each wrong-typed value: 2xx or 4xx, never
        5xx, never a traceback, and what went upstream is strict JSON."""
        replacements = [None, 7, 2.5, "x", [7], {"x": 7}]
        cases = [(front, path, new) for front in FRONTS for path in res_paths(res_rich_body(front))
                 for new in replacements]

        def one(case):
            front, path, new = case
            return self.post_raw(front, res_replaced(res_rich_body(front), path, new), key=unique_key())

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, cases))
        for (front, path, new), r in zip(cases, results):
            with self.subTest(front=front, path=path, value=new):
                self.assertLess(r.status, 500, r)
                if r.status >= 400:
                    self.assertProtocolError(r, front, (r.status,))
        for g in self.upstream.generates():
            res_strict_json(g["raw"])
        self.assertNoTraceback()

    def test_non_finite_numbers_never_reach_upstream_as_invalid_json(self):
        # Python's json accepts NaN/Infinity and 1e999; a strict upstream (JSON.parse) does not.
        for front in FRONTS:
            for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
                with self.subTest(front=front, value=literal):
                    self.upstream.reset()
                    raw = json.dumps(res_minimal_body(front))[:-1].encode() + b', "temperature": ' + literal + b"}"
                    r = self.post_raw(front, raw)
                    if r.status == 200:
                        for g in self.upstream.generates():
                            res_strict_json(g["raw"])
                    else:
                        self.assertRejected(r, front)

    def test_deep_nesting_is_400_not_a_crash(self):
        for front in FRONTS:
            for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
                with self.subTest(front=front, nesting=opener):
                    self.upstream.reset()
                    field = b'"messages"' if front != "responses" else b'"input"'
                    raw = (b'{"model": "claude-sonnet-5", "max_tokens": 5, ' + field + b": "
                           + opener * 100000 + b"1" + closer * 100000 + b"}")
                    self.assertRejected(self.post_raw(front, raw), front)
                    self.assertEqual(self.upstream.generates(), [])

    def test_nesting_just_under_the_parser_limit_is_not_a_crash(self):
        """Bodies json.loads accepts but deep enough to break naive recursion later on (surrogate
        scrubbing, token estimation, re-serialisation of a tool schema upstream): 200 or 400."""
        def deep(levels, surrogate):
            leaf = '{"type": "string", "description": "%s"}' % ("bad \\ud800" if surrogate else "ok")
            return '{"type": "object", "properties": {"p": ' * levels + leaf + "}}" * levels

        for front in FRONTS:
            for levels in (150, 440):  # ~300 and ~880 JSON nesting levels (json.loads allows ~1000)
                for where, surrogate in (("extra", True), ("schema", False), ("schema", True)):
                    with self.subTest(front=front, levels=levels, where=where, surrogate=surrogate):
                        self.upstream.reset()
                        self.exc_log.records.clear()
                        tree = deep(levels, surrogate)
                        if where == "extra":
                            extra = '"x_extension": ' + tree
                        elif front == "chat":
                            extra = '"tools": [{"type": "function", "function": {"name": "f", "parameters": %s}}]' % tree
                        elif front == "messages":
                            extra = '"tools": [{"name": "f", "input_schema": %s}]' % tree
                        else:
                            extra = '"tools": [{"type": "function", "name": "f", "parameters": %s}]' % tree
                        raw = (json.dumps(res_minimal_body(front))[:-1] + ", " + extra + "}").encode()
                        r = self.post_raw(front, raw)
                        self.assertIn(r.status, (200, 400), r)
                        if r.status != 200:
                            self.assertProtocolError(r, front, (r.status,))
                        for g in self.upstream.generates():
                            res_strict_json(g["raw"])
                        self.assertNoTraceback(r)

    def test_invalid_utf8_is_400(self):
        for front in FRONTS:
            for bad in (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"):
                with self.subTest(front=front, bytes=bad):
                    self.upstream.reset()
                    raw = json.dumps(res_minimal_body(front, text="XX")).encode().replace(b"XX", b"a" + bad + b"b")
                    self.assertRejected(self.post_raw(front, raw), front)
                    self.assertEqual(self.upstream.generates(), [])

    def test_lone_surrogates_never_reach_upstream(self):
        for front in FRONTS:
            with self.subTest(front=front):
                self.upstream.reset()
                body = res_rich_body(front)
                text = json.dumps(body)
                text = text.replace('"hi"', '"lone \\ud800 high, \\udfff low, \\ude00\\ud83d reversed, '
                                    'pair \\ud83d\\ude00 ok"')
                text = text.replace('"be brief"', '"sys \\udbff"')
                text = text.replace('"city"', '"ci\\udc00ty"')  # a dict key in the tool schema
                r = self.post_raw(front, text.encode())
                self.assertEqual(r.status, 200, r)
                raw = self.last_generate()["raw"]
                doc = res_strict_json(raw)
                dumped = json.dumps(doc, ensure_ascii=False)
                self.assertIn("\U0001F600", dumped, "a valid escaped surrogate pair must survive")
                self.assertIn("lone \ufffd high", dumped)
                self.assertNoTraceback(r)

    def test_oversized_content_length_is_413_without_reading_the_body(self):
        for front in FRONTS:
            with self.subTest(front=front):
                self.upstream.reset()
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    t0 = time.monotonic()
                    s.sendall(raw_head(front, 10 ** 12) + b'{"model": "x", "messages": [' + b" " * 4000)
                    resp = read_response(s, t0 + 3)
                    self.assertEqual(resp.status, 413)
                    self.assertLess(time.monotonic() - t0, 2)
                    if front == "messages":
                        self.assertEqual(resp.json()["type"], "error")
                    else:
                        self.assertIn("error", resp.json())
                    # the connection is closed, not left to swallow the 1 TB body
                    self.assertIn("close", ",".join(resp.header_values("connection")).lower())
                    s.settimeout(2)
                    try:
                        rest = s.recv(65536)
                    except ConnectionResetError:
                        rest = b""
                    self.assertEqual(rest, b"")
                self.assertEqual(self.upstream.generates(), [])
                self.assertNoTraceback()

    def test_oversized_chunked_body_is_413_early(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            t0 = time.monotonic()
            s.sendall(raw_head("chat", None, extra="Transfer-Encoding: chunked\r\n")
                      + b"ffffffffff\r\n" + b"{" * 1000)
            self.assertEqual(read_response(s, t0 + 3).status, 413)
            self.assertLess(time.monotonic() - t0, 2)
        self.assertNoTraceback()

    def test_invalid_content_length_is_400(self):
        for value in ("abc", "-5", "1e3", "12, 12"):
            with self.subTest(value=value), socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(raw_head("chat", None, extra="Content-Length: %s\r\n" % value) + b"{}")
                status = read_response(s, time.monotonic() + 3).status
                self.assertIn(status, (400, 411, 413), value)
        self.assertNoTraceback()

    def test_bad_methods_on_model_routes(self):
        for front in FRONTS:
            for method in ("PUT", "DELETE", "PATCH", "GET"):
                with self.subTest(front=front, method=method):
                    r = self.request(method, PATHS[front], res_minimal_body(front),
                                     headers={"anthropic-version": "2023-06-01"} if front == "messages" else {})
                    self.assertProtocolError(r, front, (405,))
                    self.assertEqual(r.header("Allow"), "POST")
            with self.subTest(front=front, method="HEAD"):
                self.assertEqual(http_request(self.port, "HEAD", PATHS[front], timeout=5).status, 405)
        self.assertEqual(self.upstream.generates(), [])
        self.assertNoTraceback()

    def raw(self, raw, wait_for_close=False):
        return raw_request(self.port, raw, wait_for_close=wait_for_close)

    def assertShape(self, front, resp, expected):
        self.assertEqual(resp.status, expected, resp)
        parsed = resp.json()
        if front == "messages":
            self.assertEqual(parsed["type"], "error", parsed)
            self.assertTrue(parsed["error"]["message"])
            self.assertEqual(resp.header_values("request-id"), resp.header_values("x-request-id"))
        else:
            self.assertIn("code", parsed["error"], parsed)
            self.assertNotIn("type", parsed, parsed)

    def test_ambiguous_or_broken_body_framing_is_400_in_the_route_shape_and_closes(self):
        body = json.dumps(res_minimal_body("chat")).encode()
        framings = {
            "bad chunk size": b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body + b"\r\n0\r\n\r\n",
            "chunk size with sign": b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            "chunk without CRLF": b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
            "Content-Length and chunked": b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), len(body), body),
            "chunked then Content-Length": b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                                           b"0\r\n\r\n",
            "unknown transfer coding": b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "two Content-Lengths": b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
            "negative Content-Length": b"Content-Length: -1\r\n\r\n{}",
            "Content-Length with sign": b"Content-Length: +2\r\n\r\n{}",
        }
        for front in FRONTS + ("count_tokens",):
            shape = "messages" if front == "count_tokens" else front
            for name, rest in framings.items():
                with self.subTest(front=front, framing=name):
                    head = raw_head(shape, None)[:-2]
                    if front == "count_tokens":
                        head = head.replace(b"/v1/messages", b"/v1/messages/count_tokens")
                    resp = self.raw(head + rest, wait_for_close=True)
                    self.assertShape(shape, resp, 400)
                    self.assertTrue(resp.closed,
                                    "a request with broken framing must close the connection")
        self.assertEqual(self.upstream.generates(), [])
        self.assertNoTraceback()

    def test_valid_chunked_bodies_with_extensions_and_trailers_are_read(self):
        body = json.dumps(res_minimal_body("chat")).encode()
        half = len(body) // 2
        for rest in (b"%x;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half,
                                                                    body[half:]),
                     b"%X\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(body), body)):
            with self.subTest(rest=rest[:20]):
                self.upstream.script(ok(text_parts("chunked ok")))
                head = raw_head("chat", None, key=unique_key(), extra="Transfer-Encoding: chunked\r\n")
                resp = self.raw(head + rest)
                self.assertEqual(resp.status, 200, resp)
                self.assertEqual(resp.body_text("chat"), "chunked ok")

    def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_sent(self):
        self.upstream.script(ok(text_parts("continued")))
        body = json.dumps(res_minimal_body("chat")).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(raw_head("chat", len(body), key=unique_key(), extra="Expect: 100-continue\r\n"))
            s.settimeout(2)
            self.assertTrue(s.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n"))
            s.sendall(body)
            resp = read_response(s, time.monotonic() + 4)
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.body_text("chat"), "continued")

    def test_unknown_methods_on_anthropic_routes_answer_in_the_anthropic_shape(self):
        for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/messages?beta=true"):
            for method in ("TRACE", "FOO"):
                with self.subTest(path=path, method=method):
                    raw = ("%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method, path)).encode()
                    self.assertShape("messages", self.raw(raw), 501)
        raw = b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n\r\n"
        self.assertShape("messages", self.raw(raw), 501)
        self.assertShape("chat", self.raw(b"FOO /v1/chat/completions HTTP/1.1\r\n\r\n"), 501)
        self.assertNoTraceback()

    def test_a_known_route_with_the_wrong_method_is_405_with_allow(self):
        cases = [("GET", "/v1/chat/completions", "chat", "POST"), ("DELETE", "/v1/messages", "messages", "POST"),
                 ("GET", "/v1/messages/count_tokens", "messages", "POST"),
                 ("PUT", "/v1/responses", "responses", "POST"),
                 ("POST", "/v1/responses/resp_x", "responses", "GET, HEAD"),
                 ("POST", "/v1/models", "chat", "GET, HEAD"), ("PATCH", "/health", "chat", "GET, HEAD"),
                 ("POST", "/models/x", "chat", "GET, HEAD")]
        for method, path, shape, allow in cases:
            with self.subTest(method=method, path=path):
                raw = ("%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % (method, path)).encode()
                resp = self.raw(raw)
                self.assertShape(shape, resp, 405)
                self.assertEqual(resp.header_values("allow"), [allow])
        self.assertNoTraceback()

    def test_malformed_heads_and_bodies_never_get_a_5xx(self):
        key = "Authorization: Bearer %s\r\n" % KEY
        heads = [b"GET\r\n\r\n", b"GET / HTTP/1.1 extra\r\n\r\n", b"GET / HTTP/1.x\r\n\r\n",
                 b"\x00\x01\x02\r\n\r\n", b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n",
                 b"GET /health HTTP/1.1\r\n: empty name\r\n\r\n", b"GET /health HTTP/1.1\r\nA B: c\r\n\r\n",
                 b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n",
                 b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                 b"GET /v1/models/%ff HTTP/1.1\r\n" + key.encode() + b"\r\n",
                 b"GET /v1/responses/%00 HTTP/1.1\r\n" + key.encode() + b"\r\n",
                 b"GET /health HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"]
        for front in FRONTS:
            post = raw_head(front, None)[:-2]
            heads += [post + b"Content-Length: 1e3\r\n\r\n", post + b"Content-Length: \r\n\r\n",
                      post + b"Content-Length: 99999999999999999999999\r\n\r\n",
                      post + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 2000 + b"\r\n",
                      post + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + b"T: v\r\n" * 100,
                      post + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                      post + b"Transfer-Encoding: identity\r\n\r\n{}",
                      post + b"Content-Length: 4\r\n\r\n\xff\xfe\x00\x01",
                      post + b"Content-Length: 2\r\nContent-Type: text/plain\r\n\r\n{}",
                      post + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n[]"]
        for raw in heads:
            with self.subTest(raw=raw[:70]):
                resp = self.raw(raw)
                self.assertTrue(400 <= resp.status < 500, resp)
        self.assertEqual(self.raw(b"GET / HTTP/2.0\r\n\r\n").status, 505)  # the one 5xx that is right
        self.assertEqual(self.upstream.generates(), [])
        self.assertNoTraceback()

    def test_unknown_methods_and_bad_paths_get_an_error_status_not_a_dropped_connection(self):
        raws = [b"FOO /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
                b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /v1/chat/completions/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /v1/models/%00%0d%0aX-Evil:%201 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer user_x\r\n\r\n",
                b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                b"Transfer-Encoding: chunked\r\nAuthorization: Bearer user_x\r\n\r\n0\r\n\r\n"]
        for raw in raws:
            with self.subTest(request=raw[:60]):
                resp = self.raw(raw)
                self.assertGreaterEqual(resp.status, 400, (raw[:60], resp))
                self.assertEqual([l for l in resp.head_lines if l.lower().startswith("x-evil")], [])
                if resp.data:
                    resp.json()
        self.assertEqual(self.upstream.generates(), [])
        self.assertNoTraceback()

    def test_header_injection_in_request_id_on_model_routes(self):
        for front in FRONTS:
            for streaming in (False, True):
                for rid in (b"abc\r\n X-Evil: 1", b"abc\r\n\tSet-Cookie: a=b", b"id\xc3\xa9\xff", b"a" * 300):
                    with self.subTest(front=front, stream=streaming, rid=rid[:20]):
                        self.upstream.reset()
                        data = json.dumps(res_minimal_body(front, streaming)).encode()
                        head = raw_head(front, len(data), extra="X-Request-Id: ")
                        head = head[:-2] + rid + b"\r\nConnection: close\r\n\r\n"
                        resp = self.raw(head + data)
                        lines = resp.head_lines
                        self.assertEqual(resp.status, 200, resp)
                        for bad in ("x-evil", "set-cookie"):
                            self.assertEqual([l for l in lines if l.lower().startswith(bad)], [], lines)
                        ids = resp.header_values("x-request-id")
                        self.assertEqual(len(ids), 1, lines)
                        self.assertRegex(ids[0], r"^[A-Za-z0-9._:\-]{1,128}$")
                        self.assertNotIn("\r", "".join(lines))
                        for other in resp.header_values("request-id"):
                            self.assertEqual(other, ids[0])
        self.assertNoTraceback()

    def test_header_injection_via_dropped_tool_names_and_session_id(self):
        evil = "x\r\nX-Evil: 1\r\n\r\n<html>"
        cases = {"messages": {"tools": [{"type": "web_search_20250305", "name": evil}]},
                 "responses": {"tools": [{"type": "web_search", "name": evil}]},
                 "chat": {}}
        for front, extra in cases.items():
            with self.subTest(front=front):
                self.upstream.reset()
                body = res_minimal_body(front)
                body.update(extra)
                data = json.dumps(body).encode()
                head = raw_head(front, len(data), extra="X-Session-Id: s\r\n X-Evil-Up: 1\r\n"
                                    "Connection: close\r\n")
                resp = self.raw(head + data)
                lines = resp.head_lines
                self.assertEqual(resp.status, 200, resp)
                self.assertEqual([l for l in lines if "evil" in l.lower() and
                                  not l.lower().startswith("x-cc-proxy-dropped-tools")], [], lines)
                for l in lines:
                    self.assertRegex(l, r"^[!-~]+: [ -~]*$")
                up = header_map(self.last_generate())
                self.assertNotIn("x-evil-up", up)
                for k, v in up.items():
                    self.assertNotIn("\n", v)
                    self.assertNotIn("\r", v)
                self.assertNoTraceback()

    def test_slow_sender_is_let_go_after_the_socket_timeout(self):
        """Half a body (or half a head) then silence: the handler thread must be freed."""
        handlers = self.server.handler_threads
        base_busy = handlers.busy()
        with mock.patch.object(proxy.ProxyHandler, "timeout", 0.5):
            socks = []
            try:
                for i in range(6):
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    if i % 2:
                        s.sendall(raw_head("chat", 1000) + b'{"model": "claude-sonnet-5", "mess')
                    else:
                        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
                    socks.append(s)
                time.sleep(0.2)
                t0 = time.monotonic()
                for s in socks:
                    s.settimeout(max(0.1, t0 + 4 - time.monotonic()))
                    try:
                        data = s.recv(65536)
                        while data and b"\r\n\r\n" not in data:
                            more = s.recv(65536)
                            if not more:
                                break
                            data += more
                    except ConnectionResetError:
                        data = b""
                    except socket.timeout:
                        self.fail("the proxy kept a slow sender's connection open past its socket timeout")
                    if data:  # an answer is fine (408/400) as long as it is an HTTP error
                        self.assertRegex(data.split(b"\r\n")[0], rb"^HTTP/1\.[01] (4\d\d) ")
                self.assertLess(time.monotonic() - t0, 4)
            finally:
                for s in socks:
                    s.close()
            wait_for(lambda: handlers.busy() <= base_busy, 3, step=0.05)
            self.assertLessEqual(handlers.busy(), base_busy, "handler threads not freed")
            # and the server still answers
            self.assertEqual(self.chat(key=unique_key()).status, 200)
        self.assertEqual(len(self.upstream.generates()), 1, "only the final request went upstream")
        self.assertNoTraceback()


# =======================================================================================
# Clients that stop reading: backpressure and the socket timeout
# =======================================================================================

def res_big_stream(megabytes):
    line = json.dumps({"type": "text-delta", "id": "t", "text": "x" * 990}).encode() + b"\n"
    block = line * (1024 * 1024 // len(line))
    return Reply(200, START + [{"type": "text-start", "id": "t"}] + [Raw(block)] * megabytes
                 + [{"type": "text-end", "id": "t"}] + finish_parts())


def res_vm_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class TestResilienceBackpressure(ResilienceCase):
    proxy_overrides = {"upstreamRetries": 0}
    LIMIT = 30 * 1024 * 1024

    def open_stalled_client(self, front="chat"):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        s.settimeout(10)
        s.connect(("127.0.0.1", self.port))
        send_request(self.port, front, res_minimal_body(front, True), key=unique_key(), sock=s)
        got = b""
        while len(got) < 200000:
            piece = s.recv(65536)
            if not piece:
                break
            got += piece
        self.assertIn(b"200 OK", got[:100])
        return s

    def test_client_that_stops_reading_does_not_make_the_proxy_buffer_the_stream(self):
        reply = res_big_stream(50)  # 50 MB of text-delta lines on offer
        self.upstream.script(reply)
        gc.collect()
        rss0 = res_vm_rss()
        tracemalloc.start()
        try:
            s = self.open_stalled_client()
            rec = self.last_generate()
            peak_rss = rss0
            deadline = time.monotonic() + 1.5  # the client reads nothing more for 1.5 s (loopback moves 50 MB in less)
            while time.monotonic() < deadline:
                peak_rss = max(peak_rss, res_vm_rss())
                time.sleep(0.1)
            _, traced_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        try:
            self.assertLess(traced_peak, self.LIMIT, "Python allocations grew by %d bytes" % traced_peak)
            self.assertLess(peak_rss - rss0, self.LIMIT, "RSS grew by %d bytes" % (peak_rss - rss0))
            self.assertFalse(rec["completed"], "the upstream wrote all 50 MB: nothing pushed back")
            self.assertIsNone(rec["disconnected_at"])
        finally:
            s.close()
        closed = time.monotonic()
        self.assertTrue(wait_for(lambda: rec["disconnected_at"], 5),
                        "the upstream connection was not closed after the client went away")
        self.assertLess(rec["disconnected_at"] - closed, 5)
        self.assertNoTraceback()

    def test_client_that_stops_reading_is_let_go_after_the_socket_timeout(self):
        for front in FRONTS:
            with self.subTest(front=front), mock.patch.object(proxy.ProxyHandler, "timeout", 0.3):
                self.upstream.reset()
                self.upstream.script(res_big_stream(50))
                s = self.open_stalled_client(front)
                try:
                    rec = self.last_generate()
                    # the socket is still open, but nothing is read: the proxy gives up on its own
                    self.assertTrue(wait_for(lambda: rec["disconnected_at"], 6),
                                    "the proxy kept relaying to a client that stopped reading")
                    self.assertFalse(rec["completed"])
                finally:
                    s.close()
        self.assertNoTraceback()


# =======================================================================================
# Leaks after bursts of disconnects and timeouts
# =======================================================================================

def res_fd_count():
    return len(os.listdir("/proc/self/fd"))


class TestResilienceLeaks(ResilienceCase):
    proxy_overrides = {"upstreamRetries": 0, "streamIdleTimeoutMs": 300, "nonStreamIdleTimeoutMs": 300,
                       "keepAliveIntervalMs": 100}

    def test_threads_and_sockets_return_to_baseline_after_a_burst(self):
        self.assertEqual(self.chat(key=unique_key()).status, 200)  # warm the upstream pool
        time.sleep(0.2)
        gc.collect()
        # handler threads kept idle for the next connection are not leaks: they are not counted
        live_threads = lambda: threading.active_count() - self.server.handler_threads.idle
        base_threads, base_fds = live_threads(), res_fd_count()
        n = 10
        self.upstream.script(*[res_partial_then(Stall(8), *finish_parts()) for _ in range(3 * n)])

        def disconnect(i):
            front = FRONTS[i % 3]
            with send_request(self.port, front, res_minimal_body(front, True), key=unique_key(),
                              timeout=10) as s:
                return b"partial" in read_until(s, b"partial", 10)

        def timeout(i):
            front = FRONTS[i % 3]
            r = self.call(front, bool(i % 2))
            normal_end = (b"data: [DONE]", b"event: message_stop", b"event: response.completed")
            if r.status >= 400 or (r.status == 200 and b"error" in r.data
                                   and not any(m in r.data for m in normal_end)):
                return r  # an HTTP error, or an in-stream error without a normal ending
            return ("unexpected", front, r)

        with concurrent.futures.ThreadPoolExecutor(3 * n) as pool:
            futures = [pool.submit(disconnect, i) for i in range(n)]
            futures += [pool.submit(timeout, i) for i in range(2 * n)]
            results = [f.result(timeout=20) for f in futures]
        self.assertEqual([r for r in results if r is False or isinstance(r, tuple)], [])
        counts = []

        def back_to_baseline():
            gc.collect()
            counts[:] = [live_threads(), res_fd_count()]
            return counts[0] <= base_threads + 2 and counts[1] <= base_fds + 4
        wait_for(back_to_baseline, 5, step=0.1)
        threads, fds = counts
        self.assertLessEqual(threads, base_threads + 2,
                             "threads: %d before, %d after: %s" % (base_threads, threads,
                                                                   sorted(t.name for t in threading.enumerate())))
        self.assertLessEqual(fds, base_fds + 4, "open fds: %d before, %d after" % (base_fds, fds))
        self.assertEqual(self.server.pipeline.inflight.count, 0)
        self.assertNoTraceback()


# =======================================================================================
# Concurrency
# =======================================================================================

class TestResilienceConcurrency(ResilienceCase):
    """200 simultaneous streaming chats; the fake upstream echoes each request's own prompt."""

    proxy_overrides = {"maxInFlight": 256}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        fake = cls.upstream
        local = threading.local()
        add = fake._add

        def _add(rec):
            local.rec = rec
            add(rec)

        def _next_reply():
            params = (local.rec.get("body") or {}).get("params") or {}
            texts = [p.get("text", "") for m in params.get("messages", [])
                     for p in (m.get("content") if isinstance(m.get("content"), list) else [])
                     if isinstance(p, dict)]
            words = ("echo: " + " ".join(texts)).split(" ")
            return ok(text_parts(*[w + " " for w in words[:-1]] + words[-1:]))
        fake._add, fake._next_reply = _add, _next_reply

    def test_200_simultaneous_streams_are_byte_identical_to_the_same_stream_alone(self):
        body = {"model": "claude-sonnet-5", "stream": True,
                "messages": [{"role": "user", "content": "the same question for everyone"}]}

        def normalised(r):   # ids and timestamps are each response's own
            self.assertEqual(r.status, 200, r)
            data = re.sub(rb'"id":"chatcmpl-[0-9a-f]+"', b'"id":"-"', r.data)
            return re.sub(rb'"created":[0-9]+', b'"created":0', data)
        alone = normalised(self.chat(**dict(body, key=unique_key())))
        self.assertIn(b"data: [DONE]", alone)
        n = 200
        barrier = threading.Barrier(n)

        def one(_):
            barrier.wait(10)
            return normalised(self.chat(**dict(body, key=unique_key())))
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(one, range(n), timeout=60))
        self.assertEqual(sum(a == alone for a in answers), n)

    def test_200_simultaneous_streams_all_complete_correctly(self):
        n = 200
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait(10)
            prompt = "request %d alpha beta gamma %d" % (i, i * 7)
            r = self.chat(stream=True, key=unique_key(), messages=[{"role": "user", "content": prompt}])
            return i, prompt, r

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = [f.result(timeout=60) for f in [pool.submit(one, i) for i in range(n)]]
        elapsed = time.monotonic() - t0
        bad = []
        for i, prompt, r in results:
            if r.status != 200 or chunk_content(r.chunks()) != "echo: " + prompt or not r.done() \
                    or finish_reasons(r.chunks()) != ["stop"]:
                bad.append((i, r))
        self.assertEqual(bad, [], "%d of %d streams wrong" % (len(bad), n))
        self.assertEqual(len(self.upstream.generates()), n)
        self.assertLess(elapsed, 30)
        self.assertNoTraceback()


class TestResilienceInFlightOverflow(ResilienceCase):
    proxy_overrides = {"maxInFlight": 4}

    def test_overflow_is_503_with_retry_after_never_a_dropped_connection(self):
        n = 18
        slow = lambda: Reply(200, START + text_parts("slow")[:2] + [Sleep(0.8)] + text_parts("x")[2:]
                             + finish_parts())
        self.upstream.script(*[slow() for _ in range(n)])
        barrier = threading.Barrier(n)

        def one(i):
            front, streaming = RES_COMBOS[i % len(RES_COMBOS)]
            barrier.wait(10)
            return front, streaming, self.call(front, streaming)

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = [f.result(timeout=30) for f in [pool.submit(one, i) for i in range(n)]]
        served = refused = 0
        for front, streaming, r in results:
            with self.subTest(front=front, stream=streaming, status=r.status):
                if r.status == 200:
                    served += 1
                    self.assertCleanAnswer(r, front, streaming, "slow")
                else:
                    refused += 1
                    self.assertProtocolError(r, front, (503,))
                    self.assertTrue(r.header("Retry-After"), r)
                    self.assertGreaterEqual(int(r.header("Retry-After")), 1)
        self.assertEqual(served + refused, n)
        self.assertGreaterEqual(served, 4)
        self.assertGreaterEqual(refused, n - 8)
        self.assertEqual(len(self.upstream.generates()), served, "refused requests must not go upstream")
        self.assertEqual(self.server.pipeline.inflight.count, 0)
        self.assertNoTraceback()


if __name__ == "__main__":
    unittest.main()


# =======================================================================================
# Usage ledger (sqlite) and the dashboard
# =======================================================================================

def ledger_dir():
    """A temporary directory for a class's ledger, removed when the test run ends."""
    path = tempfile.mkdtemp(prefix="cc-proxy-ledger-")
    atexit.register(shutil.rmtree, path, True)
    return path


def ledger_row_for(path, request_id, timeout=5.0):
    """The ledger row of one request, once the writer thread has committed it."""
    found = []

    def committed():
        if os.path.exists(path):
            found[:] = [r for r in proxy.ledger_rows(path, 0) if r["request_id"] == request_id]
        return bool(found)
    wait_for(committed, timeout)
    return found[0] if found else None


class TestUsageLedger(ProxyTestCase):
    db = os.path.join(ledger_dir(), "usage.sqlite3")
    proxy_overrides = {"usageDb": db, "upstreamRetries": 1}

    def send(self, call, **kw):
        rid = "req-ledger-" + uuid.uuid4().hex[:12]
        headers = dict(kw.pop("headers", {}), **{"X-Request-Id": rid,
                                                 "User-Agent": "OpenAI/Python 1.99.0"})
        return call(headers=headers, **kw), rid

    def test_every_route_records_one_row_with_its_figures(self):
        for call in (self.chat, self.responses, self.messages):
            for streamed in (False, True):
                with self.subTest(route=call.__name__, stream=streamed):
                    self.upstream.script(ok(text_parts("Hello")))
                    r, rid = self.send(call, stream=streamed)
                    self.assertEqual(r.status, 200, r)
                    row = ledger_row_for(self.db, rid)
                    self.assertIsNotNone(row, "no ledger row for %s" % rid)
                    self.assertEqual(
                        {k: row[k] for k in ("route", "backend", "client_model", "status",
                                             "error_kind", "stream", "input_uncached",
                                             "cache_read", "cache_write", "output", "retries",
                                             "client")},
                        {"route": {"chat": "chat", "responses": "responses",
                                   "messages": "messages"}[call.__name__],
                         "backend": "commandcode", "client_model": "claude-sonnet-5",
                         "status": 200, "error_kind": None, "stream": int(streamed),
                         "input_uncached": 32, "cache_read": 7168, "cache_write": 200,
                         "output": 12, "retries": 0, "client": "openai-python"})
                    self.assertEqual(row["backend_model"], "claude-sonnet-5")
                    self.assertGreater(row["first_byte_ms"], 0)
                    self.assertGreaterEqual(row["total_ms"], row["first_byte_ms"])
                    self.assertRegex(row["key_fp"], r"^[0-9a-f]{16}$")
                    self.assertLessEqual(abs(row["ts"] - time.time()), 30)

    def test_errors_are_recorded_with_the_status_the_client_got_and_their_kind(self):
        r, rid = self.send(self.chat, messages=[{"role": "nobody", "content": "x"}])
        self.assertEqual(r.status, 400, r)
        row = ledger_row_for(self.db, rid)
        self.assertEqual((row["status"], row["error_kind"]), (400, "invalid_request"))
        self.upstream.script(http_error(429, {"error": {"message": "slow down"}}))
        r, rid = self.send(self.messages)
        row = ledger_row_for(self.db, rid)
        self.assertEqual(row["status"], r.status)
        self.assertEqual(row["error_kind"], "rate_limit")
        r, rid = self.send(self.chat, key="sk-not-a-command-code-key")
        self.assertEqual(ledger_row_for(self.db, rid)["status"], 401)

    def test_a_retry_is_counted_on_the_row(self):
        self.upstream.script(http_error(503, {"error": {"message": "busy"}}),
                             ok(text_parts("second time")))
        r, rid = self.send(self.chat)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(ledger_row_for(self.db, rid)["retries"], 1)

    def test_a_client_that_hangs_up_is_499_client_disconnected(self):
        for streamed in (True, False):
            with self.subTest(stream=streamed):
                self.upstream.script(dripped(100, 0.05))
                rid = "req-gone-" + uuid.uuid4().hex[:12]
                s = send_request(self.port, "chat", {
                    "model": "claude-sonnet-5", "stream": streamed,
                    "messages": [{"role": "user", "content": "hi"}]}, extra="X-Request-Id: %s\r\n" % rid)
                self.assertTrue(wait_for(self.upstream.generates, 5))
                if streamed:
                    self.assertIn(b" 200 ", read_until(s, b"\r\n\r\n"))
                s.close()
                row = ledger_row_for(self.db, rid)
                self.assertEqual((row["status"], row["error_kind"]), (499, "client_disconnected"))

    def test_no_prompt_answer_or_key_reaches_the_database_files(self):
        prompt = "PROMPT-SECRET-" + uuid.uuid4().hex
        answer = "ANSWER-SECRET-" + uuid.uuid4().hex
        key = "user_LEDGERKEY" + uuid.uuid4().hex[:12]
        self.upstream.script(ok(text_parts(answer)))
        r, rid = self.send(self.chat, key=key, stream=True,
                           messages=[{"role": "user", "content": prompt}])
        self.assertIn(answer.encode(), r.data)
        row = ledger_row_for(self.db, rid)
        self.assertNotIn(key[5:], json.dumps(row))
        stored = b"".join(ops_file_bytes(self.db + suffix) for suffix in ("", "-wal", "-shm")
                          if os.path.exists(self.db + suffix))
        self.assertIn(rid.encode(), stored)   # the rows are really in these bytes
        for secret in (prompt, answer, key, key[5:]):
            self.assertNotIn(secret.encode(), stored)

    def test_key_fingerprints_tell_keys_apart_and_survive_a_restart(self):
        rows = []
        for key in ("user_ALICE" + uuid.uuid4().hex[:8], "user_BOB" + uuid.uuid4().hex[:8]):
            self.upstream.script(ok(text_parts("hi")))
            r, rid = self.send(self.chat, key=key)
            rows.append((key, ledger_row_for(self.db, rid)["key_fp"]))
        self.assertNotEqual(rows[0][1], rows[1][1])
        again = proxy.UsageLedger(self.db, 90, proxy.Metrics())
        again.start()
        self.addCleanup(again.stop)
        self.assertEqual(again.fingerprint(rows[0][0]), rows[0][1])


class TestUsageLedgerRetentionAndFaults(unittest.TestCase):
    def setUp(self):
        self.dir = ledger_dir()
        self.upstream = fake_upstream(self.addCleanup)

    def serve(self, db):
        _, port = ops_start_server(self, usageDb=db, apiBase=self.upstream.url)
        return port

    def chat(self, port):
        self.upstream.script(ok(text_parts("fine")))
        return http_request(port, "POST", "/v1/chat/completions",
                            {"model": "claude-sonnet-5",
                             "messages": [{"role": "user", "content": "hi"}]},
                            {"Authorization": "Bearer " + KEY})

    def test_rows_older_than_the_retention_are_pruned_at_start(self):
        db = os.path.join(self.dir, "old.sqlite3")
        conn = proxy.open_ledger(db)
        row = dict.fromkeys(proxy.LEDGER_FIELDS)
        for age_days, rid in ((10, "old"), (1, "recent")):
            conn.execute(proxy._LEDGER_INSERT, tuple(dict(
                row, ts=time.time() - age_days * 86400, request_id=rid)[f]
                for f in proxy.LEDGER_FIELDS))
        conn.close()
        ledger = proxy.UsageLedger(db, 5, proxy.Metrics())
        ledger.start()
        ledger.stop()
        self.assertEqual([r["request_id"] for r in proxy.ledger_rows(db, 0)], ["recent"])

    def test_stop_writes_every_queued_row_before_it_returns(self):
        db = os.path.join(self.dir, "flush.sqlite3")
        ledger = proxy.UsageLedger(db, 90, proxy.Metrics())
        ledger.start()
        row = dict.fromkeys(proxy.LEDGER_FIELDS)
        for i in range(3000):
            ledger.record(dict(row, ts=time.time(), request_id="r%d" % i))
        ledger.stop()
        self.assertEqual(len(proxy.ledger_rows(db, 0)), 3000)
        self.assertEqual(ledger.dropped, 0)

    def test_a_full_queue_drops_rows_and_counts_them(self):
        metrics = proxy.Metrics()
        ledger = proxy.UsageLedger(os.path.join(self.dir, "full.sqlite3"), 90, metrics,
                                   queue_size=2)   # not started: nothing drains the queue
        for i in range(5):
            ledger.record(dict.fromkeys(proxy.LEDGER_FIELDS))
        self.assertEqual(ledger.dropped, 3)
        self.assertIn("ccproxy_usage_ledger_dropped_total 3", metrics.render())

    def test_a_locked_database_leaves_requests_unaffected_and_is_counted(self):
        db = os.path.join(self.dir, "locked.sqlite3")
        proxy.open_ledger(db).close()
        port = self.serve(db)
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        statuses = [self.chat(port).status for _ in range(5)]
        self.assertEqual(statuses, [200] * 5)
        self.assertLess(time.monotonic() - started, 5)   # not one waited for the lock
        metrics = lambda: parse_prometheus(http_request(port, "GET", "/metrics").data.decode())[0]
        self.assertTrue(wait_for(lambda: prom_value(
            metrics(), "ccproxy_usage_ledger_errors_total") >= 1, 10))
        locker.execute("ROLLBACK")
        locker.close()
        self.assertEqual(self.chat(port).status, 200)
        self.assertTrue(wait_for(lambda: len(proxy.ledger_rows(db, 0)) >= 1, 5))

    def test_a_read_only_or_corrupt_database_leaves_requests_unaffected(self):
        corrupt = os.path.join(self.dir, "corrupt.sqlite3")
        with open(corrupt, "wb") as f:
            f.write(b"this is not a database" * 100)
        # /proc is a read-only file system even for root: the database cannot be created there
        for db in ("/proc/cc-proxy-usage-%s.sqlite3" % uuid.uuid4().hex, corrupt):
            with self.subTest(db=db), self.assertLogs("cc-proxy", "WARNING") as logs:
                port = self.serve(db)
                self.assertEqual([self.chat(port).status for _ in range(3)], [200] * 3)
                wait_for(lambda: len(logs.records) >= 2, 5)
            self.assertTrue(any("usage ledger" in r.getMessage() for r in logs.records))


class TestUsageCommand(unittest.TestCase):
    def setUp(self):
        self.dir = ledger_dir()
        self.config = os.path.join(self.dir, "config.json")
        with open(self.config, "w") as f:
            json.dump({"usageDb": "ledger.sqlite3"}, f)   # relative: beside the config file
        conn = proxy.open_ledger(os.path.join(self.dir, "ledger.sqlite3"))
        base = dict.fromkeys(proxy.LEDGER_FIELDS, 0)
        base.update(error_kind=None, cost_usd=None, first_byte_ms=None, client="codex")
        rows = [dict(base, ts=time.time() - 60, client_model="gpt-5.5", status=200,
                     input_uncached=100, cache_read=300, output=10, total_ms=ms)
                for ms in (100, 200, 300)]
        rows.append(dict(base, ts=time.time() - 30, client_model="claude-sonnet-5", status=429,
                         error_kind="rate_limit", total_ms=5))
        rows.append(dict(base, ts=time.time() - 30 * 86400, client_model="old-model", status=200))
        for row in rows:
            conn.execute(proxy._LEDGER_INSERT, tuple(row[f] for f in proxy.LEDGER_FIELDS))
        conn.close()

    def test_json_groups_by_model_with_totals_cache_rate_errors_and_latency(self):
        done = ops_main(["usage", "--config", self.config, "--by", "model", "--json"])
        self.assertEqual(done.returncode, 0, done.stderr)
        report = json.loads(done.stdout)
        groups = {g["model"]: g for g in report["groups"]}
        self.assertEqual(set(groups), {"gpt-5.5", "claude-sonnet-5"})   # --since 7d by default
        gpt = groups["gpt-5.5"]
        self.assertEqual((gpt["requests"], gpt["errors"], gpt["input_uncached"], gpt["cache_read"],
                          gpt["output"]), (3, 0, 300, 900, 30))
        self.assertEqual(gpt["cache_hit_rate"], 0.75)
        self.assertEqual((gpt["p50_ms"], gpt["p95_ms"]), (200, 300))
        self.assertEqual(groups["claude-sonnet-5"]["errors"], 1)
        self.assertEqual(report["totals"]["requests"], 4)

    def test_table_has_one_line_per_group_and_a_total(self):
        done = ops_main(["usage", "--config", self.config, "--since", "60d", "--by", "model"])
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0].split()[:4], ["model", "requests", "errors", "input"])
        self.assertEqual([line.split()[0] for line in lines[1:]],
                         ["old-model", "gpt-5.5", "claude-sonnet-5", "total"])
        self.assertEqual(lines[-1].split()[1:3], ["5", "1"])
        self.assertIn("75.0%", lines[2])

    def test_bad_since_is_exit_2_and_an_empty_usage_db_says_the_ledger_is_off(self):
        done = ops_main(["usage", "--config", self.config, "--since", "yesterday"])
        self.assertEqual(done.returncode, 2)
        self.assertIn("24h", done.stderr)
        with open(self.config, "w") as f:
            json.dump({"usageDb": ""}, f)
        done = ops_main(["usage", "--config", self.config])
        self.assertEqual(done.returncode, 1)
        self.assertIn("off", done.stderr)


class TestDashboard(ProxyTestCase):
    db = os.path.join(ledger_dir(), "usage.sqlite3")
    proxy_overrides = {"usageDb": db, "corsOrigin": "*"}

    def get(self, path, headers=None):
        return http_request(self.port, "GET", path, None, dict({"Host": "127.0.0.1"},
                                                               **(headers or {})))

    def test_page_is_self_contained_html_without_cors_or_external_urls(self):
        r = self.get("/dashboard")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("content-type"), "text/html; charset=utf-8")
        page = r.data.decode()
        self.assertIn("<svg", page)
        self.assertIn("dashboard/data", page)
        self.assertIsNone(re.search(r"https?:|//[A-Za-z]|src=|@import", page))
        self.assertIn("default-src 'none'", r.header("content-security-policy"))
        self.assertIsNone(r.header("access-control-allow-origin"))
        self.assertIsNotNone(self.request("GET", "/v1/models").header(
            "access-control-allow-origin"))   # the API itself still speaks CORS

    def test_data_has_state_totals_series_and_the_last_requests_never_a_prompt(self):
        prompt = "DASH-PROMPT-" + uuid.uuid4().hex
        for _ in range(2):
            self.upstream.script(ok(text_parts("hi")))
            self.assertEqual(self.chat(messages=[{"role": "user", "content": prompt}]).status, 200)
        self.assertTrue(wait_for(lambda: len(proxy.ledger_rows(self.db, 0)) >= 2, 5))
        r = self.get("/dashboard/data?since=1h")
        self.assertEqual(r.status, 200, r)
        self.assertNotIn(prompt.encode(), r.data)
        self.assertNotIn(KEY.encode(), r.data)
        data = r.json()
        self.assertEqual((data["backend"], data["status"], data["version"]),
                         ("commandcode", "ok", proxy.__version__))
        self.assertIn("in_flight", data)
        ledger = data["ledger"]
        self.assertGreaterEqual(ledger["totals"]["requests"], 2)
        self.assertEqual(ledger["totals"]["cache_hit_rate"], round(7168 / 7400, 4))
        self.assertGreaterEqual(sum(m["requests"] for s in ledger["series"]
                                    for m in s["models"].values()), 2)
        self.assertEqual(ledger["models"][0]["model"], "claude-sonnet-5")
        self.assertEqual(set(ledger["recent"][0]), {
            "ts", "route", "client_model", "status", "error_kind", "stream", "input_uncached",
            "cache_read", "output", "first_byte_ms", "total_ms", "client"})
        self.assertEqual(self.get("/dashboard/data?since=soon").status, 400)

    def test_a_foreign_host_name_is_refused(self):   # DNS rebinding
        for host in ("evil.example", "evil.example:%d" % self.port):
            self.assertEqual(self.get("/dashboard", {"Host": host}).status, 403)
            self.assertEqual(self.get("/dashboard/data", {"Host": host}).status, 403)
        self.assertEqual(self.get("/dashboard", {"Host": "[::1"}).status, 403)
        self.assertEqual(self.get("/dashboard", {"Host": "localhost:%d" % self.port}).status, 200)
        # an address literal cannot be rebound: a LAN address of a 0.0.0.0 server is fine
        self.assertEqual(self.get("/dashboard", {"Host": "192.0.2.7:%d" % self.port}).status, 200)


class TestDashboardBehindAFrontProxy(ProxyTestCase):
    proxy_overrides = {"trustedProxies": "127.0.0.0/8"}

    def test_a_relayed_remote_client_is_not_loopback(self):
        r = http_request(self.port, "GET", "/dashboard", None, {"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(r.status, 403, r)
        self.assertIn("loopback", r.json()["error"]["message"])
        r = http_request(self.port, "GET", "/dashboard", None, {"X-Forwarded-For": "127.0.0.1"})
        self.assertEqual(r.status, 200, r)


class TestDashboardKey(ProxyTestCase):
    dashboard_key = "dash-" + uuid.uuid4().hex
    proxy_overrides = {"dashboardKey": dashboard_key}

    def test_even_loopback_needs_the_key_by_bearer_or_the_login_cookie(self):
        self.assertEqual(http_request(self.port, "GET", "/dashboard").status, 403)
        self.assertEqual(http_request(self.port, "GET", "/dashboard/data", None,
                                      {"Authorization": "Bearer wrong"}).status, 403)
        self.assertEqual(http_request(self.port, "GET", "/dashboard/data", None, {
            "Authorization": "Bearer " + self.dashboard_key}).status, 200)
        self.assertEqual(http_request(self.port, "GET", "/dashboard?key=wrong").status, 403)
        login = http_request(self.port, "GET", "/dashboard?key=" + self.dashboard_key)
        self.assertEqual(login.status, 303, login)
        self.assertEqual(login.header("location"), "/dashboard")
        cookie = login.header("set-cookie")
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)
        r = http_request(self.port, "GET", "/dashboard", None, {"Cookie": cookie.split(";")[0]})
        self.assertEqual(r.status, 200, r)
        self.assertNotIn(self.dashboard_key.encode(), r.data)


class TestUsageLedgerClaudeCode(ClaudeCodeCase):
    def test_a_claude_code_run_is_recorded_with_its_model_usage_and_cost(self):
        db = os.path.join(self.tmp, "usage.sqlite3")
        self.stop_server()
        self.start_server(usageDb=db)
        rid = "req-claude-ledger-" + uuid.uuid4().hex[:8]
        r = self.chat("cost?", headers={"X-Request-Id": rid, "User-Agent": "claude-cli/2.1.197"})
        self.assertEqual(r.status, 200, r)
        row = ledger_row_for(db, rid)
        self.assertIsNotNone(row)
        self.assertEqual((row["backend"], row["route"], row["status"], row["client"]),
                         ("claude-code", "chat", 200, "claude-cli"))
        self.assertAlmostEqual(row["cost_usd"], float(r.header("x-claude-cost-usd")), places=6)
        usage = r.json()["usage"]
        self.assertEqual(row["input_uncached"] + row["cache_read"] + row["cache_write"],
                         usage["prompt_tokens"])
        self.assertEqual(row["output"], usage["completion_tokens"])
        self.assertTrue(row["backend_model"].startswith("claude-"), row["backend_model"])


# =======================================================================================
# Token estimates calibrated from real usage
# =======================================================================================

class TestTokenCalibration(unittest.TestCase):
    def test_a_noisy_series_converges_within_ten_percent_after_twenty_requests(self):
        calibration = proxy.TokenCalibration()
        rng = random.Random(11)
        errors = []
        for _ in range(20):
            estimate = rng.randint(500, 50000)
            actual = int(estimate * 1.3 * rng.uniform(0.92, 1.08))
            errors.append(abs(estimate * calibration.factor("m") - actual) / actual)
            calibration.observe("m", estimate, actual)
        self.assertGreater(errors[0], 0.2)   # uncalibrated: ~30 % low
        self.assertLess(abs(calibration.factor("m") - 1.3) / 1.3, 0.10)
        self.assertEqual(calibration.factor("other-model"), 1.0)   # per model

    def test_outliers_are_bounded_and_tiny_requests_ignored(self):
        calibration = proxy.TokenCalibration()
        calibration.observe("m", 10, 1000)          # below MIN_ESTIMATE: says nothing
        self.assertEqual(calibration.factor("m"), 1.0)
        calibration.observe("m", 1000, 1000000)
        self.assertEqual(calibration.factor("m"), proxy.TokenCalibration.BOUNDS[1])


class TestTokenEstimatesFollowRealUsage(ProxyTestCase):
    body = {"model": "claude-sonnet-5", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "word " * 400}]}

    def start_usage(self, upstream_input):
        self.upstream.script(ok(text_parts("ok"), inp=upstream_input, cache_read=0,
                                cache_write=0))
        r = self.messages(stream=True, messages=self.body["messages"])
        self.assertEqual(r.status, 200, r)
        return r.typed_events()[0][1]["message"]["usage"]["input_tokens"]

    def test_message_start_input_tokens_move_to_what_command_code_counts(self):
        estimate = proxy.estimate_request_tokens(proxy.AnthropicMessages().decode(self.body, {}))
        self.assertGreater(estimate, proxy.TokenCalibration.MIN_ESTIMATE)
        counted = int(estimate * 1.6)   # what the upstream's tokenizer makes of the same prompt
        self.assertEqual(self.start_usage(counted), estimate)   # nothing learned yet
        for _ in range(3):
            self.start_usage(counted)
        self.assertLess(abs(self.start_usage(counted) - counted) / counted, 0.10)
        r = self.request("POST", "/v1/messages/count_tokens", dict(self.body, stream=False),
                         {"anthropic-version": "2023-06-01"}, key_header="x-api-key")
        self.assertLess(abs(r.json()["input_tokens"] - counted) / counted, 0.10)


class TestResponsesEncryptedReasoning(ProxyTestCase):
    """store: false clients (Codex) get reasoning back as our sealed encrypted_content."""

    def reason(self, **kw):
        self.upstream.script(ok(reasoning_parts("I should ", "list the files."),
                                text_parts("Listing.")))
        r = self.responses(input="list the files", store=False, **kw)
        self.assertEqual(r.status, 200, r)
        return r

    def test_reasoning_items_carry_a_token_only_when_asked(self):
        item = self.reason(include=["reasoning.encrypted_content"]).json()["output"][0]
        self.assertEqual(item["type"], "reasoning")
        self.assertTrue(item["encrypted_content"].startswith("ccr1."))
        self.assertNotIn("encrypted_content", self.reason().json()["output"][0])
        events = self.reason(include=["reasoning.encrypted_content"], stream=True).typed_events()
        done = [d["item"] for n, d in events if n == "response.output_item.done"]
        self.assertTrue(done[0]["encrypted_content"].startswith("ccr1."))

    def replayed(self, reasoning_item):
        self.upstream.reset()
        r = self.responses(store=False, input=[
            {"role": "user", "content": "list the files"}, reasoning_item,
            {"role": "assistant", "content": "Listing."}, {"role": "user", "content": "go on"}])
        self.assertEqual(r.status, 200, r)
        up = self.upstream_params()["messages"]
        return [c for m in up for c in m["content"] if c.get("type") == "reasoning"]

    def test_a_token_sent_back_replays_the_reasoning_even_without_its_summary(self):
        item = self.reason(include=["reasoning.encrypted_content"]).json()["output"][0]
        parts = self.replayed({"type": "reasoning", "summary": [],
                               "encrypted_content": item["encrypted_content"]})
        self.assertEqual([p["text"] for p in parts], ["I should list the files."])

    def test_a_forged_truncated_or_foreign_token_is_ignored_never_trusted(self):
        token = self.reason(include=["reasoning.encrypted_content"]).json()["output"][0][
            "encrypted_content"]
        foreign = proxy.ReasoningSeal().seal("injected thoughts", None)
        forged = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
        for bad in (forged, token[:len(token) // 2], foreign, "ccr1.!!!", "x" * 50, 7):
            with self.subTest(token=str(bad)[:20]):
                parts = self.replayed({"type": "reasoning", "encrypted_content": bad,
                                       "summary": [{"type": "summary_text", "text": "summary"}]})
                self.assertEqual([p["text"] for p in parts], ["summary"])   # as without a token

    def test_the_seal_keeps_a_signature_and_refuses_what_it_did_not_seal(self):
        seal = proxy.ReasoningSeal()
        self.assertEqual(seal.open(seal.seal("why", "sig-123")), ("why", "sig-123"))
        self.assertIsNone(proxy.ReasoningSeal().open(seal.seal("why", "sig-123")))
        incompressible = base64.b64encode(os.urandom(proxy.ReasoningSeal.MAX_BYTES)).decode()
        self.assertIsNone(seal.seal(incompressible, None))   # too big to travel: no token


# =======================================================================================
# Idle upstream connections are not kept past their use
# =======================================================================================

class TestHandlerThreadsAreKept(unittest.TestCase):
    """A client connection's thread waits for the next connection instead of exiting: starting
    one means waiting behind every busy thread for the GIL."""

    def test_connections_one_after_another_are_served_by_one_kept_thread(self):
        upstream = fake_upstream(self.addCleanup)
        server, port = ops_start_server(self, apiBase=upstream.url)
        threads = server.handler_threads
        for _ in range(6):   # a new connection each time
            self.assertEqual(http_request(port, "GET", "/health").status, 200)
            self.assertTrue(wait_for(lambda: threads.busy() == 0, 3))
        self.assertEqual(threads.count, 1)

    def test_a_burst_keeps_its_threads_and_the_next_burst_starts_none(self):
        upstream = fake_upstream(self.addCleanup, default_reply=lambda: dripped(3, 0.1))
        server, port = ops_start_server(self, apiBase=upstream.url)
        threads = server.handler_threads

        def burst(n):
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                return list(pool.map(lambda _: http_request(
                    port, "POST", "/v1/chat/completions",
                    {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}]},
                    {"Authorization": "Bearer " + KEY}).status, range(n)))
        self.assertEqual(burst(20), [200] * 20)
        self.assertTrue(wait_for(lambda: threads.busy() == 0, 3))
        kept = threads.count
        self.assertGreaterEqual(kept, 10)
        self.assertEqual(burst(kept), [200] * kept)
        self.assertTrue(wait_for(lambda: threads.busy() == 0, 3))
        self.assertEqual(threads.count, kept)

    def test_an_idle_thread_exits_after_its_idle_time_and_every_one_at_close(self):
        served = []
        gate = threading.Event()

        def serve(request, address):
            served.append(request)
            gate.wait(5)
        threads = proxy.HandlerThreads(serve, idle_seconds=0.2)
        for i in range(3):
            threads.submit(i, None)
        self.assertTrue(wait_for(lambda: len(served) == 3, 3))
        self.assertEqual((threads.count, threads.busy()), (3, 3))
        gate.set()
        self.assertTrue(wait_for(lambda: threads.count == 0, 3), threads.count)
        kept = proxy.HandlerThreads(serve, idle_seconds=60)
        kept.submit("a", None)
        self.assertTrue(wait_for(lambda: kept.busy() == 0, 3))
        self.assertEqual(kept.count, 1)
        kept.close()
        self.assertTrue(wait_for(lambda: kept.count == 0, 3))


class TestIdleUpstreamConnectionsAreReaped(unittest.TestCase):
    def burst(self, port, upstream, n=8, apart=0.05):
        upstream.default_reply = lambda: dripped(3, apart)   # long enough for n to overlap
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            statuses = list(pool.map(lambda _: http_request(
                port, "POST", "/v1/chat/completions",
                {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}]},
                {"Authorization": "Bearer " + KEY}).status, range(n)))
        self.assertEqual(statuses, [200] * n)

    def serve(self, **overrides):
        upstream = fake_upstream(self.addCleanup)
        server, port = ops_start_server(self, apiBase=upstream.url, **overrides)
        return server, port, upstream

    def test_after_a_burst_of_200_idle_connections_are_closed_and_fds_return_to_baseline(self):
        server, port, upstream = self.serve(upstreamIdleMs=1500, maxInFlight=256)
        http_request(port, "GET", "/health")
        baseline = res_fd_count()
        self.burst(port, upstream, n=200, apart=0.1)
        self.assertGreater(len(server.backend.pool.idle), 64)   # kept for reuse at first
        self.assertTrue(wait_for(lambda: not server.backend.pool.idle, 5))
        self.assertTrue(wait_for(lambda: res_fd_count() <= baseline, 3),
                        (res_fd_count(), baseline))

    def test_a_burst_leaves_every_connection_it_used_idle_and_the_next_burst_reuses_them(self):
        server, port, upstream = self.serve(maxInFlight=200)
        self.burst(port, upstream, n=80, apart=0.2)
        first = {r["client_port"] for r in upstream.generates()}
        self.assertGreater(len(first), 64)   # past the old fixed idle cap of 64
        self.assertEqual(len(server.backend.pool.idle), len(first))
        upstream.reset()
        self.burst(port, upstream, n=60, apart=0.2)
        self.assertLessEqual({r["client_port"] for r in upstream.generates()}, first)

    def test_a_pooled_connection_the_upstream_closed_before_the_reaper_saw_it_is_replaced(self):
        server, port, upstream = self.serve(upstreamIdleMs=60000, upstreamRetries=0)
        upstream.idle_timeout = 0.05   # the fake closes an idle keep-alive connection this soon
        ask = lambda: http_request(port, "POST", "/v1/chat/completions", {
            "model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}]},
            {"Authorization": "Bearer " + KEY})
        self.assertEqual(ask().status, 200)
        time.sleep(0.25)   # closed by now; the reaper looks again only after REAP_EVERY (1 s)
        self.assertEqual(len(server.backend.pool.idle), 1)
        r = ask()
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "Hello world")
        ports = [g["client_port"] for g in upstream.generates()]
        self.assertEqual(len(ports), 2)
        self.assertNotEqual(ports[0], ports[1])   # sent again on a new connection, not failed

    def test_a_connection_the_upstream_closed_is_closed_promptly_not_left_in_close_wait(self):
        server, port, upstream = self.serve(upstreamIdleMs=60000)
        upstream.idle_timeout = 0.2
        http_request(port, "GET", "/health")
        baseline = res_fd_count()
        self.burst(port, upstream)
        self.assertTrue(wait_for(lambda: not server.backend.pool.idle, 3),
                        len(server.backend.pool.idle))
        self.assertTrue(wait_for(lambda: res_fd_count() <= baseline, 3))
        self.burst(port, upstream)   # and the pool still serves afterwards


class TestOutOfRangeInputsAreRefusedNot500(ProxyTestCase):
    proxy_overrides = {"usageDb": os.path.join(ledger_dir(), "usage.sqlite3")}

    def test_unicode_digits_in_limit_a_long_dashboard_range_and_absurd_usage(self):
        r = self.request("GET", "/v1/models?limit=%C2%B2", key_header="x-api-key",
                         headers={"anthropic-version": "2023-06-01"})
        self.assertEqual(r.status, 400, r)
        r = http_request(self.port, "GET", "/dashboard/data?since=700d")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["ledger"]["bucket_s"], 604800)
        self.upstream.script(http_error(429, {"error": {"message": "slow"}},
                                        headers=[("Retry-After", "\u00b2")]))
        self.assertEqual(self.chat().status, 429)
        self.upstream.script(ok(text_parts("big"), inp=10 ** 19, cache_read=0, cache_write=0))
        rid = "req-absurd-" + uuid.uuid4().hex[:8]
        self.assertEqual(self.chat(headers={"X-Request-Id": rid}).status, 200)
        self.assertEqual(ledger_row_for(self.proxy_overrides["usageDb"], rid)["input_uncached"],
                         10 ** 12)   # bounded, and the writer lives on
