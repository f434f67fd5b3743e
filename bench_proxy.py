#!/usr/bin/env python3
"""bench_proxy.py: the cc-proxy benchmark (issue 7). Standard library only, loopback only, no pass/fail.

    python3 bench_proxy.py                        # fake Command Code upstream + proxy.py, print the table
    python3 bench_proxy.py --json figures.json    # also write the figures as JSON
    python3 bench_proxy.py --upstream-port 9100 --target http://127.0.0.1:8080
        # measure another proxy (it must already use CC_API_BASE=http://127.0.0.1:9100); --target-pid PID
        # adds its RSS
    python3 bench_proxy.py --backend claude-code  # proxy.py's claude-code backend with a fake `claude`
    python3 bench_proxy.py --profile /tmp/prof.out
        # proxy.py under a per-thread cProfile while it relays large streams; prints the top 25 by tottime

What it does: starts a fake Command Code upstream (POST /alpha/generate answered with precomputed NDJSON,
TCP_NODELAY, coalesced writes; or a "drip" stream written event by event over time, chunked) in a child
process, and proxy.py as another child process (so its RSS can be read from /proc), then measures with a
warm-up and interleaved rounds: first byte / first token / total time of short streamed and non-streamed chat
completions, direct to the upstream vs through the proxy (the difference is the latency the proxy adds);
relay throughput of a 20 000-event text stream; 50 and 200 concurrent streams; idle RSS; start-up time.

The upstream picks its answer from a marker in the request body: "bench:short", "bench:relay:<events>",
"bench:drip:<events>:<ms>"; any proxy that forwards the user message reaches the same answers.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPBACK = "127.0.0.1"
KEY = "user_bench0123456789abcdef"
now = time.perf_counter

# =====================================================================================
# Fake Command Code upstream (runs in its own process: --serve-upstream PORT)
# =====================================================================================

USAGE = {"inputTokens": 7400, "inputTokenDetails": {"noCacheTokens": 32, "cacheReadTokens": 7168,
                                                    "cacheWriteTokens": 200},
         "outputTokens": 12, "outputTokenDetails": {"textTokens": 12, "reasoningTokens": 0}, "totalTokens": 7412,
         "reasoningTokens": 0, "cachedInputTokens": 7168}
WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".\n", ' "quoted"', " café",
         " naïve", " 1234", " {x: 1}", " tab\there", " done", " with", " words", " é"]


def _line(event):
    return json.dumps(event).encode() + b"\n"   # default separators, as the real server (served_streams.ndjson)


def stream_head_events():
    return [{"type": "start"}, {"type": "start-step", "request": {}, "warnings": []},
            {"type": "text-start", "id": "txt-0"}]


def stream_tail_events():
    return [{"type": "text-end", "id": "txt-0"},
            {"type": "finish-step", "finishReason": "stop", "rawFinishReason": "end_turn", "usage": USAGE,
             "providerMetadata": {}, "response": {"id": "resp_bench", "modelId": "x",
                                                  "timestamp": "2026-11-21T00:00:00.000Z"}},
            {"type": "finish", "finishReason": "stop", "rawFinishReason": "end_turn", "totalUsage": USAGE}]


def relay_texts(n):
    return [WORDS[i % len(WORDS)] for i in range(n)]


def delta(text):
    return {"type": "text-delta", "id": "txt-0", "text": text}


SHORT_TEXTS = ["Hello", " from the bench upstream."]
HEAD_200 = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def framed_stream(body, piece=65536):
    """Status line, headers and the whole chunked body as one bytes object: one sendall."""
    return HEAD_200 + b"".join(chunk(body[i:i + piece]) for i in range(0, len(body), piece)) + b"0\r\n\r\n"


class Upstream:
    SCENARIO = re.compile(rb"bench:(short|relay|drip)(?::(\d+))?(?::(\d+))?")

    def __init__(self, port):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.cache = {}
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "generate": 0, "connections": 0}
        self.short = framed_stream(b"".join(map(_line, stream_head_events() + [delta(t) for t in SHORT_TEXTS]
                                                + stream_tail_events())))

    def serve(self):
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def answer(self, kind, n, ms):
        key = (kind, n)
        data = self.cache.get(key)
        if data is None:
            if kind == "relay":
                data = framed_stream(b"".join(map(_line, stream_head_events() + [delta(t) for t in relay_texts(n)]
                                                  + stream_tail_events())))
            else:  # drip: head, then one chunk per event, then the tail
                data = (HEAD_200 + chunk(b"".join(map(_line, stream_head_events()))),
                        [chunk(_line(delta(t))) for t in relay_texts(n)],
                        chunk(b"".join(map(_line, stream_tail_events()))) + b"0\r\n\r\n")
            with self.lock:
                if len(self.cache) > 16:
                    self.cache.clear()
                self.cache[key] = data
        return data

    def handle(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.stats["connections"] += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    body, buf = read_chunked_body(conn, buf)
                else:
                    length = int(headers.get(b"content-length") or 0)
                    while len(buf) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                with self.lock:
                    self.stats["requests"] += 1
                if method == b"POST" and path.split(b"?")[0].endswith(b"/alpha/generate"):
                    with self.lock:
                        self.stats["generate"] += 1
                    m = self.SCENARIO.search(body)
                    kind = m.group(1).decode() if m else "short"
                    if kind == "short":
                        conn.sendall(self.short)
                    elif kind == "relay":
                        conn.sendall(self.answer("relay", int(m.group(2) or 20000), 0))
                    else:
                        n, ms = int(m.group(2) or 20), int(m.group(3) or 10)
                        first, events, last = self.answer("drip", n, ms)
                        conn.sendall(first)
                        for piece in events:
                            time.sleep(ms / 1000)
                            conn.sendall(piece)
                        conn.sendall(last)
                elif path == b"/bench/stats":
                    with self.lock:
                        data = json.dumps(self.stats).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(data), data))
                else:
                    data = b'{"error":{"message":"not found in the bench upstream"}}'
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d"
                                 b"\r\n\r\n%s" % (len(data), data))
                if headers.get(b"connection", b"").lower() == b"close":
                    return
        except (OSError, ValueError):
            pass
        finally:
            conn.close()


def read_chunked_body(sock, buf):
    body = []
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(65536) or b"!"  # "!" makes a closed socket fail the int() below
        size_line, _, buf = buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(buf) < size + 2:
            data = sock.recv(65536)
            if not data:
                raise ValueError("closed")
            buf += data
        body.append(buf[:size])
        buf = buf[size + 2:]
        if size == 0:
            return b"".join(body), buf


def serve_upstream(port):
    upstream = Upstream(port)
    sys.stdout.write("%d\n" % upstream.port)
    sys.stdout.flush()
    try:
        upstream.serve()
    except KeyboardInterrupt:
        pass


# =====================================================================================
# Client: raw HTTP/1.1 over a kept-alive socket, timestamps at the first byte, a marker, the end
# =====================================================================================

class Result:
    __slots__ = ("status", "ttfb", "mark", "total", "nbytes", "body", "error")

    def __init__(self):
        self.status, self.ttfb, self.mark, self.total, self.nbytes, self.body, self.error = 0, None, None, None, 0, \
            None, None


class Client:
    RECV = 262144

    def __init__(self, host, port, timeout=60.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock = None

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self):
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method, path, body=b"", headers=b"", mark=None, keep_body=True):
        req = (b"%s %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
               % (method.encode(), path.encode(), self.host.encode(), self.port, len(body), headers, body))
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self._connect()
            try:
                return self._exchange(req, mark, keep_body)
            except _Stale:
                self.close()
                if fresh or attempt:
                    raise ConnectionError("connection closed before the response")

    def _recv(self):
        data = self.sock.recv(self.RECV)
        if not data:
            raise ConnectionError("connection closed mid-response")
        return data

    def _exchange(self, req, mark, keep_body):
        r = Result()
        sock = self.sock
        t0 = now()
        try:
            sock.sendall(req)
            data = sock.recv(self.RECV)
        except (ConnectionResetError, BrokenPipeError):
            raise _Stale() from None
        if not data:
            raise _Stale()
        r.ttfb = now() - t0
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        r.status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        parts = []
        if mark is not None and mark in rest:
            r.mark = now() - t0
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            buf, pos = rest, 0
            while True:
                j = buf.find(b"\r\n", pos)
                while j < 0:
                    more = self._recv()
                    if mark is not None and r.mark is None and mark in more:
                        r.mark = now() - t0
                    buf = buf[pos:] + more
                    pos = 0
                    j = buf.find(b"\r\n")
                size = int(buf[pos:j].split(b";")[0], 16)
                start = j + 2
                end = start + size + 2
                while len(buf) < end:
                    more = self._recv()
                    if mark is not None and r.mark is None and mark in more:
                        r.mark = now() - t0
                    buf = buf[pos:] + more
                    start -= pos
                    end -= pos
                    pos = 0
                if size == 0:
                    break
                if keep_body:
                    parts.append(buf[start:start + size])
                r.nbytes += size
                pos = end
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            got = len(rest)
            parts.append(rest)
            while got < length:
                more = self._recv()
                if mark is not None and r.mark is None and mark in more:
                    r.mark = now() - t0
                parts.append(more)
                got += len(more)
            r.nbytes = length
        else:  # until close
            parts.append(rest)
            while True:
                more = self.sock.recv(self.RECV)
                if not more:
                    break
                parts.append(more)
            self.close()
            r.nbytes = sum(map(len, parts))
        r.total = now() - t0
        if mark is not None and r.mark is None and r.status == 200:
            r.mark = r.total if mark in b"".join(parts) else None
        if keep_body:
            r.body = b"".join(parts)
        if headers.get(b"connection") == b"close":
            self.close()
        return r


class _Stale(Exception):
    pass


def get(host, port, path, timeout=2.0):
    c = Client(host, port, timeout)
    try:
        return c.request("GET", path)
    finally:
        c.close()


# =====================================================================================
# Processes: the upstream, the proxy, RSS
# =====================================================================================

PROXY_ENV_NAMES = ("PORT", "HOST", "BACKEND", "API_KEY", "TRUSTED_PROXIES", "CORS_ORIGIN", "LOG_LEVEL", "LOG_FILE",
                   "LOG_MAX_SIZE", "LOG_MAX_FILES", "MAX_BODY_BYTES", "MAX_IN_FLIGHT", "DEFAULT_MODEL", "MODEL_MAP",
                   "UPSTREAM_RETRIES", "CC_API_BASE", "PROJECT_SLUG", "CC_VERSION", "CC_USE_PROVIDER_MODELS",
                   "CC_MODEL_REFRESH_MS", "STREAM_IDLE_TIMEOUT_MS", "NON_STREAM_IDLE_TIMEOUT_MS",
                   "KEEPALIVE_INTERVAL_MS", "CLAUDE_PATH", "CLAUDE_WORKING_DIR", "CLAUDE_PERMISSION_MODE",
                   "CLAUDE_MAX_TURNS", "CLAUDE_TIMEOUT_MS", "CLAUDE_MAX_PROCESSES", "CLAUDE_ASK_WORKING_DIR",
                   "SESSION_TTL_MS", "SESSION_FILE", "CC_PROXY_CONFIG")


def free_port():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_upstream(port):
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream", str(port)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise SystemExit("bench: the fake upstream did not start (port %s in use?)" % port)
    return proc, int(line)


def stop(proc, sig=signal.SIGTERM, wait=10):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_status(pid):
    """VmRSS, VmHWM in MB (None when unreadable)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            text = f.read()
    except OSError:
        return None, None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line[:5]] = int(line.split()[1]) / 1024
    return values.get("VmRSS"), values.get("VmHWM")


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (None when unreadable)."""
    if not pid:
        return None
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak(pid):
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class RssSampler:
    def __init__(self, pid, every=0.01):
        self.pid, self.every, self.peak = pid, every, 0.0
        self.stop_event = threading.Event()
        self.reset = reset_peak(pid) if pid else False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop_event.is_set():
            rss, _ = read_status(self.pid)
            if rss:
                self.peak = max(self.peak, rss)
            self.stop_event.wait(self.every)

    def __enter__(self):
        if self.pid:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        if self.pid:
            self.thread.join()
            rss, hwm = read_status(self.pid)
            if self.reset and hwm:
                self.peak = max(self.peak, hwm)
        return False


class Proxy:
    """proxy.py started as a child process; `startup` is spawn -> first /health 200."""

    def __init__(self, proxy_path, port, env, args=(), prefix=(), workdir=None):
        self.port = port
        self.err = tempfile.TemporaryFile()
        argv = list(prefix) + [proxy_path, "start", "--port", str(port)] + list(args)
        t0 = now()
        self.proc = subprocess.Popen([sys.executable] + argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.err, cwd=workdir)
        self.startup = None
        deadline = t0 + 20
        while now() < deadline:
            if self.proc.poll() is not None:
                return
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.002)
                continue
            try:
                if get(LOOPBACK, port, "/health").status == 200:
                    self.startup = now() - t0
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.002)

    @property
    def pid(self):
        return self.proc.pid

    def stderr_tail(self, lines=6):
        self.err.seek(0)
        text = self.err.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def stop(self, sig=signal.SIGTERM):
        stop(self.proc, sig, wait=15)
        self.err.close()


def bench_ledger(args, on, upstream_port, tmp, log):
    """Added latency with the usage ledger on (the proxy measured above, usageDb beside its
    config) and off (a second proxy, USAGE_DB=""), in alternating blocks of rounds."""
    env = proxy_env(upstream_port, os.path.join(tmp, "no-config.json"), {"USAGE_DB": ""})
    proxy = Proxy(args.proxy, free_port(), env)
    try:
        off = Targets("http://%s:%d" % (LOOPBACK, proxy.port), upstream_port, args.model, on.auth)
        blocks = {"on": [], "off": []}
        for _ in range(3):
            for name, target in (("off", off), ("on", on)):
                blocks[name].append(bench_latency(target, args.ledger_rounds, 5, log))
        out = {}
        for name, runs in blocks.items():
            out[name] = {mode: {stat: statistics.median(r[mode]["added"]["first_byte"][stat]
                                                        for r in runs)
                                for stat in ("p50_ms", "p99_ms")}
                         for mode in ("stream", "plain")}
        return out
    finally:
        proxy.stop()


def proxy_env(upstream_port, config_path, extra=None):
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_NAMES}
    env.update({"CC_API_BASE": "http://%s:%d" % (LOOPBACK, upstream_port), "CC_VERSION": "1.64.0",
                "LOG_LEVEL": "error", "CC_USE_PROVIDER_MODELS": "false", "CC_PROXY_CONFIG": config_path,
                "MAX_IN_FLIGHT": "1000"})
    env.update(extra or {})
    return env


# =====================================================================================
# Figures
# =====================================================================================

def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(v):
    return None if v is None else round(v * 1000, 3)


def summary(values):
    return {"n": len(values), "p50_ms": ms(pct(values, 50)), "p99_ms": ms(pct(values, 99)),
            "mean_ms": ms(statistics.fmean(values)) if values else None}


class Targets:
    """Where requests go: the proxy's chat endpoint and the upstream's generate endpoint."""

    def __init__(self, proxy_url, upstream_port, model, auth):
        m = re.match(r"^http://([^/:]+)(?::(\d+))?(/.*)?$", proxy_url.rstrip("/"))
        if not m:
            raise SystemExit("bench: --target must be an http:// URL (loopback), got %r" % proxy_url)
        self.proxy_host, self.proxy_port = m.group(1), int(m.group(2) or 80)
        base = m.group(3) or ""
        self.chat_path = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.upstream_port = upstream_port
        self.pid = None   # the proxy's pid when known (CPU and RSS figures)
        self.model = model
        self.auth = auth

    def proxy_client(self, timeout=60.0):
        return Client(self.proxy_host, self.proxy_port, timeout)

    def upstream_client(self, timeout=60.0):
        return Client(LOOPBACK, self.upstream_port, timeout)

    def chat_body(self, marker, stream):
        return json.dumps({"model": self.model, "stream": stream,
                           "messages": [{"role": "user", "content": marker}]}).encode()

    def generate_body(self, marker):
        return json.dumps({"config": {"workingDir": "/workspace/bench", "environment": "linux"}, "memory": None,
                           "taste": None, "skills": None, "permissionMode": "standard", "threadId": "bench",
                           "params": {"model": self.model, "messages": [{"role": "user", "content": marker}],
                                      "tools": [], "system": "", "max_tokens": 1024, "stream": True}}).encode()

    def proxy_call(self, client, marker, stream, mark=None, keep_body=True):
        return client.request("POST", self.chat_path, self.chat_body(marker, stream), self.auth, mark, keep_body)

    def direct_call(self, client, marker, mark=None, keep_body=True):
        return client.request("POST", "/alpha/generate", self.generate_body(marker),
                              b"Authorization: Bearer " + KEY.encode() + b"\r\n", mark, keep_body)


def sse_events(body):
    """chat.completion.chunk SSE -> (data events, concatenated content text, [DONE] seen)."""
    events, text, done = 0, [], False
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        events += 1
        try:
            obj = json.loads(payload)
        except ValueError:
            continue
        for choice in obj.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                text.append(content)
    return events, "".join(text), done


def check_ok(r, marker_events=None):
    if r.error:
        return r.error
    if r.status != 200:
        return "HTTP %d %s" % (r.status, (r.body or b"")[:200].decode(errors="replace"))
    return None


def bench_latency(t, rounds, warmup, log):
    """Short answers: direct (upstream NDJSON) vs proxy streamed vs proxy non-streamed, interleaved."""
    direct_c, stream_c, plain_c = t.upstream_client(), t.proxy_client(), t.proxy_client()
    sample = {"direct": [], "stream": [], "plain": []}
    mark = b"Hello"
    errors = []
    steps = [("direct", lambda: t.direct_call(direct_c, "bench:short", mark)),
             ("stream", lambda: t.proxy_call(stream_c, "bench:short", True, mark)),
             ("direct", lambda: t.direct_call(direct_c, "bench:short", mark)),
             ("plain", lambda: t.proxy_call(plain_c, "bench:short", False, mark))]
    log("latency: %d warm-up + %d interleaved rounds" % (warmup, rounds))
    cpu0 = None
    for i in range(warmup + rounds):
        if i == warmup:
            cpu0 = cpu_seconds(t.pid)
        order = steps if i % 2 == 0 else steps[::-1]
        for name, call in order:
            try:
                r = call()
            except (OSError, ValueError) as e:
                errors.append("%s: %s" % (name, e))
                for c in (direct_c, stream_c, plain_c):
                    c.close()
                continue
            if r.status != 200:
                errors.append("%s: %s" % (name, check_ok(r)))
                continue
            if i >= warmup:
                sample[name].append(r)
    cpu1 = cpu_seconds(t.pid)
    for c in (direct_c, stream_c, plain_c):
        c.close()
    out = {"rounds": rounds, "warmup": warmup, "errors": len(errors), "first_errors": errors[:3],
           # what one short request costs the proxy (both kinds; the direct calls cost it nothing)
           "proxy_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / (2 * rounds), 3)
           if cpu0 is not None and cpu1 is not None and rounds else None}
    for name, results in sample.items():
        out[name] = {"first_byte": summary([r.ttfb for r in results]),
                     "first_token": summary([r.mark for r in results if r.mark is not None]),
                     "total": summary([r.total for r in results])}
    for name in ("stream", "plain"):
        added = {}
        for what in ("first_byte", "first_token", "total"):
            a, d = out[name][what], out["direct"][what]
            added[what] = {k: (round(a[k] - d[k], 3) if a[k] is not None and d[k] is not None else None)
                           for k in ("p50_ms", "p99_ms")}
        out[name]["added"] = added
    return out


def bench_relay(t, events, runs, log):
    marker = "bench:relay:%d" % events
    expect = "".join(relay_texts(events))
    out = {"events": events, "runs": runs}
    for name in ("direct", "proxy"):
        client = t.upstream_client(120) if name == "direct" else t.proxy_client(120)
        times, sizes, problems = [], [], []
        cpu = []
        for i in range(runs + 1):
            cpu0 = cpu_seconds(t.pid) if name == "proxy" else None
            try:
                if name == "direct":
                    r = t.direct_call(client, marker, keep_body=(i == 1))
                else:
                    r = t.proxy_call(client, marker, True, keep_body=(i == 1))
            except (OSError, ValueError) as e:
                problems.append(str(e))
                client.close()
                continue
            if r.status != 200:
                problems.append(check_ok(r))
                continue
            if i == 0:
                continue  # warm-up
            times.append(r.total)
            sizes.append(r.nbytes)
            if cpu0 is not None:
                cpu.append(cpu_seconds(t.pid) - cpu0)
            if i == 1:  # verify once, outside the timing
                if name == "proxy":
                    n, text, done = sse_events(r.body)
                    if text != expect or not done:
                        problems.append("content differs (%d chars of %d, [DONE] %s)" % (len(text), len(expect),
                                                                                         done))
                    out["proxy_sse_events"] = n
                else:
                    n = r.body.count(b'"text-delta"')
                    if n != events:
                        problems.append("direct stream had %d text-delta events" % n)
        client.close()
        if times:
            best = statistics.median(times)
            out[name] = {"median_s": round(best, 4), "min_s": round(min(times), 4),
                         "events_per_s": round(events / best), "best_events_per_s": round(events / min(times)),
                         "mb_per_s": round(statistics.median(sizes) / best / 1e6, 2),
                         "bytes": int(statistics.median(sizes)), "problems": problems[:3],
                         "proxy_cpu_us_per_event": round(sum(cpu) / (events * len(cpu)) * 1e6, 2) if cpu else None}
        else:
            out[name] = {"problems": problems[:3]}
        log("relay %s: %s" % (name, out[name]))
    return out


def bench_concurrency(t, n, drip_events, drip_ms, pid, log, direct=False):
    marker = "bench:drip:%d:%d" % (drip_events, drip_ms)
    expect = "".join(relay_texts(drip_events))
    results = [None] * n
    barrier = threading.Barrier(n + 1)

    def one(i):
        client = t.upstream_client(60) if direct else t.proxy_client(60)
        try:
            client._connect()
            barrier.wait(30)
            if direct:
                r = t.direct_call(client, marker)
            else:
                r = t.proxy_call(client, marker, True)
            problem = check_ok(r)
            if problem is None and not direct:
                _, text, done = sse_events(r.body)
                if text != expect or not done:
                    problem = "incomplete stream (%d of %d chars, [DONE] %s)" % (len(text), len(expect), done)
            if problem is None and direct and r.body.count(b'"text-delta"') != drip_events:
                problem = "incomplete direct stream"
            results[i] = (problem, r.total, r.ttfb)
        except (OSError, ValueError, threading.BrokenBarrierError) as e:
            results[i] = ("%s: %s" % (type(e).__name__, e), None, None)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    cpu0 = None if direct else cpu_seconds(pid)
    with RssSampler(None if direct else pid) as sampler:
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            pass
        t0 = now()
        for th in threads:
            th.join(max(0.1, 90 - (now() - t0)))
        wall = now() - t0
    cpu = round(cpu_seconds(pid) - cpu0, 2) if cpu0 is not None else None
    done = [r for r in results if r is not None]
    ok = [r for r in done if r[0] is None]
    problems = sorted({r[0] for r in done if r[0] is not None})
    out = {"streams": n, "ok": len(ok), "failed": n - len(ok), "wall_s": round(wall, 3),
           "total": summary([r[1] for r in ok]), "first_byte": summary([r[2] for r in ok]),
           "peak_rss_mb": round(sampler.peak, 1) if sampler.peak else None, "proxy_cpu_s": cpu,
           "problems": problems[:3]}
    log("concurrency %s %d: %s" % ("direct" if direct else "proxy", n, out))
    return out


def verify_target_reaches_upstream(t):
    before = json.loads(get(LOOPBACK, t.upstream_port, "/bench/stats").body)["generate"]
    c = t.proxy_client(10)
    try:
        r = t.proxy_call(c, "bench:short", True)
    except OSError as e:
        raise BenchAbort("cannot reach the target %s:%d (%s)" % (t.proxy_host, t.proxy_port, e)) from None
    finally:
        c.close()
    after = json.loads(get(LOOPBACK, t.upstream_port, "/bench/stats").body)["generate"]
    if r.status != 200:
        raise BenchAbort("the target answered HTTP %d: %s" % (r.status, (r.body or b"")[:300].decode(
            errors="replace")))
    if after <= before:
        raise BenchAbort("the target answered but never called the bench upstream on port %d; configure it "
                         "with that upstream (e.g. CC_API_BASE=http://127.0.0.1:%d)" % (t.upstream_port,
                                                                                         t.upstream_port))


# =====================================================================================
# Fake `claude` and the claude-code mode
# =====================================================================================

CLAUDE_SESSION = "b6dd4d32-8cd5-4d33-9a66-da9e463f85c0"
# A fake `claude` for bench_proxy.py: it sleeps CLAUDE_BENCH_START_MS (the real CLI 2.1.330 takes
# ~0.7-1.1 s before its first turn can start), then answers every stream-json user line on stdin
# with the lines of b_partial_messages.jsonl, keeping stdin open like the real CLI, until EOF.
FAKE_CLAUDE = r"""#!%(python)s
import os, sys, time
args = sys.argv[1:]
if "--version" in args or "-v" in args:
    print("2.1.330 (Claude Code)")
    sys.exit(0)
