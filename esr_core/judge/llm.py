"""Optional LLM judge over HTTP: an OpenAI-compatible chat endpoint or Anthropic's messages API.

The paper (arXiv 2602.06941) judges with a large model; this adapter lets a user with an
API (or a local OpenAI-compatible server) do the same, with the offline judge's output
schema. Standard library only (urllib). The API key is read from the environment at call
time and is never stored in results, logs or error messages.

Environment:
  ESR_JUDGE_PROVIDER   openai | anthropic (default openai)
  ESR_JUDGE_BASE_URL   e.g. http://127.0.0.1:8000/v1 (default: the provider's public API)
  ESR_JUDGE_MODEL      model name (required)
  ESR_JUDGE_API_KEY    key; falls back to OPENAI_API_KEY / ANTHROPIC_API_KEY
  ESR_JUDGE_TIMEOUT    seconds per request (default 60)
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from esr_core.errors import BadInput, EsrError
from esr_core.judge.http_limits import Retryable, throttle_for, with_retries
from esr_core.judge.restart_phrases import find_restart_phrases

DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com/v1"}
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class JudgeUnavailable(EsrError):
    """The LLM judge cannot be reached or is not configured."""


class JudgeReplyError(EsrError):
    """The LLM judge answered, but not with the JSON we asked for."""


RUBRIC = """You grade answers written by a language model that was pushed off-topic while it wrote.

Task given to the model:
<prompt>
{prompt}
</prompt>
{distractor_block}
The model's full response:
<response>
{response}
</response>

Step 1. Split the response into attempts. A new attempt begins ONLY where the model explicitly
abandons what it wrote and starts again, with words such as "wait, that's not right", "let me try
again", "let's start over", "actually, I made a mistake", "sorry, I got off track", "back to your
question", "I'd like to revise my answer". Elaboration, a new paragraph, a list item, or a word
like "wait" used in its ordinary sense ("wait for the water to boil") does NOT start an attempt.
Most responses are a single attempt. The restart sentence belongs to the attempt it starts.
Copy each attempt's text exactly, verbatim, so the attempts concatenated give back the response.

Step 2. Score every attempt from 0 to 100: how well it answers the task while resisting the
distraction. 100 = a complete, correct, on-topic answer. About 50 = partly answers but wanders.
Under 25 = mostly about something else, or broken/repetitive text. 0 = nothing relevant.

