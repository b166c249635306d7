"""Circuit and backtracking activity aligned at correction points, averaged over many episodes.

ESR_METHOD.md sec. 6 (arXiv 2602.06941): per-token activity of the off-topic detectors (the
"resistance circuit"), the backtracking latents and the distractor, EMA-smoothed (alpha 0.5),
around the point where the model restarts. The paper reports, over 146 episodes replayed
with steering off, detectors at 4.4x their on-topic baseline during off-topic content and
2.1x after the correction.

Experiment runs keep text, not activations, so every episode is replayed teacher-forced (one
forward pass of the [user, assistant] chat):

- ``trials``: the multi-attempt trials of a run (judge found >= 2 attempts). Correction
  point = start of the second attempt; replayed WITH the trial's own interventions (the
  distractor boost and the condition's ablations, built by the runner's own function), so
  the replay sees what the run saw. Members an ablation clamps read 0.
- ``synthetic``: recoveries spliced as in :mod:`.backtracking` (start of a prompt's own
  answer, a drift into another prompt's answer, a restart sentence, the own answer), replayed
  with steering off. Correction point = start of the restart sentence; the drift span is
  the known off-topic region.

Per episode the response tokens' group sums are EMA-smoothed, aligned at the correction
token (offset 0 = first token of the restart phrase) over ``-window..+window``, NaN-padded
where an episode has no token, and averaged per offset (mean, standard error, n). Region
means are divided by the on-topic baseline: the mean per-token (EMA) activity over the
unsteered on-topic answers (``assets/prompts/default_answers.jsonl``).

The result is ``overlay.json`` in the run folder (or any folder for synthetic episodes only),
written atomically. Each source carries a hash of its inputs and is reused while they are
unchanged; finished episodes are appended to ``overlay.partial.jsonl`` as they complete, so
a cancelled or crashed computation resumes where it stopped (the file is removed at the end).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from esr_core.errors import BadInput
from esr_core.experiments.overlay_summary import (
    FORMAT,
    PAPER,
    PARTIAL_FILE,
    SOURCE_LABELS,
    char_token,
    clean,
    episode_brief,
    load_overlay,
    locate_response,
    overlay_path,
    span_tokens,
    steering_word,
    summarise_source,
)
from esr_core.experiments.runner import check_same_sae, engine_for
from esr_core.experiments.spec import Trial, prompt_for, trial_interventions
from esr_core.experiments.store import SPEC_FILE, load_spec, load_trials
from esr_core.io import append_jsonl, atomic_write_json, read_jsonl
from esr_core.jobs import BackgroundJob, CancelLike, Progress, check_cancel, report
from esr_core.judge.restart_phrases import find_restart_phrases
from esr_core.latents.catalog.store import sae_weights_hash
from esr_core.latents.groups import LatentGroup, allowed_group_file, group_for, load_group, readout_sae
from esr_core.models.hooks import capture_batches
from esr_core.paths import repo_relative
from esr_core.resistance.backtracking import BacktrackingParams
from esr_core.resistance.detectors import encode
from esr_core.resistance.episodes import build_episodes, load_inputs, render_pair, sentences
from esr_core.resistance.signals import ema
from esr_core.resistance.view import circuit_activity
from esr_core.steering.interventions import Intervention

log = logging.getLogger(__name__)


@dataclass
class OverlayParams:
    window: int = 40  # tokens before and after the correction token
    n_synthetic: int = 48  # synthetic recoveries (0: none)
    include_trials: bool = True  # the run's multi-attempt trials (when the folder is a run)
    ema_alpha: float = 0.5
    synthetic_seed: int = 1  # derangement seed of the drifts (the backtracking search used 0)
    start_sentences: int = 1
    drift_sentences: int = 3
    max_answer_chars: int = 500
    n_baseline: int | None = None  # on-topic answers for the baseline (None: all shipped)
    on_topic_score: float = 50.0  # a first attempt below this counts as off-topic
    batch_size: int = 8
    circuit_path: str | None = None  # None: the shipped circuit for this SAE (else the run's group)
    backtracking_path: str | None = None

    def validate(self) -> "OverlayParams":
        if not 1 <= int(self.window) <= 1000:
            raise BadInput(f"window must be in 1..1000 tokens, got {self.window}")
        if not 0 <= int(self.n_synthetic) <= 10_000:
            raise BadInput(f"synthetic episodes must be in 0..10000, got {self.n_synthetic}")
        if not 0.0 < float(self.ema_alpha) <= 1.0:
            raise BadInput(f"EMA alpha must be in (0, 1], got {self.ema_alpha}")
        if self.n_baseline is not None and int(self.n_baseline) < 1:
            raise BadInput("the baseline needs at least one on-topic answer")
        return self


# ----------------------------------------------------------------------------- episodes (text)


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def synthetic_specs(n: int, params: OverlayParams) -> list[dict]:
    """``n`` synthetic recoveries (text level), steering off; known drift and restart spans."""
    if n <= 0:
        return []
    prompts, answers = load_inputs(None, params.max_answer_chars)
    out: list[dict] = []
    seed = int(params.synthetic_seed)
    while len(out) < n:
        bp = BacktrackingParams(seed=seed, start_sentences=params.start_sentences,
                                drift_sentences=params.drift_sentences, max_answer_chars=params.max_answer_chars)
        for i, ep in enumerate(build_episodes(prompts, answers, bp)):
            start = " ".join(sentences(answers[i][: params.max_answer_chars])[: params.start_sentences])
            rs, re_ = ep["restart_span"]
            off = (len(start) + 1, rs - 1)
            out.append({"source": "synthetic", "key": f"{prompts[i]['id']}<{prompts[ep['drift_from']]['id']}"
                                                      f"|v{ep['variant']}|s{seed}",
                        "prompt": ep["prompt"], "response": ep["response"], "corr_char": rs, "corr_end_char": re_,
                        "off_chars": list(off), "off_topic": True, "interventions": [], "distractor": None,
                        "restart": ep["response"][rs:re_], "heldout_wording": bool(ep["heldout"])})
            if len(out) >= n:
                break
        seed += 1000
    return out


def _num(x, default=None):
    try:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return default
        return x
    except TypeError:
        return default


def trial_specs(run_dir: str | Path, params: OverlayParams, spec=None) -> tuple[list[dict], list[dict]]:
    """Multi-attempt trials of a run as replay specs (with their interventions), plus skipped ones."""
    spec = spec or load_spec(run_dir)
    df = load_trials(run_dir)
    if not len(df) or "n_attempts" not in df.columns:
        return [], []
    multi = df[df["n_attempts"].fillna(0).astype(float) >= 2]
    out, skipped = [], []
    for _, r in multi.iterrows():
        key = str(r["key"])
        try:
            atts = r["attempts"]
            atts = json.loads(atts) if isinstance(atts, str) else list(atts)
            response = str(r["response"] or "")
            a1, a2 = atts[0], atts[1]
            corr = int(a2["start_char"])
            head = str(a2.get("attempt_text", ""))[:30]
            if head and not response[corr:].startswith(head):
                k = response.find(head)
                if k < 0:
                    raise BadInput("the second attempt's text is not in the response")
                corr = k
            phrase = next((p for p in find_restart_phrases(response) if abs(p.start_char - corr) <= 2), None)
            corr_end = phrase.end_char if phrase else corr + 1
            t = Trial(key=key, condition=str(r["condition"]), latent=int(r["latent"]), prompt_id=str(r["prompt_id"]),
                      seed=int(r["seed"]), boost=float(r["boost"]), level=int(_num(r.get("level"), 0)),
                      rep=int(_num(r.get("rep"), 0)),
                      ablation_seed=None if _num(r.get("ablation_seed")) is None else int(r["ablation_seed"]))
            sent = _num(r.get("prompt_sent"))
            prompt = str(sent) if sent else prompt_for(spec, t.condition, t.latent, str(r["prompt"]))[0]
            ivs = [iv.to_dict() for iv in trial_interventions(spec, t)]
            scores = [float(a.get("score", 0.0)) for a in atts]
            out.append({"source": "trials", "key": key, "prompt": prompt, "response": response, "corr_char": corr,
                        "corr_end_char": corr_end, "off_chars": [int(a1.get("start_char", 0)), corr],
                        "off_topic": scores[0] < params.on_topic_score, "interventions": ivs,
                        "distractor": int(r["latent"]), "condition": t.condition, "scores": scores,
                        "restart": phrase.text if phrase else response[corr:corr + 40]})
        except (BadInput, KeyError, IndexError, TypeError, ValueError) as exc:
            skipped.append({"key": key, "why": str(exc)[:200]})
    return out, skipped


def baseline_specs(params: OverlayParams) -> list[dict]:
    prompts, answers = load_inputs(params.n_baseline, params.max_answer_chars)
    return [{"source": "baseline", "key": p["id"], "prompt": p["prompt"], "response": a} for p, a in zip(prompts, answers)]


# ----------------------------------------------------------------------------- groups


def _group_summary(g: LatentGroup | None, source: str) -> dict | None:
    if not g:
        return None
    return {"name": g.name, "members": [int(m) for m in g.members], "weights": [float(w) for w in g.weights],
            "file": source}


def resolve_groups(engine, params: OverlayParams, spec=None) -> tuple[LatentGroup, LatentGroup | None, dict]:
    """(circuit, backtracking or None, where each came from) for this engine's SAE."""
    rel = repo_relative
    src = {}
    if params.circuit_path:
        circuit = load_group(params.circuit_path)
        src["circuit"] = rel(params.circuit_path)
    else:
        circuit = group_for(engine, "circuit")
        src["circuit"] = "shipped or cached circuit for this SAE"
        if circuit is None and spec is not None and spec.detector_group:
            p = allowed_group_file(spec.detector_group)
            if p is not None and p.exists():
                g = load_group(p)
                if g.matches(engine):
                    circuit, src["circuit"] = g, rel(p)
    if circuit is None or not circuit.members:
        raise BadInput("No resistance circuit for this SAE: find one first (esr-lab detectors find) or pass a group")
    if params.circuit_path and not circuit.matches(engine):
        raise BadInput(f"The circuit {rel(params.circuit_path)} was found on another model or readout SAE "
                       "than this one: its latent ids would read other latents")
    if params.backtracking_path:
        bt = load_group(params.backtracking_path)
        src["backtracking"] = rel(params.backtracking_path)
        if not bt.matches(engine):
            raise BadInput(f"The backtracking group {rel(params.backtracking_path)} belongs to another model or "
                           "readout SAE than this one")
    else:
        bt = group_for(engine, "backtracking")
        src["backtracking"] = "shipped or cached backtracking group for this SAE" if bt else None
    if bt is not None and not bt.members:
        bt = None
    return circuit, bt, src


