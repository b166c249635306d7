"""The engines of this process: one per (model, SAE), shared by every caller, bounded in number.

Why bounded: a browser visitor can try models; each engine holds a model and an SAE in memory,
so only the most recently used ones stay, and a released engine gives back its hook and model.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from esr_core.models.loading import check_model, forget_model, load_model
from esr_core.models.registry import DEFAULT_MODEL, default_sae_spec
from esr_core.models.sae import forget as forget_sae
from esr_core.models.sae import load_sae
from esr_core.steering.engine import Engine


# model + SAE pairs kept loaded (the least recently used idle one is released): three, so one
# visitor comparing two models does not push out the engine another visitor is using
def _max_engines(default: int = 3) -> int:
    try:
        return max(1, int(os.environ.get("ESR_LAB_MAX_ENGINES", default)))
    except ValueError:
        return default


MAX_ENGINES = _max_engines()
_ENGINES: "OrderedDict[tuple[str, str], Engine]" = OrderedDict()
_ENGINES_LOCK = threading.Lock()


def get_engine(model: str = DEFAULT_MODEL, sae: str | None = None) -> Engine:
    """The process-wide engine for (model, SAE); created once, safe to share between threads.

    At most :data:`MAX_ENGINES` stay loaded: asking for another releases the least recently
    used one that is not generating (its hook is removed and its model forgotten), so a
    visitor trying models cannot grow memory without bound. The SAE loads first: a missing or
    corrupt SAE fails before the (slower) model load.
    """
    sae_spec = sae or default_sae_spec(model)
    key = (model, str(sae_spec))
    with _ENGINES_LOCK:
        eng = _ENGINES.pop(key, None)
        if eng is None:
            handle = load_sae(sae_spec)
            check_model(model)
            eng = Engine(load_model(model), handle)
        _ENGINES[key] = eng
        for old_key in [k for k in _ENGINES if k != key]:
            if len(_ENGINES) <= MAX_ENGINES:
                break
            old = _ENGINES[old_key]
            if old.busy:
                continue
            del _ENGINES[old_key]
            old.close()
            if all(e.model.name != old.model.name for e in _ENGINES.values()):
                forget_model(old.model.name)
            forget_sae(old_key[1])
        return eng


def loaded_engines() -> list[tuple[str, str]]:
    """The (model, SAE) pairs loaded now, least recently used first."""
    with _ENGINES_LOCK:
        return list(_ENGINES)
