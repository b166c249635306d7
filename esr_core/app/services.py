"""The thin, Streamlit-free glue the app's pages call.

Everything here is plain Python (testable without a browser): choosing models and SAEs,
describing what is loaded, safe access to the catalog and latent search (which may not exist
yet for a given SAE), turning form input into a validated GenerationSpec, and folding a live
token stream into a partial or finished RunRecord.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from esr_core.errors import BadInput, EsrError
from esr_core.steering.spec import GenerationSpec, PromptReadout, RunDone, RunResult, TokenEvent, collect
from esr_core.steering.interventions import MODES, POSITIONS, UNITS, Intervention, validate
from esr_core.latents.groups import (LatentGroup, catalog_scales, load_builtin_groups, normalised_lane, observed_scales,
                            resolve_scales)
from esr_core.models.registry import DEFAULT_MODEL, get_entry, list_models
from esr_core.paths import ASSETS_DIR
from esr_core.app.run_record import RunRecord

log = logging.getLogger(__name__)

EXAMPLES_FILE = ASSETS_DIR / "examples.json"
ENV_DEFAULT_SAE = "ESR_LAB_DEFAULT_SAE"
NO_DESCRIPTION = "no description"


# ------------------------------------------------------------------ models and SAEs
def model_options() -> list[tuple[str, str]]:
    """(name, label) of the registry's models, the embedded default first."""
    return [(e.name, e.label) for e in list_models()]


def default_sae_for(model: str) -> str | None:
    """The SAE to preselect: ``$ESR_LAB_DEFAULT_SAE`` for the default model, else the registry's."""
    env = os.environ.get(ENV_DEFAULT_SAE)
    if env and model == DEFAULT_MODEL:
        return env
    e = get_entry(model)
    if e is None or not e.default_sae:
        return None
    p = e.default_sae_path
    return str(p) if p is not None else e.default_sae


def default_sae_missing(model: str) -> str | None:
    """A one-line reason when the model's default SAE folder is not there (None if fine)."""
    spec = default_sae_for(model)
    if spec is None:
        return f"No default SAE is known for '{model}': choose an SAE folder or a SAE-Lens release"
    if ":" not in spec or Path(spec).exists():
        p = Path(spec)
        if not (p / "cfg.json").exists():
            return (f"The default SAE for {model} is not in {p} yet (it is trained by `esr-lab sae train`); "
                    "choose another SAE in the sidebar")
    return None


def local_sae_folders(root: Path = ASSETS_DIR / "sae") -> list[str]:
    """SAE-Lens folders shipped under assets/sae (one level deep, or one more)."""
    out = []
    if root.is_dir():
        for p in sorted(root.rglob("cfg.json")):
            if (p.parent / "sae_weights.safetensors").exists():
                out.append(str(p.parent))
    return out


def sae_info(engine) -> dict[str, Any]:
    """What the sidebar shows about the loaded SAE: hook, size, L0 and other recorded metrics."""
    s = engine.sae
    meta = dict(s.meta or {})
    info = {"source": s.source, "hook": s.hook_name, "d_sae": s.d_sae, "d_in": s.d_in,
            "architecture": s.architecture, "layer": s.layer}
    try:
        info["median_resid_norm"] = round(float(engine.median_norm), 2) if s.median_resid_norm is not None else None
    except Exception:
        info["median_resid_norm"] = None
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    for k in ("l0", "explained_variance", "dead_fraction", "ce_loss_recovered"):
        v = metrics.get(k, meta.get(k))
        if v is not None:
            info[k] = v
    for k in ("training_tokens", "release", "sae_id"):
        if k in meta:
            info[k] = meta[k]
    return info


# ------------------------------------------------------------------ catalog and search
def load_catalog(engine):
    """The shipped or cached catalog for this (model, SAE), or None (then ids still work)."""
    try:
        from esr_core.latents.catalog import load_catalog_for_names
    except Exception:
        return None
    try:
        cat = load_catalog_for_names(engine.model.name, engine.sae)
    except EsrError:
        return None
    if cat is not None:
        warm_search_in_background(cat)
    return cat


