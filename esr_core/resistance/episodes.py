"""Recovery episodes: the on-topic and off-topic chats, and synthetic self-corrections.

An off-topic pair is a prompt followed by another prompt's answer (a seeded derangement,
ESR_METHOD.md sec. 5); a synthetic recovery is the start of a prompt's own answer, a drift
into another prompt's answer, one restart sentence, then the on-topic answer (the recipe of
the paper's fine-tuning data, sec. 10). Both are rendered as [user, assistant] chats with the
model's template, with the char span of the response and its first token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.judge.prompts import load_default_answers, load_prompts

# our own wording; the last two are held out of the search
RESTART_SENTENCES = [
    "Wait, that's not right. Let me get back to your question.",
    "Hold on, I got off track. Let me start over.",
    "Actually, I made a mistake there. Let me try again.",
    "Sorry, that has nothing to do with what you asked. Let me refocus.",
    "Oops, I drifted off topic. Back to your question.",
    "Wait, I'm getting sidetracked. Let's go back to the question.",
]


def derangement(n: int, seed: int, groups: Sequence | None = None, tries: int = 200) -> np.ndarray:
    """A seeded permutation with no fixed point (``perm[i] != i``).

    With ``groups`` (e.g. prompt topics) it also tries to avoid ``groups[perm[i]] == groups[i]``
    so an "off-topic" answer is not merely a neighbouring how-to; falls back to a plain
    derangement when that is impossible.
    """
    if n < 2:
        raise BadInput("A derangement needs at least two prompts")
    rng = np.random.default_rng(int(seed))
    idx = np.arange(n)
    best = None
    for _ in range(tries):
        p = rng.permutation(n)
        if np.any(p == idx):
            continue
        if groups is None:
            return p
        same = sum(groups[i] == groups[p[i]] for i in range(n))
        if same == 0:
            return p
        if best is None or same < best[0]:
            best = (same, p)
    if best is not None:
        return best[1]
    # Sattolo's algorithm: a uniformly random n-cycle, always a derangement
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        p[i], p[j] = p[j], p[i]
    return np.asarray(p)


def render_pair(tokenizer, prompt: str, answer: str, response_only: bool = True) -> tuple[list[int], list[tuple[int, int]], str, int]:
    """Token ids, char offsets, text of a [user, assistant] chat, and the first token to pool."""
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        prefix = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        special = False
    else:
        prefix = prompt + "\n\n"
        text = prefix + answer
        special = True
    if text.startswith(prefix):
        resp_char = len(prefix)
    else:
        k = text.find(answer.strip()[:40]) if answer.strip() else -1
        resp_char = k if k >= 0 else len(prefix)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    offs = [tuple(map(int, o)) for o in enc["offset_mapping"]]
    first = 1
    if response_only:
        first = next((t for t, (s, e) in enumerate(offs) if s >= resp_char and e > s), len(ids))
        first = max(first, 1)
    return ids, offs, text, first


def read_answers_file(path: str | Path) -> dict[str, str]:
    """``{id: answer}`` from a JSON list or JSONL of records with ``id`` and ``answer``."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"Answers file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        recs = json.loads(text)
        if isinstance(recs, dict):
            recs = [{"id": k, "answer": v} for k, v in recs.items()]
    except json.JSONDecodeError:
        try:
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise BadInput(f"Answers file {p} is neither JSON nor JSONL: {exc}") from None
    out = {}
    for r in recs:
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("answer"), str):
            raise BadInput(f"Answers file {p}: every record needs string 'id' and 'answer'")
        out[r["id"]] = r["answer"]
    return out


def load_inputs(n_prompts: int | None = None, max_answer_chars: int = 1200,
                answers_path: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """The shipped prompts and the default model's unsteered answers (or ``answers_path``), aligned."""
    prompts = load_prompts()
    answers = read_answers_file(answers_path) if answers_path else load_default_answers()
    rows = [(p, answers[p["id"]]) for p in prompts if answers.get(p["id"], "").strip()]
    if n_prompts:
        rows = rows[: int(n_prompts)]
    if len(rows) < 3:
        raise BadInput("The detector search needs at least 3 prompts with unsteered answers")
    return [r[0] for r in rows], [r[1][:max_answer_chars] for r in rows]


_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if s and s.strip()]


def splice(on_answer: str, off_answer: str, restart: str, start_sentences: int = 1,
           drift_sentences: int = 3) -> tuple[str, tuple[int, int]]:
    """A synthetic recovery and the char span of its restart sentence inside it."""
    on_s, off_s = sentences(on_answer), sentences(off_answer)
    if not on_s or not off_s:
        raise BadInput("Both answers need at least one sentence")
    start = " ".join(on_s[:start_sentences])
    drift = " ".join(off_s[:drift_sentences])
    head = f"{start} {drift} "
    text = head + restart + "\n\n" + on_answer.strip()
    return text, (len(head), len(head) + len(restart))


def build_episodes(prompts: list[dict], answers: list[str], params) -> list[dict]:
    """Synthetic recoveries: prompt i, its start, the drift of a deranged answer, a restart, its answer."""
    n = len(prompts)
    d = derangement(n, params.seed, [p.get("topic", str(i)) for i, p in enumerate(prompts)])
    eps = []
    for i in range(n):
        v = i % len(params.restart_sentences)
        restart = params.restart_sentences[v]
        text, span = splice(answers[i][: params.max_answer_chars], answers[int(d[i])][: params.max_answer_chars],
                            restart, params.start_sentences, params.drift_sentences)
        heldout = v >= len(params.restart_sentences) - params.n_heldout_variants
        eps.append({"prompt": prompts[i]["prompt"], "response": text, "restart_span": span, "variant": v,
                    "heldout": heldout, "drift_from": int(d[i])})
    return eps
