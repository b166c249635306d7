"""Training data for a resistance-tuned model: self-corrections and plain answers.

A self-correction example is the chat-templated prompt, a drift of 2-4 sentences about
something else, one sentence that notices it (:mod:`.noticing`) and the base model's own
unsteered answer. Only the noticing sentence and the answer carry loss. Drift sources, each
with a share: ``steered`` (the base model's own continuation under a training-split distractor
at about its calibrated boost, kept only where the judge scores it off-topic: the text the
model really sees when steered), ``other_answer`` (another topic's answer, a derangement) and
``corpus`` (sentences from the local text corpus). A normal example is the prompt and the
answer, all of it with loss.

Splits: training prompts (assets/finetune/train_prompts.json) never overlap the evaluation
prompts, and training distractor latents never include the evaluation run's latents; both
splits are written next to the data. Every stage appends to a JSONL file keyed by prompt, so
an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esr_core.errors import BadInput
from esr_core.experiments.distractors import select_distractors
from esr_core.finetune.noticing import NOTICING
from esr_core.io import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl
from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.judge.prompts import load_prompts
from esr_core.judge.scoring import score_many
from esr_core.latents.catalog.store import Catalog, find_catalog
from esr_core.paths import ASSETS_DIR
from esr_core.sae_training import corpus
from esr_core.steering.engines import get_engine
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec

TRAIN_PROMPTS = ASSETS_DIR / "finetune" / "train_prompts.json"
HELDOUT_RUN = ASSETS_DIR / "experiments" / "reference"  # its latents and prompts are the held-out split
DRIFT_SOURCES = ("steered", "other_answer", "corpus")
EXAMPLES_FILE, RECIPE_FILE, SPLITS_FILE = "examples.jsonl", "recipe.json", "splits.json"
MASK_FIELDS = ("segments",)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


@dataclass
class DataRecipe:
    """Everything that decides the data; recorded with it (and with the adapter)."""

    model: str = "smollm2-135m-instruct"
    n_self_correction: int = 360
    n_normal: int = 180
    drift_shares: dict = field(default_factory=lambda: {"steered": 0.5, "other_answer": 0.25, "corpus": 0.25})
    n_train_latents: int = 40
    boost_norm: float = 0.45  # x median residual norm: about the evaluation latents' calibrated boosts
    retry_boost_factor: float = 1.6  # a steered drift the judge finds on-topic is tried once more, stronger
    off_topic_below: float = 30.0  # judge score (0-100) under which a drift counts as off-topic
    drift_sentences: tuple = (2, 4)
    drift_max_tokens: int = 72
    answer_max_tokens: int = 128
    temperature: float = 0.6  # drifts are sampled like the experiments' answers; answers are greedy
    seed: int = 42
    batch_size: int = 24
    n_prompts: int | None = None  # use only this many training prompts (a seeded choice); None = all

    def validate(self) -> DataRecipe:
        shares = {k: float(v) for k, v in dict(self.drift_shares).items()}
        if set(shares) - set(DRIFT_SOURCES) or any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
            raise BadInput(f"drift_shares must be non-negative shares of {', '.join(DRIFT_SOURCES)}")
        total = sum(shares.values())
        self.drift_shares = {k: shares.get(k, 0.0) / total for k in DRIFT_SOURCES}
        if self.n_self_correction < 0 or self.n_normal < 0 or self.n_self_correction + self.n_normal == 0:
            raise BadInput("Need at least one example (n_self_correction + n_normal > 0)")
        lo, hi = self.drift_sentences
        if not 1 <= int(lo) <= int(hi):
            raise BadInput("drift_sentences must be (low, high) with 1 <= low <= high")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> DataRecipe:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise BadInput(f"Unknown data recipe field(s): {', '.join(sorted(unknown))}")
        r = cls(**d)
        r.drift_sentences = tuple(r.drift_sentences)
        return r.validate()


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text or "") if s and s.strip()]


def cut_sentences(text: str, lo: int, hi: int, rng: random.Random, max_words: int = 90) -> str:
    """The first ``lo``..``hi`` sentences (a drift); a run-on without sentence ends is cut by words."""
    ss = sentences(text)
    if len(ss) >= lo:
        return " ".join(ss[: rng.randint(lo, min(hi, len(ss)))])
    words = (text or "").split()
    return " ".join(words[:max_words]).rstrip(",;:") + ("" if (text or "").rstrip().endswith((".", "!", "?")) else "…")


def complete_sentences(text: str) -> str:
    """``text`` up to its last complete sentence (an answer cut by the token limit ends cleanly)."""
    t = (text or "").strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=[\"')\]]*(?:\s|$))", t)]
    return t[: ends[-1]].strip() if ends and ends[-1] > len(t) // 3 else t


def splits(train_prompts=None, heldout_run: Path = HELDOUT_RUN) -> dict:
    """The training and held-out splits (prompt ids and texts, held-out latent ids), checked disjoint."""
    train = load_prompts(train_prompts or TRAIN_PROMPTS)
    heldout = load_prompts()
    spec = read_json(Path(heldout_run) / "spec.json", "The held-out run's spec")
    held_latents = [int(x) for x in spec.get("latents", [])]
    overlap = ({p["id"] for p in train} & {p["id"] for p in heldout}) | (
        {p["prompt"].strip().lower() for p in train} & {p["prompt"].strip().lower() for p in heldout})
    if overlap:
        raise BadInput(f"Training prompts overlap the evaluation prompts: {sorted(overlap)[:5]}")
    return {"train_prompt_ids": [p["id"] for p in train], "heldout_prompt_ids": [p["id"] for p in heldout],
            "heldout_latents": held_latents, "heldout_run": str(Path(heldout_run).name), "train_prompts": train}


def encode_example(tokenizer, ex: dict, max_len: int = 256) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: the templated prompt and every segment without loss
    get label -100; the end-of-turn token is learnt with the last segment."""
    if not isinstance(ex, dict) or not isinstance(ex.get("segments"), list) or not ex.get("prompt"):
        raise BadInput("A training example needs 'prompt' and 'segments' [{text, loss}] (the loss mask)")
    msgs = [{"role": "user", "content": str(ex["prompt"])}]
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(head, add_special_tokens=False).input_ids)
    else:
        ids = list(tokenizer(str(ex["prompt"]) + "\n").input_ids)
    labels = [-100] * len(ids)
    text_so_far = ""
    for seg in ex["segments"]:
        if not isinstance(seg, dict) or "text" not in seg or "loss" not in seg:
            raise BadInput("Each segment needs 'text' and 'loss'")
        piece = (" " if text_so_far and not text_so_far.endswith((" ", "\n")) else "") + str(seg["text"])
        text_so_far += piece
        t = list(tokenizer(piece, add_special_tokens=False).input_ids)
        ids += t
        labels += t if seg["loss"] else [-100] * len(t)
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.append(int(eos))
        labels.append(int(eos) if ex["segments"][-1]["loss"] else -100)
    return ids[:max_len], labels[:max_len]


