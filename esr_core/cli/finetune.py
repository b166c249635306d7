"""``esr-lab finetune data|train|validate|info``: build self-correction data, train a LoRA adapter,
compare candidates on the validation split, inspect one."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from esr_core.cli.common import StderrProgress, dump_json
from esr_core.errors import BadInput
from esr_core.finetune.data import DataRecipe, build_dataset
from esr_core.finetune.train import LoraTrainConfig, train_adapter
from esr_core.io import atomic_write_json
from esr_core.models.adapters import META_FILE, adapter_dir, check_adapter
from esr_core.models.registry import DEFAULT_MODEL, default_sae_spec, get_entry
from esr_core.models.sae import load_sae
from esr_core.paths import cache_subdir


def _shares(text: str) -> dict:
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise BadInput(f"--shares wants source=share pairs (steered=0.5,other_answer=0.25); got {part!r}") from None
    return out


def cmd_data(args) -> int:
    recipe = DataRecipe(model=args.model, n_self_correction=args.self_corrections, n_normal=args.normal,
                        n_train_latents=args.latents, boost_norm=args.boost, seed=args.seed,
                        batch_size=args.batch_size)
    if args.shares:
        recipe.drift_shares = _shares(args.shares)
    recipe.validate()
    out = Path(args.out or cache_subdir("finetune") / "data")
    manifest = build_dataset(recipe, out, progress=StderrProgress(every=5.0, newline=True))
    print(f"data written to {out}", file=sys.stderr)
    dump_json(manifest)
    return 0


def cmd_train(args) -> int:
    cfg = LoraTrainConfig(base_model=args.model, r=args.r, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
                          epochs=args.epochs, batch_size=args.batch_size, max_len=args.max_len, seed=args.seed,
                          steer=args.steer, bf16=not args.no_bf16, max_steps=args.max_steps,
                          validation_prompts=args.validation_prompts, max_examples=args.max_examples,
                          self_correction_share=args.self_correction_share, noticing_variants=args.noticing_variants,
                          drift_sources=tuple(s.strip() for s in args.drift_sources.split(",") if s.strip())
                          if args.drift_sources else None, split_version=args.split_version).validate()
    if args.threads:
        import torch  # heavy: torch, only to set the thread count

        torch.set_num_threads(int(args.threads))
    sae = load_sae(args.sae or default_sae_spec(args.model)) if cfg.steer else None
    if sae is not None:
        cfg.hook_name = sae.hook_name
    out = Path(args.out or cache_subdir("finetune") / "adapter")
    meta = train_adapter(args.data, out, cfg, sae=sae, resume=args.resume, progress=StderrProgress(every=10.0,
                                                                                                   newline=True))
    meta["command"] = "esr-lab finetune train " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    atomic_write_json(out / META_FILE, meta)
    print(f"adapter written to {out}: {meta['steps']} steps in {meta['train_seconds'] / 60:.1f} min, "
          f"{meta['tokens_per_s']} tokens/s, final loss {meta['final_loss']}", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from esr_core.finetune.validate import validate_adapter  # heavy: the engine

    ids = [p for p in (args.prompts or "").split(",") if p.strip()] or None
    out = validate_adapter(None if args.base_only else args.adapter, args.data, args.model, n=args.n,
                           prompt_ids=ids, progress=StderrProgress(every=10.0, newline=True))
    for cond, r in out["by_condition"].items():
        print(f"{cond}: multi-attempt {r['multi_attempt_k']}/{r['n']} ({100 * r['multi_attempt_rate']:.0f} %), "
              f"ESR {r['esr_k']}/{r['n']} ({100 * r['esr_rate']:.0f} %), first-attempt score "
              f"{r['first_score_mean']:.1f}", file=sys.stderr)
    for k, r in out.get("noticing_teacher_forced", {}).items():
        if r.get("n"):
            print(f"noticing sentence after a held-out drift ({k}, teacher-forced, n {r['n']}): "
                  f"{r['mean_logprob_per_token']:.3f} log-prob per token, first token p {r['mean_first_token_prob']:.3f}",
                  file=sys.stderr)
    if args.json:
        dump_json({k: v for k, v in out.items() if k != "rows"})
    return 0


def cmd_info(args) -> int:
    entry = get_entry(args.model)
    if args.adapter:
        d, base = Path(args.adapter), args.base
    elif entry is not None and entry.source == "adapter":
        d, base = adapter_dir(entry.adapter), entry.base
    else:
        raise BadInput(f"'{args.model}' is not an adapter model; pass --adapter DIR")
    meta = check_adapter(d, base)
    if args.json:
        dump_json(meta)
        return 0
    cfg = meta.get("config", {})
    print(f"adapter: {d} (base {meta.get('base_model')})")
    print(f"LoRA r {cfg.get('r')}, alpha {cfg.get('alpha')}, dropout {cfg.get('dropout')}, lr {cfg.get('lr')}, "
          f"{cfg.get('epochs')} epochs, steering during training: {cfg.get('steer')}")
    print(f"data: {json.dumps(meta.get('manifest', {}))}")
    print(f"trained {meta.get('steps')} steps in {meta.get('train_seconds', 0) / 60:.1f} min "
          f"({meta.get('tokens_per_s')} tokens/s), final loss {meta.get('final_loss')}")
    for k, v in (meta.get("results") or {}).items():
        print(f"{k}: {json.dumps(v)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="resistance tuning: self-correction data and a LoRA adapter")
    sub = p.add_subparsers(dest="finetune_cmd", metavar="STEP")
    d = sub.add_parser("data", help="build (or resume) the self-correction training data")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--out", help="data folder (default: the user cache's finetune/data)")
    d.add_argument("--self-corrections", type=int, default=DataRecipe.n_self_correction)
    d.add_argument("--normal", type=int, default=DataRecipe.n_normal, help="plain answers (loss on all of it)")
    d.add_argument("--shares", help="drift sources, e.g. steered=0.5,other_answer=0.25,corpus=0.25")
    d.add_argument("--latents", type=int, default=DataRecipe.n_train_latents, help="training distractor latents")
    d.add_argument("--boost", type=float, default=DataRecipe.boost_norm, help="steering for the steered drifts "
                                                                              "(x median residual norm)")
    d.add_argument("--batch-size", type=int, default=DataRecipe.batch_size)
    d.add_argument("--seed", type=int, default=DataRecipe.seed)
    d.set_defaults(func=cmd_data)
    t = sub.add_parser("train", help="train the LoRA adapter (peft); checkpointed, --resume continues")
    t.add_argument("--data", required=True, help="a folder made by `esr-lab finetune data`")
    t.add_argument("--out", help="adapter folder (default: the user cache's finetune/adapter)")
    t.add_argument("--model", default=DEFAULT_MODEL, help="the base model")
    t.add_argument("--sae", help="SAE whose directions steer with --steer (default: the model's)")
    for name, typ in (("r", int), ("alpha", int), ("dropout", float), ("lr", float), ("epochs", int),
                      ("batch-size", int), ("max-len", int), ("seed", int)):
        t.add_argument(f"--{name}", type=typ, default=getattr(LoraTrainConfig, name.replace("-", "_")))
    t.add_argument("--steer", action="store_true", help="add each example's distractor direction while training")
    t.add_argument("--max-steps", type=int, help="stop after this many steps")
    t.add_argument("--validation-prompts", type=int, default=0,
                   help="keep this many training prompts out of training, to compare settings on (finetune validate)")
    t.add_argument("--max-examples", type=int, help="train on a seeded subset of this many examples")
    t.add_argument("--self-correction-share", type=float,
                   help="mixing ratio: subsample so self-corrections are this fraction (default: the data's)")
    t.add_argument("--drift-sources", help="keep self-corrections whose drift came from these, e.g. steered,corpus")
    t.add_argument("--noticing-variants", type=int, help="keep self-corrections using the first N noticing sentences")
    t.add_argument("--split-version", type=int, choices=[1, 2], default=2,
                   help="1: the validation split of adapters made before 2026-12-02 (it held out every "
                        "corpus-drift prompt; only to reproduce them)")
    t.add_argument("--no-bf16", action="store_true", help="float32 only (default: bf16 autocast where the CPU has it)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.set_defaults(func=cmd_train)
    v = sub.add_parser("validate", help="steered and unsteered answers on the validation split: restart rates")
    v.add_argument("--adapter", help="the candidate adapter folder (its validation prompts are in its metadata)")
    v.add_argument("--base-only", action="store_true", help="validate the base model instead (needs --prompts)")
    v.add_argument("--data", required=True, help="the data folder the adapter was trained on")
    v.add_argument("--model", default=DEFAULT_MODEL, help="the base model")
    v.add_argument("--n", type=int, default=40, help="validation prompts to use")
    v.add_argument("--prompts", help="comma-separated validation prompt ids (default: the adapter's)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_validate)
    i = sub.add_parser("info", help="what an adapter is: base, data, hyperparameters, measured results")
    i.add_argument("--model", default="smollm2-135m-esr")
    i.add_argument("--adapter", help="an adapter folder instead of a registry model")
    i.add_argument("--base", default=DEFAULT_MODEL, help="with --adapter: the base model it must fit")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    def _no_step(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_no_step)
