#!/usr/bin/env python3
"""A fake `claude` CLI for cc-proxy's tests: replays the verbatim captures of Claude Code 2.1.197
(captures/claude-cli/ beside this file, described in README.md) and records how it was run. The
long-lived ("warm") process behaviour, stdin control requests and the in-process "sdk" MCP client
follow the CLI 2.1.330 captures l_*.jsonl.

Controlled through environment variables named CLAUDE_FAKE_* (the proxy passes CLAUDE_* on):
  CLAUDE_FAKE_RECORD    append one JSON line per event here (every line has event, pid, time):
                          start     argv, cwd, env, stdin (all stdin text up to and including the
                                    first user line), scenario (of the first turn); a process
                                    given no user line within 0.5 s of start-up (a spare) writes
                                    it then, with the stdin so far, scenario null and spare true
                          turn      n (1-based), stdin (that user line), scenario
                          mcp_tools server, status ("connected"/"failed"), tools (the tools/list
                                    objects), names (their names); once per sdk server, at start-up
                          initialize request_id    (an `initialize` control request was answered)
                          interrupt request_id, turn (its number, null between turns), ignored
                          control_request subtype, request_id    (unsupported: answered with an error)
                          tool_result id (the tool_use id), result (the MCP tools/call result)
                          late_response request_id    (the answer to an abandoned tools/call)
                          hanging, grandchild (child), signal (signal), end (rc[, orphaned])
  CLAUDE_FAKE_STATE     directory remembering sessions (--session-id creates, --resume needs one, per cwd)
  CLAUDE_FAKE_SCENARIO  default scenario (else "echo")
  CLAUDE_FAKE_CAPTURES  capture directory (default captures/claude-cli beside this file)
  CLAUDE_FAKE_DELAY     seconds between output lines
  CLAUDE_FAKE_STAY_ORPHANED=1  a hanging run keeps going when its parent dies (else it leaves; 20 s at most)
A prompt containing `scenario:<name>` picks the scenario for its turn (the last one wins);
`call:<tool>` markers name the client tools the `client_tool` scenario calls.

Scenarios: echo (answers "ECHO: <prompt>"), text, thinking, tool, cut, sse_overloaded, max_turns,
max_tokens, 400, 401, 403, 404, 429, 500, 529, nocreds, refused, malformed, crash, noresult,
usage_error, slow, hang, stall, stubborn, grandchild, hidden_tool_call, deaf (hangs, ignores stdin interrupts, obeys
signals), client_tool (calls the sdk MCP tools named by `call:` markers: after a text block
"I'll run that for you.", one tool_use block per marker i = 0, 1, ... in one assistant message,
id toolu_fake_<pid>_<turn>_<i>, name mcp__<server>__<tool>, input {"q": "<tool> <i>"}; then one
tools/call at a time, each answer printed as a tool_result user line, and a second message
"Tool results: <t1> | <t2>" (a result's text, "error: <text>" for isError); a tool that
tools/list did not offer gets the text answer "no such tool <tool>"), exit_after_result
(answers like echo, then exits 0 although stdin is open).

With --input-format stream-json stdin is read line by line: each `user` line is one turn (its own
system/init ... result, same session id); it waits for the next one and exits once stdin is closed
and the turn is done, with the last turn's exit code. A control_request `initialize` gets a small
control_response; `interrupt` ends a running turn (control_response, the partial assistant block,
"[Request interrupted by user]", an error_during_execution result, exit code 1 if it was the last
turn) and the process keeps serving. `--mcp-config` servers of type "sdk" are connected over
stdout/stdin at start-up (mcp_message control requests: initialize, notifications/initialized,
tools/list) and their tools are listed in system/init as mcp__<server>__<tool>. On SIGINT during a
turn it prints an interruption note and a clean result and exits 0, on SIGTERM it dies with 143
("stubborn" ignores both signals and interrupts).
"""

import collections
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

CAPTURES = os.environ.get("CLAUDE_FAKE_CAPTURES", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "captures", "claude-cli"))
RECORD = os.environ.get("CLAUDE_FAKE_RECORD")
STATE = os.environ.get("CLAUDE_FAKE_STATE")
ALIASES = {"sonnet": "claude-sonnet-5", "opus": "claude-opus-4-8", "haiku": "claude-haiku-4-5-20251001",
           "fable": "claude-fable-5"}
