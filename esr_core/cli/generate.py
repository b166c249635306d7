"""`esr-lab generate`: steered and default runs side by side, streamed token by token."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

from esr_core.cli.common import sae_spec
from esr_core.errors import BadInput
from esr_core.io import read_text_arg
from esr_core.models.loading import DTYPES, check_model
from esr_core.models.registry import DEFAULT_MODEL
from esr_core.models.sae import load_sae
from esr_core.steering.interventions import Intervention, parse_cli_pair
from esr_core.steering.interventions import validate as validate_intervention
from esr_core.steering.spec import SAMPLERS, GenerationSpec, PromptReadout, RunDone, TokenEvent


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate steered and default answers with per-token SAE readout")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steer", action="append", default=[], metavar="LATENT:STRENGTH",
                   help="add the latent's decoder direction, strength in norm units (x median residual norm)")
    p.add_argument("--steer-raw", action="append", default=[], metavar="LATENT:STRENGTH",
                   help="add in raw residual units (the paper's b)")
    p.add_argument("--clamp", action="append", default=[], metavar="LATENT:VALUE")
    p.add_argument("--scale", action="append", default=[], metavar="LATENT:FACTOR")
    p.add_argument("--ablate", action="append", default=[], metavar="LATENT[,LATENT...]")
    p.add_argument("--watch", default="", metavar="LATENT[,...]")
    p.add_argument("--positions", default="all", choices=["prompt", "generated", "all"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--sampler", choices=list(SAMPLERS), default=SAMPLERS[0],
                   help="random stream of sampled tokens (multinomial: replay a run recorded before 2026-12-02)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--top-k", type=int, default=5, help="top active latents reported per token")
    p.add_argument("--raw", action="store_true", help="raw completion: no chat template")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="a prompt over the model's limit keeps its end instead of failing")
    p.add_argument("--only", choices=["steered", "default"], help="run only one of the two")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sae", default=None, help="SAE folder or release:sae_id (default: the model's)")
    p.add_argument("--read-sae", default=None, metavar="PATH",
                   help="read the watched and top latents from this second SAE (folder or release:sae_id) at its "
                        "own hook, after the steering; --watch ids are its latents (default: the steering SAE)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="model weights: float32 (default, or ESR_LAB_DTYPE) or bfloat16 (faster on CPUs with bf16; "
                        "activations and texts differ slightly)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (first: the model, SAE and readout SAE with their hooks)")
    p.set_defaults(func=run)


def _ids(text: str, what: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise BadInput(f"{what}: '{part}' is not a latent id") from None
    return out


def spec_from_args(args) -> GenerationSpec:
    ivs = []
    for values, flag, mode, units in ((args.steer, "--steer", "add", "norm"), (args.steer_raw, "--steer-raw", "add", "raw"),
                                      (args.clamp, "--clamp", "clamp", "raw"), (args.scale, "--scale", "scale", "raw")):
        for s in values:
            i, v = parse_cli_pair(s, flag)
            ivs.append(Intervention(i, mode, v, units, args.positions))
    for s in args.ablate:
        for i in _ids(s, "--ablate"):
            ivs.append(Intervention(i, "ablate", 0.0, "raw", args.positions))
    runs = (args.only,) if args.only else ("steered", "default")
    return GenerationSpec(prompt=read_text_arg(args.prompt, "--prompt"), interventions=ivs,
                          watch=_ids(args.watch, "--watch"), top_k=args.top_k, temperature=args.temperature,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, chat=not args.raw, runs=runs,
                          sampler=args.sampler,
                          truncate="keep_end" if args.truncate_prompt else "error")


def run(args) -> int:
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    spec = spec_from_args(args).validate()
    sae = sae_spec(args)  # an unknown model fails here, before anything loads
    check_model(args.model)
    steer = load_sae(sae)
    read = load_sae(args.read_sae) if args.read_sae else steer
    # bad latent ids fail before the model loads: interventions name steering latents, --watch readout ones
    for iv in list(spec.interventions) + list(spec.default_interventions):
        validate_intervention(iv, steer.d_sae)
    bad = [i for i in spec.watch if not 0 <= int(i) < read.d_sae]
    if bad:
        which = f"the readout SAE {read.source}" if read is not steer else "this SAE"
        raise BadInput(f"Watched latent {bad[0]} is out of range: {which} has latents 0..{read.d_sae - 1}")
    eng = get_engine(args.model, sae, args.read_sae, dtype=args.dtype)
    if args.json:
        print(json.dumps(header(eng), ensure_ascii=False), flush=True)
        for ev in eng.stream(spec):
            if isinstance(ev, (TokenEvent, RunDone)):
                print(json.dumps(ev.to_json(), ensure_ascii=False), flush=True)
        return 0
    return _print_side_by_side(eng, spec)


def header(eng) -> dict:
    """What the run used: the model, the steering SAE and the readout SAE, each with its hook."""
    return {"model": eng.model.name, "dtype": getattr(eng.model, "dtype", "float32"), "sae": {"source": str(eng.sae.source), "hook": eng.hook_name},
            "read_sae": {"source": str(eng.read_sae.source), "hook": eng.read_hook_name,
                         "same_as_sae": not eng.has_readout_sae}}


def _print_side_by_side(eng, spec: GenerationSpec) -> int:
    """Readable stream: tokens as they come, tagged by run; then both answers in two columns."""
    width = max(40, shutil.get_terminal_size((120, 20)).columns // 2 - 2)
    final = {}
    read = f" | readout SAE {eng.read_sae.source} @ {eng.read_hook_name}" if eng.has_readout_sae else ""
    print(f"model {eng.model.name} ({getattr(eng.model, 'dtype', 'float32')}) | SAE {eng.sae.source} @ {eng.hook_name}{read}")
    for iv in spec.interventions:
        print("  " + iv.label())
    for ev in eng.stream(spec):
        if isinstance(ev, PromptReadout) and ev.run == spec.runs[0]:
            print("rendered prompt:\n" + ev.rendered_prompt)
        elif isinstance(ev, TokenEvent):
            tag = "S" if ev.run == "steered" else "D"
            acts = " ".join(f"{k}={v:.2f}" for k, v in ev.acts.items())
            sys.stdout.write(f"[{tag}{ev.step:>3}] {ev.text!r} {acts}\n")
            sys.stdout.flush()
        elif isinstance(ev, RunDone):
            final[ev.run] = ev
    print()
    cols = [(r, final[r].text) for r in spec.runs if r in final]

    wrapped = [[f"== {r} ({len(final[r].token_ids)} tokens, {final[r].stop_reason}) =="]
               + sum((textwrap.wrap(line, width) or [""] for line in t.splitlines()), []) for r, t in cols]
    for i in range(max(len(w) for w in wrapped)):
        print("  ".join((w[i] if i < len(w) else "").ljust(width) for w in wrapped))
    return 0
