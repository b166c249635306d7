"""Load SAEs: SAE-Lens folders (cfg.json + sae_weights.safetensors) or pretrained releases.

The SAE's hook name decides where the engine reads and steers. ESR Lab keeps its own
metadata (median residual norm for ``norm`` steering units, training facts, metrics) in
``esr_meta.json`` beside the SAE-Lens files; SAEs without it get the norm measured on
reference text and cached in the user cache.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esr_core.errors import BadInput, SaeUnavailable
from esr_core.io import read_json
from esr_core.paths import ASSETS_DIR, REPO_ROOT, cache_subdir, offline_env

META_FILE = "esr_meta.json"
_LOCK = threading.Lock()
_LOADED: dict[str, "SaeHandle"] = {}


@dataclass
class SaeHandle:
    sae: Any  # sae_lens.SAE
    source: str
    hook_name: str
    meta: dict = field(default_factory=dict)
    folder: Path | None = None

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def layer(self) -> int | None:
        parts = self.hook_name.split(".")
        if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
            return int(parts[1])
        return None

    @property
    def W_dec(self):
        return self.sae.W_dec

    @property
    def architecture(self) -> str:
        try:
            return str(self.sae.cfg.architecture())
        except Exception:
            return type(self.sae).__name__

    @property
    def median_resid_norm(self) -> float | None:
        v = self.meta.get("median_resid_norm")
        return float(v) if v is not None else None

    @property
    def key(self) -> str:
        """Stable identity of this SAE for cache keys (source + weights fingerprint)."""
        return self.meta.get("fingerprint") or hashlib.sha1(self.source.encode()).hexdigest()[:12]

    def encode(self, h):
        """The SAE code of ``h``, computed in the SAE's own dtype (a bfloat16 model's residuals
        are cast up, so the code does not depend on the model's dtype more than its input does)."""
        w = self.sae.W_dec
        return self.sae.encode(h if h.dtype == w.dtype else h.to(w.dtype))

    def decode(self, z):
        return self.sae.decode(z)

    def check_latent(self, latent: int, what: str = "this SAE") -> int:
        try:
            i = int(latent)
        except (TypeError, ValueError):
            raise BadInput(f"Latent id must be an integer, got {latent!r}") from None
        if not 0 <= i < self.d_sae:
            raise BadInput(f"Latent {i} is out of range: {what} has latents 0..{self.d_sae - 1}")
        return i


def _fingerprint(folder: Path) -> str:
    w = folder / "sae_weights.safetensors"
    st = w.stat()
    return hashlib.sha1(f"{folder.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def load_sae_folder(folder: str | Path, device: str = "cpu") -> SaeHandle:
    folder = Path(folder).expanduser()
    if not folder.is_absolute() and not folder.exists():
        for base in (REPO_ROOT, ASSETS_DIR):
            if (base / folder).exists():
                folder = base / folder
                break
    if not folder.is_dir():
        raise SaeUnavailable(f"SAE folder {folder} does not exist")
    cfg_path, w_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise SaeUnavailable(f"{folder} is not an SAE-Lens folder (needs cfg.json and sae_weights.safetensors)")
    cfg = read_json(cfg_path, f"The SAE config {cfg_path}", error=SaeUnavailable)
    meta = read_json(folder / META_FILE, f"The SAE metadata {folder / META_FILE}", error=SaeUnavailable) \
        if (folder / META_FILE).exists() else {}
    if not isinstance(cfg, dict) or not isinstance(meta, dict):
        raise SaeUnavailable(f"{folder}: cfg.json and esr_meta.json must hold JSON objects")
    from sae_lens import SAE  # heavy: SAE-Lens

    try:
        sae = SAE.load_from_disk(str(folder), device=device)
    except Exception as exc:
        raise SaeUnavailable(f"Could not load SAE from {folder}: {str(exc).splitlines()[0][:200]}") from None
    sae.eval()
    meta.setdefault("fingerprint", _fingerprint(folder))
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or meta.get("hook_name")
    if not hook:
        raise SaeUnavailable(f"{cfg_path} names no hook_name; cannot tell where to read and steer")
    return SaeHandle(sae=sae, source=str(folder), hook_name=hook, meta=meta, folder=folder)


def load_sae_release(release: str, sae_id: str, device: str = "cpu") -> SaeHandle:
    offline_env()
    from sae_lens import SAE  # heavy: SAE-Lens

    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory  # heavy: SAE-Lens

        directory = get_pretrained_saes_directory()
    except Exception:
        directory = {}
    if directory and release not in directory:
        raise SaeUnavailable(f"'{release}' is not a SAE-Lens pretrained release")
    if directory and sae_id not in directory[release].saes_map:
        ids = list(directory[release].saes_map)[:5]
        raise SaeUnavailable(f"'{sae_id}' is not in release '{release}' (e.g. {', '.join(ids)})")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SaeUnavailable(
            f"SAE {release}:{sae_id} could not be downloaded (offline or hub unreachable): {first}"
        ) from None
    if isinstance(sae, tuple):  # older SAE-Lens returned (sae, cfg, sparsity)
        sae = sae[0]
    sae.eval()
    hook = sae.cfg.metadata.hook_name
    meta = {"fingerprint": hashlib.sha1(f"{release}:{sae_id}".encode()).hexdigest()[:12],
            "release": release, "sae_id": sae_id}
    return SaeHandle(sae=sae, source=f"{release}:{sae_id}", hook_name=hook, meta=meta)


def list_pretrained_releases() -> dict[str, list[str]]:
    """SAE-Lens' own registry (release -> sae ids), read at run time, never hard-coded."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory  # heavy: SAE-Lens

        return {k: list(v.saes_map) for k, v in get_pretrained_saes_directory().items()}
    except Exception:
        return {}


def load_sae(spec: str | Path, device: str = "cpu") -> SaeHandle:
    """``spec`` is a folder path or ``release:sae_id``; loaded once per process."""
    spec_s = str(spec).strip()
    if not spec_s:
        raise SaeUnavailable("No SAE given")
    with _LOCK:
        key = f"{spec_s}@{device}"
        if key in _LOADED:
            return _LOADED[key]
        p = Path(spec_s).expanduser()
        if p.exists() or (ASSETS_DIR / spec_s).exists() or "/" in spec_s and ":" not in spec_s:
            handle = load_sae_folder(spec_s, device=device)
        elif ":" in spec_s:
            release, sae_id = spec_s.split(":", 1)
            handle = load_sae_release(release, sae_id, device=device)
        else:
            raise SaeUnavailable(f"'{spec_s}' is neither an SAE folder nor release:sae_id")
        _LOADED[key] = handle
        return handle


def forget(spec: str | Path | None = None) -> None:
    """Drop cached handles (tests and the app's reload button)."""
    with _LOCK:
        if spec is None:
            _LOADED.clear()
        else:
            for k in [k for k in _LOADED if k.startswith(str(spec))]:
                del _LOADED[k]


def norm_cache_path(model_name: str, hook_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model_name}__{hook_name}")
    return cache_subdir("norms") / f"{safe}.json"
