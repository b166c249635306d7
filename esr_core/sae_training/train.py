"""Train a TopK sparse autoencoder on cached activations with a plain torch loop.

Why not SAE-Lens' training runner: it re-runs the language model to fill its activation
buffer and carries generic machinery; on these 2-core CPUs it trains ~370 tok/s end to
end, while a loop over a float16 memmap of pre-computed activations runs several
thousand tok/s and can make several passes over the same activations. The result is
saved with SAE-Lens' own ``TopKSAE`` classes, so ``sae_lens.SAE.load_from_disk`` loads it.

Method (TopK SAE, Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
arXiv 2406.04093): z = TopK_k(ReLU((x - b_dec) W_enc + b_enc)), x_hat = z W_dec + b_dec,
loss = ||x - x_hat||^2 / ||x - mean(x)||^2 plus an AuxK term (the top ``aux_k`` dead
latents reconstruct the residual error, weight 1/32) that revives dead latents. Decoder
rows are kept at unit norm after every step; the encoder starts as the decoder's
transpose; inputs are scaled by one constant so that E||x|| = sqrt(d) during training and
the scale is folded back into the weights on export (encoding raw residuals gives the
same top-k set and activations in raw residual units).

Determinism: seeded init, per-epoch permutations from the seed, checkpoints every
``checkpoint_every`` steps holding parameters, Adam state, dead-latent counters and the
step; ``resume=True`` continues from the last checkpoint and reaches the same weights as
an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from esr_core.errors import BadInput, Cancelled
from esr_core.io import atomic_write_json
from esr_core.jobs import Progress, is_cancelled, report

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    d_in: int
    d_sae: int = 8192
    k: int = 32
    total_tokens: int | None = None  # None: one pass over the cache
    batch_size: int = 2048
    lr: float = 4e-4
    warmup_frac: float = 0.02
    decay_frac: float = 0.2  # linear decay to 0 over the last 20 % of steps
    aux_k: int = 512
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 200_000
    seed: int = 0
    checkpoint_every: int = 200  # steps
    device: str = "cpu"


@dataclass
class TrainResult:
    state: dict  # W_enc (d, m), b_enc (m), W_dec (m, d), b_dec (d) in raw residual units
    config: TrainConfig
    steps: int
    tokens_seen: int
    input_scale: float
    final_fvu: float
    dead_fraction: float
    seconds: float
    log: list = field(default_factory=list)


def _set_seed(seed: int):
    import torch  # heavy: torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _rows(acts, rows, device: str):
    """float32 batch on ``device`` from a numpy array/memmap or a torch tensor (any device)."""
    import torch  # heavy: torch

    if isinstance(acts, torch.Tensor):
        idx = torch.as_tensor(rows, device=acts.device)
        return acts[idx].to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.asarray(acts[rows], dtype=np.float32)).to(device)


def _head(acts, n: int) -> np.ndarray:
    import torch  # heavy: torch

    x = acts[: min(n, len(acts))]
    if isinstance(x, torch.Tensor):
        return x.float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def estimate_scale(acts, n: int = 20_000) -> float:
    """Constant s with E||s x|| = sqrt(d) on the first ``n`` rows (deterministic)."""
    sample = _head(acts, n)
    norms = np.linalg.norm(sample, axis=1)
    return float(math.sqrt(acts.shape[1]) / max(float(np.mean(norms)), 1e-8))


def _init_params(cfg: TrainConfig, mean: np.ndarray):
    import torch  # heavy: torch

    g = torch.Generator().manual_seed(cfg.seed)
    W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": W_dec.t().clone().contiguous(),
        "b_enc": torch.zeros(cfg.d_sae),
        "W_dec": W_dec,
        "b_dec": torch.as_tensor(mean, dtype=torch.float32).clone(),
    }
    return {k: v.to(cfg.device).requires_grad_(True) for k, v in params.items()}


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(total * cfg.warmup_frac))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    decay_start = int(total * (1 - cfg.decay_frac))
    if step >= decay_start:
        return cfg.lr * max(0.0, (total - step) / max(1, total - decay_start))
    return cfg.lr


_PERM_CACHE: dict = {}


def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    key = (n_rows, seed, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return _PERM_CACHE[key]


def _batch_indices(n_rows: int, step: int, cfg: TrainConfig) -> np.ndarray:
    """Rows for ``step``: per-epoch permutations from the seed (recomputed on resume)."""
    per_epoch = n_rows // cfg.batch_size
    epoch, i = divmod(step, per_epoch)
    perm = _epoch_permutation(n_rows, cfg.seed, epoch)
    return np.sort(perm[i * cfg.batch_size : (i + 1) * cfg.batch_size])


def sae_forward(p: dict, x, k: int):
    """(x_hat, pre, top_idx, top_val) for a batch; decode touches only the k active rows."""
    import torch  # heavy: torch

    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    val, idx = torch.topk(pre, k, dim=-1, sorted=False)
    val = torch.relu(val)
    x_hat = torch.einsum("bk,bkd->bd", val, p["W_dec"][idx]) + p["b_dec"]
    return x_hat, pre, idx, val


def _save_checkpoint(path: Path, params, opt, step, tokens, since_fired, cfg, scale, history):
    import torch  # heavy: torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({"params": {k: v.detach().cpu() for k, v in params.items()}, "opt": opt.state_dict(),
                "step": step, "tokens": tokens, "since_fired": since_fired.cpu(), "config": asdict(cfg),
                "scale": scale, "history": history}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device="cpu") -> dict:
    """A training checkpoint: tensors and plain values only (``weights_only``), so loading a
    file never runs code from it; a torn or foreign file gives one clear line."""
    import torch  # heavy: torch, only when training

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a torn or foreign file
        raise BadInput(f"The checkpoint {path} cannot be read ({type(exc).__name__}); "
                       "delete it or train without --resume") from None


def train_topk_sae(acts: np.ndarray, cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
                   progress: Progress | None = None, cancel=None,
                   max_steps: int | None = None, input_divisor: float = 1.0) -> TrainResult:
    """Train on ``acts`` ((rows, d_in) array or memmap); checkpoints in ``out_dir``.

    ``max_steps`` stops early after that many steps (checkpointed): the interrupted half
    of a resume test, or a time-boxed run. Raises :class:`Cancelled` when ``cancel()``.
    ``input_divisor``: the cache holds x / input_divisor (float16 range); the returned
    state is for raw x.
    """
    import torch  # heavy: torch

    if acts.ndim != 2 or acts.shape[1] != cfg.d_in:
        raise BadInput(f"activations have shape {acts.shape}, expected (rows, {cfg.d_in})")
    if not 0 < cfg.k < cfg.d_sae:
        raise BadInput(f"k must be between 1 and d_sae-1 (got k={cfg.k}, d_sae={cfg.d_sae})")
    n_rows = len(acts)
    if n_rows < cfg.batch_size:
        raise BadInput(f"only {n_rows} cached activations; need at least one batch of {cfg.batch_size}")
    total_tokens = cfg.total_tokens or n_rows
    total_steps = max(1, total_tokens // cfg.batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ck_path = out_dir / CHECKPOINT
    _set_seed(cfg.seed)
    scale = estimate_scale(acts)
    dev = cfg.device
    history: list = []
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path, dev)
        saved = {k: v for k, v in ck["config"].items() if k not in ("device", "checkpoint_every")}
        now = {k: v for k, v in asdict(cfg).items() if k not in ("device", "checkpoint_every")}
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
            raise BadInput(f"--resume with different settings than the checkpoint: {diff}")
        params = {k: v.to(dev).requires_grad_(True) for k, v in ck["params"].items()}
        opt = torch.optim.Adam(list(params.values()), lr=cfg.lr, betas=(0.9, 0.999))
        opt.load_state_dict(ck["opt"])
        step, tokens, scale = ck["step"], ck["tokens"], ck["scale"]
        since_fired = ck["since_fired"].to(dev)
        history = ck.get("history", [])
        report(progress, "sae", step, total_steps, "resumed")
    else:
        sample = _head(acts, 50_000) * scale
        params = _init_params(cfg, sample.mean(axis=0))
        opt = torch.optim.Adam(list(params.values()), lr=cfg.lr, betas=(0.9, 0.999))
        step, tokens = 0, 0
        since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=dev)
    t0, start_step = time.time(), step
    fvu_ema = float("nan")
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    while step < stop_at:
        if is_cancelled(cancel):
            _save_checkpoint(ck_path, params, opt, step, tokens, since_fired, cfg, scale, history)
            raise Cancelled(f"SAE training stopped at step {step} (checkpointed; use --resume)")
        rows = _batch_indices(n_rows, step, cfg)
        x = _rows(acts, rows, dev) * scale
        x_hat, pre, idx, val = sae_forward(params, x, cfg.k)
        err = x - x_hat
        denom = (x - x.mean(0)).pow(2).sum(-1).mean()
        mse = err.pow(2).sum(-1).mean() / denom
        loss = mse
        dead = since_fired > cfg.dead_after_tokens
        n_dead = int(dead.sum())
        if n_dead > 0 and cfg.aux_coef > 0:
            k_aux = min(cfg.aux_k, n_dead)
            masked = pre.masked_fill(~dead, float("-inf"))
            aval, aidx = torch.topk(masked, k_aux, dim=-1, sorted=False)
            aval = torch.relu(aval)
            e_hat = torch.einsum("bk,bkd->bd", aval, params["W_dec"][aidx])
            aux = (err.detach() - e_hat).pow(2).sum(-1).mean() / denom
            if torch.isfinite(aux):
                loss = loss + cfg.aux_coef * aux
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total_steps, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # drop the gradient along each decoder row (keeps norms ~1)
            W, G = params["W_dec"], params["W_dec"].grad
            G -= (G * W).sum(-1, keepdim=True) * W
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True).clamp_min(1e-8)
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=dev)
            fired[idx[val > 0]] = True
            since_fired += len(rows)
            since_fired[fired] = 0
        step += 1
        tokens += len(rows)
        f = float(mse.detach())
        fvu_ema = f if math.isnan(fvu_ema) else 0.98 * fvu_ema + 0.02 * f
        if step % 50 == 0 or step == stop_at:
            el = time.time() - t0
            rate = (step - start_step) * cfg.batch_size / max(el, 1e-9)
            eta = (total_steps - step) * cfg.batch_size / max(rate, 1e-9)
            rec = {"step": step, "tokens": tokens, "fvu": round(fvu_ema, 4), "dead": n_dead}
            history.append(rec)
            report(progress, "sae", step, total_steps, f"FVU {fvu_ema:.3f}  dead {n_dead}  "
                   f"{rate:,.0f} tok/s  ETA {eta / 60:.1f} min")
        if step % cfg.checkpoint_every == 0 or step == stop_at:
            _save_checkpoint(ck_path, params, opt, step, tokens, since_fired, cfg, scale, history)
    dead_frac = float((since_fired > cfg.dead_after_tokens).float().mean())
    state = unscale_state({k: v.detach().cpu() for k, v in params.items()}, scale / input_divisor)
    return TrainResult(state=state, config=cfg, steps=step, tokens_seen=tokens, input_scale=scale,
                       final_fvu=fvu_ema, dead_fraction=dead_frac, seconds=time.time() - t0, log=history)


def unscale_state(p: dict, scale: float) -> dict:
    """Fold the input scale s into the weights: same top-k set, activations in raw units."""
    return {"W_enc": p["W_enc"].clone(), "b_enc": p["b_enc"] / scale,
            "W_dec": p["W_dec"].clone(), "b_dec": p["b_dec"] / scale}


def export_sae_lens(state: dict, out_dir: str | Path, hook_name: str, k: int, model_name: str,
                    meta: dict | None = None, weights_dtype: str = "float16") -> Path:
    """Write an SAE-Lens folder (``TopKSAE.save_model``) plus ``esr_meta.json``.

    Weights are stored as ``weights_dtype`` (float16 halves the file); the cfg says
    float32, so SAE-Lens loads them into float32 parameters.
    """
    import torch  # heavy: torch
    from sae_lens import TopKSAE, TopKSAEConfig  # heavy: SAE-Lens
    from sae_lens.saes.sae import SAEMetadata  # heavy: SAE-Lens
    from safetensors.torch import load_file, save_file  # heavy: safetensors

    out_dir = Path(out_dir)
    d_in, d_sae = state["W_enc"].shape
    cfg = TopKSAEConfig(d_in=int(d_in), d_sae=int(d_sae), k=int(k), dtype="float32", device="cpu",
                        apply_b_dec_to_input=True, normalize_activations="none",
                        metadata=SAEMetadata(model_name=model_name, hook_name=hook_name,
                                             hook_head_index=None, context_size=128, prepend_bos=False))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(state[name].to(torch.float32))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sae.save_model(str(tmp))
    wpath = tmp / "sae_weights.safetensors"
    if weights_dtype != "float32":
        dt = getattr(torch, weights_dtype)
        tensors = load_file(str(wpath))
        save_file({k: v.to(dt).contiguous() for k, v in tensors.items()}, str(wpath))
    if meta is not None:
        atomic_write_json(tmp / "esr_meta.json", meta)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def write_train_log(out_dir: str | Path, result: TrainResult) -> None:
    atomic_write_json(Path(out_dir) / "train_log.json",
                      {"config": asdict(result.config), "steps": result.steps, "tokens_seen": result.tokens_seen,
                       "input_scale": result.input_scale, "final_fvu": result.final_fvu,
                       "dead_fraction_train": result.dead_fraction, "seconds": result.seconds,
                       "history": result.log})
