"""The sidebar: which model, SAE and readout SAE, loaded in the background, and what exactly is loaded."""

from __future__ import annotations

import html
from pathlib import Path

import streamlit as st

from esr_core.app import engine_loader, url_state, workspace
from esr_core.app import session as svc
from esr_core.errors import EsrError
from esr_core.models.hooks import parse_resid_hook
from esr_core.models.registry import DEFAULT_MODEL
from esr_core.models.sae import list_pretrained_releases
from esr_core.paths import ASSETS_DIR, cache_dir

OTHER_MODEL = "Other: HF id or local path…"
SAE_DEFAULT = "default for this model"
SAE_FOLDER = "local SAE folder…"
SAE_RELEASE = "SAE-Lens pretrained release…"
READ_SAME = "same as steering SAE"


@st.cache_data(show_spinner=False)
def pretrained_releases() -> dict[str, list[str]]:
    return list_pretrained_releases()


@st.cache_resource(show_spinner=False, max_entries=4)
def load_catalog(_engine, key: str):
    return svc.load_catalog(_engine)


def _sae_label(s: str) -> str:
    if s in (SAE_DEFAULT, SAE_FOLDER, SAE_RELEASE, READ_SAME):
        return s
    p = Path(s)
    try:
        return str(p.resolve().relative_to(ASSETS_DIR.resolve()))
    except (ValueError, OSError):
        pass
    try:
        return "cache: " + str(p.resolve().relative_to(cache_dir().resolve()))
    except (ValueError, OSError):
        return s


def request_model(name: str, names: list[str] | None = None) -> None:
    """Switch the sidebar's model picker from code (a Home example, a trial opened in the lab).

    The picker's session key is its value: setting it in a callback, before the widget is drawn,
    is the one way that wins over the value the browser resends for the widget."""
    ss = st.session_state
    names = names if names is not None else [n for n, _ in svc.model_options()]
    ss.model_choice = name
    if name in names:
        ss["w_model"] = name
    else:
        ss["w_model"] = OTHER_MODEL
        ss["w_model_other"] = name


def choice() -> tuple[str, str | None, str | None]:
    """The (model, SAE spec, readout SAE spec) the user asks for; None SAE = the model's default,
    None readout SAE = read the steering SAE."""
    ss = st.session_state
    models = svc.model_options()
    names = [n for n, _ in models]
    labels = dict(models)
    want = ss.get("model_choice", DEFAULT_MODEL)
    options = names + [OTHER_MODEL]
    if ss.get("w_model") not in options:  # first draw (or a stale value): the picker starts at the choice
        request_model(want, names)
    pick = st.selectbox("Model", options, format_func=lambda n: labels.get(n, n), key="w_model")
    model = pick
    if pick == OTHER_MODEL:
        model = st.text_input("HF model id or local path", key="w_model_other").strip() or DEFAULT_MODEL
    ss.model_choice = model
    sae_opts = [SAE_DEFAULT] + svc.local_sae_folders() + [SAE_FOLDER, SAE_RELEASE]
    want_sae = ss.get("sae_choice")
    if want_sae and want_sae not in sae_opts:
        sae_opts.insert(1, want_sae)
    sidx = sae_opts.index(want_sae) if want_sae in sae_opts else 0
    sel = st.selectbox("SAE", sae_opts, index=sidx, key="w_sae", format_func=_sae_label)
    sae: str | None = None
    if sel == SAE_FOLDER:
        sae = st.text_input("SAE folder (cfg.json + sae_weights.safetensors)", key="w_sae_folder").strip() or None
    elif sel == SAE_RELEASE:
        rel = pretrained_releases()
        if not rel:
            st.caption("SAE-Lens' registry could not be read.")
        else:
            st.caption(f"{len(rel)} releases in SAE-Lens' own registry (downloads need the network).")
            r = st.selectbox("Release", sorted(rel), key="w_sae_rel")
            sid = st.selectbox("SAE id", rel.get(r, []), key="w_sae_id")
            if st.button("Load this SAE", key="w_sae_rel_load"):
                ss.sae_release_pick = f"{r}:{sid}"
            sae = ss.get("sae_release_pick")
    elif sel != SAE_DEFAULT:
        sae = sel
    return model, sae, read_choice(model)


