"""What a browser session works with: the models and SAEs on offer, what is loaded, its catalog.

Plain Python (no streamlit): the sidebar lists :func:`model_options`, the app loads an
engine and shows :func:`sae_info`; the catalog and the shipped groups and examples are found
here for the loaded (model, SAE).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from esr_core.errors import BadInput, EsrError
from esr_core.io import read_json_or
from esr_core.jobs import Progress
from esr_core.latents.catalog.build import catalog_for
from esr_core.latents.catalog.store import load_catalog_for_names
from esr_core.latents.groups import LatentGroup, load_builtin_groups, readout_sae
from esr_core.latents.search import embed_query, warm_search
from esr_core.models.adapters import check_adapter
from esr_core.models.embeddings import embedding_model
from esr_core.models.registry import DEFAULT_MODEL, get_entry, list_models
from esr_core.paths import ASSETS_DIR, cache_dir, from_repo
from esr_core.steering.interventions import Intervention

log = logging.getLogger(__name__)

EXAMPLES_FILE = ASSETS_DIR / "examples.json"
ENV_DEFAULT_SAE = "ESR_LAB_DEFAULT_SAE"


def model_options() -> list[tuple[str, str]]:
    """(name, label) of the registry's models, the embedded default first; an adapter model
    only once its adapter is in the checkout (it cannot be fetched)."""
    return [(e.name, e.label) for e in list_models() if e.source != "adapter" or adapter_present(e)]


def compare_options(model: str, sae_source: str) -> list[tuple[str, str]]:
    """(name, label) of the other models that read the same SAE as ``model`` does: the ones the
    steering lab can run the same steering on as a third column (latent ids mean the same)."""
    def same(a: str | None, b: str) -> bool:
        if not a:
            return False
        try:
            return Path(a).resolve() == Path(b).resolve()
        except OSError:
            return a == b
    return [(n, lab) for n, lab in model_options() if n != model and same(default_sae_for(n), sae_source)]


def adapter_present(entry) -> bool:
    try:
        check_adapter(entry.adapter, entry.base)
    except EsrError:
        return False
    return True


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


def cached_sae_folders(d_in: int | None = None, root: Path | None = None) -> list[str]:
    """SAE-Lens folders in the user cache (``esr-lab sae train`` writes them to
    ``~/.cache/esr-lab/sae/<model>-L<layer>``), those whose cfg.json reads ``d_in`` if given."""
    root = Path(root) if root is not None else cache_dir() / "sae"
    out = []
    if root.is_dir():
        for p in sorted(root.glob("*/cfg.json")):
            if not (p.parent / "sae_weights.safetensors").exists():
                continue
            if d_in is not None:
                cfg = read_json_or(p, {})
                if not isinstance(cfg, dict) or cfg.get("d_in") != d_in:
                    continue
            out.append(str(p.parent))
    return out


def readout_sae_folders(d_model: int | None = None) -> list[str]:
    """The SAEs the sidebar offers as a readout SAE: the shipped folders, and the user cache's
    folders for this d_model (all of them when the d_model is not known yet)."""
    def fits(folder: str) -> bool:
        cfg = read_json_or(Path(folder) / "cfg.json", {})
        return d_model is None or (isinstance(cfg, dict) and cfg.get("d_in") == d_model)

    shipped = [f for f in local_sae_folders() if fits(f)]
    return shipped + [f for f in cached_sae_folders(d_model) if f not in shipped]


def read_sae_info(engine) -> dict[str, Any] | None:
    """The readout SAE when the engine reads a second SAE (None when it reads the steering SAE)."""
    if not getattr(engine, "has_readout_sae", False):
        return None
    s = engine.read_sae
    return {"source": s.source, "hook": engine.read_hook_name, "d_sae": s.d_sae, "architecture": s.architecture,
            "layer": s.layer}


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
    fit = sae_fit_on(engine.model.name)
    if fit:
        info["fit_note"], info["fit_degraded"] = fit
    return info


FIT_DROP = 0.05  # a drop in explained variance or CE recovered beyond this is called material


def sae_fit_on(model: str) -> tuple[str, bool] | None:
    """For an adapter model, how well the base model's SAE fits it (measured with
    ``esr-lab sae-metrics`` and stored in the adapter's metadata), next to the base's numbers."""
    e = get_entry(model)
    if e is None or e.source != "adapter":
        return None
    try:
        fit = (check_adapter(e.adapter, e.base).get("results") or {}).get("sae_fit") or {}
    except EsrError:
        return None
    tuned, base = fit.get("tuned") or {}, fit.get("base") or {}
    if not tuned:
        return ("The SAE was trained on the base model; its fit on this tuned model is not measured yet.", False)
    parts, worse = [], False
    for k, label in (("explained_variance", "explained variance"), ("ce_loss_recovered", "CE-loss recovered")):
        if tuned.get(k) is None:
            continue
        b = base.get(k)
        parts.append(f"{label} {tuned[k]:.3f}" + (f" (base model {b:.3f})" if b is not None else ""))
        worse = worse or (b is not None and b - tuned[k] > FIT_DROP)
    note = f"The base model's SAE on this tuned model: {', '.join(parts)}."
    if worse:
        note += " The fit is materially worse than on the base: read latent activations with care."
    return note, worse


# ------------------------------------------------------------------ catalog
def load_catalog(engine, readout: bool = False):
    """The shipped or cached catalog for this (model, SAE), or None (then ids still work).

    ``readout``: the catalog of the SAE the views read (the readout SAE when the engine has one),
    for descriptions of watched and top latents; the default is the steering SAE's, for search."""
    try:
        cat = load_catalog_for_names(engine.model.name, readout_sae(engine) if readout else engine.sae)
    except EsrError:
        return None
    if cat is not None:
        warm_search_in_background(cat)
    return cat


