"""Collect residual-stream activations at one or more layers into a float16 disk cache.

Why a cache: SAE training makes several passes over the same activations, and the
model forward dominates the cost on CPU (~1,100 tok/s through layer 15 on two cores),
so each token goes through the model once and training reads a memmap.
Why stop early: layers after the last one wanted are never computed
(:func:`esr_core.models.hooks.capture`), which halves the cost for a mid-depth layer.

Only plain Hugging Face modules are used (residual hooks resolve to ``model.model.layers[L]``),
so the same code runs on a machine with only torch + transformers. Position 0 of every window (the
attention sink: residual norm ~24,000 vs a median ~157 on SmolLM2) is never stored.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from esr_core.errors import BadInput
from esr_core.io import atomic_write_json, read_json_or
from esr_core.jobs import Progress, check_cancel, report
from esr_core.models.hooks import capture, check_layer, resid_hook
from esr_core.sae_training.corpus import interleave_by_source, load_documents, render_document

log = logging.getLogger(__name__)

WINDOW = 128


def collect_to_memmap(hf_model, windows: np.ndarray, layers: Sequence[int], out_dir: str | Path,
                      batch_size: int = 32, device: str = "cpu",
                      progress: Progress | None = None, cancel=None) -> dict[int, Path]:
    """Run ``windows`` (n, T) through the model; store positions 1..T-1 per layer as float16.

    Files: ``out_dir/L{layer}.f16`` (shape (n*(T-1), d_model)), ``out_dir/progress.json``
    (windows done). Re-running resumes after the last completed batch.
    """
    import torch  # heavy: torch, only when a model runs

    layers = sorted({check_layer(hf_model, l) for l in layers})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, T = windows.shape
    d = int(hf_model.config.hidden_size)
    rows = n * (T - 1)
    paths = {l: out_dir / f"L{l}.f16" for l in layers}
    prog_path = out_dir / "progress.json"
    done, divisor = 0, None
    prog = read_json_or(prog_path, {})
    if isinstance(prog, dict):
        try:
            done, divisor = int(prog.get("windows_done", 0)), prog.get("divisor")
        except (TypeError, ValueError):
            done = 0
    mms = {}
    for l, p in paths.items():
        mode = "r+" if p.exists() and p.stat().st_size == rows * d * 2 else "w+"
        if mode == "w+":
            done, divisor = 0, None
        mms[l] = np.memmap(p, dtype=np.float16, mode=mode, shape=(rows, d))
    t0, start = time.time(), done
    while done < n:
        check_cancel(cancel, f"Activation collection at {done}/{n} windows (resumable)")
        b = windows[done : done + batch_size]
        ids = torch.as_tensor(b, dtype=torch.long, device=device)
        hooks = {l: resid_hook(l) for l in layers}
        acts = capture(hf_model, list(hooks.values()), ids)
        got = {l: acts[name] for l, name in hooks.items()}
        if divisor is None:  # Gemma's residual exceeds float16's range: store x / 2^n instead
            peak = max(float(got[l][:, 1:, :].abs().max()) for l in layers)
            divisor = float(2 ** math.ceil(math.log2(peak * 8 / 65504))) if peak * 8 > 65504 else 1.0
        for l in layers:
            h = (got[l][:, 1:, :].float().cpu().numpy() / divisor).astype(np.float16).reshape(-1, d)
            if not np.isfinite(h).all():
                raise BadInput(f"layer {l} activations overflow float16 even after dividing by {divisor:g}")
            mms[l][done * (T - 1) : (done + len(b)) * (T - 1)] = h
        done += len(b)
        if done % (batch_size * 8) == 0 or done == n:
            for mm in mms.values():
                mm.flush()
            atomic_write_json(prog_path, {"windows_done": done, "windows": n, "divisor": divisor})
            el = time.time() - t0
            rate = (done - start) * T / max(el, 1e-9)
            report(progress, "activations", done, n, f"{rate:,.0f} tok/s, ETA {(n - done) * T / max(rate, 1e-9) / 60:.1f} min")
    for mm in mms.values():
        mm.flush()
    atomic_write_json(prog_path, {"windows_done": done, "windows": n, "divisor": divisor or 1.0})
    return paths


def activation_divisor(out_dir: str | Path) -> float:
    """The constant the cached activations were divided by (1.0 unless float16 would overflow)."""
    prog = read_json_or(Path(out_dir) / "progress.json", {})
    return float((prog.get("divisor") if isinstance(prog, dict) else None) or 1.0)


def open_activations(path: str | Path, d_model: int) -> np.ndarray:
    """A read-only (rows, d_model) float16 view of a cache file."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"No activation cache at {path}")
    size = os.path.getsize(path)
    if size % (2 * d_model):
        raise BadInput(f"{path} is not a float16 cache of width {d_model}")
    return np.memmap(path, dtype=np.float16, mode="r", shape=(size // (2 * d_model), d_model))


def training_windows(tokenizer, n_tokens: int, model_name: str | None = None, window: int = WINDOW,
                     split: str = "train") -> tuple[np.ndarray, dict[str, int]]:
    """Token windows from the corpus (sources interleaved) and tokens per source used.

    A prefix of the interleaved document list is taken, so every source contributes in
    proportion to its capped size until it runs out.
    """
    docs = interleave_by_source(load_documents(split, model_name=model_name))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    need = (n_tokens // (window - 1) + 1) * window
    buf: list[int] = []
    per_source: dict[str, int] = {}
    for doc in docs:
        ids = tokenizer(render_document(doc, tokenizer), add_special_tokens=False)["input_ids"] + [eos]
        take = ids[: max(0, need - len(buf))]
        buf.extend(take)
        per_source[doc["source"]] = per_source.get(doc["source"], 0) + len(take)
        if len(buf) >= need:
            break
    n_win = len(buf) // window
    if n_win == 0:
        raise BadInput("The corpus split is empty")
    arr = np.asarray(buf[: n_win * window], dtype=np.int64).reshape(n_win, window)
    return arr, per_source