DEFAULT_SESSION = "00000000-0000-4000-8000-000000000000"
SPARE_AFTER = 0.5   # no user line this long after start-up: the start record is written without one
VERSION = "2.1.197"

REPLAY = {  # scenario -> (capture, exit code)
    "text": ("b_partial_messages.jsonl", 0),
    "thinking": ("d_thinking_partial_messages.jsonl", 0),
    "tool": ("e_bash_bypass_partial_messages.jsonl", 0),
    "cut": ("j_stream_cut_midway.jsonl", 0),
    "sse_overloaded": ("j_sse_error_event_overloaded.jsonl", 0),
    "max_turns": ("e_max_turns_1.jsonl", 1),
    "max_tokens": ("d_stop_reason_max_tokens.jsonl", 1),
    "400": ("j_error_400_prompt_too_long.jsonl", 1),
    "401": ("j_error_401_stream_json.jsonl", 1),
    "403": ("j_error_403_retries_2.jsonl", 1),
    "404": ("j_error_404_model_not_found.jsonl", 1),
    "429": ("j_error_429_stream_json.jsonl", 1),
    "500": ("j_error_500_stream_json.jsonl", 1),
    "529": ("j_error_529_stream_json.jsonl", 1),
    "nocreds": ("j_no_credentials.jsonl", 1),
    "refused": ("j_connection_refused.jsonl", 1),
    "malformed": ("j_malformed_json_body.jsonl", 1),
}
HANGING = ("hang", "stubborn", "stall", "grandchild", "deaf")
DEAF = ("deaf", "stubborn")   # no answer to a stdin interrupt while they run
SUMMED = ("inputTokens", "outputTokens", "cacheReadInputTokens", "cacheCreationInputTokens", "webSearchRequests",
          "costUSD", "thinkingTokens", "cacheCreationEphemeral5mInputTokens", "cacheCreationEphemeral1hInputTokens")


def record(event, **fields):
    if not RECORD:
        return
    fields.update(event=event, pid=os.getpid(), time=time.time())
    data = (json.dumps(fields) + "\n").encode()
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def option(argv, name):
    if name in argv:
        i = argv.index(name)
        return argv[i + 1] if i + 1 < len(argv) else ""
    return None


