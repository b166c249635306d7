"""Train a LoRA adapter (``peft``) on the self-correction data: seeded, checkpointed, resumable.

Paper defaults (ESR_METHOD.md sec. 10): r 32, alpha 16, dropout 0.05 on all linear layers, lr
2e-4 on a cosine schedule, 4 epochs. The loop is ours only because it must checkpoint and
resume to the same weights on a 2-core CPU and optionally steer while training; the adapter
itself is peft's. With ``steer`` each self-correction example is trained with its distractor's
decoder direction added at its boost on every position (the engine's own add intervention),
so the model learns to notice and recover while the steering is on.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esr_core.errors import BadInput
from esr_core.finetune.data import DRIFT_SOURCES, encode_example, load_examples
from esr_core.finetune.noticing import NOTICING
from esr_core.io import atomic_write_json
from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.models.adapters import META_FILE
from esr_core.models.hooks import decoder_layers, parse_resid_hook, with_tensor
from esr_core.models.loading import resolve_model_path
from esr_core.steering.interventions import Intervention, raw_strength

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoraTrainConfig:
    base_model: str = "smollm2-135m-instruct"
    r: int = 32
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: int = 4
    batch_size: int = 4
    max_len: int = 256
    warmup_frac: float = 0.05
    seed: int = 42
    steer: bool = False  # add each example's distractor direction while training
    hook_name: str = "blocks.15.hook_resid_post"  # where the steering is added (the SAE's hook)
    bf16: bool = True  # bfloat16 autocast on CPU when the CPU supports it (about 1.6x here)
    checkpoint_every: int = 25  # optimiser steps
    max_steps: int | None = None  # stop early (tests, timing); None = all epochs
    validation_prompts: int = 0  # training prompts kept out of training (seeded) to compare settings on
    max_examples: int | None = None  # train on a seeded subset of the examples (small-scale comparisons)
    # levers over one data folder, applied before max_examples (the mixing ratio, drift
    # sources and noticing variety), so a sweep need not rebuild the data for each setting
    self_correction_share: float | None = None  # fraction of self-correction examples (the rest normal)
    drift_sources: tuple[str, ...] | None = None  # keep self-corrections whose drift came from these
    noticing_variants: int | None = None  # keep self-corrections using the first N noticing sentences
    split_version: int = 2  # 1: the validation split of adapters trained before 2026-12-02 (see split_examples)

    def validate(self) -> LoraTrainConfig:
        for name, lo in (("r", 1), ("alpha", 1), ("epochs", 1), ("batch_size", 1), ("max_len", 16),
                         ("checkpoint_every", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise BadInput(f"{name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1 and math.isfinite(self.lr)):
            raise BadInput(f"lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise BadInput(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.validation_prompts, int) or self.validation_prompts < 0:
            raise BadInput(f"validation_prompts must be an integer >= 0, got {self.validation_prompts!r}")
        if self.max_examples is not None and (not isinstance(self.max_examples, int) or self.max_examples < 1):
            raise BadInput(f"max_examples must be a positive integer or None, got {self.max_examples!r}")
        s = self.self_correction_share
        if s is not None and not (isinstance(s, (int, float)) and math.isfinite(s) and 0 < s <= 1):
            raise BadInput(f"self_correction_share must be in (0, 1], got {s!r}")
        if self.drift_sources is not None:
            self.drift_sources = tuple(self.drift_sources)
            bad = [d for d in self.drift_sources if d not in DRIFT_SOURCES]
            if bad or not self.drift_sources:
                raise BadInput(f"drift_sources must be some of {', '.join(DRIFT_SOURCES)}, got {list(self.drift_sources)}")
        nv = self.noticing_variants
        if nv is not None and (not isinstance(nv, int) or isinstance(nv, bool) or not 1 <= nv <= len(NOTICING)):
            raise BadInput(f"noticing_variants must be an integer in 1..{len(NOTICING)}, got {nv!r}")
        if parse_resid_hook(self.hook_name) is None:
            raise BadInput(f"hook_name must be a residual hook (blocks.L.hook_resid_post), got {self.hook_name!r}")
        return self


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    return [order[a : a + batch_size] for a in range(0, n, batch_size)]


def _collate(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    import torch  # heavy: torch

    T = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    lab = torch.full((len(encoded), T), -100, dtype=torch.long)
    att = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, (i, y) in enumerate(encoded):
        ids[b, : len(i)] = torch.tensor(i)
        lab[b, : len(y)] = torch.tensor(y)
        att[b, : len(i)] = 1
    return ids, att, lab


def split_examples(examples: list[dict], cfg: LoraTrainConfig) -> tuple[list[dict], list[str]]:
    """The examples to train on and the validation prompt ids kept out (both seeded by ``cfg.seed``)."""
    pids = sorted({str(e["prompt_id"]) for e in examples})
    # its own random stream: with Random(seed) this sample was exactly the last prompts of the data
    # builder's seeded shuffle, i.e. every corpus-drift prompt, so no corpus drift was ever trained on
    rng = random.Random(f"validation-split:{cfg.seed}") if cfg.split_version >= 2 else random.Random(cfg.seed)
    val = sorted(rng.sample(pids, min(cfg.validation_prompts, max(0, len(pids) - 1))))
    keep = apply_levers([e for e in examples if str(e["prompt_id"]) not in set(val)], cfg)
    if cfg.max_examples is not None and cfg.max_examples < len(keep):
        idx = sorted(random.Random(cfg.seed + 1).sample(range(len(keep)), cfg.max_examples))
        keep = [keep[i] for i in idx]
    return keep, val


def apply_levers(examples: list[dict], cfg: LoraTrainConfig) -> list[dict]:
    """Filter self-corrections by drift source and noticing sentence, then subsample one kind
    (seeded) so self-corrections make up ``self_correction_share`` of what is left."""
    sc = [e for e in examples if e.get("kind") == "self_correction"]
    normal = [e for e in examples if e.get("kind") != "self_correction"]
    if cfg.drift_sources is not None:
        sc = [e for e in sc if e.get("drift_source") in cfg.drift_sources]
    if cfg.noticing_variants is not None:
        allowed = set(NOTICING[: cfg.noticing_variants])
        sc = [e for e in sc if e.get("noticing") in allowed]
    if not sc:
        raise BadInput("No self-correction examples are left after the drift-source and noticing filters")
    share = cfg.self_correction_share
    if share is not None:
        rng = random.Random(cfg.seed + 2)
        want_normal = round(len(sc) * (1 - share) / share)
        if want_normal <= len(normal):
            normal = rng.sample(normal, want_normal)
        else:  # too few normal examples: keep them all and drop self-corrections instead
            sc = rng.sample(sc, max(1, round(len(normal) * share / (1 - share))))
    order = {id(e): i for i, e in enumerate(examples)}
    return sorted(sc + normal, key=lambda e: order[id(e)])


def bf16_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_adapter(data_dir: str | Path, out_dir: str | Path, cfg: LoraTrainConfig, sae=None, resume: bool = False,
                  progress: Progress | None = None, cancel=None, device: str | None = None) -> dict:
    """Train; write the adapter (float16 safetensors) and ``esr_adapter.json`` into ``out_dir``.

    ``sae`` (an SAE handle) is needed only with ``cfg.steer``. A checkpoint is written every
    ``checkpoint_every`` steps; with ``resume`` training continues from it and ends with the same
    weights as an uninterrupted run (same data order, same dropout draws).
    """
    import torch  # heavy: torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # heavy: peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup  # heavy: transformers

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples, validation_ids = split_examples(load_examples(data_dir), cfg)
    if cfg.steer and sae is None:
        raise BadInput("Training with the steering on needs the SAE whose directions steer (--sae)")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    path, _ = resolve_model_path(cfg.base_model)
    tok = AutoTokenizer.from_pretrained(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    layer, _kind = parse_resid_hook(cfg.hook_name)
    block = decoder_layers(model)[layer]
    model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoded = [encode_example(tok, e, cfg.max_len) for e in examples]
    n_tokens = sum(len(i) for i, _ in encoded)
    steer_delta = {"d": None}
    W = None
    if cfg.steer:
        W = sae.W_dec.detach().float().to(dev)

        def add_steering(_m, _i, output):
            d = steer_delta["d"]
            if d is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            return with_tensor(output, h + d.to(h.dtype))

        hook = block.register_forward_hook(add_steering)
    per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(cfg.warmup_frac * total)), total)
    step, history, seconds, tokens_seen = 0, [], 0.0, 0
    ck = out / CHECKPOINT
    if resume and ck.exists():
        state = _load_checkpoint(ck, dev)
        if state["config"] != asdict(cfg) or state["n_examples"] != len(encoded):
            raise BadInput("--resume with other settings or data than the checkpoint's; start a new output folder")
        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history, seconds, tokens_seen = state["step"], state["history"], state["seconds"], state["tokens_seen"]
        torch.set_rng_state(state["rng"])
    use_bf16 = cfg.bf16 and dev == "cpu" and bf16_supported()
    model.train()
    t0 = time.time()
    try:
        for epoch in range(cfg.epochs):
            for bi, batch in enumerate(_batches(len(encoded), cfg.batch_size, cfg.seed, epoch)):
                if epoch * per_epoch + bi < step:
                    continue  # done before the checkpoint
                if step >= total:
                    break
                check_cancel(cancel, "Fine-tuning")
                ids, att, lab = _collate([encoded[i] for i in batch], pad)
                ids, att, lab = ids.to(dev), att.to(dev), lab.to(dev)
                if W is not None:
                    rows = [examples[i] for i in batch]
                    steer_delta["d"] = torch.stack([
                        W[int(e["latent"])] * raw_strength(Intervention(latent=int(e["latent"]), mode="add",
                                                                        strength=float(e["boost"]), units="raw"), 1.0,
                                                           None)
                        if e.get("kind") == "self_correction" and e.get("latent") is not None
                        else torch.zeros(W.shape[1], device=dev) for e in rows])[:, None, :]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
                loss.backward()
                loss_value = float(loss.detach())
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += int(att.sum())
                history.append([step, round(loss_value, 4)])
                el = seconds + time.time() - t0
                rate = tokens_seen / max(el, 1e-6)
                eta = (total - step) * el / max(step, 1)
                report_fraction(progress, "fine-tune", step / total,
                                f"step {step}/{total} · loss {loss_value:.3f} · {rate:.0f} tokens/s · "
                                f"ETA {eta / 60:.0f} min")
                if step % cfg.checkpoint_every == 0 and step < total:
                    _save_checkpoint(ck, model, opt, sched, step, history, el, tokens_seen, cfg, len(encoded),
                                     get_peft_model_state_dict)
    finally:
        if W is not None:
            hook.remove()
    seconds += time.time() - t0
    _save_checkpoint(ck, model, opt, sched, step, history, seconds, tokens_seen, cfg, len(encoded),
                     get_peft_model_state_dict)
    model.save_pretrained(str(out))
    _to_float16(out / "adapter_model.safetensors")
    meta = {"base_model": cfg.base_model, "config": asdict(cfg), "n_examples": len(encoded), "n_tokens": n_tokens,
            "trained_mix": trained_mix(examples),
            "trainable_parameters": int(n_trainable), "validation_prompt_ids": validation_ids, "steps": step, "train_seconds": round(seconds, 1),
            "tokens_per_s": round(tokens_seen / max(seconds, 1e-6), 1), "bf16": use_bf16, "device": dev,
            "final_loss": history[-1][1] if history else None,
            "loss_curve": history[:: max(1, len(history) // 60)]}
    data_meta = Path(data_dir)
    for name in ("recipe.json", "manifest.json", "splits.json"):
        if (data_meta / name).exists():
            meta[name.split(".")[0]] = json.loads((data_meta / name).read_text(encoding="utf-8"))
    if isinstance(meta.get("splits"), dict):
        meta["splits"].pop("train_prompts", None)
    old = out / META_FILE
    if old.exists():  # keep results measured earlier for the same adapter folder
        prev = json.loads(old.read_text(encoding="utf-8"))
        meta["results"] = prev.get("results", {})
        meta["command"] = prev.get("command")
    atomic_write_json(out / META_FILE, meta)
    return meta


def trained_mix(examples: list[dict]) -> dict:
    """What the adapter actually trained on: counts by kind, drift source and noticing sentence."""
    sc = [e for e in examples if e.get("kind") == "self_correction"]
    by_source: dict[str, int] = {}
    for e in sc:
        by_source[str(e.get("drift_source"))] = by_source.get(str(e.get("drift_source")), 0) + 1
    return {"n_self_correction": len(sc), "n_normal": len(examples) - len(sc),
            "self_correction_share": round(len(sc) / max(1, len(examples)), 3), "drift_sources": by_source,
            "n_noticing_variants": len({e.get("noticing") for e in sc})}


def _save_checkpoint(path, model, opt, sched, step, history, seconds, tokens_seen, cfg, n, get_state) -> None:
    import torch  # heavy: torch

    state = {"adapter": {k: v.detach().cpu() for k, v in get_state(model).items()}, "opt": opt.state_dict(),
             "sched": sched.state_dict(), "step": step, "history": history, "seconds": seconds,
             "tokens_seen": tokens_seen, "config": asdict(cfg), "n_examples": n, "rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, device) -> dict:
    import torch  # heavy: torch

    try:  # tensors and plain values only: loading never runs code from the file
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a torn or foreign file
        raise BadInput(f"The checkpoint {path} cannot be read ({type(exc).__name__}); "
                       "delete it to start over") from None


def _to_float16(path: Path) -> None:
    """Store the adapter in float16 (half the size; merged into the float32 base at load)."""
    import torch  # heavy: torch
    from safetensors.torch import load_file, save_file  # heavy: safetensors

    t = {k: v.to(torch.float16) for k, v in load_file(str(path)).items()}
    tmp = path.with_suffix(".tmp")
    save_file(t, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
