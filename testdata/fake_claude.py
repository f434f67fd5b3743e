#!/usr/bin/env python3
"""A fake `claude` CLI for cc-proxy's tests: replays the verbatim captures of Claude Code 2.1.197
(captures/claude-cli/ beside this file, described in README.md) and records how it was run.

Controlled through environment variables named CLAUDE_FAKE_* (the proxy passes CLAUDE_* on):
  CLAUDE_FAKE_RECORD    append one JSON line per event here: start (argv, cwd, env, stdin), signal, end
  CLAUDE_FAKE_STATE     directory remembering sessions (--session-id creates, --resume needs one, per cwd)
  CLAUDE_FAKE_SCENARIO  default scenario (else "echo")
  CLAUDE_FAKE_CAPTURES  capture directory (default captures/claude-cli beside this file)
  CLAUDE_FAKE_DELAY     seconds between output lines
  CLAUDE_FAKE_STAY_ORPHANED=1  a hanging run keeps going when its parent dies (else it leaves; 20 s at most)
A prompt containing `scenario:<name>` picks the scenario for that run (the last one wins).

Scenarios: echo (answers "ECHO: <prompt>"), text, thinking, tool, cut, sse_overloaded, max_turns,
max_tokens, 400, 401, 403, 404, 429, 500, 529, nocreds, refused, malformed, crash, noresult,
usage_error, slow, hang, stall, stubborn, grandchild.
Like the real CLI it exits after its result only once stdin is closed, saves a clean result on
SIGINT, and dies with 143 on SIGTERM ("stubborn" ignores both).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

CAPTURES = os.environ.get("CLAUDE_FAKE_CAPTURES", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "captures", "claude-cli"))
RECORD = os.environ.get("CLAUDE_FAKE_RECORD")
STATE = os.environ.get("CLAUDE_FAKE_STATE")
ALIASES = {"sonnet": "claude-sonnet-5", "opus": "claude-opus-4-8", "haiku": "claude-haiku-4-5-20251001",
           "fable": "claude-fable-5"}

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


def original_session(lines):
    for item in lines:
        if item.get("session_id"):
            return item["session_id"]
    return None


class Output:
    def __init__(self, session_id, model, delay):
        self.session_id = session_id
        self.model = model
        self.delay = delay

    def emit(self, item, original=None):
        line = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
        if original and self.session_id:
            line = line.replace(original, self.session_id)
        if self.model:
            line = line.replace("claude-opus-4-8", self.model)
        if '"subtype":"init"' in line:
            item = json.loads(line)
            item["cwd"] = os.getcwd()
            line = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if self.delay:
            time.sleep(self.delay)


def echo_lines(answer):
    """b_partial_messages.jsonl with its answer replaced by `answer`, streamed in three deltas."""
    lines = load("b_partial_messages.jsonl")
    out, done = [], False
    third = max(1, len(answer) // 3)
    chunks = [answer[:third], answer[third:2 * third], answer[2 * third:]]
    for item in lines:
        event = item.get("event") or {}
        if item["type"] == "stream_event" and event.get("type") == "content_block_delta":
            if not done:
                for chunk in chunks:
                    if chunk:
                        copy = json.loads(json.dumps(item))
                        copy["event"]["delta"]["text"] = chunk
                        out.append(copy)
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


def hang_forever():
    parent = os.getppid()
    # an aborted test run must not leave us behind; CLAUDE_FAKE_STAY_ORPHANED acts like the real CLI,
    # which does not notice its parent's death (for at most 20 s)
    stay = os.environ.get("CLAUDE_FAKE_STAY_ORPHANED") == "1"
    record("hanging")   # what tests wait for: the run got this far and is now waiting to be stopped
    deadline = time.monotonic() + 20
    while (stay or os.getppid() == parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    record("end", rc=0, orphaned=True)
    os._exit(0)


def main():
    argv = sys.argv[1:]
    if argv in (["--version"], ["-v"]):
        print("2.1.197 (Claude Code)")
        return 0
    if "-p" not in argv and "--print" not in argv:
        sys.stderr.write("fake claude: only print mode is faked\n")
        return 2
    if option(argv, "--output-format") == "stream-json" and "--verbose" not in argv:
        sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
        return 1
    stdin = sys.stdin.buffer.read().decode("utf-8", "replace")   # returns only once stdin is closed
    message = None
    if option(argv, "--input-format") == "stream-json":
        first = stdin.strip().splitlines()[0] if stdin.strip() else ""
        try:
            message = json.loads(first)
        except ValueError:
            sys.stderr.write("Error: stdin is not stream-json\n")
            return 1
    content = (message or {}).get("message", {}).get("content", stdin)
    prompt = content if isinstance(content, str) else "\n".join(
        b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    picked = re.findall(r"scenario:([\w-]+)", prompt)
    scenario = picked[-1] if picked else os.environ.get("CLAUDE_FAKE_SCENARIO", "echo")
    delay = float(os.environ.get("CLAUDE_FAKE_DELAY") or 0)
    env = {k: v for k, v in os.environ.items()}
    record("start", argv=argv, cwd=os.getcwd(), env=env, stdin=stdin, scenario=scenario)

    def on_signal(signum, frame):
        record("signal", signal=signal.Signals(signum).name)
        if scenario == "stubborn":
            return
        if signum == signal.SIGINT:   # like the CLI: an interruption note and a clean result, exit 0
            out.emit({"type": "user", "message": {"role": "user", "content": [
                {"type": "text", "text": "[Request interrupted by user]"}]}, "session_id": session_id})
            out.emit({"type": "result", "subtype": "error_during_execution", "is_error": True, "num_turns": 1,
                      "session_id": session_id, "terminal_reason": "aborted_streaming", "modelUsage": {},
                      "errors": ["[ede_diagnostic] result_type=user"]})
            record("end", rc=0)
            os._exit(0)
        record("end", rc=143)
        os._exit(143)

    model = option(argv, "--model")
    model = ALIASES.get(model, model) if model else None
    resume, new_id = option(argv, "--resume"), option(argv, "--session-id")
    session_id = resume or new_id or "00000000-0000-4000-8000-000000000000"
    out = Output(session_id, model, delay)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    sessions = read_sessions()
    if new_id and resume is None and new_id in sessions:
        sys.stderr.write("Error: Session ID %s is already in use.\n" % new_id)
        record("end", rc=1)
        return 1
    if resume is not None and sessions.get(resume) != os.getcwd():
        for item in load("j_resume_nonexistent_id.jsonl"):
            out.emit(item, "99999999-9999-4999-8999-999999999999")
        sys.stderr.write("No conversation found with session ID: %s\n" % resume)
        record("end", rc=1)
        return 1
    if new_id and STATE:
        sessions[new_id] = os.getcwd()
        write_sessions(sessions)

    rc = 0
    if scenario in REPLAY:
        capture, rc = REPLAY[scenario]
        lines = load(capture)
        original = original_session(lines)
        for item in lines:
            out.emit(item, original)
    elif scenario in ("echo", "slow"):
        if scenario == "slow":
            time.sleep(0.4)
            out.delay = out.delay or 0.03
        lines = echo_lines("ECHO: " + prompt.strip())
        original = original_session(lines)
        for item in lines:
            out.emit(item, original)
    elif scenario == "crash":
        out.emit(load("b_partial_messages.jsonl")[0], original_session(load("b_partial_messages.jsonl")))
        sys.stderr.write("panic: the fake CLI crashed (key sk-ant-api03-abcdefghijklmnop)\n")
        rc = 3
    elif scenario == "noresult":
        out.emit(load("b_partial_messages.jsonl")[0], original_session(load("b_partial_messages.jsonl")))
    elif scenario == "usage_error":
        sys.stderr.write("error: unknown option '--cwd'\n")
        rc = 1
    elif scenario in ("hang", "stubborn", "stall", "grandchild"):
        lines = load("b_partial_messages.jsonl")
        original = original_session(lines)
        count = 5 if scenario == "stall" else 1   # init, status, message_start, block start, first delta
        for item in lines[:count]:
            out.emit(item, original)
        if scenario == "grandchild":
            child = subprocess.Popen(["sleep", "60"])
            record("grandchild", child=child.pid)
        hang_forever()
    else:
        sys.stderr.write("fake claude: unknown scenario %r\n" % scenario)
        rc = 2
    record("end", rc=rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
