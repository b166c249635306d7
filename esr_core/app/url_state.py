"""Shareable view state <-> URL query parameters (strings only, compact, forgiving).

Interventions: ``iv=123:add:4:norm:all,7:ablate:0:raw:generated``; watch: ``w=1,2,3``;
groups: ``g=`` (see latent_groups.encode_groups); prompt ``p``, seed ``seed``, temperature
``t``, sampler ``smp`` (only when not the default), max new tokens ``n``, latent detail
``latent``, search ``q``, model ``model``, SAE ``sae``, readout SAE ``read``, the run shown
``run`` and the session's other recent runs ``h`` (ids of the server's run store).
Decoding never raises: bad pieces are dropped and reported in ``errors`` so a mangled link
still opens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from esr_core.app import run_store, session
from esr_core.errors import BadInput
from esr_core.latents.groups import LatentGroup, decode_groups, encode_groups
from esr_core.paths import from_repo, repo_relative
from esr_core.steering.interventions import MODES, POSITIONS, UNITS, Intervention, default_units
from esr_core.steering.spec import SAMPLERS

MAX_PROMPT_IN_URL = 4000
MAX_RECENT_IN_URL = 10
_RUN_ID = re.compile(r"^[0-9a-f]{8,32}$")


@dataclass
class ViewState:
    prompt: str | None = None
    interventions: list[Intervention] = field(default_factory=list)
    watch: list[int] = field(default_factory=list)
    groups: list[LatentGroup] = field(default_factory=list)
    seed: int | None = None
    temperature: float | None = None
    sampler: str | None = None  # written only when not the default (a replay of a run recorded before it)
    max_new_tokens: int | None = None
    latent: int | None = None
    query: str | None = None
    model: str | None = None
    sae: str | None = None
    read_sae: str | None = None
    run: str | None = None
    recent: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def encode_interventions(ivs: list[Intervention]) -> str:
    return ",".join(f"{iv.latent}:{iv.mode}:{iv.strength:g}:{iv.units}:{iv.positions}" for iv in ivs)


def decode_interventions(text: str) -> list[Intervention]:
    out = []
    for part in str(text or "").split(","):
        if not part.strip():
            continue
        bits = part.strip().split(":")
        try:
            lat = int(bits[0])
            mode = bits[1] if len(bits) > 1 else "add"
            strength = float(bits[2]) if len(bits) > 2 else 0.0
            units = bits[3] if len(bits) > 3 else default_units(mode)
            pos = bits[4] if len(bits) > 4 else "all"
        except ValueError:
            raise BadInput(f"Bad intervention in the URL: '{part[:40]}'") from None
        if mode not in MODES or units not in UNITS or pos not in POSITIONS or not math.isfinite(strength):
            raise BadInput(f"Bad intervention in the URL: '{part[:40]}'")
        out.append(Intervention(latent=lat, mode=mode, strength=strength, units=units, positions=pos))
    return out


def encode_ints(xs) -> str:
    return ",".join(str(int(x)) for x in xs)


def decode_ints(text: str) -> list[int]:
    out = []
    for p in str(text or "").split(","):
        p = p.strip().lstrip("#")
        if p:
            out.append(int(p))
    return out


def to_params(vs: ViewState) -> dict[str, str]:
    """Only non-empty fields, so URLs stay short."""
    d: dict[str, str] = {}
    if vs.prompt:
        d["p"] = vs.prompt[:MAX_PROMPT_IN_URL]
    if vs.interventions:
        d["iv"] = encode_interventions(vs.interventions)
    if vs.watch:
        d["w"] = encode_ints(vs.watch)
    if vs.groups:
        d["g"] = encode_groups(vs.groups)
    if vs.seed is not None:
        d["seed"] = str(int(vs.seed))
    if vs.temperature is not None:
        d["t"] = f"{vs.temperature:g}"
    if vs.sampler and vs.sampler != SAMPLERS[0]:
        d["smp"] = vs.sampler
    if vs.max_new_tokens is not None:
        d["n"] = str(int(vs.max_new_tokens))
    if vs.latent is not None:
        d["latent"] = str(int(vs.latent))
    if vs.query:
        d["q"] = vs.query
    if vs.model:
        d["model"] = vs.model
    if vs.sae:
        d["sae"] = vs.sae
    if vs.read_sae:
        d["read"] = vs.read_sae
    if vs.run:
        d["run"] = vs.run
    if vs.recent:
        d["h"] = ",".join(vs.recent[-MAX_RECENT_IN_URL:])
    return d


def _sampler(text: str) -> str:
    if text not in SAMPLERS:
        raise BadInput(f"unknown sampler {text[:20]!r} (one of {', '.join(SAMPLERS)})")
    return text


def from_params(params: Mapping[str, Any]) -> ViewState:
    vs = ViewState()

    def get(k):
        v = params.get(k)
        if isinstance(v, (list, tuple)):
            v = v[-1] if v else None
        return None if v is None else str(v)

    def attempt(key, fn):
        raw = get(key)
        if raw is None or raw == "":
            return None
        try:
            return fn(raw)
        except (BadInput, ValueError, TypeError) as exc:
            vs.errors.append(f"Ignored '{key}' from the link: {exc}" if isinstance(exc, BadInput)
                             else f"Ignored '{key}={raw[:30]}' from the link")
            return None

    vs.prompt = get("p")
    vs.interventions = attempt("iv", decode_interventions) or []
    vs.watch = attempt("w", decode_ints) or []
    vs.groups = attempt("g", decode_groups) or []
    vs.seed = attempt("seed", int)
    t = attempt("t", float)
    vs.temperature = t if t is not None and math.isfinite(t) else None
    vs.sampler = attempt("smp", _sampler)
    vs.max_new_tokens = attempt("n", int)
    vs.latent = attempt("latent", int)
    vs.query = get("q")
    vs.model = get("model")
    vs.sae = get("sae")
    vs.read_sae = get("read")
    run = get("run")
    vs.run = run if run and _RUN_ID.match(run) else None
    vs.recent = [r for r in (get("h") or "").split(",") if _RUN_ID.match(r)][-MAX_RECENT_IN_URL:]
    return vs


def apply_link(ss, vs: ViewState) -> None:
    """Put a shared link's state into a session (``ss``: Streamlit's session state or any mapping
    with attribute access). What cannot be honoured is added to ``ss["_url_errors"]``."""
    errors = list(vs.errors)
    if vs.prompt:
        ss.prompt = vs.prompt
    if vs.interventions:
        ss.ivs = [iv.to_dict() for iv in vs.interventions]
    if vs.watch:
        ss.watch = vs.watch
        ss.watch_text = ",".join(str(i) for i in vs.watch)
    if vs.groups:
        names = {g.name for g in ss.user_groups}
        ss.user_groups = ss.user_groups + [g for g in vs.groups if g.name not in names]
        ss.sel_groups = [g.name for g in vs.groups]
    if vs.seed is not None:
        ss.seed = vs.seed
    if vs.temperature is not None:
        ss.temperature = min(max(vs.temperature, 0.0), 2.0)
    ss.sampler = vs.sampler or SAMPLERS[0]
    if vs.max_new_tokens is not None:
        ss.max_new_tokens = min(max(vs.max_new_tokens, 1), 512)
    if vs.latent is not None:
        ss.latent = vs.latent
    if vs.query:
        ss.query = vs.query
    for run_id in list(vs.recent) + ([vs.run] if vs.run else []):  # runs the link names, from the server
        rec = run_store.load(run_id)
        if rec is not None and rec.id not in {r.id for r in ss.history}:
            ss.history = ss.history + [rec]
    if vs.run and any(r.id == vs.run for r in ss.history):
        ss.view_run = vs.run
    elif vs.run:
        errors.append("The run this link names is no longer kept on the server")
    for name, value, check in (("model_choice", vs.model, session.check_model_choice),
                               ("sae_choice", vs.sae, session.check_sae_choice)):
        if value:
            try:
                ss[name] = check(value)
            except BadInput as exc:  # a shared URL may not make the server open any local file
                errors.append(f"Ignored from the URL: {exc}")
    if vs.read_sae:
        try:
            read = session.check_sae_choice(vs.read_sae)
        except BadInput as exc:
            errors.append(f"Ignored from the URL: {exc}")
        else:
            match = [f for f in session.readout_sae_folders() if _same_folder(f, read)]
            if match:
                ss["w_read_sae"] = match[0]  # the sidebar's readout picker
            else:
                errors.append(f"Ignored from the URL: the readout SAE '{read}' is not available here")
    ss["_url_errors"] = errors


def link_folder(folder: str | None) -> str | None:
    """A folder as a link names it: relative to the checkout for shipped assets (so a link works
    on another server), else as it is."""
    if not folder:
        return None
    return repo_relative(folder)


def _same_folder(a: str, b: str) -> bool:
    return from_repo(a) == from_repo(b)