def warm_search_in_background(catalog) -> threading.Thread:
    """Load the search vectors and the query embedder (about 10 s on CPU) while the user reads the
    page, so the first search answers at once; a failure only means the first search warms up."""
    from esr_core.models.embeddings import embedding_model
    from esr_core.latents.search import embed_query, warm_search

    def work():
        try:
            warm_search(catalog)
            embedding_model()
            embed_query("warm up")  # first forward of the query embedder
        except Exception:  # noqa: BLE001 - best effort; the real search reports its own errors
            log.debug("search warm-up failed", exc_info=True)

    t = threading.Thread(target=work, name="esr-search-warmup", daemon=True)
    t.start()
    return t


def build_catalog(engine, progress: Callable[[float, str], None] | None = None, n_tokens: int = 30_000):
    from esr_core.latents.catalog import catalog_for

    return catalog_for(engine.model, engine.sae, progress=progress, n_tokens=n_tokens)


def description(catalog, latent: int) -> str:
    if catalog is None:
        return NO_DESCRIPTION
    try:
        return catalog.description(int(latent)) or NO_DESCRIPTION
    except (EsrError, IndexError, ValueError, TypeError):
        return NO_DESCRIPTION


def search(catalog, query: str, top: int = 20, d_sae: int | None = None) -> list[dict]:
    """Semantic + lexical search over descriptions; a bare number (or #123) finds that latent."""
    q = (query or "").strip()
    if not q:
        return []
    ids = []
    for tok in q.replace(",", " ").split():
        t = tok.lstrip("#")
        if t.isdigit():
            ids.append(int(t))
    if ids and len(ids) == len(q.replace(",", " ").split()):
        out = []
        for i in ids:
            if d_sae is not None and not 0 <= i < d_sae:
                raise BadInput(f"Latent {i} is out of range: this SAE has latents 0..{d_sae - 1}")
            out.append(_row(catalog, i, score=1.0))
        return out
    if catalog is None:
        raise BadInput("No latent catalog for this SAE yet, so descriptions cannot be searched; "
                       "type latent ids, use 'which latents fire on my text', or build the catalog")
    try:
        from esr_core.latents.search import search_latents
    except ImportError:
        return _lexical(catalog, q, top)
    return [dict(r) for r in search_latents(catalog, q, top=top)]


def _row(catalog, i: int, score: float) -> dict:
    d = {"latent": int(i), "description": description(catalog, i), "score": float(score), "density": None,
         "max_act": None}
    if catalog is not None:
        try:
            d["density"] = float(catalog.density[i])
            d["max_act"] = float(catalog.max_act[i])
        except (IndexError, AttributeError):
            pass
    return d


def _lexical(catalog, q: str, top: int) -> list[dict]:
    words = [w for w in q.lower().split() if w]
    scored = []
    for i, d in enumerate(catalog.descriptions()):
        dl = (d or "").lower()
        s = sum(dl.count(w) for w in words)
        if s:
            scored.append((s, i))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [_row(catalog, i, s) for s, i in scored[:top]]


def firing_on(engine, text: str, top: int = 20, catalog=None) -> list[dict]:
    """Latents that fire most on ``text`` (max over tokens, position 0 excluded)."""
    if catalog is not None:  # ranks by activation relative to each latent's catalog maximum
        try:
            from esr_core.latents.search import latents_firing_on
        except ImportError:
            latents_firing_on = None
        if latents_firing_on is not None:
            out = []
            for r in latents_firing_on(engine, text, top=top, catalog=catalog):
                row = _row(catalog, int(r["latent"]), float(r.get("relative", 0.0)))
                row["act"] = float(r.get("max_act_on_text", 0.0))
                row["token"] = r.get("token")
                out.append(row)
            return out
    res = engine.activations(text=text)
    z = res.z[1:] if res.z.shape[0] > 1 else res.z
    mx, arg = z.max(dim=0)
    vals, idx = mx.topk(min(top, z.shape[1]))
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        if v <= 0:
            break
        r = _row(catalog, i, v)
        r["act"] = float(v)
        r["token"] = res.tokens[int(arg[i]) + (1 if res.z.shape[0] > 1 else 0)]
        out.append(r)
    return out