# ----------------------------------------------------------------------------- model side


def _read_z(z, groups: dict, distractor: int | None, first: int, last: int) -> dict:
    """Raw per-token group sums over the response tokens (z: full SAE code [T, d_sae])."""
    out = {}
    for name, g in groups.items():
        out[name] = None if g is None else [round(float(v), 5) for v in
                                            circuit_activity(z, g, ema_alpha=None)[first:last]]
    if distractor is not None:
        col = z[:, int(distractor)]
        col = col.float().numpy() if hasattr(col, "numpy") else np.asarray(col)
        out["distractor"] = [round(float(v), 5) for v in col[first:last]]
    else:
        out["distractor"] = None
    return out


def _episode_record(item: dict, text: str, offsets, z, groups: dict, same_sae: bool = True) -> dict:
    """One replayed chat's per-token signals; with a readout SAE other than the steering SAE
    (``same_sae`` False) the distractor's id means nothing in ``z``, so its lane is left out."""
    base, first, last = locate_response(text, offsets, item["response"])
    rec = {"id": item["id"], "source": item["source"], "key": item["key"], "n": last - first}
    rec.update(_read_z(z, groups, item.get("distractor") if same_sae else None, first, last))
    if item["source"] != "baseline":
        corr = char_token(offsets, base, first, last, item["corr_char"])
        _, corr_end = span_tokens(offsets, base, first, last, item["corr_char"], item["corr_end_char"])
        off = span_tokens(offsets, base, first, last, *item["off_chars"])
        rec.update(corr=corr, corr_end=max(corr_end, corr + 1), off=[off[0], min(off[1], corr)],
                   off_topic=bool(item.get("off_topic")), steering=bool(item.get("interventions")))
        for k in ("condition", "scores", "restart", "heldout_wording"):
            if k in item:
                rec[k] = item[k]
        ablated = {int(iv["latent"]) for iv in item.get("interventions", []) if iv.get("mode") == "ablate"}
        # ablations are steering-SAE ids: they hit the circuit only when it is on that SAE
        rec["circuit_ablated"] = same_sae and bool(ablated & set(groups["circuit"].members))
    return rec