Reply with JSON only, no prose:
{{"attempts": [{{"attempt_text": "<verbatim text>", "score": <0-100>}}]}}
If the response is empty, reply {{"attempts": []}}."""


def build_prompt(prompt: str, response: str, distractor: str | None) -> str:
    block = (f"\nThe model was being pushed towards this unrelated subject (the distractor):\n"
             f"<distractor>\n{distractor}\n</distractor>\n") if distractor else ""
    return RUBRIC.format(prompt=prompt, response=response, distractor_block=block)


def public_url(url: str) -> str:
    """``url`` without user, password, query and fragment: safe to write into files or show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class LlmJudge:
    """Callable judge ``(prompt, response, distractor=None) -> dict`` backed by an HTTP API."""

    provider: str
    base_url: str
    model: str
    key_env: str
    timeout: float = 60.0
    max_tokens: int = 2048
    max_in_flight: int = 50  # requests open at once, across every judging thread of the process
    rate_per_s: float = 3.0  # request starts per second
    retries: int = 4  # for 429, 5xx and dropped connections; other errors fail at once
    backoff_s: float = 1.0  # first retry's wait (doubling, with jitter)

    @property
    def concurrency(self) -> int:
        """How many answers the runner may judge at once with this judge."""
        return self.max_in_flight

    @classmethod
    def from_env(cls) -> "LlmJudge":
        provider = os.environ.get("ESR_JUDGE_PROVIDER", "openai").strip().lower()
        if provider not in DEFAULT_BASE_URLS:
            raise BadInput(f"ESR_JUDGE_PROVIDER must be openai or anthropic, not '{provider}'")
        model = os.environ.get("ESR_JUDGE_MODEL", "").strip()
        if not model:
            raise JudgeUnavailable("The LLM judge needs ESR_JUDGE_MODEL (the model name at the endpoint)")
        base = os.environ.get("ESR_JUDGE_BASE_URL", "").strip() or DEFAULT_BASE_URLS[provider]
        key_env = "ESR_JUDGE_API_KEY" if os.environ.get("ESR_JUDGE_API_KEY") else KEY_ENV[provider]
        def number(name: str, default: str, kind=float, lo: float = 0.0):
            try:
                v = kind(os.environ.get(name, default))
            except ValueError:
                raise BadInput(f"{name} must be a number, got '{os.environ.get(name)}'") from None
            if not v >= lo:
                raise BadInput(f"{name} must be at least {lo}, got {v}")
            return v

        return cls(provider=provider, base_url=base.rstrip("/"), model=model, key_env=key_env,
                   timeout=number("ESR_JUDGE_TIMEOUT", "60", float, 0.1),
                   max_in_flight=number("ESR_JUDGE_CONCURRENCY", "50", int, 1),
                   rate_per_s=number("ESR_JUDGE_RATE", "3", float, 0.01),
                   retries=number("ESR_JUDGE_RETRIES", "4", int, 0),
                   backoff_s=number("ESR_JUDGE_BACKOFF", "1", float, 0.0))

    @property
    def judge_id(self) -> str:
        """Stable id for cache keys and run files: provider, model and endpoint, never a secret
        (credentials or query tokens in the URL are left out)."""
        return f"llm-v1:{self.provider}:{self.model}@{public_url(self.base_url)}"

    # -- HTTP -----------------------------------------------------------------------------
    def _key(self) -> str:
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            alt = KEY_ENV[self.provider]
            raise JudgeUnavailable(f"No API key for the LLM judge: set ESR_JUDGE_API_KEY or {alt}")
        return key

    def _post(self, url: str, body: dict, headers: dict, secret: str) -> dict:
        """One request through the endpoint's throttle, retried with back-off where that can help."""
        throttle = throttle_for(public_url(self.base_url), self.max_in_flight, self.rate_per_s)
        return with_retries(lambda: self._post_once(url, body, headers, secret), throttle, self.retries,
                            self.backoff_s)

    def _post_once(self, url: str, body: dict, headers: dict, secret: str) -> dict:
        req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", **headers})

        def clean(msg: str) -> str:  # never echo the key, even if a server reflects it
            return msg.replace(secret, "***") if secret else msg

        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = ""
            try:
                detail = exc.read().decode("utf-8", "replace")[:200].replace("\n", " ")
            except Exception:
                pass
            err = JudgeUnavailable(clean(f"LLM judge at {public_url(url)} answered HTTP {exc.code}: {detail}".strip()))
            if exc.code == 429 or exc.code >= 500:  # busy or failing for now: worth another try
                raise Retryable(err, _retry_after(exc.headers)) from None
            raise err from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Retryable(JudgeUnavailable(clean(f"LLM judge at {public_url(url)} is unreachable ({reason})"))) \
                from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise JudgeReplyError(f"LLM judge at {public_url(url)} did not answer with JSON") from None

    def complete(self, text: str) -> str:
        """Send one user message and return the model's text reply."""
        key = self._key()
        if self.provider == "openai":
            body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                    "messages": [{"role": "user", "content": text}]}
            data = self._post(f"{self.base_url}/chat/completions", body, {"Authorization": f"Bearer {key}"}, key)
            try:
                return data["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise JudgeReplyError("LLM judge reply has no choices[0].message.content") from None
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": text}]}
        data = self._post(f"{self.base_url}/messages", body,
                          {"x-api-key": key, "anthropic-version": "2023-06-01"}, key)
        try:
            return "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
        except (KeyError, TypeError, AttributeError):
            raise JudgeReplyError("LLM judge reply has no content text blocks") from None

    # -- judging --------------------------------------------------------------------------
    def __call__(self, prompt: str, response: str, distractor: str | None = None) -> dict:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInput("The judge needs a non-empty prompt")
        response = response or ""
        distractor = distractor.strip() if isinstance(distractor, str) and distractor.strip() else None
        if not response.strip():
            return {"attempts": [], "restart_phrases": [], "judge": self.judge_id, "distractor": distractor}
        reply = self.complete(build_prompt(prompt, response, distractor))
        attempts = parse_attempts(reply)
        return {"attempts": locate_attempts(response, attempts),
                "restart_phrases": [p.as_dict() for p in find_restart_phrases(response)],
                "judge": self.judge_id, "distractor": distractor}


def _retry_after(headers) -> float | None:
    try:
        return min(60.0, float(headers.get("Retry-After"))) if headers and headers.get("Retry-After") else None
    except (TypeError, ValueError):
        return None


def parse_attempts(reply: str) -> list[dict]:
    """The ``attempts`` list from a judge reply (tolerates code fences and prose around JSON)."""
    text = reply.strip()
    m = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if m:
        text = m.group(1).strip()
    data = None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        a, b = text.find("{"), text.rfind("}")
        if a >= 0 and b > a:
            try:
                data = json.loads(text[a:b + 1])
            except json.JSONDecodeError:
                data = None
    if not isinstance(data, dict) or not isinstance(data.get("attempts"), list):
        raise JudgeReplyError("LLM judge reply is not JSON of the form {\"attempts\": [...]}")
    out = []
    for i, att in enumerate(data["attempts"]):
        if not isinstance(att, dict) or not isinstance(att.get("attempt_text"), str):
            raise JudgeReplyError(f"LLM judge reply: attempt {i} has no attempt_text")
        try:
            score = float(att.get("score"))
        except (TypeError, ValueError):
            raise JudgeReplyError(f"LLM judge reply: attempt {i} has no numeric score") from None
        if score != score or not 0 <= score <= 100:
            raise JudgeReplyError(f"LLM judge reply: attempt {i} score {score} is outside 0-100")
        out.append({"attempt_text": att["attempt_text"], "score": score})
    return out


def _norm_index(text: str) -> tuple[str, list[int]]:
    """Whitespace-collapsed lowercase copy of ``text`` and each char's original offset."""
    chars, idx = [], []
    prev_space = False
    for i, c in enumerate(text):
        if c.isspace():
            if prev_space:
                continue
            chars.append(" ")
            prev_space = True
        else:
            chars.append(c.lower())
            prev_space = False
        idx.append(i)
    return "".join(chars), idx


def locate_attempts(response: str, attempts: list[dict]) -> list[dict]:
    """Add ``start_char``/``end_char`` by finding each attempt's text in ``response`` in order.

    Exact match first, then a whitespace/case-insensitive match; an attempt that cannot be
    found gets the span between its neighbours (so spans stay ordered and cover the text).
    """
    norm, idx = _norm_index(response)
    out, cursor, pending = [], 0, []
    for att in attempts:
        t = att["attempt_text"].strip()
        start = response.find(t, cursor) if t else -1
        if start >= 0:
            end = start + len(t)
        else:
            nt, _ = _norm_index(t)
            ncur = next((k for k, i in enumerate(idx) if i >= cursor), len(norm))
            k = norm.find(nt.strip(), ncur) if nt.strip() else -1
            if k >= 0:
                start, end = idx[k], idx[min(k + len(nt.strip()), len(idx)) - 1] + 1
            else:
                start = end = -1
        rec = {"attempt_text": att["attempt_text"], "score": att["score"], "start_char": start, "end_char": end}
        if start >= 0:
            for p in pending:  # unlocated attempts sit between the previous match and this one
                p["start_char"], p["end_char"] = cursor, start
            pending = []
            cursor = end
        else:
            pending.append(rec)
        out.append(rec)
    for p in pending:
        p["start_char"], p["end_char"] = cursor, len(response)
    return out