# ----------------------------------------------------------------------------- building


def _generate(engine, items: list[dict], max_new: int, temperature: float, batch_size: int, cancel,
              progress: Progress | None, stage: str, out: Path, judge: bool = False) -> dict[str, dict]:
    """Generate ``items`` ({key, prompt, ivs, seed}) in batches, appending each (with the judge's
    score of the text against the prompt, if asked) to ``out``; what is there already is kept."""
    done = {r["key"]: r for r in read_jsonl(out)} if out.exists() else {}
    done = {k: r for k, r in done.items() if k in {it["key"] for it in items}}
    todo = [it for it in items if it["key"] not in done]
    for a in range(0, len(todo), batch_size):
        check_cancel(cancel, f"Data ({stage})")
        chunk = todo[a : a + batch_size]
        specs = [GenerationSpec(prompt=it["prompt"], interventions=[Intervention.from_dict(d) for d in it["ivs"]],
                                watch=[], top_k=0, temperature=temperature, max_new_tokens=max_new, seed=it["seed"],
                                runs=("steered",)) for it in chunk]
        results = engine.generate_batch(specs, cancel=cancel)
        texts = [r["steered"].text for r in results]
        judged = score_many([(it["prompt"], t, None) for it, t in zip(chunk, texts)]) if judge else [None] * len(chunk)
        for it, text, sc in zip(chunk, texts, judged):
            rec = {**it, "text": text}
            if sc is not None:
                rec["score"] = round(float(sc[0]), 3)
            append_jsonl(out, rec)
            done[it["key"]] = rec
        report_fraction(progress, f"data: {stage}", (len(items) - len(todo) + a + len(chunk)) / max(1, len(items)),
                        f"{len(done)}/{len(items)}")
    return done