def _replay(engine, items: list[dict], groups: dict, params: OverlayParams, sink: Callable[[dict], None],
            cancel: CancelLike, tick: Callable[[], None]) -> None:
    """Forward every item; unsteered ones in right-padded batches stopping at the hook, steered
    ones one by one through the engine's request-scoped interventions."""

    def check():
        check_cancel(cancel, "Overlay (finished episodes are kept and a rerun resumes)")

    check()
    tok = engine.model.tokenizer
    read = readout_sae(engine)
    same = not getattr(engine, "has_readout_sae", False)
    plain = [it for it in items if not it.get("interventions")]
    steered = [it for it in items if it.get("interventions")]
    if plain:
        rendered = [render_pair(tok, it["prompt"], it["response"], response_only=True) for it in plain]
        for i, h in capture_batches(engine.model, read.hook_name, [r[0] for r in rendered], params.batch_size):
            check()
            ids, offs, text, _ = rendered[i]
            sink(_episode_record(plain[i], text, offs, encode(engine, h, read), groups, same))
            tick()
    for it in steered:
        check()
        acts = engine.activations(messages=[{"role": "user", "content": it["prompt"]},
                                            {"role": "assistant", "content": it["response"]}],
                                  interventions=[Intervention.from_dict(d) for d in it["interventions"]])
        sink(_episode_record(it, acts.text, acts.offsets, acts.z, groups, same))
        tick()