def warm_search_in_background(catalog) -> threading.Thread:
    """Load the search vectors and the query embedder (about 10 s on CPU) while the user reads the
    page, so the first search answers at once; a failure only means the first search warms up."""

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


def build_catalog(engine, progress: Progress | None = None, n_tokens: int = 30_000):
    """Build (and cache) the catalog of the loaded SAE now, with progress."""
    return catalog_for(engine.model, engine.sae, progress=progress, n_tokens=n_tokens)


def load_examples(path: Path | None = None, model: str | None = None) -> list[dict]:
    """The shipped "try it" examples (each names the model it was found on); ``model`` keeps that
    model's only. A missing or corrupt file gives none."""
    data = read_json_or(Path(path or EXAMPLES_FILE), {})
    exs = data.get("examples", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    exs = [e for e in exs if isinstance(e, dict)]
    if model is not None:
        exs = [e for e in exs if e.get("model", DEFAULT_MODEL) == model]
    return exs


def example_steering(ex: dict) -> str:
    """An example's steering in words, whichever way it is written (one latent, or interventions)."""
    if ex.get("interventions"):
        try:
            return ", ".join(Intervention.from_dict(d).label() for d in ex["interventions"])
        except (EsrError, KeyError, TypeError, ValueError):
            return "(unreadable interventions)"
    return (f"add latent #{ex.get('latent')} at {ex.get('strength')} x median residual norm "
            f"({ex.get('positions', 'all')} positions)")


def example_norm_strength(ex: dict, median_norm: float) -> float:
    """An example's steering strength in x-median-norm units, whichever way it is written."""
    if "strength" in ex:
        s = float(ex["strength"])
        return s / median_norm if ex.get("units") == "raw" and median_norm else s
    add = next((d for d in ex.get("interventions") or [] if d.get("mode", "add") == "add"), None)
    if add is None:
        return 0.0
    s = float(add.get("strength", 0.0))
    return round(s / median_norm, 3) if add.get("units") == "raw" and median_norm else s


def builtin_groups(engine) -> tuple[list[LatentGroup], list[str]]:
    """Groups shipped in assets/groups that belong to this engine's SAE (the resistance circuit
    and backtracking name the SAE they were found on); a note for each one left out."""
    groups, errors = load_builtin_groups()
    own = {g.name for g in groups if g.matches(engine)}
    keep = []
    for g in groups:
        if not g.matches(engine) and g.name in own:
            continue  # another model's copy of a group this model has its own of (e.g. the tuned model's circuit)
        if not g.matches(engine):
            note = f"{g.name}: found on another model or SAE, not shown here"
            if g.name in ("resistance circuit", "backtracking") and note not in errors:  # the two every page relies on
                errors.append(note)
            continue  # another model's or another SAE's own group (the tuned model's, the block-20 readout's)
        elif max(g.members) >= engine.sae.d_sae:
            errors.append(f"{g.name}: latents beyond this SAE's 0..{engine.sae.d_sae - 1}")
        else:
            keep.append(g)
    return keep, errors


# ------------------------------------------------------------------ what a visitor may ask to load
def _inside_allowed(path: str) -> bool:
    p = from_repo(path)
    return any(p.is_relative_to(Path(root).resolve()) for root in (ASSETS_DIR, cache_dir()))


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).suffix != ""


def check_model_choice(name: str) -> str:
    """A model a visitor may load: a registry name, a Hugging Face id, or a model folder inside
    the shipped assets or the user cache (never any other local path)."""
    name = str(name or "").strip()
    if get_entry(name) is not None:
        return name
    if looks_like_path(name):
        if not _inside_allowed(name):
            raise BadInput(f"'{name}' is outside the shipped assets and the user cache; copy the model there first")
        return name
    if name.count("/") == 1 and all(part and part.replace("-", "").replace("_", "").replace(".", "").isalnum()
                                    for part in name.split("/")):
        return name
    raise BadInput(f"'{name}' is neither a known model nor a Hugging Face id (owner/name)")


def check_sae_choice(spec: str | None) -> str | None:
    """An SAE a visitor may load: None (the model's default), a SAE-Lens ``release:sae_id`` or a
    folder inside the shipped assets or the user cache."""
    if spec is None or not str(spec).strip():
        return None
    spec = str(spec).strip()
    if ":" in spec and not looks_like_path(spec.split(":", 1)[0]):
        return spec
    if not _inside_allowed(spec):
        raise BadInput(f"SAE folder '{spec}' is outside the shipped assets and the user cache")
    return spec
