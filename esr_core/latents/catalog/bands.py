"""Contexts from the whole activation range, not only the top: samples in activation bands.

The top contexts show what a latent does at its strongest; a feature page also needs the
weaker firings to judge whether a label holds across the range (Neuronpedia's quantile
intervals). Bands are shares of the latent's maximum, so they need the maximum first: this is
a second pass over the catalog's own stored rows, after the evidence pass. In each band a
uniform sample of firings is kept (a random key per token, the largest keys win; at most one
sample per row), with the latent's activations around it, like the top contexts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.latents.catalog.evidence import CTX_LEN, Rows, batch_tensors, merge_slots, row_batches
from esr_core.latents.catalog.store import BANDS

N_SAMPLES = 3
SEED = 20261202


def band_pass(rows: Rows, residual_fn, encode_fn, max_act: np.ndarray, n_samples: int = N_SAMPLES,
              batch_size: int = 16, pad_id: int = 0, progress: Progress | None = None, cancel=None,
              part_file: Path | None = None) -> dict[str, np.ndarray]:
    """``band_pos`` [d, n_bands, n] (flat positions, -1 empty) and ``band_ctx`` [d, n_bands, n,
    CTX_LEN] (uint8, share of max x 255). Checkpointed to ``part_file`` about once a minute."""
    import torch  # heavy: torch, only when a model runs

    d = len(max_act)
    mx = torch.as_tensor(np.maximum(max_act, 1e-12), dtype=torch.float32)
    slots = [{"key": np.zeros((d, n_samples), np.float32), "pos": np.full((d, n_samples), -1, np.int64),
              "ctx": np.zeros((d, n_samples, CTX_LEN), np.float16)} for _ in BANDS]
    batches = row_batches(rows, batch_size)
    start = 0
    if part_file is not None and part_file.exists():
        try:
            with np.load(part_file) as st:
                if st["n_rows"] == len(rows.lens) and st["d"] == d:
                    start = int(st["done"])
                    for j, s in enumerate(slots):
                        for name in s:
                            s[name] = st[f"{j}_{name}"]
        except (OSError, KeyError, ValueError):
            start = 0
    gen = torch.Generator().manual_seed(SEED)
    last = time.time()
    for n, batch in enumerate(batches):
        keys = torch.rand((len(batch), int(rows.lens[batch].max())), generator=gen) + 1e-6  # > 0: a real sample
        if n < start:
            continue  # the generator still advances, so a resumed pass draws the same keys
        check_cancel(cancel, "Band samples")
        ids, att, elig = batch_tensors(rows, batch, pad_id)
        with torch.no_grad():
            z = encode_fn(residual_fn(ids, att)).float().cpu()
        z = z * elig.unsqueeze(-1)
        share = z / mx
        for (lo, hi), s in zip(BANDS, slots):
            inside = (share > lo) & (share <= hi) & (z > 0)
            k = torch.where(inside, keys.unsqueeze(-1), torch.zeros(()))  # [B, T, d]
            best, arg = k.max(dim=1)  # one candidate per row and latent
            merge_slots(s, "key", best, arg, z, rows.row_starts[batch])
        report_fraction(progress, "band samples", (n + 1) / len(batches), f"{n + 1}/{len(batches)} batches")
        if part_file is not None and time.time() - last > 60:
            _checkpoint(part_file, slots, n + 1, len(rows.lens), d)
            last = time.time()
    scale = np.maximum(max_act, 1e-12)[:, None, None]
    pos = np.stack([s["pos"] for s in slots], axis=1).astype(np.int32)
    ctx = np.stack([np.clip(np.rint(s["ctx"].astype(np.float32) / scale * 255), 0, 255) for s in slots], axis=1)
    if part_file is not None and part_file.exists():
        part_file.unlink()
    return {"band_pos": pos, "band_ctx": ctx.astype(np.uint8)}


def _checkpoint(path: Path, slots, done: int, n_rows: int, d: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{j}_{name}": arr for j, s in enumerate(slots) for name, arr in s.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, done=np.array(done), n_rows=np.array(n_rows), d=np.array(d), **arrays)
    os.replace(tmp, path)