def latent_entry(engine, catalog, latent: int) -> dict:
    """A feature page: the catalog entry when there is one, else what the weights alone tell."""
    i = engine.sae.check_latent(latent)
    if catalog is not None:
        try:
            e = dict(catalog.entry(i))
            e.setdefault("description", NO_DESCRIPTION)
            e["from_catalog"] = True
            return e
        except EsrError:
            pass
    e = {"latent": i, "description": NO_DESCRIPTION, "density": None, "max_act": None, "histogram": None,
         "contexts": {"text": [], "chat": []}, "from_catalog": False, "dead": False}
    e.update(weight_facts(engine, i))
    return e


def weight_facts(engine, latent: int, n: int = 10) -> dict:
    """Promoted/suppressed tokens (decoder direction through the unembedding) and nearest latents."""
    import torch

    W = engine._W_dec
    d = W[latent]
    out: dict[str, Any] = {}
    try:
        U = engine.model.hf_model.get_output_embeddings().weight.detach().float()
        logits = U @ d
        tok = engine.model.tokenizer
        pv, pi = torch.topk(logits, n)
        sv, si = torch.topk(-logits, n)
        out["promoted"] = [{"token": tok.decode([int(t)]), "token_id": int(t), "logit": float(v)}
                           for t, v in zip(pi, pv)]
        out["suppressed"] = [{"token": tok.decode([int(t)]), "token_id": int(t), "logit": -float(v)}
                             for t, v in zip(si, sv)]
    except Exception:
        out["promoted"], out["suppressed"] = [], []
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = Wn @ Wn[latent]
    cos[latent] = -2
    cv, ci = torch.topk(cos, min(8, W.shape[0] - 1))
    out["neighbours"] = [{"latent": int(j), "cosine": round(float(c), 4), "description": NO_DESCRIPTION}
                         for j, c in zip(ci, cv)]
    return out


def text_activation(engine, text: str, latent: int) -> dict:
    """One latent on the user's own text: per-token values and the maximum (position 0 excluded)."""
    res = engine.activations(text=text)
    vals = res.z[:, int(latent)].tolist()
    body = vals[1:] if len(vals) > 1 else vals
    return {"tokens": res.tokens, "values": vals, "max": float(max(body)) if body else 0.0}


# ------------------------------------------------------------------ steering requests
def parse_latent(text: Any, d_sae: int) -> int:
    s = str(text).strip().lstrip("#")
    try:
        i = int(s)
    except ValueError:
        raise BadInput(f"'{text}' is not a latent id (a whole number like 123)") from None
    if not 0 <= i < d_sae:
        raise BadInput(f"Latent {i} is out of range: this SAE has latents 0..{d_sae - 1}")
    return i


def parse_strength(text: Any) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise BadInput(f"'{text}' is not a number") from None
    if math.isnan(v) or math.isinf(v):
        raise BadInput(f"Strength must be a finite number, got {text}")
    return v


def make_intervention(latent: Any, mode: str, strength: Any, units: str, positions: str, d_sae: int) -> Intervention:
    """Validated intervention from form input; raises BadInput with one clear line."""
    if mode not in MODES or units not in UNITS or positions not in POSITIONS:
        raise BadInput("Unknown mode, units or positions")
    iv = Intervention(latent=parse_latent(latent, d_sae), mode=mode,
                      strength=0.0 if mode == "ablate" else parse_strength(strength), units=units, positions=positions)
    return validate(iv, d_sae)


def parse_watch(text: str, d_sae: int) -> list[int]:
    out = []
    for tok in str(text or "").replace(";", ",").replace(" ", ",").split(","):
        if tok.strip():
            i = parse_latent(tok, d_sae)
            if i not in out:
                out.append(i)
    return out


def watch_list(watched: Sequence[int], interventions: Sequence[Intervention], groups: Sequence[LatentGroup]) -> list[int]:
    """Everything the readout must report: watched latents, steered latents, group members."""
    out: list[int] = []
    for i in list(watched) + [iv.latent for iv in interventions] + [m for g in groups for m in g.members]:
        if int(i) not in out:
            out.append(int(i))
    return out


