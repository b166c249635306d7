"""The token-level detector search's inputs: prompts with their own answers and steered drifts,
the chats built from them (on-topic, synthetic recovery, drift, garbled) and the prompt split.

Each chat carries the class of every character span of its response, so every response token
gets a label (see ``token_detectors`` for what is measured on them).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from esr_core.errors import BadInput
from esr_core.paths import ASSETS_DIR
from esr_core.resistance.episodes import derangement, sentences, splice

INPUTS_PATH = ASSETS_DIR / "prompts" / "detector_inputs.jsonl"
RESTARTS = ("Wait, that's not what you asked.", "Actually, I got off track.", "Let me start over.",
            "Back to your question.")
CLASSES = ("on", "ctx", "off", "restart", "after", "drift", "shuffle", "repeat")


def load_detector_inputs(path: str | Path | None = None, n_prompts: int | None = None) -> list[dict]:
    """Rows ``{id, prompt, answer, drift?, drift_latent?}`` (JSONL); a clear error when unusable."""
    p = Path(path or INPUTS_PATH)
    if not p.exists():
        raise BadInput(f"Detector inputs {p} do not exist (build them with `esr-lab detectors inputs`)")
    rows = []
    for k, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{p} line {k + 1} is not JSON: {exc}") from None
        if not isinstance(r, dict) or not all(isinstance(r.get(f), str) and r[f].strip()
                                              for f in ("id", "prompt", "answer")):
            raise BadInput(f"{p} line {k + 1}: every row needs non-empty string 'id', 'prompt' and 'answer'")
        rows.append(r)
    if n_prompts:
        rows = rows[: int(n_prompts)]
    if len(rows) < 6:
        raise BadInput(f"{p}: the token-level search needs at least 6 prompts, found {len(rows)}")
    return rows


def build_detector_inputs(answers: Sequence[dict], drifts: Sequence[dict], out: str | Path,
                          max_answer_chars: int = 600, off_topic_below: float = 30.0) -> dict:
    """Write the inputs file from the fine-tuning data's unsteered answers and steered drifts.

    ``answers``: ``{key, prompt, text}`` (the base model's own answers to training prompts);
    ``drifts``: ``{pid, text, latent, score}`` (its continuations under a distractor latent),
    kept only where the judge scored them off-topic (score below ``off_topic_below``).
    """
    drift_of: dict[str, dict] = {}
    for d in drifts:
        if float(d.get("score", 100)) < off_topic_below and d.get("text", "").strip():
            drift_of.setdefault(str(d["pid"]), d)
    rows = []
    for a in answers:
        if not a.get("text", "").strip():
            continue
        d = drift_of.get(str(a["key"]))
        rows.append({"id": str(a["key"]), "prompt": a["prompt"], "answer": a["text"][:max_answer_chars],
                     **({"drift": d["text"], "drift_latent": int(d["latent"]), "drift_score": float(d["score"])}
                        if d else {})})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out) + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return {"rows": len(rows), "with_drift": sum(1 for r in rows if "drift" in r)}


def garble(answer: str, how: str, seed: int) -> str:
    """On-topic text made degenerate: its words shuffled, or its first words repeated."""
    words = answer.split()
    if how == "shuffle":
        random.Random(seed).shuffle(words)
        return " ".join(words)
    if how == "repeat":
        head = words[: max(1, min(6, len(words)))]
        return " ".join((head * (len(words) // len(head) + 1))[: len(words)])
    raise BadInput(f"Unknown garbling {how!r}")


def split_prompts(rows: Sequence[dict], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(search, held-out) row indices, split by a hash of the prompt id (stable under reordering)."""
    def h(r):
        return int(hashlib.sha1(f"{seed}:{r['id']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    held = [i for i, r in enumerate(rows) if h(r) < frac]
    search = [i for i, r in enumerate(rows) if h(r) >= frac]
    if len(held) < 3 or len(search) < 3:
        raise BadInput("Too few prompts on one side of the search / held-out split")
    return search, held


@dataclass
class Chat:
    """One [user, assistant] chat and the class of every character span of the response."""
    row: int
    kind: str  # on | recovery | drift | shuffle | repeat
    prompt: str
    response: str
    spans: list[tuple[int, int, str]]  # (start char, end char, class) within the response


def make_chats(rows: Sequence[dict], seed: int = 0) -> list[Chat]:
    """The on-topic, off-topic and garbled chats of every row (see the module docstring)."""
    n = len(rows)
    d = derangement(n, seed)
    chats = []
    for i, r in enumerate(rows):
        ans = r["answer"].strip()
        chats.append(Chat(i, "on", r["prompt"], ans, [(0, len(ans), "on")]))
        other = rows[int(d[i])]["answer"].strip()
        if sentences(ans) and sentences(other):
            restart = RESTARTS[i % len(RESTARTS)]
            text, (r0, r1) = splice(ans, other, restart, start_sentences=1, drift_sentences=3)
            start = len(sentences(ans)[0]) + 1
            chats.append(Chat(i, "recovery", r["prompt"], text,
                              [(0, start, "ctx"), (start, r0, "off"), (r0, r1, "restart"), (r1, len(text), "after")]))
        if r.get("drift", "").strip():
            dr = r["drift"].strip()
            chats.append(Chat(i, "drift", r["prompt"], dr, [(0, len(dr), "drift")]))
        for how in ("shuffle", "repeat"):
            g = garble(ans, how, seed + i)
            chats.append(Chat(i, how, r["prompt"], g, [(0, len(g), how)]))
    return chats


