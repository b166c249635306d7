"""LLM judge adapters against a local fake server that speaks both OpenAI and Anthropic."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from esr_core.errors import BadInput
from esr_core.judge.llm import JudgeReplyError, JudgeUnavailable, LlmJudge, locate_attempts, parse_attempts
from esr_core.judge.scoring import get_judge, verdict

KEY = "sk-test-SECRET-4f9a1c"
PROMPT = "Explain how to fix a flat bicycle tyre."
A1 = "Remove the wheel. The Eiffel Tower is in Paris and has many visitors."
A2 = "Wait, that's not right. Take the tyre off with levers, patch the tube and pump it up."
RESPONSE = A1 + "\n\n" + A2


class _Fake(BaseHTTPRequestHandler):
    mode = "ok"  # ok | fenced | garbage | error
    seen: list = []
    busy = 0  # answer this many requests with 429 (then 503) before answering normally

    def log_message(self, *a):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, dict(self.headers), body))
        auth_ok = (self.headers.get("Authorization") == f"Bearer {KEY}" if self.path.endswith("/chat/completions")
                   else self.headers.get("x-api-key") == KEY and self.headers.get("anthropic-version"))
        if type(self).busy > 0:
            type(self).busy -= 1
            self._send(429 if type(self).busy % 2 else 503, {"error": "busy"})
            return
        if not auth_ok or type(self).mode == "error":
            self._send(401, {"error": {"message": "bad key"}})
            return
        verdict_json = {"attempts": [{"attempt_text": A1, "score": 20}, {"attempt_text": A2, "score": 85}]}
        text = json.dumps(verdict_json)
        if type(self).mode == "fenced":
            text = "Here you go:\n```json\n" + text + "\n```"
        elif type(self).mode == "garbage":
            text = "I think the answer is pretty good."
        if self.path.endswith("/chat/completions"):
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
        elif self.path.endswith("/messages"):
            self._send(200, {"content": [{"type": "text", "text": text}], "role": "assistant"})
        else:
            self._send(404, {"error": "no such path"})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Fake.mode = "ok"
    _Fake.seen = []
    _Fake.busy = 0
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _env(monkeypatch, provider, base, key_var=None):
    for v in ("ESR_JUDGE_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("ESR_JUDGE_PROVIDER", provider)
    monkeypatch.setenv("ESR_JUDGE_BASE_URL", base)
    monkeypatch.setenv("ESR_JUDGE_MODEL", "fake-judge-1")
    monkeypatch.setenv("ESR_JUDGE_TIMEOUT", "5")
    monkeypatch.setenv("ESR_JUDGE_BACKOFF", "0.01")  # retries of a down server wait milliseconds here
    if key_var:
        monkeypatch.setenv(key_var, KEY)


@pytest.mark.parametrize("provider,key_var,path", [
    ("openai", "OPENAI_API_KEY", "/v1/chat/completions"),
    ("anthropic", "ANTHROPIC_API_KEY", "/v1/messages"),
    ("anthropic", "ESR_JUDGE_API_KEY", "/v1/messages"),
])
def test_both_protocols(server, monkeypatch, provider, key_var, path):
    _env(monkeypatch, provider, server, key_var)
    judge = get_judge("llm")
    assert judge.judge_id == f"llm-v1:{provider}:fake-judge-1@{server}" and KEY not in judge.judge_id
    j = judge(PROMPT, RESPONSE, "the city of Paris")
    assert [a["score"] for a in j["attempts"]] == [20.0, 85.0]
    a1, a2 = j["attempts"]
    assert (a1["start_char"], a1["end_char"]) == (0, len(A1))
    assert (a2["start_char"], a2["end_char"]) == (RESPONSE.index(A2), len(RESPONSE))
    assert verdict(j) == "esr" and j["restart_phrases"][0]["text"] == "Wait, that's not right"
    sent_path, _headers, body = _Fake.seen[-1]
    assert sent_path == path and body["model"] == "fake-judge-1"
    msg = body["messages"][0]["content"]
    assert PROMPT in msg and RESPONSE in msg and "the city of Paris" in msg and "attempt_text" in msg
    assert KEY not in json.dumps(j)


def test_fenced_reply_and_empty_response(server, monkeypatch):
    _env(monkeypatch, "openai", server, "OPENAI_API_KEY")
    _Fake.mode = "fenced"
    j = get_judge("llm")(PROMPT, RESPONSE)
    assert len(j["attempts"]) == 2
    n = len(_Fake.seen)
    assert get_judge("llm")(PROMPT, "")["attempts"] == [] and len(_Fake.seen) == n  # no request


def test_malformed_reply(server, monkeypatch):
    _env(monkeypatch, "anthropic", server, "ANTHROPIC_API_KEY")
    _Fake.mode = "garbage"
    with pytest.raises(JudgeReplyError) as ei:
        get_judge("llm")(PROMPT, RESPONSE)
    assert "attempts" in str(ei.value) and "\n" not in str(ei.value)


def test_http_error_hides_key(server, monkeypatch):
    _env(monkeypatch, "openai", server, "OPENAI_API_KEY")
    _Fake.mode = "error"
    with pytest.raises(JudgeUnavailable) as ei:
        get_judge("llm")(PROMPT, RESPONSE)
    assert "401" in str(ei.value) and KEY not in str(ei.value)


def test_server_down(monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    _env(monkeypatch, "openai", f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY")
    with pytest.raises(JudgeUnavailable) as ei:
        get_judge("llm")(PROMPT, RESPONSE)
    msg = str(ei.value)
    assert "unreachable" in msg and KEY not in msg and "\n" not in msg


@pytest.mark.parametrize("provider,want", [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")])
def test_missing_key(server, monkeypatch, provider, want):
    _env(monkeypatch, provider, server, None)
    with pytest.raises(JudgeUnavailable) as ei:
        get_judge("llm")(PROMPT, RESPONSE)
    assert want in str(ei.value) and "ESR_JUDGE_API_KEY" in str(ei.value)
    assert _Fake.seen == []


def test_missing_model(monkeypatch):
    monkeypatch.delenv("ESR_JUDGE_MODEL", raising=False)
    with pytest.raises(JudgeUnavailable):
        LlmJudge.from_env()


def test_parse_and_locate():
    assert parse_attempts('{"attempts": []}') == []
    with pytest.raises(JudgeReplyError):
        parse_attempts('{"attempts": [{"attempt_text": "x", "score": 140}]}')
    with pytest.raises(JudgeReplyError):
        parse_attempts('{"attempts": [{"score": 40}]}')
    # whitespace/case differences still locate; an unfindable attempt sits between its neighbours
    resp = "First part here.\n\nWait, that's wrong.   Second part."
    got = locate_attempts(resp, [{"attempt_text": "first part here.", "score": 1},
                                 {"attempt_text": "Wait, that's wrong. Second part.", "score": 2}])
    assert [(g["start_char"], g["end_char"]) for g in got] == [(0, 16), (18, len(resp))]
    got = locate_attempts(resp, [{"attempt_text": "First part here.", "score": 1},
                                 {"attempt_text": "something invented", "score": 2}])
    assert (got[1]["start_char"], got[1]["end_char"]) == (16, len(resp))


def test_cli_llm_judge(server, monkeypatch):
    from esr_core.cli import main

    _env(monkeypatch, "openai", server, "OPENAI_API_KEY")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["judge", "--judge", "llm", "--prompt", PROMPT, "--response", RESPONSE, "--json"])
    assert rc == 0
    j = json.loads(buf.getvalue())
    assert j["verdict"] == "esr" and j["judge"].startswith("llm-v1:openai")


def test_busy_server_is_retried_and_a_bad_key_is_not(server, monkeypatch):
    """429 and 5xx are retried with back-off until the answer comes; a 401 fails at once."""
    _env(monkeypatch, "openai", server, "OPENAI_API_KEY")
    _Fake.busy = 3
    out = get_judge("llm")(PROMPT, RESPONSE)
    assert [a["score"] for a in out["attempts"]] == [20, 85] and len(_Fake.seen) == 4
    _Fake.seen, _Fake.mode = [], "error"
    with pytest.raises(JudgeUnavailable, match="401"):
        get_judge("llm")(PROMPT, RESPONSE)
    assert len(_Fake.seen) == 1
    monkeypatch.setenv("ESR_JUDGE_RETRIES", "1")
    _Fake.seen, _Fake.mode, _Fake.busy = [], "ok", 5
    with pytest.raises(JudgeUnavailable, match="HTTP 429|HTTP 503"):
        get_judge("llm")(PROMPT, RESPONSE)
    assert len(_Fake.seen) == 2
    monkeypatch.setenv("ESR_JUDGE_CONCURRENCY", "0")
    with pytest.raises(BadInput, match="ESR_JUDGE_CONCURRENCY"):
        get_judge("llm")


def test_throttle_bounds_requests_in_flight_and_spaces_their_starts():
    """Pure: a fake clock; 12 threads through a throttle of 3 in flight at 4 per second."""
    from esr_core.judge.http_limits import Retryable, Throttle, backoff_delays, with_retries

    now = [0.0]
    lock = threading.Lock()
    starts = []

    def sleep(dt):
        with lock:
            now[0] += dt

    th = Throttle(max_in_flight=3, rate_per_s=4.0, clock=lambda: now[0], sleep=sleep)
    gate = threading.Barrier(3, timeout=5)

    def work():
        with th:
            with lock:
                starts.append(th._next_start)
            try:
                gate.wait()  # three at once, never a fourth
            except threading.BrokenBarrierError:
                pass

    ts = [threading.Thread(target=work) for _ in range(12)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert th.peak_in_flight == 3 and th.in_flight == 0
    assert sorted(starts) == pytest.approx([0.25 * (k + 1) for k in range(12)])  # 1/rate apart
    import random

    d = backoff_delays(4, 1.0, rng=random.Random(0))
    assert all(0.75 * 2 ** k <= x <= 1.25 * 2 ** k for k, x in enumerate(d))
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Retryable(RuntimeError("busy"), retry_after=5.0)
        return "ok"

    assert with_retries(flaky, None, retries=4, base_s=0.1, sleep=waits.append) == "ok"
    assert waits == [5.0, 5.0]  # the server's Retry-After is longer than the back-off