def build_spec(prompt: str, interventions: Sequence[Intervention], watched: Sequence[int],
               groups: Sequence[LatentGroup], d_sae: int, *, seed: int = 0, temperature: float = 0.0,
               max_new_tokens: int = 48, repetition_penalty: float = 1.1, top_k: int = 8,
               ablate_groups: Sequence[LatentGroup] = (), chat: bool = True) -> GenerationSpec:
    """A validated GenerationSpec; group ablations are applied to the steered run."""
    for iv in interventions:
        validate(iv, d_sae)
    for g in groups:
        g.check(d_sae)
    ivs = list(interventions) + [a for g in ablate_groups for a in g.ablations()]
    spec = GenerationSpec(prompt=prompt or "", interventions=ivs,
                          watch=watch_list(watched, interventions, list(groups) + list(ablate_groups)),
                          top_k=top_k, temperature=float(temperature), max_new_tokens=int(max_new_tokens),
                          seed=int(seed), repetition_penalty=float(repetition_penalty), chat=chat)
    return spec.validate()


@dataclass
class LiveRun:
    """Folds streamed events into per-run text as they arrive; survives a rerun in session state."""

    spec: GenerationSpec
    model: str
    sae: str
    groups: list[LatentGroup] = field(default_factory=list)
    events: list = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    n_tokens: dict[str, int] = field(default_factory=dict)
    done: dict[str, str] = field(default_factory=dict)
    rendered_prompt: str = ""
    status: str = "running"

    def add(self, ev) -> str | None:
        """Record one event; returns the run it belongs to."""
        self.events.append(ev)
        if isinstance(ev, PromptReadout):
            self.rendered_prompt = ev.rendered_prompt
            return ev.run
        if isinstance(ev, TokenEvent):
            self.texts[ev.run] = self.texts.get(ev.run, "") + (ev.text or "")
            self.n_tokens[ev.run] = self.n_tokens.get(ev.run, 0) + 1
            return ev.run
        if isinstance(ev, RunDone):
            self.texts[ev.run] = ev.text
            self.done[ev.run] = ev.stop_reason
            return ev.run
        return None

    def record(self, status: str | None = None) -> RunRecord:
        """The run so far as a RunRecord (a stopped run keeps every token it produced)."""
        st = status or self.status
        res = collect(list(self.events), self.spec)
        for run, r in res.items():
            if not r.text and r.pieces:
                r.text = "".join(r.pieces)
            if not r.stop_reason:
                r.stop_reason = "cancelled" if st == "stopped" else ""
        return RunRecord(spec=self.spec, model=self.model, sae=self.sae, results=res,
                         rendered_prompt=self.rendered_prompt, groups=list(self.groups), status=st)


# ------------------------------------------------------------------ views of a finished run
def _run_tokens(result: RunResult, include_prompt: bool) -> tuple[list[str], np.ndarray, list[bool], list]:
    """Pieces, watched activations [T, n_watch], special flags and top lists, prompt first if asked."""
    pieces, special, tops = list(result.pieces), list(result.special), list(result.top)
    acts = result.acts if result.acts is not None else np.zeros((len(pieces), len(result.watch)))
    if include_prompt and result.prompt is not None:
        p = result.prompt
        pieces = list(p.tokens) + pieces
        special = [False] * len(p.tokens) + special
        tops = list(p.top) + tops
        acts = np.concatenate([np.asarray(p.acts).reshape(-1, len(result.watch)), acts], axis=0) if len(
            result.watch) else np.zeros((len(pieces), 0))
    return pieces, acts, special, tops


def token_values(result: RunResult, latent: int | None = None, group: LatentGroup | None = None,
                 how: str = "sum", include_prompt: bool = False) -> tuple[list[str], list[float], list[bool], list]:
    """Pieces, values, special flags and top lists of one run, for a latent or a group."""
    pieces, acts, special, tops = _run_tokens(result, include_prompt)
    if group is not None:
        vals = group.lane(acts, result.watch, how) if all(m in result.watch for m in group.members) else \
            group.lane_from_tops(tops, how)
    elif latent is not None and latent in result.watch:
        vals = np.asarray(acts)[:, result.watch.index(latent)]
    elif latent is not None:
        vals = np.array([dict(t).get(latent, 0.0) for t in tops])
    else:
        vals = np.zeros(len(pieces))
    return pieces, [float(v) for v in vals], special, tops


def group_member_values(result: RunResult, group: LatentGroup, include_prompt: bool = False,
                        ) -> tuple[list[str], np.ndarray, list[bool], list]:
    """Pieces, the members' activations [T, n_members], special flags and top lists of one run."""
    pieces, acts, special, tops = _run_tokens(result, include_prompt)
    if all(m in result.watch for m in group.members):
        m = group.member_matrix(acts, result.watch)
    else:
        m = group.member_matrix_from_tops(tops)
    return pieces, m, special, tops