def read_choice(model: str) -> str | None:
    """The optional readout SAE: latents are read at its hook (after the steering) instead of the
    steering SAE's; the shipped SAE folders and the cached ones for this model's d_model."""
    eng = st.session_state.get("engine")
    d_model = eng.model.d_model if eng is not None and getattr(eng.model, "name", None) == model else None
    opts = [READ_SAME] + svc.readout_sae_folders(d_model)
    sel = st.selectbox("Readout SAE", opts, key="w_read_sae", format_func=_sae_label,
                       help="Steer with the SAE above, read the watched and top latents from this SAE at its own "
                            "hook (a later layer sees the steering's effect downstream; an earlier one sees none). "
                            "Watched latent ids are this SAE's.")
    return None if sel == READ_SAME else sel


@st.fragment(run_every=1.0)
def _loading(model: str, sae: str, read_sae: str | None = None) -> None:
    """Progress of the background load; the whole app reruns once the model is there."""
    job = engine_loader.request(model, sae, read_sae)
    st.html(f'<div class="esr-loading" data-model="{html.escape(model, quote=True)}">Loading '
            f'<b>{html.escape(model)}</b>… {html.escape(job.step.message or job.step.stage)}</div>')
    st.progress(job.step.fraction)
    if not job.running:
        st.rerun()


def _try(model: str, sae: str | None, errors: list[str], read_sae: str | None = None):
    """(engine or None while loading, sae spec) for a choice; errors are appended, never raised."""
    reading = False  # an error from here on is the readout SAE's (or its load's)
    try:
        model = svc.check_model_choice(model)
        sae = svc.check_sae_choice(sae) or svc.default_sae_for(model)
        if sae is None or (model == DEFAULT_MODEL and svc.default_sae_missing(model)):
            raise EsrError(svc.default_sae_missing(model) or f"No SAE chosen for {model}")
        reading = bool(read_sae)
        read_sae = svc.check_sae_choice(read_sae)
        return engine_loader.ready_engine(model, sae, read_sae), sae
    except EsrError as exc:
        errors.append(f"Readout SAE {_sae_label(read_sae)}: {exc}" if reading else str(exc))
    except Exception as exc:  # anything else from a third-party loader: keep the app alive
        errors.append(f"Could not load {model} / {sae}: {type(exc).__name__}: {str(exc)[:200]}")
    return False, sae


def ensure_engine(model: str, sae: str | None, read_sae: str | None = None) -> None:
    """The engine for the choice (or, if it fails, the same without the readout SAE, then the
    default), loaded in the background.

    While it loads, ``engine`` is None and ``engine_loading`` names it; pages that need a model
    say so, the others draw at once. Switching the (model, SAE, readout SAE) switches the
    workspace (watched latent ids are the readout SAE's).
    """
    ss = st.session_state
    errors: list[str] = []
    eng, spec = _try(model, sae, errors, read_sae)
    used, read_used = (model, spec), read_sae
    if eng is False and read_sae:
        eng, spec = _try(model, sae, errors)
        used, read_used = (model, spec), None
    if eng is False and model != DEFAULT_MODEL:
        eng, spec = _try(DEFAULT_MODEL, None, errors)
        used, read_used = (DEFAULT_MODEL, spec), None
    ss.load_errors = errors
    if eng is None:  # loading in the background: the pages keep the model they had until it is ready
        ss.engine_loading = used + (read_used,)
        if ss.get("engine") is None:
            ss.engine_error = f"{used[0]} is loading…"
        return
    ss.engine_loading = None
    if eng is False:
        ss.engine, ss.engine_key, ss.catalog = None, None, None
        ss.engine_read_sae = None
        ss.engine_error = " · ".join(errors) or "No model could be loaded"
        return
    reads = getattr(eng, "has_readout_sae", False)
    new_key = workspace.key_of(eng.model.name, eng.sae.source + (f"|read={eng.read_sae.source}" if reads else ""))
    if ss.get("workspace_key") != new_key:
        workspace.switch(ss, ss.get("workspace_key"), new_key)
        ss.workspace_key = new_key
    ss.engine, ss.engine_key, ss.engine_error = eng, used, None
    ss.engine_read_sae = eng.read_sae.source if reads else None
    ss.catalog = load_catalog(eng, new_key)
    ss.read_catalog = svc.load_catalog(eng, readout=True) if reads else ss.catalog
    ss.builtin_groups, ss.group_errors = svc.builtin_groups(eng)
    ss.model_in_url = used[0] if used[0] != DEFAULT_MODEL else None
    ss.sae_in_url = sae if used == (model, spec) else None
    ss.read_in_url = url_state.link_folder(ss.engine_read_sae)