def build_dataset(recipe: DataRecipe, out_dir: str | Path, engine=None, catalog=None,
                  progress: Progress | None = None, cancel=None, corpus_texts: list[str] | None = None) -> dict:
    """Build (or resume) the data in ``out_dir``; returns the manifest (counts and shares)."""
    recipe.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp = splits()
    rng = random.Random(recipe.seed)
    prompts = {p["id"]: p for p in sp.pop("train_prompts")}
    if recipe.n_prompts is not None:
        keep = sorted(random.Random(recipe.seed).sample(sorted(prompts), min(recipe.n_prompts, len(prompts))))
        prompts = {i: prompts[i] for i in keep}
        sp["train_prompt_ids"] = list(prompts)
    if engine is None:
        engine = get_engine(recipe.model)
    atomic_write_json(out / RECIPE_FILE, asdict(recipe))
    # training distractor latents: concrete, irrelevant to the training prompts, never a held-out one
    latents_file = out / "train_latents.json"
    if latents_file.exists():
        chosen = read_json(latents_file, "The training latents")
    else:
        if catalog is None:
            where = find_catalog(engine.model.name, engine.sae)
            if where is None:
                raise BadInput("No latent catalog for this model and SAE: build one (`esr-lab catalog build`) so "
                               "training distractors can be chosen by their labels")
            catalog = Catalog.load(where)
        sel = select_distractors(catalog, engine, [p["prompt"] for p in prompts.values()], recipe.n_train_latents,
                                 seed=recipe.seed, exclude=sp["heldout_latents"], cancel=cancel)
        chosen = {"latents": [int(i) for i in sel["latents"]],
                  "labels": {str(k): v for k, v in sel["labels"].items()}, "report": sel["report"]}
        atomic_write_json(latents_file, chosen)
    train_latents = chosen["latents"]
    if set(train_latents) & set(sp["heldout_latents"]):
        raise BadInput("A training latent is in the held-out set")
    sp["train_latents"] = train_latents
    atomic_write_json(out / SPLITS_FILE, sp)
    ids = list(prompts)
    # 1. the base model's own greedy answers
    answers = _generate(engine, [{"key": i, "prompt": prompts[i]["prompt"], "ivs": [], "seed": recipe.seed}
                                 for i in ids], recipe.answer_max_tokens, 0.0, recipe.batch_size, cancel,
                        progress, "answers", out / "answers.jsonl")
    answer = {i: complete_sentences(answers[i]["text"]) for i in ids}
    # 2. which prompts get which drift source
    n_sc = min(recipe.n_self_correction, len(ids))
    order = ids[:]
    rng.shuffle(order)
    sc_ids = order[:n_sc]
    counts = {s: int(round(recipe.drift_shares[s] * n_sc)) for s in DRIFT_SOURCES}
    counts["steered"] += n_sc - sum(counts.values())
    source_of = {}
    k = 0
    for s in DRIFT_SOURCES:
        for i in sc_ids[k : k + counts[s]]:
            source_of[i] = s
        k += counts[s]
    # 3. steered drifts: the base model's continuation under a training latent, judged off-topic
    med = float(engine.median_norm)
    steer_items = []
    for j, i in enumerate([i for i in sc_ids if source_of[i] == "steered"]):
        lat = train_latents[j % len(train_latents)]
        for attempt, factor in enumerate((1.0, recipe.retry_boost_factor)):
            steer_items.append({"key": f"{i}#{attempt}", "pid": i, "prompt": prompts[i]["prompt"], "latent": lat,
                                "boost": recipe.boost_norm * factor * med, "seed": recipe.seed + 1000 * attempt + j,
                                "ivs": [{"latent": lat, "mode": "add", "strength": recipe.boost_norm * factor * med,
                                         "units": "raw", "positions": "all"}]})
    first = [it for it in steer_items if it["key"].endswith("#0")]
    drifts = _generate(engine, first, recipe.drift_max_tokens, recipe.temperature, recipe.batch_size, cancel,
                       progress, "steered drifts", out / "drifts.jsonl", judge=True)
    retry = [it for it in steer_items if it["key"].endswith("#1")
             and drifts[it["pid"] + "#0"]["score"] >= recipe.off_topic_below]
    drifts.update(_generate(engine, retry, recipe.drift_max_tokens, recipe.temperature, recipe.batch_size, cancel,
                            progress, "stronger drifts", out / "drifts_retry.jsonl", judge=True))
    scores = {k: float(r["score"]) for k, r in drifts.items()}
    # 4. assemble
    corpus = _corpus_sentences(corpus_texts)
    lo, hi = recipe.drift_sentences
    examples, dropped = [], {"steered_on_topic": 0}
    by_topic = {}
    for i in ids:
        by_topic.setdefault(prompts[i]["topic"], []).append(i)
    for j, i in enumerate(sc_ids):
        src = source_of[i]
        meta: dict[str, Any] = {}
        if src == "steered":
            key = next((f"{i}#{a}" for a in (0, 1) if scores.get(f"{i}#{a}", 100.0) < recipe.off_topic_below), None)
            if key is None:
                dropped["steered_on_topic"] += 1
                continue
            d = drifts[key]
            drift = cut_sentences(d["text"], lo, hi, rng)
            meta = {"latent": d["latent"], "boost": d["boost"], "drift_score": round(scores[key], 2)}
        elif src == "other_answer":
            others = [q for t, qs in by_topic.items() if t != prompts[i]["topic"] for q in qs]
            drift = cut_sentences(answer[rng.choice(others)], lo, hi, rng)
        else:
            start = rng.randrange(max(1, len(corpus) - hi))
            drift = " ".join(corpus[start : start + rng.randint(lo, hi)])
        if "latent" not in meta:  # for training with the steering on: every self-correction has a distractor
            lat = train_latents[j % len(train_latents)]
            meta = {"latent": lat, "boost": recipe.boost_norm * med}
        noticing = rng.choice(NOTICING)
        examples.append({"id": f"sc-{i}", "kind": "self_correction", "prompt_id": i, "prompt": prompts[i]["prompt"],
                         "drift_source": src, "noticing": noticing, **meta,
                         "segments": [{"text": drift, "loss": False}, {"text": noticing, "loss": True},
                                      {"text": answer[i], "loss": True}]})
    for i in order[n_sc : n_sc + recipe.n_normal] + order[: max(0, recipe.n_normal - (len(ids) - n_sc))]:
        examples.append({"id": f"normal-{i}", "kind": "normal", "prompt_id": i, "prompt": prompts[i]["prompt"],
                         "segments": [{"text": answer[i], "loss": True}]})
    rng.shuffle(examples)
    atomic_write_text(out / EXAMPLES_FILE, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    made = {s: sum(1 for e in examples if e.get("drift_source") == s) for s in DRIFT_SOURCES}
    manifest = {"n_examples": len(examples), "n_self_correction": sum(made.values()),
                "n_normal": sum(1 for e in examples if e["kind"] == "normal"), "drift_sources": made,
                "drift_shares": {s: round(made[s] / max(1, sum(made.values())), 3) for s in DRIFT_SOURCES},
                "dropped": dropped, "n_noticing_variants": len({e.get("noticing") for e in examples} - {None}),
                "train_latents": len(train_latents), "heldout_latents": len(sp["heldout_latents"]),
                "train_prompts": len(ids), "heldout_prompts": len(sp["heldout_prompt_ids"])}
    atomic_write_json(out / "manifest.json", manifest)
    report_fraction(progress, "data", 1.0, f"{len(examples)} examples")
    return manifest


def _corpus_sentences(texts: list[str] | None) -> list[str]:
    """Plain sentences of 6-40 words from local text (the corpus's training split, else the sample)."""
    if texts is None:
        try:
            docs = corpus.load_documents("train")
        except Exception:  # noqa: BLE001 - no corpus fetched: the shipped sample
            docs, _ = corpus.heldout_documents(source="shipped")
        texts = [d["text"] for d in docs if "text" in d][:400]
    out = [s for t in texts for s in sentences(t) if 6 <= len(s.split()) <= 40 and "http" not in s]
    if len(out) < 10:
        raise BadInput("Not enough corpus text for the 'corpus' drift source; set its share to 0")
    return out


def load_examples(data_dir: str | Path) -> list[dict]:
    p = Path(data_dir) / EXAMPLES_FILE
    if not p.exists():
        raise BadInput(f"No training data in {data_dir} ({EXAMPLES_FILE} is missing): run `esr-lab finetune data`")
    rows = read_jsonl(p)
    bad = [r.get("id", "?") for r in rows if not all(f in r for f in MASK_FIELDS + ("prompt",))]
    if bad or not rows:
        raise BadInput(f"{p} has examples without the mask fields (prompt, segments): {bad[:3]}")
    return rows