def load(capture):
    with open(os.path.join(CAPTURES, capture), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_330(capture):
    """An l_* capture (CLI 2.1.330, default model claude-opus-5-5) with the model names of the 2.1.197
    captures (modelUsage key claude-opus-4-8[1m], else claude-opus-4-8), so that --model substitution
    and the warm process's usage totals treat both alike."""
    with open(os.path.join(CAPTURES, capture), encoding="utf-8") as f:
        return [json.loads(line.replace('"claude-opus-5-5":', '"claude-opus-4-8[1m]":')
                           .replace("claude-opus-5-5", "claude-opus-4-8")) for line in f if line.strip()]


def copy(item):
    return json.loads(json.dumps(item))


def original_session(lines):
    for item in lines:
        if item.get("session_id"):
            return item["session_id"]
    return None


def thirds(text):
    third = max(1, len(text) // 3)
    return [c for c in (text[:third], text[third:2 * third], text[2 * third:]) if c]


def write_line(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Output:
    def __init__(self, session_id, model):
        self.session_id = session_id
        self.model = model
        self.turn = 1
        self.on_init = None

    def emit(self, item, original=None):
        line = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
        if original and self.session_id:
            line = line.replace(original, self.session_id)
        if self.model:
            line = line.replace("claude-opus-4-8", self.model)
        if '"subtype":"init"' in line:
            item = json.loads(line)
            item["cwd"] = os.getcwd()
            if self.on_init:
                self.on_init(item)
            line = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
        if self.turn > 1:   # a warm process's later turns: the real CLI's message ids differ per turn
            line = re.sub(r'"(msg_[0-9A-Za-z]+)"', r'"\1_t%d"' % self.turn, line)
        write_line(line)


def echo_lines(answer):
    """b_partial_messages.jsonl with its answer replaced by `answer`, streamed in three deltas."""
    lines = load("b_partial_messages.jsonl")
    out, done = [], False
    for item in lines:
        event = item.get("event") or {}
        if item["type"] == "stream_event" and event.get("type") == "content_block_delta":
            if not done:
                for chunk in thirds(answer):
                    copied = copy(item)
                    copied["event"]["delta"]["text"] = chunk
                    out.append(copied)
                done = True
            continue
        if item["type"] == "assistant":
            item["message"]["content"][0]["text"] = answer
        if item["type"] == "result":
            item["result"] = answer
        out.append(item)
    return out


def sessions_file():
    return os.path.join(STATE, "sessions.json") if STATE else None


def read_sessions():
    path = sessions_file()
    try:
        with open(path) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return {}


def write_sessions(data):
    path = sessions_file()
    if path:
        tmp = path + ".%d" % os.getpid()
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)


def finish(rc, **fields):
    record("end", rc=rc, **fields)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:   # a closed pipe, or a signal that came in during a write
            pass
    os._exit(rc)


class Interrupted(Exception):
    """A stdin interrupt arrived during the turn."""


EMPTY = object()


class Stdin:
    """stdin read on a thread, one line at a time (None at EOF). Raw reads on fd 0, so that a reader
    still blocked at exit cannot trip over the buffered sys.stdin's lock."""

    def __init__(self):
        self.queue = queue.Queue()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(0, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.queue.put((line + b"\n").decode("utf-8", "replace"))
        if buf:
            self.queue.put(buf.decode("utf-8", "replace"))
        self.queue.put(None)

    def get(self, timeout):
        try:
            return self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return EMPTY


def read_all_stdin():
    chunks = []
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(chunk)


class Fake:
    def __init__(self, argv):
        self.argv = argv
        self.delay = float(os.environ.get("CLAUDE_FAKE_DELAY") or 0)
        self.turn_delay = self.delay
        model = option(argv, "--model")
        self.model = ALIASES.get(model, model) if model else None
        self.resume, self.new_id = option(argv, "--resume"), option(argv, "--session-id")
        self.session_id = self.resume or self.new_id or DEFAULT_SESSION
        self.out = Output(self.session_id, self.model)
        self.out.on_init = self.init_line
        self.stdin = None
        self.eof = False
        self.valid = False          # a JSON line arrived
        self.seen_user = False
        self.received = []          # stdin text up to and including the first user line
        self.users = collections.deque()   # user lines waiting for their turn
        self.responses = {}         # request_id -> control_response.response, for our control requests
        self.waiting = set()        # request ids of our unanswered control requests
        self.abandoned = set()      # tools/call requests an interrupt gave up on
        self.turn = 0
        self.started = False        # the start record is written
        self.in_turn = False
        self.scenario = None        # of the running (or last) turn
        self.interrupt = None
        self.sigint = False
        self.rc = 0
        self.servers = collections.OrderedDict()   # sdk MCP servers: name -> {status, tools, next_id}
        self.usage_total, self.cost_total, self.results = {}, 0.0, 0
        self.reset_stream()

    # ---- output ---------------------------------------------------------------------------
    def reset_stream(self):
        self.msg, self.block, self.next_index, self.said_init = None, None, 0, False

    def track(self, item):
        """What of the current message is open: the interrupt tail closes it as the CLI does."""
        kind = item.get("type")
        if kind == "system" and item.get("subtype") == "init":
            self.said_init = True
        elif kind == "assistant" and self.block:
            self.block["said"] = True
        elif kind == "stream_event":
            event = item.get("event") or {}
            etype = event.get("type")
            if etype == "message_start":
                self.msg, self.block, self.next_index = event.get("message"), None, 0
            elif etype == "content_block_start":
                block = event.get("content_block") or {}
                self.block = {"index": event.get("index", 0), "type": block.get("type"), "text": "", "said": False}
                self.next_index = event.get("index", 0) + 1
            elif etype == "content_block_delta" and self.block:
                delta = event.get("delta") or {}
                self.block["text"] += delta.get("text") or delta.get("thinking") or ""
            elif etype == "content_block_stop":
                self.block = None
            elif etype == "message_stop":
                self.msg, self.block = None, None

    def account(self, result):
        """Like CLI 2.1.330 in a warm process: modelUsage and total_cost_usd of a later result add up
        everything since the process started; model_usage_since_last_result holds this turn's share."""
        turn_usage = result.get("modelUsage") or {}
        if self.results:
            total = copy(self.usage_total)
            for name, usage in turn_usage.items():
                if name not in total:
                    total[name] = copy(usage)
                    continue
                for key, value in usage.items():
                    if key in SUMMED and isinstance(value, (int, float)):
                        total[name][key] = total[name].get(key, 0) + value
                    else:
                        total[name][key] = value
            result["modelUsage"] = total
            result["total_cost_usd"] = self.cost_total + (result.get("total_cost_usd") or 0)
            result["model_usage_since_last_result"] = turn_usage
            if "result_index" in result:
                result["result_index"] = self.results
        self.usage_total = copy(result.get("modelUsage") or {})
        self.cost_total = result.get("total_cost_usd") or 0
        self.results += 1

    def say(self, item, original=None):
        """One output line of a turn, paced; a stdin interrupt that came in before it ends the turn."""
        self.pump(0)
        self.check()
        self.track(item)
        if item.get("type") == "result":
            self.account(item)
        self.out.emit(item, original)
        if self.turn_delay:
            self.wait(self.turn_delay)

    def send(self, item):
        write_line(json.dumps(item, ensure_ascii=False, separators=(",", ":")))

    def init_line(self, item):
        if not self.servers:
            return
        names = ["mcp__%s__%s" % (name, tool.get("name")) for name, server in self.servers.items()
                 for tool in server["tools"]]
        item["tools"] = names if option(self.argv, "--tools") == "" else list(item.get("tools") or []) + names
        item["mcp_servers"] = [{"name": name, "status": server["status"], "source": "sdk"}
                               for name, server in self.servers.items()]

    # ---- stdin ----------------------------------------------------------------------------
    def pump(self, timeout=0):
        """Handle what stdin brought within `timeout` seconds (0: only what is there already)."""
        if self.stdin:
            item = self.stdin.get(timeout)
        else:   # a plain-text prompt: stdin was read to its end already
            item = EMPTY
            time.sleep(timeout)
        while item is not EMPTY:
            self.handle(item)
            item = self.stdin.get(0)
        if self.sigint:
            if self.in_turn:
                self.sigint_exit()
            finish(0)   # the turn had just ended: nothing more to say

    def check(self):
        if self.in_turn and self.interrupt:
            raise Interrupted()

    def wait(self, seconds):
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.pump(min(left, 0.05))

    def handle(self, raw):
        if raw is None:
            self.eof = True
            return
        if not self.seen_user:
            self.received.append(raw)
        text = raw.strip()
        if not text:
            return
        try:
            item = json.loads(text)
        except ValueError:
            if not self.valid:
                sys.stderr.write("Error: stdin is not stream-json\n")
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(1)
            sys.stderr.write("Could not parse message into JSON: %s\n" % text)
            sys.stderr.flush()
            return
        self.valid = True
        if not isinstance(item, dict):
            return
        kind = item.get("type")
        if kind == "user":
            self.seen_user = True
            self.users.append((raw, item))
        elif kind == "control_request":
            self.control(item)
        elif kind == "control_response":
            response = item.get("response") or {}
            rid = response.get("request_id")
            if rid in self.abandoned:
                self.abandoned.discard(rid)
                record("late_response", request_id=rid)
            elif rid in self.waiting:
                self.responses[rid] = response

    def control(self, item):
        rid = item.get("request_id")
        request = item.get("request") or {}
        subtype = request.get("subtype")
        if subtype == "interrupt":
            if self.in_turn and self.scenario in DEAF:
                record("interrupt", request_id=rid, turn=self.turn, ignored=True)
                return
            record("interrupt", request_id=rid, turn=self.turn if self.in_turn else None, ignored=False)
            self.send({"type": "control_response", "response": {"subtype": "success", "request_id": rid,
                                                                 "response": {"still_queued": []}}})
            if self.in_turn:
                self.interrupt = rid
        elif subtype == "initialize":
            record("initialize", request_id=rid)
            self.send({"type": "control_response", "response": {"subtype": "success", "request_id": rid, "response": {
                "commands": [], "agents": [], "output_style": "default",
                "available_output_styles": ["default", "Explanatory", "Learning"], "models": [],
                "account": {"tokenSource": "none",
                            "apiKeySource": "ANTHROPIC_API_KEY" if os.environ.get("ANTHROPIC_API_KEY") else "none",
                            "apiProvider": "firstParty"},
                "pid": os.getpid(), "claude_code_version": VERSION,
                "current_permission_mode": option(self.argv, "--permission-mode") or "default",
                "fast_mode_state": "off"}}})
        else:
            record("control_request", subtype=subtype, request_id=rid)
            self.send({"type": "control_response", "response": {
                "subtype": "error", "request_id": rid, "error": "Unsupported control request subtype: %s" % subtype}})

    # ---- signals --------------------------------------------------------------------------
    def on_signal(self, signum, frame):
        record("signal", signal=signal.Signals(signum).name)
        if self.scenario == "stubborn":
            return
        if signum == signal.SIGINT and self.in_turn:
            self.sigint = True   # the main thread prints the note and the result at its next step
            return
        finish(0 if signum == signal.SIGINT else 143)

    def sigint_exit(self):
        """Like the CLI: an interruption note and a clean result, exit 0."""
        self.out.emit({"type": "user", "message": {"role": "user", "content": [
            {"type": "text", "text": "[Request interrupted by user]"}]}, "session_id": self.session_id})
        self.out.emit({"type": "result", "subtype": "error_during_execution", "is_error": True, "num_turns": 1,
                       "session_id": self.session_id, "terminal_reason": "aborted_streaming", "modelUsage": {},
                       "errors": ["[ede_diagnostic] result_type=user"]})
        finish(0)

    # ---- sdk MCP servers ------------------------------------------------------------------
    def connect_servers(self):
        spec = option(self.argv, "--mcp-config")
        if spec is None:
            return
        try:
            if spec.lstrip().startswith("{"):
                config = json.loads(spec)
            else:
                with open(spec) as f:
                    config = json.load(f)
        except (OSError, ValueError):
            sys.stderr.write("Error: Invalid MCP configuration: %s\n" % spec)
            return
        for name, entry in (config.get("mcpServers") or {}).items():
            if isinstance(entry, dict) and entry.get("type") == "sdk":
                self.servers[name] = {"status": "pending", "tools": [], "next_id": 0}
        template = load_330("l_sdk_mcp_tool_call.jsonl")[0]["request"]["message"]["params"]
        for name, server in self.servers.items():
            status, tools = "failed", []
            reply = self.mcp(name, {"method": "initialize", "params": copy(template), "jsonrpc": "2.0",
                                    "id": self.next_id(name)})
            if reply is not None and "result" in reply:
                self.mcp(name, {"jsonrpc": "2.0", "method": "notifications/initialized"})
                reply = self.mcp(name, {"method": "tools/list", "jsonrpc": "2.0", "id": self.next_id(name)})
                if reply is not None and isinstance(reply.get("result"), dict):
                    status = "connected"
                    tools = [t for t in reply["result"].get("tools") or [] if isinstance(t, dict) and t.get("name")]
            server["status"], server["tools"] = status, tools
            record("mcp_tools", server=name, status=status, tools=tools, names=[t["name"] for t in tools])

    def next_id(self, name):
        server = self.servers[name]
        server["next_id"] += 1
        return server["next_id"] - 1

    def mcp_request(self, name, message):
        rid = str(uuid.uuid4())
        self.waiting.add(rid)
        self.send({"type": "control_request", "request_id": rid, "request": {
            "subtype": "mcp_message", "server_name": name, "message": message}})
        return rid

    def mcp_answer(self, rid):
        """Wait (no timeout) for the answer to our request `rid`: the JSON-RPC reply, or a JSON-RPC
        error object when the host answered with an error or stdin closed first. An interrupt during
        a turn abandons the request."""
        while rid not in self.responses:
            if self.eof:
                self.waiting.discard(rid)
                return {"error": {"code": -32000, "message": "Connection closed"}}
            if self.in_turn and self.interrupt:
                self.waiting.discard(rid)
                self.abandoned.add(rid)
                raise Interrupted()
            self.pump(0.05)
        self.waiting.discard(rid)
        response = self.responses.pop(rid)
        if response.get("subtype") != "success":
            return {"error": {"code": -32603, "message": str(response.get("error") or "control request failed")}}
        reply = (response.get("response") or {}).get("mcp_response")
        return reply if isinstance(reply, dict) else {"error": {"code": -32603, "message": "no mcp_response"}}

    def mcp(self, name, message):
        reply = self.mcp_answer(self.mcp_request(name, message))
        return None if "error" in reply else reply

    # ---- turns ----------------------------------------------------------------------------
    def run(self):
        argv = self.argv
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        if option(argv, "--input-format") != "stream-json":
            stdin = read_all_stdin()   # a plain-text prompt: all of stdin
            self.received = [stdin]
            finish(self.run_turn(stdin, None))
        self.stdin = Stdin()
        self.connect_servers()
        deadline = time.monotonic() + SPARE_AFTER
        while not self.users and not self.eof and time.monotonic() < deadline:
            self.pump(0.02)
        if not self.users and not self.eof:   # a spare, started ahead of its conversation
            self.started = True
            record("start", argv=argv, cwd=os.getcwd(), env=dict(os.environ), stdin="".join(self.received),
                   scenario=None, spare=True)
        while True:
            while self.users:
                raw, message = self.users.popleft()
                self.rc = self.run_turn(raw, message)
            if self.eof:
                if not self.valid:
                    sys.stderr.write("Error: stdin is not stream-json\n")
                    sys.stderr.flush()
                    os._exit(1)
                finish(self.rc)
            self.pump(0.1)

    def run_turn(self, raw, message):
        self.turn += 1
        content = (message or {}).get("message", {}).get("content", raw)
        prompt = content if isinstance(content, str) else "\n".join(
            b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
        picked = re.findall(r"scenario:([\w-]+)", prompt)
        scenario = picked[-1] if picked else os.environ.get("CLAUDE_FAKE_SCENARIO", "echo")
        self.scenario = scenario
        self.out.turn = self.turn
        self.turn_delay = self.delay
        self.reset_stream()
        if not self.started:
            self.started = True
            record("start", argv=self.argv, cwd=os.getcwd(), env=dict(os.environ), stdin="".join(self.received),
                   scenario=scenario)
        record("turn", n=self.turn, stdin=raw, scenario=scenario)
        if self.turn == 1:
            self.check_session()
        self.in_turn, self.interrupt = True, None
        try:
            rc = self.play(scenario, prompt)
        except Interrupted:
            self.interrupted()
            rc = 1
        self.in_turn, self.interrupt = False, None
        return rc

    def check_session(self):
        sessions = read_sessions()
        if self.new_id and self.resume is None and self.new_id in sessions:
            sys.stderr.write("Error: Session ID %s is already in use.\n" % self.new_id)
            finish(1)
        if self.resume is not None and sessions.get(self.resume) != os.getcwd():
            for item in load("j_resume_nonexistent_id.jsonl"):
                self.say(item, "99999999-9999-4999-8999-999999999999")
            sys.stderr.write("No conversation found with session ID: %s\n" % self.resume)
            finish(1)
        if self.new_id and STATE:
            sessions[self.new_id] = os.getcwd()
            write_sessions(sessions)

    def play(self, scenario, prompt):
        if scenario in REPLAY:
            capture, rc = REPLAY[scenario]
            lines = load(capture)
            original = original_session(lines)
            for item in lines:
                self.say(item, original)
            return rc
        if scenario in ("echo", "slow", "exit_after_result"):
            if scenario == "slow":
                self.wait(0.4)
                self.turn_delay = self.delay or 0.03
            lines = echo_lines("ECHO: " + prompt.strip())
            original = original_session(lines)
            for item in lines:
                self.say(item, original)
            if scenario == "exit_after_result":
                finish(0)
            return 0
        if scenario in ("crash", "noresult"):
            lines = load("b_partial_messages.jsonl")
            self.say(lines[0], original_session(lines))
            if scenario == "noresult":
                finish(0)
            sys.stderr.write("panic: the fake CLI crashed (key sk-ant-api03-abcdefghijklmnop)\n")
            finish(3)
        if scenario == "usage_error":
            sys.stderr.write("error: unknown option '--cwd'\n")
            finish(1)
        if scenario in HANGING:
            lines = load("b_partial_messages.jsonl")
            original = original_session(lines)
            count = 5 if scenario == "stall" else 1   # init, status, message_start, block start, first delta
            for item in lines[:count]:
                self.say(item, original)
            child = None
            if scenario == "grandchild":
                child = subprocess.Popen(["sleep", "60"])
                record("grandchild", child=child.pid)
            self.hang(child)
        if scenario == "client_tool":
            return self.client_tool(prompt)
        if scenario == "hidden_tool_call":
            return self.hidden_tool_call()
        sys.stderr.write("fake claude: unknown scenario %r\n" % scenario)
        finish(2)

    def hang(self, child):
        parent = os.getppid()
        # an aborted test run must not leave us behind; CLAUDE_FAKE_STAY_ORPHANED acts like the real CLI,
        # which does not notice its parent's death (for at most 20 s)
        stay = os.environ.get("CLAUDE_FAKE_STAY_ORPHANED") == "1"
        record("hanging")   # what tests wait for: the run got this far and is now waiting to be stopped
        deadline = time.monotonic() + 20
        while (stay or os.getppid() == parent) and time.monotonic() < deadline:
            self.pump(0.05)
            if self.interrupt:
                if child:   # the CLI stops its running tool
                    child.kill()
                    child.wait()
                raise Interrupted()
        finish(0, orphaned=True)

    def interrupted(self):
        """The end of an interrupted turn, as in l_interrupt_then_next_turn (the control_response is out)."""
        self.abandoned.update(self.waiting)
        self.waiting.clear()
        lines = load_330("l_interrupt_then_next_turn.jsonl")
        original = original_session(lines)
        first = lambda test: copy(next(i for i in lines if test(i)))
        event = lambda item: (item.get("event") or {}).get("type")
        if not self.said_init:
            init = load("b_partial_messages.jsonl")[0]
            self.out.emit(init, original_session([init]))
        msg, block = self.msg, self.block
        if msg and block and not block["said"] and block["text"] and block["type"] in ("text", "thinking"):
            item = first(lambda i: i["type"] == "assistant" and i.get("aborted"))
            for key in ("id", "model", "usage"):
                if key in msg:
                    item["message"][key] = msg[key]
            item["message"]["content"] = [{"type": "text", "text": block["text"]} if block["type"] == "text"
                                          else {"type": "thinking", "thinking": block["text"], "signature": ""}]
            self.out.emit(item, original)
        self.out.emit(first(lambda i: i["type"] == "user"), original)
        if msg:
            if block:
                item = first(lambda i: event(i) == "content_block_stop")
                item["event"]["index"] = block["index"]
                item["api_message_id"] = msg.get("id")
                self.out.emit(item, original)
            for name in ("message_delta", "message_stop"):
                item = first(lambda i: event(i) == name)
                item["api_message_id"] = msg.get("id")
                if "abandoned_blocks" in item:
                    item["abandoned_blocks"] = {"api_message_id": msg.get("id"), "from_block_index": self.next_index}
                self.out.emit(item, original)
        result = first(lambda i: i["type"] == "result")
        if msg:
            result["begun_message_ids"] = [msg.get("id")]
        self.account(result)
        self.out.emit(result, original)
        self.reset_stream()

    def hidden_tool_call(self):
        """A tools/call for a tool_use the host never saw streamed (as a sub-agent's would be),
        then an echo answer saying what came back."""
        name, server = next(((n, s) for n, s in self.servers.items() if s["tools"]), (None, None))
        reply = {}
        if name:
            number = self.next_id(name)
            reply = self.mcp_answer(self.mcp_request(name, {
                "method": "tools/call", "jsonrpc": "2.0", "id": number, "params": {
                    "name": server["tools"][0]["name"], "arguments": {},
                    "_meta": {"claudecode/toolUseId": "toolu_hidden", "progressToken": number}}}))
        result = reply.get("result") if isinstance(reply.get("result"), dict) else {}
        record("tool_result", id="toolu_hidden", result=result)
        lines = echo_lines("hidden call answered, isError=%s" % bool(result.get("isError")))
        original = original_session(lines)
        for item in lines:
            self.say(item, original)
        return 0

    def client_tool(self, prompt):
        """l_sdk_mcp_tool_call: a text block, one tool_use block per `call:<tool>` marker, the
        tools/call requests one at a time, then a second message with the results."""
        calls = re.findall(r"call:([\w.-]*[\w-])", prompt)
        offered = {}
        for name, server in self.servers.items():
            for tool in server["tools"]:
                offered.setdefault(tool["name"], name)
        missing = [c for c in calls if c not in offered]
        if missing or not calls:
            lines = echo_lines("no such tool %s" % missing[0] if missing else "no tool call requested")
            original = original_session(lines)
            for item in lines:
                self.say(item, original)
            return 0
        t = load_330("l_sdk_mcp_tool_call.jsonl")
        original = original_session(t)
        init = load("b_partial_messages.jsonl")[0]
        self.say(init, original_session([init]))
        for item in t[5:13]:   # status, message_start, the text block "I'll run that for you."
            self.say(item, original)
        planned = []
        for i, tool in enumerate(calls):   # i counts from 0; block 0 is the text
            server = offered[tool]
            tool_id = "toolu_fake_%d_%d_%d" % (os.getpid(), self.turn, i)
            full = "mcp__%s__%s" % (server, tool)
            arguments = {"q": "%s %d" % (tool, i)}
            start = copy(t[13])
            start["event"]["index"] = i + 1
            start["event"]["content_block"].update(id=tool_id, name=full, input={})
            self.say(start, original)
            for piece in [""] + thirds(json.dumps(arguments)):   # the CLI forwards the empty first delta too
                delta = copy(t[14])
                delta["event"]["index"] = i + 1
                delta["event"]["delta"]["partial_json"] = piece
                self.say(delta, original)
            said = copy(t[19])
            said["message"]["content"] = [{"type": "tool_use", "id": tool_id, "name": full, "input": arguments}]
            said["tool_use_meta"] = [{"id": tool_id, "display_name": re.sub(r"[_-]+", " ", tool).title(),
                                      "server_display_name": server, "tool_name": tool}]
            self.say(said, original)
            stop = copy(t[20])
            stop["event"]["index"] = i + 1
            self.say(stop, original)
            planned.append((tool_id, server, tool, arguments))
        texts = []
        for k, (tool_id, server, tool, arguments) in enumerate(planned):
            number = self.next_id(server)
            rid = self.mcp_request(server, {"method": "tools/call", "params": {
                "name": tool, "arguments": arguments,
                "_meta": {"claudecode/toolUseId": tool_id, "progressToken": number}}, "jsonrpc": "2.0", "id": number})
            if k == 0:   # the CLI asks for the first call before it prints the message's end
                self.say(t[22], original)
                self.say(t[23], original)
            reply = self.mcp_answer(rid)
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {"message": str(reply["error"])}
                result = {"content": [{"type": "text", "text": "MCP error %s: %s" % (
                    error.get("code"), error.get("message"))}], "isError": True}
            else:
                result = reply.get("result") if isinstance(reply.get("result"), dict) else {}
            content = [c for c in result.get("content") or [] if isinstance(c, dict)]
            block = {"tool_use_id": tool_id, "type": "tool_result", "content": content}
            if result.get("isError"):
                block["is_error"] = True
            user = copy(t[24])
            user["message"]["content"] = [block]
            user["tool_use_result"] = content
            user["tool_result_meta"][0]["id"] = tool_id
            record("tool_result", id=tool_id, result=result)
            self.out.emit(user, original)   # the tool is done: its result is printed even if an
            if self.turn_delay:             # interrupt came in with it (it ends the turn next)
                self.wait(self.turn_delay)
            text = "\n".join(c.get("text", "") for c in content if c.get("type") == "text")
            texts.append(("error: " if result.get("isError") else "") + text)
        answer = "Tool results: " + " | ".join(texts)
        for item in t[25:28]:   # status, message_start, text block start
            self.say(item, original)
        for chunk in thirds(answer):
            delta = copy(t[28])
            delta["event"]["delta"]["text"] = chunk
            self.say(delta, original)
        said = copy(t[31])
        said["message"]["content"][0]["text"] = answer
        self.say(said, original)
        for item in t[32:35]:   # block stop, message_delta end_turn, message_stop
            self.say(item, original)
        result = copy(t[35])
        result["result"] = answer
        self.say(result, original)
        return 0


def main():
    argv = sys.argv[1:]
    if argv in (["--version"], ["-v"]):
        print("%s (Claude Code)" % VERSION)
        return 0
    if "-p" not in argv and "--print" not in argv:
        sys.stderr.write("fake claude: only print mode is faked\n")
        return 2
    if option(argv, "--output-format") == "stream-json" and "--verbose" not in argv:
        sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
        return 1
    Fake(argv).run()


if __name__ == "__main__":
    sys.exit(main())