def _upstream(read_hook: str, steer_hook: str) -> bool:
    """True when the residual at ``read_hook`` is computed before the one at ``steer_hook``."""
    r, s = parse_resid_hook(read_hook), parse_resid_hook(steer_hook)
    if r is None or s is None:
        return False
    return (r[0] if r[1] == "post" else r[0] - 1) < (s[0] if s[1] == "post" else s[0] - 1)


def status() -> None:
    """What is loaded: the model's full name, and what the SAE is (hook, width, origin, quality)."""
    ss = st.session_state
    for e in ss.get("load_errors") or []:
        st.error(e)
    if ss.get("engine_loading"):
        _loading(*ss.engine_loading)
        if ss.get("engine") is not None:
            st.caption(f"Until then the pages use {ss.engine.model.name}.")
        return
    eng = ss.get("engine")
    if eng is None:
        return
    info = svc.sae_info(eng)
    st.markdown(f"**Model** `{eng.model.name}`  \n{eng.model.n_layers} layers · d_model {eng.model.d_model} · "
                f"weights **{getattr(eng.model, 'dtype', 'float32')}**",
                help="Set for the whole server with ESR_LAB_DTYPE (float32 or bfloat16); runs record it. bfloat16 "
                     "is faster on CPUs with bf16 instructions; activations and sampled texts differ slightly.")
    st.markdown(f"**SAE** {info['architecture']} at `{info['hook']}`  \nd_sae **{info['d_sae']:,}** · "
                f"from `{_sae_label(info['source'])}`")
    read = svc.read_sae_info(eng)
    if read is not None:
        st.markdown(f"**Readout SAE** {read['architecture']}, reads `{read['hook']}`  \n"
                    f"d_sae **{read['d_sae']:,}** · from `{_sae_label(read['source'])}`")
        st.caption(f"Steers at {info['hook']}, reads {read['hook']}: watched and top latents are the readout "
                   "SAE's" + (" (it is upstream of the steering, so it sees none of it)."
                              if _upstream(read["hook"], info["hook"]) else "."))
    extra = {k: v for k, v in info.items() if k not in ("source", "hook", "d_sae", "d_in", "architecture", "layer",
                                                         "fit_note", "fit_degraded")}
    if extra:
        st.caption(" · ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in extra.items()
                              if v is not None))
    if info.get("fit_note"):
        (st.warning if info.get("fit_degraded") else st.caption)(info["fit_note"])
    cat = ss.get("catalog")
    if cat is not None:
        st.caption(f"Catalog: {cat.source} ({Path(cat.path).name})")
    else:
        st.caption("Catalog: none for this SAE yet (latent ids work; descriptions show 'no description').")
    for e in ss.get("group_errors") or []:
        st.caption(f"Group not shown: {e}")
