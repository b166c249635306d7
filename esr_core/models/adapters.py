"""Models made from a base model plus a LoRA adapter (``peft``), merged once and cached.

Why merged: a merged model is a plain Hugging Face model, so it streams at the base model's
speed, takes the same SAE hooks and loads in under a second from the user cache. The merged
copy is keyed by the adapter's content hash, so a rebuilt adapter never reuses a stale merge.
Every way an adapter can be unusable (missing, corrupt, made for another base) is one clear line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from esr_core.errors import ModelUnavailable
from esr_core.io import save_pretrained_atomically
from esr_core.paths import ASSETS_DIR, cache_subdir

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
META_FILE = "esr_adapter.json"  # our metadata: base model, data recipe, hyperparameters, results


def adapter_dir(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ASSETS_DIR / p


def check_adapter(path: str | Path, base: str) -> dict:
    """The adapter's metadata, after checking its files are there and that it was made for ``base``."""
    d = adapter_dir(path)
    missing = [f for f in ADAPTER_FILES if not (d / f).exists()]
    if missing:
        raise ModelUnavailable(f"The adapter in {d} is incomplete ({', '.join(missing)} missing); rebuild it with "
                               "`esr-lab finetune train`")
    try:
        cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8")) if (d / META_FILE).exists() else {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelUnavailable(f"The adapter in {d} is corrupt ({type(exc).__name__}); rebuild it") from None
    if not isinstance(cfg, dict) or not isinstance(meta, dict):
        raise ModelUnavailable(f"The adapter in {d} is corrupt (its config is not a JSON object)")
    made_for = meta.get("base_model") or cfg.get("base_model_name_or_path")
    if made_for and made_for != base and Path(str(made_for)).name != base:
        raise ModelUnavailable(f"The adapter in {d} was made for '{made_for}', not '{base}'")
    return meta


def adapter_hash(path: str | Path) -> str:
    d = adapter_dir(path)
    h = hashlib.sha256()
    for f in ADAPTER_FILES:
        with open(d / f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def merged_dir(name: str, base_dir: str | Path, adapter: str | Path, base: str) -> Path:
    """A float32 copy of base + adapter, merged (``merge_and_unload``), in the user cache."""
    check_adapter(adapter, base)
    out = cache_subdir("models") / f"{name}-{adapter_hash(adapter)}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch  # heavy: torch
    from peft import PeftModel  # heavy: peft
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers

    log.info("Merging the adapter %s into %s (first load only)", adapter, base)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir(adapter))).merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - peft/safetensors raise many types for a torn or foreign adapter
        raise ModelUnavailable(f"The adapter in {adapter_dir(adapter)} does not fit {base}: "
                               f"{str(exc).splitlines()[0][:200]}") from None
    return save_pretrained_atomically(out, merged, tok)