SCALE_SOURCES = {"catalog": "its catalog max", "observed": "its max in these runs", "none": "never active: 0"}


def scale_note(group: LatentGroup, sources: Sequence[str]) -> str:
    """How each member was scaled, in words: "each latent ÷ its catalog max" (or the mix)."""
    kinds = list(dict.fromkeys(sources))
    if len(kinds) == 1:
        return f"each latent ÷ {SCALE_SOURCES.get(kinds[0], kinds[0])}"
    parts = []
    for k in kinds:
        ids = [f"#{m}" for m, s in zip(group.members, sources) if s == k]
        more = f" +{len(ids) - 4}" if len(ids) > 4 else ""
        parts.append(f"{SCALE_SOURCES.get(k, k)} for {', '.join(ids[:4])}{more}")
    return "each latent ÷ " + "; ".join(parts)


def group_heatmap_values(results: dict[str, RunResult], group: LatentGroup, catalog=None, normalise: bool = True,
                         include_prompt: bool = False, how: str = "sum",
                         ) -> tuple[dict[str, tuple[list[str], list[float], list[bool], list]], str]:
    """Heatmap values of a group for every run shown together, and a note on the scale.

    ``normalise``: each member is divided by its own scale (its max activation in ``catalog``;
    where the catalog lacks it, the max seen in these runs, position 0 and special tokens
    excluded) before the weighted sum, so no single latent's raw units dominate the colour.
    Otherwise the raw weighted sum (one shared raw scale)."""
    mats = {run: group_member_values(res, group, include_prompt) for run, res in results.items()}
    if not normalise:
        w = np.asarray(group.weights, dtype=float)
        views = {}
        for run, (p, m, sp, t) in mats.items():
            v = np.where(np.isfinite(m), m, 0.0) @ w
            if how == "mean":
                v = v / max(float(np.sum(np.abs(w))), 1e-12)
            views[run] = (p, [float(x) for x in v], sp, t)
        return views, "raw weighted sum"
    seen = np.zeros(len(group.members))
    for p, m, sp, _ in mats.values():
        mask = [not s for s in sp]
        if mask:
            mask[0] = False if include_prompt else mask[0]
        if m.shape[0]:
            seen = np.maximum(seen, observed_scales(m, mask))
    own = catalog_scales(catalog, group.members)
    _, sources = resolve_scales(own, list(seen), len(group.members))
    views = {run: (p, [float(x) for x in normalised_lane(m, group.weights, own, list(seen), how)], sp, t)
             for run, (p, m, sp, t) in mats.items()}
    return views, scale_note(group, sources)


def normalised_member_series(member_acts, group: LatentGroup, catalog=None, special: Sequence[bool] | None = None,
                             skip_first: bool = True, how: str = "sum") -> tuple[np.ndarray, str]:
    """One sequence's group values with each member ÷ its own scale (catalog max, else its max
    here outside position 0 and special tokens), and the note saying so."""
    m = np.asarray(member_acts, dtype=float).reshape(-1, len(group.members))
    mask = [not bool(x) for x in (special or [False] * m.shape[0])]
    mask = (mask + [True] * m.shape[0])[: m.shape[0]]
    if skip_first and mask:
        mask[0] = False
    seen = observed_scales(m, mask)
    own = catalog_scales(catalog, group.members)
    _, sources = resolve_scales(own, list(seen), len(group.members))
    return normalised_lane(m, group.weights, own, list(seen), how), scale_note(group, sources)


def load_examples(path: Path | None = None) -> list[dict]:
    try:
        data = json.loads(Path(path or EXAMPLES_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data.get("examples", []) if isinstance(data, dict) else list(data)


def builtin_groups(d_sae: int | None = None) -> tuple[list[LatentGroup], list[str]]:
    """Groups shipped in assets/groups (e.g. the resistance circuit), filtered to this SAE's size."""
    groups, errors = load_builtin_groups()
    if d_sae is not None:
        keep = []
        for g in groups:
            if max(g.members) < d_sae:
                keep.append(g)
            else:
                errors.append(f"{g.name}: latents beyond this SAE's 0..{d_sae - 1} (made for another SAE?)")
        groups = keep
    return groups, errors
