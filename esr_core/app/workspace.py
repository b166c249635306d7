"""What a user has set up belongs to the (model, SAE) it was made for.

Interventions, watched latents and groups name latent ids of one SAE: on another SAE they mean
nothing (or an error). A session keeps one workspace per (model, SAE); switching saves the
current one and restores (or starts) the other. Runs keep the (model, SAE) they were made with.
"""

from __future__ import annotations

import copy
from typing import Any, MutableMapping

from esr_core.experiments.conditions import DEFAULT_META_VARIANT, META_PROMPTS

FIELDS: dict[str, Any] = {"ivs": [], "watch": [], "watch_text": "", "sel_groups": [], "abl_groups": [],
                          "user_groups": [], "view_run": None, "_resistance_watched": False}
# widgets that mirror a field (pages/_ui.persist): dropped so they start from the restored value
WIDGETS = ("w_watch_text", "w_sel_groups", "w_abl_groups", "pick_run", "iv_latent")


def key_of(model: str, sae: str) -> str:
    return f"{model}|{sae}"


def switch(state: MutableMapping, old: str | None, new: str) -> None:
    """Save ``state``'s workspace fields under ``old`` and load those saved under ``new``.

    With no ``old`` (the session's first model) the current fields become that model's
    workspace: what a shared URL restored is kept.
    """
    spaces = state.setdefault("workspaces", {})
    if old is None or old == new:
        return
    spaces[old] = {k: copy.deepcopy(state.get(k, v)) for k, v in FIELDS.items()}
    saved = spaces.get(new, {})
    for k, v in FIELDS.items():
        state[k] = copy.deepcopy(saved.get(k, v))
    for w in WIDGETS:
        state.pop(w, None)


def runs_for(history: list, model: str, sae: str) -> tuple[list, int]:
    """The runs made with (model, SAE), and how many were made with others."""
    mine = [r for r in history if r.model == model and r.sae == sae]
    return mine, len(history) - len(mine)


def apply_example(state: MutableMapping, model: str) -> bool:
    """Set up the pending lab request (``state["pending_example"]``: a Home example, or a trial
    from an experiment, :func:`esr_core.experiments.cases.lab_setup`) once ``model`` is loaded:
    prompt, meta-prompt, interventions, watch list and sampling. True when it was applied."""
    ex = state.get("pending_example")
    if not ex or ex.get("model", model) != model:
        return False
    state["pending_example"] = None
    watch = [int(x) for x in ex.get("watch", [ex["latent"]])]
    if ex.get("interventions") is not None:
        state["ivs"] = [dict(iv) for iv in ex["interventions"]]
    else:
        state["ivs"] = [{"latent": int(ex["latent"]), "mode": ex.get("mode", "add"), "strength": float(ex["strength"]),
                         "units": ex.get("units", "norm"), "positions": ex.get("positions", "all")}]
    state["watch"] = watch
    for key, value in (("prompt", ex["prompt"]), ("watch_text", ",".join(map(str, watch))),
                       ("max_new_tokens", int(ex.get("max_new_tokens", 48))), ("seed", int(ex.get("seed", 0))),
                       ("temperature", float(ex.get("temperature", 0.0))),
                       ("repetition_penalty", float(ex.get("repetition_penalty", 1.1))),
                       ("sampler", ex.get("sampler", "cdf")),
                       ("meta_on", bool(ex.get("meta_variant"))),
                       ("meta_variant", ex.get("meta_variant") or state.get("meta_variant", DEFAULT_META_VARIANT))):
        state[key] = value
        state.pop("w_" + key, None)  # the mirrored widget starts from the new value
    state["lab_source"] = ex.get("source")
    return True


def setup_from_spec(spec, model: str, source: str | None = None) -> dict:
    """A lab request (for :func:`apply_example`) that reruns ``spec`` exactly: same prompt,
    meta-prompt, interventions, watch list, seed and sampling."""
    variant = next((k for k, v in META_PROMPTS.items() if spec.meta_prompt and
                    spec.meta_prompt.startswith(v.split("{", 1)[0].strip())), None) if spec.meta_prompt else None
    return {"model": model, "prompt": spec.prompt, "interventions": [iv.to_dict() for iv in spec.interventions],
            "latent": spec.interventions[0].latent if spec.interventions else 0, "watch": list(spec.watch),
            "seed": int(spec.seed), "temperature": float(spec.temperature), "max_new_tokens": int(spec.max_new_tokens),
            "repetition_penalty": float(spec.repetition_penalty), "sampler": spec.sampler, "meta_variant": variant,
            "source": source}
