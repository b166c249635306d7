"""ESR Lab: Streamlit entry point (navigation, model/SAE choice, the shared engine).

One engine per (model, SAE) is shared by every session through ``st.cache_resource``
(the engine scopes steering per request, so concurrent sessions never leak into each other);
everything else a user does lives in ``st.session_state`` and the shareable part in the URL.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from esr_core.app import session as svc
from esr_core.errors import EsrError
from esr_core.models.registry import DEFAULT_MODEL
from esr_core.models.sae import list_pretrained_releases
from esr_core.paths import offline_env
from pages import _ui

offline_env()
st.set_page_config(page_title="ESR Lab", page_icon=":material/explore:", layout="wide")
ROOT = Path(__file__).resolve().parent

OTHER_MODEL = "Other: HF id or local path…"
SAE_DEFAULT = "default for this model"
SAE_FOLDER = "local SAE folder…"
SAE_RELEASE = "SAE-Lens pretrained release…"


@st.cache_resource(show_spinner=False, max_entries=4)
def load_engine(model: str, sae: str | None):
    from esr_core.steering.engine import get_engine  # heavy: torch, once the first page asks for a model

    return get_engine(model, sae)


@st.cache_resource(show_spinner=False)
def load_catalog(_engine, key: str):
    return svc.load_catalog(_engine)


@st.cache_data(show_spinner=False)
def pretrained_releases() -> dict[str, list[str]]:
    return list_pretrained_releases()


def sidebar_choice() -> tuple[str, str | None]:
    """The (model, SAE spec) the user asks for; None SAE = the model's default."""
    ss = st.session_state
    models = svc.model_options()
    names = [n for n, _ in models]
    labels = dict(models)
    want = ss.get("model_choice", DEFAULT_MODEL)
    options = names + [OTHER_MODEL]
    idx = options.index(want) if want in options else len(names)
    choice = st.selectbox("Model", options, index=idx, format_func=lambda n: labels.get(n, n), key="w_model")
    model = choice
    if choice == OTHER_MODEL:
        model = st.text_input("HF model id or local path", value="" if want in names else want,
                              key="w_model_other").strip() or DEFAULT_MODEL
    sae_opts = [SAE_DEFAULT] + svc.local_sae_folders() + [SAE_FOLDER, SAE_RELEASE]
    want_sae = ss.get("sae_choice")
    if want_sae and want_sae not in sae_opts:
        sae_opts.insert(1, want_sae)
    sidx = sae_opts.index(want_sae) if want_sae in sae_opts else 0
    sae_sel = st.selectbox("SAE", sae_opts, index=sidx, key="w_sae",
                           format_func=lambda s: s if s in (SAE_DEFAULT, SAE_FOLDER, SAE_RELEASE) else Path(s).name
                           if "/" in s else s)
    sae: str | None = None
    if sae_sel == SAE_FOLDER:
        sae = st.text_input("SAE folder (cfg.json + sae_weights.safetensors)", key="w_sae_folder").strip() or None
    elif sae_sel == SAE_RELEASE:
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
    elif sae_sel != SAE_DEFAULT:
        sae = sae_sel
    return model, sae


def ensure_engine(model: str, sae: str | None) -> None:
    """Load (or reuse) the engine; on failure show why and fall back to the default."""
    ss = st.session_state
    sae_spec = sae or svc.default_sae_for(model)
    key = (model, sae_spec)
    if ss.get("engine") is not None and key in (ss.get("engine_key"), ss.get("failed_key")):
        return  # already loaded, or already failed and fell back (errors stay on show)
    attempts = [(model, sae_spec)]
    default = (DEFAULT_MODEL, svc.default_sae_for(DEFAULT_MODEL))
    if default not in attempts:
        attempts.append(default)
    errors = []
    for m, s in attempts:
        if s is None or (m == DEFAULT_MODEL and s == default[1] and svc.default_sae_missing(m)):
            errors.append(svc.default_sae_missing(m) or f"No SAE chosen for {m}")
            continue
        try:
            with st.status(f"Loading {m} with SAE {Path(s).name if '/' in s else s}…", expanded=False) as status:
                eng = load_engine(m, s)
                status.update(label=f"Loaded {m}", state="complete")
        except EsrError as exc:
            errors.append(str(exc))
            continue
        except Exception as exc:  # anything else from a third-party loader: keep the app alive
            errors.append(f"Could not load {m} / {s}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        ss.engine, ss.engine_key = eng, (m, s)
        ss.catalog = load_catalog(eng, f"{m}|{s}")
        ss.model_in_url = m if m != DEFAULT_MODEL else None
        ss.sae_in_url = sae if (m, s) == key else None
        groups, gerr = svc.builtin_groups(eng.sae.d_sae)
        ss.builtin_groups, ss.group_errors = groups, gerr
        ss.engine_error = None
        ss.load_errors = errors
        ss.failed_key = key if (m, s) != key else None
        return
    ss.engine, ss.engine_key, ss.catalog = None, None, None
    ss.engine_error = " · ".join(errors) or "No model could be loaded"
    ss.load_errors = errors


def sidebar_status() -> None:
    ss = st.session_state
    for e in ss.get("load_errors") or []:
        st.error(e)
    eng = ss.get("engine")
    if eng is None:
        return
    info = svc.sae_info(eng)
    cat = ss.get("catalog")
    st.markdown(f"**Model** `{eng.model.name}` · {eng.model.n_layers} layers  \n"
                f"**SAE** `{Path(info['source']).name if '/' in info['source'] else info['source']}`  \n"
                f"hook `{info['hook']}` · d_sae **{info['d_sae']:,}** · {info['architecture']}")
    extra = {k: v for k, v in info.items() if k not in ("source", "hook", "d_sae", "d_in", "architecture", "layer")}
    if extra:
        st.caption(" · ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in extra.items()
                              if v is not None))
    if cat is not None:
        st.caption(f"Catalog: {cat.source} ({Path(cat.path).name})")
    else:
        st.caption("Catalog: none for this SAE yet (latent ids work; descriptions show 'no description').")
    for e in ss.get("group_errors") or []:
        st.caption(f"Group skipped: {e}")


PAGES = (("pages/home.py", "Home", ":material/home:"), ("pages/latents.py", "Latents", ":material/search:"),
         ("pages/steering.py", "Steering lab", ":material/science:"),
         ("pages/resistance.py", "Resistance", ":material/shield:"),
         ("pages/experiments.py", "Experiments", ":material/monitoring:"))


def navigation():
    """The fixed list of pages: a missing page file is an error, never a silently shorter menu."""
    missing = [f for f, _, _ in PAGES if not (ROOT / f).exists()]
    if missing:
        raise FileNotFoundError(f"ESR Lab is incomplete: {', '.join(missing)} missing")
    return st.navigation([st.Page(f, title=title, icon=icon, default=(k == 0))
                          for k, (f, title, icon) in enumerate(PAGES)])


_ui.enter_frame()
try:
    _ui.init_state()
    pg = navigation()
    with st.sidebar:
        st.subheader("Model and SAE")
        model, sae = sidebar_choice()
        ensure_engine(model, sae)
        sidebar_status()
    pg.run()
    _ui.sync_url()
finally:
    _ui.exit_frame()