sid = "%(sid)s"
for flag in ("--session-id", "--resume", "-r"):
    if flag in args and args.index(flag) + 1 < len(args):
        sid = args[args.index(flag) + 1]
time.sleep(int(os.environ.get("CLAUDE_BENCH_START_MS") or 0) / 1000)
answer = %(lines)r.replace("$sid", sid).encode() + b"\n"
for line in sys.stdin.buffer:
    if line.startswith(b'{"type":"user"') or line.startswith(b'{"type": "user"'):
        sys.stdout.buffer.write(answer)
        sys.stdout.buffer.flush()
"""


def fake_claude_lines():
    s = "$sid"
    usage = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 13904,
             "output_tokens": 15}
    msg = {"id": "msg_bench01", "type": "message", "role": "assistant", "model": "claude-opus-4-8", "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1)}
    ev = lambda e: {"type": "stream_event", "event": e, "session_id": s, "parent_tool_use_id": None}
    texts = ["Hello!", " How can", " I help", " you today?"]
    lines = [{"type": "system", "subtype": "init", "cwd": "/tmp", "session_id": s, "tools": ["Bash", "Read"],
              "mcp_servers": [], "model": "claude-opus-4-8", "permissionMode": "default",
              "apiKeySource": "none", "claude_code_version": "2.1.197"},
             ev({"type": "message_start", "message": msg}),
             ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    lines += [ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": x}})
              for x in texts]
    lines += [{"type": "assistant", "message": dict(msg, content=[{"type": "text", "text": "".join(texts)}]),
               "parent_tool_use_id": None, "session_id": s},
              ev({"type": "content_block_stop", "index": 0}),
              ev({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                  "usage": usage}),
              ev({"type": "message_stop"}),
              {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 5, "duration_api_ms": 3,
               "num_turns": 1, "result": "".join(texts), "stop_reason": "end_turn", "session_id": s,
               "total_cost_usd": 0.0, "usage": usage, "permission_denials": [], "terminal_reason": "completed"}]
    return "\n".join(json.dumps(x, separators=(",", ":")) for x in lines)


def write_fake_claude(directory):
    path = os.path.join(directory, "claude")
    with open(path, "w") as f:
        f.write(FAKE_CLAUDE % {"python": sys.executable, "sid": CLAUDE_SESSION, "lines": fake_claude_lines()})
    os.chmod(path, 0o755)
    return path


CLAUDE_ARGS = ["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
               "--include-partial-messages", "--model", "sonnet", "--permission-mode", "default", "--max-turns", "25"]
CLAUDE_ANSWER = "Hello! How can I help you today?"

# How a conversation's turns find their CLI process, per proxy setting.
CLAUDE_MODES = (("cold", {"CLAUDE_WARM_PROCESSES": "0", "CLAUDE_SPARE_PROCESSES": "0"}),
                ("warm", {"CLAUDE_WARM_PROCESSES": "4", "CLAUDE_SPARE_PROCESSES": "0"}),
                ("spare", {"CLAUDE_WARM_PROCESSES": "4", "CLAUDE_SPARE_PROCESSES": "1"}))


def run_fake_claude_directly(path, workdir, env):
    line = json.dumps({"type": "user", "message": {"role": "user", "content": "hi"}}).encode() + b"\n"
    t0 = now()
    proc = subprocess.Popen([path] + CLAUDE_ARGS, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=workdir, env=env)
    proc.stdin.write(line)
    proc.stdin.close()
    first = None
    for out in proc.stdout:
        if first is None and b'"text_delta"' in out:
            first = now() - t0
    proc.wait()
    return first, now() - t0


def claude_turn_body(i, second):
    first = "conversation %d: hi" % i
    messages = [{"role": "user", "content": first}]
    if second:
        messages += [{"role": "assistant", "content": CLAUDE_ANSWER}, {"role": "user", "content": "and then?"}]
    return json.dumps({"model": "sonnet", "stream": True, "messages": messages}).encode()


def wait_for_spare(port, timeout=10.0):
    deadline = now() + timeout
    while now() < deadline:
        try:
            if json.loads(get(LOOPBACK, port, "/health").body).get("claudeSpare"):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return False


def bench_claude_mode(args, mode, settings, fake, tmp, workdir, log):
    """Conversations of two turns through proxy.py: time to the first text token and total."""
    port = free_port()
    api_key = "bench-proxy-key-0123456789"
    env = proxy_env(free_port(), os.path.join(tmp, "no-config.json"),
                    dict({"CLAUDE_PATH": fake, "API_KEY": api_key, "CLAUDE_WORKING_DIR": workdir,
                          "CLAUDE_ASK_WORKING_DIR": "false", "CLAUDE_MAX_PROCESSES": "4",
                          "CLAUDE_BENCH_START_MS": str(args.claude_start_ms)}, **settings))
    proxy = Proxy(args.proxy, port, env, ["--backend", "claude-code"], workdir=tmp)
    try:
        if proxy.startup is None:
            code = proxy.proc.poll()
            raise BenchAbort("proxy.py did not start with --backend claude-code (%s). Its stderr:\n%s" % (
                "exit code %s" % code if code is not None else "no /health answer in 20 s",
                proxy.stderr_tail() or "(empty)"))
        auth = b"Authorization: Bearer " + api_key.encode() + b"\r\n"
        client = Client(LOOPBACK, port, 30)
        turns, errors = {1: [], 2: []}, []
        log("claude-code %s: %d conversations" % (mode, args.claude_rounds))
        for i in range(args.claude_rounds):
            if mode == "spare":   # a new conversation arriving once the spare has had time to start
                if not wait_for_spare(port):
                    errors.append("no spare within 10 s")
                time.sleep(args.claude_start_ms / 1000 + 0.3)
            for turn in (1, 2):
                r = client.request("POST", "/v1/chat/completions", claude_turn_body(i, turn == 2), auth,
                                   b"Hello")
                if r.error or r.status != 200:
                    errors.append(r.error or "HTTP %d" % r.status)
                else:
                    turns[turn].append(r)
        client.close()
        figures = {"rss_mb": round(read_status(proxy.pid)[0] or 0, 1), "errors": len(errors),
                   "first_errors": errors[:3]}
        for turn, got in turns.items():
            figures["turn%d" % turn] = {"first_token": summary([r.mark for r in got if r.mark is not None]),
                                        "total": summary([r.total for r in got])}
        return figures
    finally:
        proxy.stop()


def bench_claude(args, log):
    tmp = tempfile.mkdtemp(prefix="bench-claude-")
    fake = write_fake_claude(tmp)
    workdir = os.path.join(tmp, "work")
    os.makedirs(workdir)
    figures = {"mode": "claude-code", "fake_claude": fake, "start_ms": args.claude_start_ms}
    try:
        env = dict(os.environ, CLAUDE_BENCH_START_MS=str(args.claude_start_ms))
        direct = [run_fake_claude_directly(fake, workdir, env) for _ in range(min(args.claude_rounds, 10))]
        figures["direct"] = {"first_token": summary([d[0] for d in direct if d[0] is not None]),
                             "total": summary([d[1] for d in direct])}
        for mode, settings in CLAUDE_MODES:
            figures[mode] = bench_claude_mode(args, mode, settings, fake, tmp, workdir, log)
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BenchAbort(Exception):
    pass


# =====================================================================================
# Profiling: proxy.py with a cProfile per thread (cProfile alone sees only the main thread)
# =====================================================================================

def profile_runner(out_path, script, argv):
    import cProfile
    import importlib.util
    import pstats
    profiles = []
    original_run = threading.Thread.run

    def run(self):
        prof = cProfile.Profile()
        entry = [prof, False]
        profiles.append(entry)
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()
            entry[1] = True

    threading.Thread.run = run
    main = cProfile.Profile()
    sys.argv = [script] + argv
    main.enable()
    try:  # imported, as `proxy.py start` runs itself (run as __main__ it would re-exec out of the profiler)
        spec = importlib.util.spec_from_file_location("proxy", script)
        module = sys.modules["proxy"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(argv)
    except SystemExit:
        pass
    finally:
        main.disable()
        stats = pstats.Stats(main)
        for prof, finished in list(profiles):
            if finished:
                stats.add(prof)
        stats.dump_stats(out_path)


def bench_profile(args, t, upstream_port, tmp, log):
    env = proxy_env(upstream_port, os.path.join(tmp, "no-config.json"))
    port = free_port()
    proxy = Proxy(args.proxy, port, env, prefix=[os.path.abspath(__file__), "--profile-runner", args.profile])
    if proxy.startup is None:
        raise BenchAbort("proxy.py did not start under the profiler:\n" + proxy.stderr_tail())
    t = Targets("http://%s:%d" % (LOOPBACK, port), upstream_port, args.model, t.auth)
    if args.profile_scenario == "relay":
        c = t.proxy_client(300)
        times = []
        for _ in range(args.profile_streams):
            r = t.proxy_call(c, "bench:relay:%d" % args.relay_events, True, keep_body=False)
            times.append(r.total)
        c.close()
        what = "%d streams of %d events, %.3f s each" % (len(times), args.relay_events, statistics.median(times))
    elif args.profile_scenario.startswith("short"):
        n = int(args.profile_scenario.split(":")[1]) if ":" in args.profile_scenario else 500
        c = t.proxy_client(30)
        times = [t.proxy_call(c, "bench:short", True).total for _ in range(n)]
        c.close()
        what = "%d sequential short streamed requests, p50 %.2f ms" % (n, statistics.median(times) * 1000)
    else:
        n = int(args.profile_scenario.split(":")[1]) if ":" in args.profile_scenario else 200
        row = bench_concurrency(t, n, args.drip_events, args.drip_ms, proxy.pid, log)
        what = "%d concurrent streams of %d events %d ms apart, %d ok, p50 %s ms" % (
            n, args.drip_events, args.drip_ms, row["ok"], row["total"]["p50_ms"])
    time.sleep(0.5)  # let the handler threads see the close and finish (their profiles are then complete)
    proxy.stop(signal.SIGINT)
    import pstats
    import io
    buf = io.StringIO()
    stats = pstats.Stats(args.profile, stream=buf)
    stats.sort_stats("tottime").print_stats(args.profile_top)
    print("\nprofile of proxy.py under cProfile (all threads; profiled, so slower than the figures above): %s; "
          "written to %s" % (what, args.profile))
    print(buf.getvalue().rstrip())


# =====================================================================================
# Table
# =====================================================================================

def fmt(v, unit="", digits=2):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return ("%." + str(digits) + "f%s") % (v, unit)
    return "%s%s" % (v, unit)


def signed(v):
    return "n/a" if v is None else "%+.2f" % v


def print_table(f, args):
    w = print
    lat = f.get("latency")
    w("")
    w("cc-proxy benchmark: %s" % f["subject"])
    w("python %s, %s CPUs, loopback; fake upstream %s" % (f["python"], f["cpus"], f["upstream"]))
    if lat:
        w("")
        w("Latency, short answers (2 text events): %d rounds after %d warm-up, direct and proxy interleaved, "
          "ms" % (lat["rounds"], lat["warmup"]))
        w("%-34s %9s %9s %9s %9s %9s %9s" % ("", "direct", "", "proxy", "", "added", ""))
        w("%-34s %9s %9s %9s %9s %9s %9s" % ("", "p50", "p99", "p50", "p99", "p50", "p99"))
        for name, label in (("stream", "stream=true "), ("plain", "stream=false")):
            for what, wl in (("first_byte", "first byte"), ("first_token", "first token"), ("total", "total")):
                d, p, a = lat["direct"][what], lat[name][what], lat[name]["added"][what]
                w("%-34s %9s %9s %9s %9s %9s %9s" % ("  %s  %s" % (label, wl), fmt(d["p50_ms"]), fmt(d["p99_ms"]),
                                                     fmt(p["p50_ms"]), fmt(p["p99_ms"]), signed(a["p50_ms"]),
                                                     signed(a["p99_ms"])))
        if lat.get("proxy_cpu_ms_per_request") is not None:
            w("  proxy CPU per request (user+system, both kinds)  %s ms"
              % fmt(lat["proxy_cpu_ms_per_request"], digits=3))
        if lat["errors"]:
            w("  errors: %d (%s)" % (lat["errors"], "; ".join(lat["first_errors"])))
    rel = f.get("relay")
    if rel:
        w("")
        w("Relay: one stream of %d text events, median of %d runs after 1 warm-up" % (rel["events"], rel["runs"]))
        w("%-34s %12s %9s %9s %12s %12s" % ("", "events/s", "MB/s", "s", "bytes", "CPU us/ev"))
        for name, label in (("direct", "  direct (upstream NDJSON)"), ("proxy", "  proxy (chat SSE, stream=true)")):
            x = rel[name]
            w("%-34s %12s %9s %9s %12s %12s" % (label, fmt(x.get("events_per_s")), fmt(x.get("mb_per_s")),
                                               fmt(x.get("median_s"), digits=3), fmt(x.get("bytes")),
                                               fmt(x.get("proxy_cpu_us_per_event"))))
            if x.get("problems"):
                w("    problems: %s" % "; ".join(x["problems"]))
    conc = f.get("concurrency")
    if conc:
        w("")
        w("Concurrent streams (each %d events, %d ms apart), ms" % (args.drip_events, args.drip_ms))
        w("%-34s %9s %9s %9s %9s %9s %12s %10s" % ("", "ok", "p50", "p99", "1st byte", "wall", "peak RSS MB",
                                                 "proxy CPU s"))
        for row in conc:
            w("%-34s %9s %9s %9s %9s %9s %12s %10s" % (
                "  %s %d" % (row["via"], row["streams"]), "%d/%d" % (row["ok"], row["streams"]),
                fmt(row["total"]["p50_ms"]), fmt(row["total"]["p99_ms"]), fmt(row["first_byte"]["p50_ms"]),
                fmt(row["wall_s"] * 1000, digits=0), fmt(row["peak_rss_mb"], digits=1), fmt(row["proxy_cpu_s"])))
            if row["problems"]:
                w("    problems: %s" % "; ".join(row["problems"]))
    load = f.get("load")
    if load:
        w("")
        w("Load: concurrent streams of %d events, %d ms apart, ms" % (args.load_events, args.load_ms))
        w("%-22s %8s %9s %9s %9s %9s %12s %10s" % ("", "ok", "p50", "p99", "1st p50", "1st p99",
                                                  "peak RSS MB", "proxy CPU s"))
        for row in load:
            w("%-22s %8s %9s %9s %9s %9s %12s %10s" % (
                "  %s %d" % (row["via"], row["streams"]), "%d/%d" % (row["ok"], row["streams"]),
                fmt(row["total"]["p50_ms"]), fmt(row["total"]["p99_ms"]),
                fmt(row["first_byte"]["p50_ms"]), fmt(row["first_byte"]["p99_ms"]),
                fmt(row["peak_rss_mb"], digits=1), fmt(row["proxy_cpu_s"])))
    ledger = f.get("ledger")
    if ledger:
        w("")
        w("Usage ledger on vs off: added first byte, ms (median of 3 alternating blocks)")
        w("%-34s %9s %9s %9s %9s" % ("", "stream p50", "p99", "plain p50", "p99"))
        for name in ("off", "on"):
            row = ledger[name]
            w("%-34s %9s %9s %9s %9s" % ("  ledger " + name, fmt(row["stream"]["p50_ms"]),
                                         fmt(row["stream"]["p99_ms"]), fmt(row["plain"]["p50_ms"]),
                                         fmt(row["plain"]["p99_ms"])))
    proc = f.get("process")
    if proc:
        w("")
        w("Process")
        w("  %-32s %s" % ("start-up (spawn -> /health 200)", "%s ms median of %d (min %s)" % (
            fmt(proc.get("startup_ms_median"), digits=0), len(proc.get("startup_ms") or []),
            fmt(proc.get("startup_ms_min"), digits=0)) if proc.get("startup_ms") else "n/a"))
        w("  %-32s %s MB" % ("RSS idle after start", fmt(proc.get("idle_rss_mb"), digits=1)))
        w("  %-32s %s MB" % ("RSS idle after the run", fmt(proc.get("rss_after_mb"), digits=1)))
        w("  %-32s %s MB" % ("peak RSS over the run (VmHWM)", fmt(proc.get("hwm_mb"), digits=1)))
    if lat or rel:
        w("")
        w("Issue 7 targets (reference only)")
        w("  %-44s %-16s %s" % ("figure", "measured", "target"))
        rows = []
        if lat:
            rows += [("added first byte, median (stream)", fmt(lat["stream"]["added"]["first_byte"]["p50_ms"], " ms"),
                      "<= 1 ms"),
                     ("added first byte, p99 (stream)", fmt(lat["stream"]["added"]["first_byte"]["p99_ms"], " ms"),
                      "<= 5 ms")]
        if rel:
            rows.append(("relay throughput", fmt(rel["proxy"].get("events_per_s"), " ev/s"), ">= 100000 ev/s"))
        if conc:
            big = [r for r in conc if r["via"] == "proxy"]
            if big:
                rows.append(("%d concurrent streams" % big[-1]["streams"], "%d/%d ok" % (big[-1]["ok"],
                                                                                       big[-1]["streams"]), "no error"))
                rows.append(("peak RSS at %d streams" % big[-1]["streams"], fmt(big[-1]["peak_rss_mb"], " MB", 1),
                             "<= 80 MB"))
        if proc:
            rows.append(("RSS idle", fmt(proc.get("idle_rss_mb"), " MB", 1), "<= 30 MB"))
        for row in rows:
            w("  %-44s %-16s %s" % row)
    rows = load_target_rows(f)
    if rows:
        w("")
        w("Issue 14 targets, proxy against direct in this run (reference only)")
        w("  %-44s %-16s %s" % ("figure", "measured", "target"))
        for row in rows:
            w("  %-44s %-16s %s" % row)
    w("")
    w("command: python3 bench_proxy.py%s" % (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""))


def load_target_rows(f):
    """The load targets as ratios and differences to direct, each pair from the same run."""
    def pair(section, n):
        rows = {r["via"]: r for r in f.get(section) or [] if r["streams"] == n}
        return (rows["proxy"], rows["direct"]) if len(rows) == 2 else (None, None)

    def ratio(a, b):
        return None if a is None or not b else a / b
    out = []
    proxy, direct = pair("load", 200)
    if proxy:
        out += [("N=200 completed", "%d/%d" % (proxy["ok"], proxy["streams"]), "all"),
                ("N=200 p99 total / direct p99",
                 fmt(ratio(proxy["total"]["p99_ms"], direct["total"]["p99_ms"]), "x"), "<= 1.25x"),
                ("N=200 first byte p50 - direct p50",
                 fmt(None if None in (proxy["first_byte"]["p50_ms"], direct["first_byte"]["p50_ms"])
                     else proxy["first_byte"]["p50_ms"] - direct["first_byte"]["p50_ms"], " ms", 1),
                 "<= 10 ms"),
                ("N=200 peak RSS", fmt(proxy["peak_rss_mb"], " MB", 1), "<= 60 MB")]
    for section, label in (("concurrency", "20 events 10 ms apart"), ("load", "50 events")):
        proxy, direct = pair(section, 50)
        if proxy:
            out.append(("N=50 (%s) p99 / direct" % label,
                        fmt(ratio(proxy["total"]["p99_ms"], direct["total"]["p99_ms"]), "x"),
                        "<= 1.1x"))
    lat, rel = f.get("latency"), f.get("relay")
    if lat:
        added = lat["stream"]["added"]["first_byte"]
        out += [("one stream: added first byte p50", fmt(added["p50_ms"], " ms"), "<= 0.8 ms"),
                ("one stream: added first byte p99", fmt(added["p99_ms"], " ms"), "<= 2 ms")]
    if rel:
        out += [("relay throughput", fmt(rel["proxy"].get("events_per_s"), " ev/s"),
                 ">= 400000 ev/s"),
                ("relay CPU per event", fmt(rel["proxy"].get("proxy_cpu_us_per_event"), " us"),
                 "<= 2.5 us")]
    return out


def print_claude_table(f):
    w = print
    w("")
    w("cc-proxy benchmark, claude-code backend with a fake `claude` that takes %d ms to start (%s)"
      % (f["start_ms"], f["fake_claude"]))
    w("python %s, %s CPUs, loopback; each conversation: turn 1, then turn 2 with the history" % (
        f["python"], f["cpus"]))
    w("%-44s %9s %9s" % ("ms", "p50", "p99"))
    rows = [("fake claude run directly: first text_delta", f["direct"]["first_token"]),
            ("fake claude run directly: exit", f["direct"]["total"])]
    for mode, _ in CLAUDE_MODES:
        for turn in ("turn1", "turn2"):
            rows.append(("%s: %s first token" % (mode, turn), f[mode][turn]["first_token"]))
            rows.append(("%s: %s total" % (mode, turn), f[mode][turn]["total"]))
    for label, s in rows:
        w("  %-42s %9s %9s" % (label, fmt(s["p50_ms"]), fmt(s["p99_ms"])))
    for mode, _ in CLAUDE_MODES:
        m = f[mode]
        w("  %s: RSS after %s MB, errors %d%s" % (mode, fmt(m.get("rss_mb"), digits=1), m.get("errors", 0),
                                                (" (%s)" % "; ".join(m["first_errors"])) if m.get("first_errors")
                                                else ""))
    w("  targets (real CLI): turn-2 first token <= 250 ms (warm), turn-1 first token with a spare <= 450 ms")
    w("")
    w("command: python3 bench_proxy.py %s" % " ".join(sys.argv[1:]))


# =====================================================================================
# Main
# =====================================================================================

def parse_args(argv):
    p = argparse.ArgumentParser(description="cc-proxy benchmark (issue 7): figures, no pass/fail.")
    p.add_argument("--target", help="measure this running proxy (http://host:port) instead of starting proxy.py")
    p.add_argument("--target-pid", type=int, help="with --target: its pid, to read RSS from /proc")
    p.add_argument("--upstream-port", type=int, default=0, help="port of the fake upstream (default: any free)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--backend", choices=("commandcode", "claude-code"), default="commandcode")
    p.add_argument("--proxy", default=os.path.join(HERE, "proxy.py"), help="proxy.py to start")
    p.add_argument("--model", default="claude-sonnet-4-6")
    p.add_argument("--rounds", type=int, default=300, help="latency rounds (each: 2 direct, 2 proxy requests)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--relay-events", type=int, default=20000)
    p.add_argument("--relay-runs", type=int, default=5)
    p.add_argument("--concurrency", default="50,200", help="comma-separated stream counts")
    p.add_argument("--load-streams", default="200",
                   help="comma-separated stream counts of the load scenario ('' skips it)")
    p.add_argument("--load-events", type=int, default=50)
    p.add_argument("--load-ms", type=int, default=20)
    p.add_argument("--drip-events", type=int, default=20)
    p.add_argument("--drip-ms", type=int, default=10)
    p.add_argument("--startups", type=int, default=3, help="start-up time samples")
    p.add_argument("--ledger-rounds", type=int, default=100,
                   help="latency rounds per block, usage ledger on vs off (0: skip)")
    p.add_argument("--claude-rounds", type=int, default=15, help="two-turn conversations per claude-code mode")
    p.add_argument("--claude-start-ms", type=int, default=700, help="the fake claude's start-up time")
    p.add_argument("--profile", metavar="FILE", help="after the figures, profile proxy.py relaying streams")
    p.add_argument("--profile-streams", type=int, default=3, help="relay streams sent to the profiled proxy")
    p.add_argument("--profile-scenario", default="relay", help="relay (default), short[:N] or concurrency[:N]")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile-runner", help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parse_args(argv)
    if args.serve_upstream is not None:
        return serve_upstream(args.serve_upstream)
    if args.profile_runner:
        return profile_runner(args.profile_runner, rest[0], rest[1:])
    if rest:
        raise SystemExit("bench: unknown arguments %s" % " ".join(rest))
    started = now()

    def log(message):
        if not args.quiet:
            print("[%5.1fs] %s" % (now() - started, message), file=sys.stderr, flush=True)

    base = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if args.backend == "claude-code":
        if args.target:
            raise SystemExit("bench: --target is not supported with --backend claude-code")
        try:
            figures = dict(base, **bench_claude(args, log))
        except BenchAbort as e:
            print("bench: claude-code mode unavailable: %s" % e, file=sys.stderr)
            return 2
        print_claude_table(figures)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(figures, fh, indent=2)
        return 0

    if args.target and not args.upstream_port:
        raise SystemExit("bench: --target needs --upstream-port N, and the target proxy must already be configured "
                         "to use http://127.0.0.1:N as its Command Code base URL (CC_API_BASE)")
    tmp = tempfile.mkdtemp(prefix="bench-proxy-")
    upstream, proxy = None, None
    try:
        upstream, upstream_port = start_upstream(args.upstream_port)
        log("fake upstream on http://%s:%d" % (LOOPBACK, upstream_port))
        auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        figures = dict(base, upstream="http://%s:%d" % (LOOPBACK, upstream_port))
        process = {}
        pid = None
        if args.target:
            t = Targets(args.target, upstream_port, args.model, auth)
            t.pid = args.target_pid
            verify_target_reaches_upstream(t)
            figures["subject"] = "target %s%s" % (args.target, " (pid %d)" % args.target_pid if args.target_pid
                                                  else "")
            pid = args.target_pid
            if pid:
                process["idle_rss_mb"] = round(read_status(pid)[0] or 0, 1)
        else:
            env = proxy_env(upstream_port, os.path.join(tmp, "no-config.json"))
            startups = []
            for i in range(max(1, args.startups)):
                port = free_port()
                proxy = Proxy(args.proxy, port, env)
                if proxy.startup is None:
                    raise BenchAbort("proxy.py did not answer /health (exit code %s):\n%s" % (
                        proxy.proc.poll(), proxy.stderr_tail()))
                startups.append(proxy.startup)
                if i < args.startups - 1:
                    proxy.stop()
                    proxy = None
            pid = proxy.pid
            process["startup_ms"] = [ms(s) for s in startups]
            process["startup_ms_median"] = ms(statistics.median(startups))
            process["startup_ms_min"] = ms(min(startups))
            time.sleep(1.0)
            process["idle_rss_mb"] = round(read_status(pid)[0] or 0, 1)
            log("proxy.py pid %d on port %d, start-up %s ms, idle RSS %s MB" % (
                pid, port, process["startup_ms_median"], process["idle_rss_mb"]))
            t = Targets("http://%s:%d" % (LOOPBACK, port), upstream_port, args.model, auth)
            t.pid = pid
            figures["subject"] = "%s (started by the bench) pid %d" % (os.path.relpath(args.proxy), pid)
        figures["latency"] = bench_latency(t, args.rounds, args.warmup, log)
        if not args.target and args.ledger_rounds:
            figures["ledger"] = bench_ledger(args, t, upstream_port, tmp, log)
        figures["relay"] = bench_relay(t, args.relay_events, args.relay_runs, log)
        figures["concurrency"] = []
        for n in [int(x) for x in args.concurrency.split(",") if x.strip()]:
            for via in ("direct", "proxy"):
                row = bench_concurrency(t, n, args.drip_events, args.drip_ms, pid, log, direct=(via == "direct"))
                row["via"] = via
                figures["concurrency"].append(row)
        figures["load"] = []   # issue 14's scenario: longer streams, events further apart
        for n in [int(x) for x in args.load_streams.split(",") if x.strip()]:
            for via in ("direct", "proxy"):
                row = bench_concurrency(t, n, args.load_events, args.load_ms, pid, log,
                                        direct=(via == "direct"))
                row["via"] = via
                figures["load"].append(row)
        if pid:
            time.sleep(1.0)
            rss, hwm = read_status(pid)
            process["rss_after_mb"] = round(rss, 1) if rss else None
            process["hwm_mb"] = max(round(hwm, 1), max([(r["peak_rss_mb"] or 0) for r in figures["concurrency"]], default=0)) \
                if hwm else None
        figures["process"] = process
        figures["elapsed_s"] = round(now() - started, 1)
        print_table(figures, args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(figures, fh, indent=2)
        if args.profile and not args.target:
            proxy.stop()
            proxy = None
            bench_profile(args, t, upstream_port, tmp, log)
        return 0
    except BenchAbort as e:
        print("bench: %s" % e, file=sys.stderr)
        return 2
    finally:
        if proxy is not None:
            proxy.stop()
        stop(upstream)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