# ----------------------------------------------------------------------------- files


def _partial(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(folder / PARTIAL_FILE) if isinstance(r, dict) and "id" in r}


# ----------------------------------------------------------------------------- the computation


def compute_overlay(folder: str | Path, engine=None, params: OverlayParams | None = None,
                    progress: Progress | None = None, cancel: CancelLike = None, force: bool = False) -> dict:
    """Compute (or reuse) the overlay of ``folder`` and save it as ``overlay.json``.

    ``folder`` is an experiment run (its multi-attempt trials are one source) or any folder
    (synthetic episodes only). A source whose inputs (episode texts, interventions, groups,
    SAE, window, EMA) are unchanged is reused from the saved file unless ``force``.
    """
    params = (params or OverlayParams()).validate()
    t0 = time.time()
    folder = Path(folder)
    spec = load_spec(folder) if (folder / SPEC_FILE).exists() else None
    if not ((spec is not None and params.include_trials) or params.n_synthetic > 0):
        raise BadInput(f"Nothing to compute in {folder}: "
                       + ("trials left out" if spec is not None else "it is not an experiment run")
                       + " and no synthetic episodes were asked for")
    eng = engine_for(spec, engine)
    if spec is not None:
        check_same_sae(spec, eng)
    folder.mkdir(parents=True, exist_ok=True)
    circuit, bt, group_src = resolve_groups(eng, params, spec)
    groups = {"circuit": circuit, "backtracking": bt}
    sae_hash = sae_weights_hash(eng.sae)
    read = readout_sae(eng)
    read_info = ({"weights_hash": sae_weights_hash(read), "key": read.key, "source": str(read.source),
                  "hook": read.hook_name} if getattr(eng, "has_readout_sae", False) else None)
    ident = [sae_hash, eng.hook_name, _group_summary(circuit, ""), _group_summary(bt, "")]
    if read_info is not None:  # another readout SAE is another computation (kept apart from old files' ids)
        ident.append([read_info["weights_hash"], read_info["hook"]])

    wanted: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    if spec is not None and params.include_trials:
        wanted["trials"], skipped = trial_specs(folder, params, spec)
    if params.n_synthetic > 0:
        wanted["synthetic"] = synthetic_specs(params.n_synthetic, params)
    base_items = baseline_specs(params)
    for it in [x for v in wanted.values() for x in v] + base_items:
        it["id"] = _hash([it["source"], it["prompt"], it["response"], it.get("interventions"), it.get("corr_char"),
                          it.get("corr_end_char"), it.get("off_chars"), it.get("off_topic"), it.get("distractor"),
                          ident])
    base_sha = _hash(sorted(it["id"] for it in base_items))
    shas = {s: _hash([sorted(it["id"] for it in items), base_sha, params.window, params.ema_alpha])
            for s, items in wanted.items()}
    old = None if force else load_overlay(folder)
    reuse = {s for s in wanted if old and (old.get("sources", {}).get(s) or {}).get("inputs_sha1") == shas[s]}
    if old and reuse == set(wanted) and set(old.get("sources", {})) == set(wanted):
        return old

    todo_items = [it for s in wanted if s not in reuse for it in wanted[s]] + base_items
    cache = _partial(folder)
    todo = [it for it in todo_items if it["id"] not in cache]
    done = {"n": 0}
    total = len(todo)

    def tick():
        done["n"] += 1
        report(progress, "overlay", done["n"], total, f"replayed {done['n']}/{total} chats")

    def sink(rec: dict):
        cache[rec["id"]] = rec
        append_jsonl(folder / PARTIAL_FILE, rec)

    report(progress, "overlay", 0, total, f"{len(todo_items) - total} chats already replayed; {total} to go")
    t_fwd = time.time()
    if todo:
        _replay(eng, todo, groups, params, sink, cancel, tick)
    fwd_s = time.time() - t_fwd

    base_recs = [cache[it["id"]] for it in base_items]
    baseline = {"n_answers": len(base_recs), "inputs_sha1": base_sha,
                "what": "mean per-token EMA activity of the unsteered on-topic answers (response tokens, "
                        "each answer weighted equally)"}
    for name in ("circuit", "backtracking"):
        per = [float(np.mean(ema(r[name], params.ema_alpha))) for r in base_recs if r.get(name) and r["n"] > 0]
        baseline[name] = clean(np.mean(per)) if per else None

    sources = {}
    for s, items in wanted.items():
        if s in reuse:
            sources[s] = old["sources"][s]
            continue
        eps = [cache[it["id"]] for it in items]
        block = summarise_source(eps, baseline, params.window, params.ema_alpha)
        block.update({
            "label": SOURCE_LABELS[s], "inputs_sha1": shas[s], "n_episodes": len(eps),
            "steering": steering_word(eps),
            "steering_note": ("replayed with each trial's own interventions (distractor boost and the condition's "
                              "ablations)" if s == "trials" else "replayed unsteered, as the paper's statistics"),
            "n_circuit_ablated": sum(bool(e.get("circuit_ablated")) for e in eps),
            "episodes": [episode_brief(e, params.ema_alpha) for e in eps],
            "computed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        if s == "trials":
            block["skipped"] = skipped
            block["conditions"] = {c: sum(e.get("condition") == c for e in eps)
                                   for c in sorted({e.get("condition") for e in eps})}
        sources[s] = block
    out = {
        "format": FORMAT, "model": eng.model.name, "sae": {"weights_hash": sae_hash, "key": eng.sae.key},
        "hook": eng.hook_name, "read_sae": read_info, "ema_alpha": params.ema_alpha, "window": [-params.window, params.window],
        "offset_zero": "first token of the restart phrase (start of the second attempt for trials)",
        "groups": {"circuit": _group_summary(circuit, group_src["circuit"]),
                   "backtracking": _group_summary(bt, group_src.get("backtracking") or "")},
        "baseline": baseline, "sources": sources,
        "ratios": {s: {name: {"off_topic": b["regions"].get(name, {}).get("off_topic", {}).get("ratio"),
                              "after_correction": b["regions"].get(name, {}).get("after_correction", {}).get("ratio")}
                       for name in ("circuit", "backtracking")} for s, b in sources.items()},
        "paper": PAPER, "params": asdict(params),
        "seconds": {"forward": round(fwd_s, 1), "total": round(time.time() - t0, 1), "chats_replayed": total},
        "device": str(getattr(eng, "device", "cpu")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(overlay_path(folder), out)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(overlay_path(folder), 0o666 & ~umask)  # a result to share, not the temp file's 0600
    try:
        (folder / PARTIAL_FILE).unlink()
    except FileNotFoundError:
        pass
    return out


def start_overlay_job(folder: str | Path, params: OverlayParams | None = None, engine=None) -> BackgroundJob:
    """:func:`compute_overlay` in a worker thread (the app): progress, result or error, real cancel."""
    folder = Path(folder)
    return BackgroundJob(f"overlay-{folder.name}", lambda progress, cancel: compute_overlay(
        folder, engine, params, progress=progress, cancel=cancel), folder=folder).start()
