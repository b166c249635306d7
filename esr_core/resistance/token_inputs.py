"""The token-level detector search's inputs: prompts with their own answers and steered drifts,
the chats built from them (on-topic, synthetic recovery, drift, garbled) and the prompt split.

Each chat carries the class of every character span of its response, so every response token
gets a label (see ``token_detectors`` for what is measured on them).

A drift that records its steering (``drift_boost``, raw units at the steering SAE's hook, as
written by :func:`generate_live_drifts`) is read back *with that steering on*, as the live
badge reads it, and brings a ``steer_only`` control: the prompt's own on-topic answer read
with the same steering, so a latent that answers to the steering vector rather than to the
drifted text is seen as such. Drifts without it are read unsteered, as before.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.io import atomic_write_text
from esr_core.jobs import check_cancel, report_fraction
from esr_core.judge.scoring import score_many
from esr_core.paths import ASSETS_DIR
from esr_core.resistance.episodes import derangement, sentences, splice
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec

INPUTS_PATH = ASSETS_DIR / "prompts" / "detector_inputs.jsonl"
RESTARTS = ("Wait, that's not what you asked.", "Actually, I got off track.", "Let me start over.",
            "Back to your question.")
CLASSES = ("on", "ctx", "off", "restart", "after", "drift", "shuffle", "repeat", "steer_only")
LIVE_INPUTS_PATH = ASSETS_DIR / "prompts" / "detector_inputs_live.jsonl"


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
    write_inputs(rows, out)
    return {"rows": len(rows), "with_drift": sum(1 for r in rows if "drift" in r)}


def live_steering(row: dict) -> tuple[int, float] | None:
    """(latent, raw coefficient) a drift was written under, when the row records it."""
    if row.get("drift_boost") is None or row.get("drift_latent") is None:
        return None
    return int(row["drift_latent"]), float(row["drift_boost"])


def check_boost_range(lo: float, hi: float) -> tuple[float, float]:
    """A boost range in x median-norm units: finite, positive, ordered, at most 10."""
    lo, hi = float(lo), float(hi)
    if not (0 < lo <= hi <= 10):  # NaN fails every comparison
        raise BadInput(f"The boost range must satisfy 0 < LO <= HI <= 10 (x the median residual norm), "
                       f"got {lo:g},{hi:g}")
    return lo, hi


def generate_live_drifts(engine, rows: Sequence[dict], latents: Sequence[int], boost_range: tuple[float, float],
                         seed: int = 7, max_new_tokens: int = 96, temperature: float = 0.6,
                         off_topic_below: float = 30.0, batch_size: int = 48, heldout_frac: float = 0.3,
                         split_seed: int = 0, cancel=None, progress=None) -> list[dict]:
    """Each row with a fresh steered drift from ``engine``'s model, its steering recorded.

    Distractors are held out with their prompts: the latents are split like the prompts
    (:func:`split_latents`), a search prompt drifts under a search latent and a held-out prompt
    under a held-out one, cycling through each set. A group of topic latents that happen to
    match the search distractors' topics then scores no better on the held-out prompts than on
    a new run's distractors. The boost is drawn uniformly from ``boost_range`` (x the median
    residual norm at the steering hook); sampling is the experiments' (temperature 0.6,
    repetition penalty 1.1, a recorded seed). A drift the offline judge scores below
    ``off_topic_below`` is kept as ``drift`` with ``drift_latent``, ``drift_boost`` (raw),
    ``drift_boost_norm``, ``drift_seed``, ``drift_score`` and ``drift_split``; the others keep none.
    """
    if not latents:
        raise BadInput("Live drifts need at least one distractor latent")
    lo, hi = check_boost_range(*boost_range)
    med = float(engine.median_norm)
    rng = np.random.default_rng(seed)
    _, held_rows = split_prompts(rows, heldout_frac, split_seed)
    search_lat, held_lat = split_latents(latents, heldout_frac, split_seed)
    held_rows, plan, used = set(held_rows), [], {"search": 0, "heldout": 0}
    for k in range(len(rows)):
        side = "heldout" if k in held_rows else "search"
        pool = held_lat if side == "heldout" else search_lat
        plan.append((int(pool[used[side] % len(pool)]), float(rng.uniform(lo, hi)), seed * 1000 + k, side))
        used[side] += 1
    out = []
    for a in range(0, len(rows), batch_size):
        check_cancel(cancel, "Live drifts")
        chunk = list(range(a, min(a + batch_size, len(rows))))
        specs = [GenerationSpec(prompt=rows[k]["prompt"], runs=("steered",), watch=[], top_k=0,
                                interventions=[Intervention(latent=plan[k][0], mode="add", strength=plan[k][1] * med,
                                                            units="raw")],
                                temperature=temperature, repetition_penalty=1.1, max_new_tokens=max_new_tokens,
                                seed=plan[k][2]) for k in chunk]
        texts = [r["steered"].text.strip() for r in engine.generate_batch(specs, cancel=cancel)]
        scores = score_many([(rows[k]["prompt"], t, None) for k, t in zip(chunk, texts)])
        for k, text, (score, _) in zip(chunk, texts, scores):
            base = {f: v for f, v in rows[k].items() if not f.startswith("drift")}
            if text and float(score) < off_topic_below:
                lat, b, sd, side = plan[k]
                base.update(drift=text, drift_latent=lat, drift_boost=round(b * med, 4), drift_boost_norm=round(b, 4),
                            drift_seed=sd, drift_score=round(float(score), 2), drift_split=side)
            out.append(base)
        report_fraction(progress, "live drifts", len(out) / max(1, len(rows)), f"{len(out)}/{len(rows)} prompts")
    return out


def write_inputs(rows: Sequence[dict], out: str | Path) -> Path:
    """Write detector input rows as JSONL, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


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


def split_latents(latents: Sequence[int], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(search, held-out) distractor latents, split by a hash of the latent id like the prompts."""
    def h(j):
        return int(hashlib.sha1(f"{seed}:latent:{int(j)}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    lat = sorted(dict.fromkeys(int(j) for j in latents))
    held = [j for j in lat if h(j) < frac]
    search = [j for j in lat if h(j) >= frac]
    if not held or not search:
        raise BadInput(f"Hold out distractors too: {len(lat)} latent(s) cannot be split into search and held-out sets")
    return search, held


@dataclass
class Chat:
    """One [user, assistant] chat and the class of every character span of the response."""
    row: int
    kind: str  # on | recovery | drift | shuffle | repeat | steer_only
    prompt: str
    response: str
    spans: list[tuple[int, int, str]]  # (start char, end char, class) within the response
    steer: tuple[int, float] | None = None  # (latent, raw coefficient) added at the steering hook while reading


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
        steer = live_steering(r)
        if r.get("drift", "").strip():
            dr = r["drift"].strip()
            chats.append(Chat(i, "drift", r["prompt"], dr, [(0, len(dr), "drift")], steer))
        if steer is not None:
            chats.append(Chat(i, "steer_only", r["prompt"], ans, [(0, len(ans), "steer_only")], steer))
        for how in ("shuffle", "repeat"):
            g = garble(ans, how, seed + i)
            chats.append(Chat(i, how, r["prompt"], g, [(0, len(g), how)]))
    return chats


