"""The engines of this process: one per (model, SAE[, readout SAE]), shared by every caller, bounded in number.

Why bounded: a browser visitor can try models; each engine holds a model and an SAE in memory,
so only the most recently used ones stay, and a released engine gives back its hook and model.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from esr_core.models.loading import check_dtype, check_model, forget_model, load_model
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
_ENGINES: "OrderedDict[tuple[str, ...], Engine]" = OrderedDict()
_ENGINES_LOCK = threading.Lock()


def _same_spec(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


def readout_spec(sae: str, read_sae: str | None) -> str | None:
    """The readout SAE spec that makes a difference: None when none is given or it is the steering SAE."""
    if read_sae is None or not str(read_sae).strip():
        return None
    read_sae = str(read_sae).strip()
    return None if _same_spec(str(sae), read_sae) else read_sae


def default_dtype() -> str:
    """The weights dtype engines get when none is asked for: ``ESR_LAB_DTYPE`` (float32 by default)."""
    return check_dtype(os.environ.get("ESR_LAB_DTYPE") or "float32")


def engine_key(model: str, sae: str | None = None, read_sae: str | None = None,
               dtype: str | None = None) -> tuple[str, ...]:
    """The cache key of an engine: (model, SAE), plus the readout SAE when one is used, plus
    ``dtype:<name>`` when the weights are not float32.

    Two requests with different readout or dtype choices never share an engine; one without a
    readout SAE (or with the steering SAE as readout) in float32 keeps the plain (model, SAE) key.
    """
    sae_spec = str(sae or default_sae_spec(model))
    read = readout_spec(sae_spec, read_sae)
    d = check_dtype(dtype) if dtype else default_dtype()
    return (model, sae_spec) + ((read,) if read else ()) + (() if d == "float32" else (f"dtype:{d}",))


def key_parts(key: tuple[str, ...]) -> tuple[str, str, str | None, str]:
    """(model, SAE, readout SAE or None, dtype) of an :func:`engine_key`."""
    rest = list(key[2:])
    d = rest.pop()[len("dtype:"):] if rest and rest[-1].startswith("dtype:") else "float32"
    return key[0], key[1], (rest[0] if rest else None), d


def get_engine(model: str = DEFAULT_MODEL, sae: str | None = None, read_sae: str | None = None,
               dtype: str | None = None) -> Engine:
    """The process-wide engine for (model, SAE, readout SAE); created once, safe to share between threads.

    ``read_sae`` (a folder or ``release:sae_id``, like ``sae``) is an optional second SAE the
    engine reads its readout from (see :class:`Engine`); None reads the steering SAE. ``dtype``
    (float32 or bfloat16; default :func:`default_dtype`) is the weights' dtype.

    At most :data:`MAX_ENGINES` stay loaded: asking for another releases the least recently
    used one that is not generating (its hook is removed and its model forgotten), so a
    visitor trying models cannot grow memory without bound. The SAE loads first: a missing or
    corrupt SAE fails before the (slower) model load.
    """
    key = engine_key(model, sae, read_sae, dtype)
    _, sae_spec, read, d = key_parts(key)
    with _ENGINES_LOCK:
        eng = _ENGINES.pop(key, None)
        if eng is None:
            handle = load_sae(sae_spec)
            read_handle = load_sae(read) if read else None
            check_model(model)
            eng = Engine(load_model(model, dtype=d), handle, read_handle)
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
            old_read = key_parts(old_key)[2]
            if old_read and all(old_read not in k[1:] for k in _ENGINES):
                forget_sae(old_read)
        return eng


def loaded_engines() -> list[tuple[str, ...]]:
    """The keys of the engines loaded now (see :func:`engine_key`), least recently used first."""
    with _ENGINES_LOCK:
        return list(_ENGINES)
