"""``esr-lab detectors ...``: find the resistance circuit and backtracking latents, show them, replay text."""

from __future__ import annotations

import json
from pathlib import Path

from esr_core.cli.common import StderrProgress
from esr_core.errors import BadInput
from esr_core.io import read_text_arg
from esr_core.latents.groups import (
    GroupUnavailable,
    LatentGroup,
    cached_group_path,
    group_for,
    load_group,
    save_group,
    shipped_group,
)
from esr_core.models.registry import DEFAULT_MODEL
from esr_core.resistance.backtracking import BacktrackingParams, find_backtracking
from esr_core.resistance.detectors import DetectorParams, find_detectors
from esr_core.resistance.view import replay_episode
from esr_core.steering.interventions import Intervention, parse_cli_pair


def register(sub) -> None:
    p = sub.add_parser("detectors", help="off-topic detector latents (resistance circuit) and backtracking latents")
    dsub = p.add_subparsers(dest="detectors_command", metavar="ACTION")

    f = dsub.add_parser("find", help="contrastive search for off-topic detector latents (ESR paper sec. 5)")
    f.add_argument("--rule", choices=["auc", "strict"], default="auc")
    f.add_argument("--threshold", type=float, default=1.0,
                   help="AUC threshold for --rule auc (relaxed in 0.05 steps down to --relax-to if nothing passes)")
    f.add_argument("--relax-to", type=float, default=0.8)
    f.add_argument("--min-off-freq", type=float, default=0.8, help="--rule strict: fires on >= this share of off-topic")
    f.add_argument("--max-size", type=int, default=26)
    f.add_argument("--derangements", type=int, default=2)
    f.add_argument("--heldout", choices=["derangements", "prompts"], default="derangements")
    f.add_argument("--whole-chat", action="store_true", help="max-pool over prompt + response (default: response only)")
    f.add_argument("--n-prompts", type=int, default=None)
    f.add_argument("--alert", choices=["youden", "quantile"], default="youden",
                   help="live alert threshold: best on/off-topic split of peak activity (default) or the "
                        "95%% quantile of on-topic token activity")
    _common(f)
    f.set_defaults(func=run_find)

    b = dsub.add_parser("backtracking", help="latents that fire on restart phrases of synthetic self-corrections")
    b.add_argument("--max-size", type=int, default=12)
    b.add_argument("--min-selectivity", type=float, default=0.8)
    b.add_argument("--min-episode-freq", type=float, default=0.5)
    b.add_argument("--n-prompts", type=int, default=None)
    _common(b)
    b.set_defaults(func=run_backtracking)

    s = dsub.add_parser("show", help="print a group's members and statistics")
    s.add_argument("which", nargs="?", choices=["circuit", "backtracking"], default="circuit")
    s.add_argument("--file", default=None, help="a group JSON file (default: the shipped one)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_show)

    r = dsub.add_parser("replay", help="the circuit and backtracking latents over a transcript, per region")
    r.add_argument("--prompt", required=True)
    r.add_argument("--response", default=None, help="the response text (or --response-file)")
    r.add_argument("--response-file", default=None)
    r.add_argument("--steer", action="append", default=[], metavar="LATENT:STRENGTH",
                   help="apply this steering (norm units) during the replay forward pass")
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.add_argument("--sae", default=None)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=run_replay)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _common(p) -> None:
    p.add_argument("--answers", default=None, metavar="FILE",
                   help="unsteered answers (JSON/JSONL records with id, answer) instead of the shipped ones")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sae", default=None, help="SAE folder or release:sae_id (default: the model's)")
    p.add_argument("--out", default=None, help="where to write the group JSON (default: the user cache)")
    p.add_argument("--json", action="store_true", help="print the whole group as JSON")


def _engine(args):
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    return get_engine(args.model, args.sae)


def _save(group: LatentGroup, args, which: str) -> Path:
    sae = group.extra.get("sae") or {}
    out = Path(args.out) if args.out else cached_group_path(group.extra.get("model", ""), sae.get("fingerprint", ""),
                                                            which)
    return save_group(group, out)


def _finish(group: LatentGroup, args, which: str) -> int:
    """Save a found group, print it (or its JSON); exit status 1 when no latent passed."""
    path = _save(group, args, which)
    if args.json:
        print(json.dumps(group.to_dict()))
    else:
        _print_group(group, path)
    return 0 if group.members else 1


def _print_group(group: LatentGroup, path: Path | None = None) -> None:
    sae = group.extra.get("sae") or {}
    print(f"{group.name}: {len(group.members)} latents ({group.extra.get('model')}, SAE {sae.get('source')})")
    if path:
        print(f"saved to {path}")
    s = group.extra.get("summary", {})
    params = group.extra.get("params", {})
    if "threshold_used" in params:
        print(f"rule {params['rule']}, AUC threshold used {params['threshold_used']}, "
              f"{s.get('n_latents_auc_1')} latents with AUC 1.0, held-out AUC mean {s.get('mean_auc_heldout')} "
              f"min {s.get('min_auc_heldout')}")
    for row in group.table():
        rest = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("latent", "weight", "description"))
        d = f"  {row['description'][:50]}" if row.get("description") else ""
        print(f"  #{row['latent']:<6} {rest}{d}")


def run_find(args) -> int:
    params = DetectorParams(rule=args.rule, threshold=args.threshold, relax_to=args.relax_to,
                            strict_min_off_freq=args.min_off_freq, max_size=args.max_size,
                            derangements=args.derangements, heldout=args.heldout,
                            response_only=not args.whole_chat, n_prompts=args.n_prompts,
                            answers_path=args.answers, threshold_rule=args.alert).validate()
    return _finish(find_detectors(_engine(args), params, progress=None if args.json else StderrProgress(newline=True)), args, "circuit")


def run_backtracking(args) -> int:
    params = BacktrackingParams(max_size=args.max_size, min_selectivity=args.min_selectivity,
                                min_episode_freq=args.min_episode_freq, n_prompts=args.n_prompts,
                                answers_path=args.answers)
    return _finish(find_backtracking(_engine(args), params, progress=None if args.json else StderrProgress(newline=True)), args,
                   "backtracking")


def run_show(args) -> int:
    if args.file:
        g = load_group(args.file)
    else:
        g = shipped_group(args.which)
        if g is None:
            raise GroupUnavailable(f"No shipped {args.which} group; run `esr-lab detectors "
                                   f"{'find' if args.which == 'circuit' else 'backtracking'}`")
    if args.json:
        print(json.dumps(g.to_dict()))
    else:
        _print_group(g)
    return 0


def run_replay(args) -> int:
    if (args.response is None) == (args.response_file is None):
        raise BadInput("Give the response with exactly one of --response or --response-file")
    resp = args.response if args.response is not None else read_text_arg("@" + args.response_file, "--response-file")
    eng = _engine(args)
    steer = [Intervention(latent=l, mode="add", strength=v, units="norm")
             for l, v in (parse_cli_pair(s, "--steer") for s in args.steer)]
    circ, bt = group_for(eng, "circuit"), group_for(eng, "backtracking")
    if circ is None:
        raise BadInput("No resistance circuit for this model and SAE: run `esr-lab detectors find` first")
    r = replay_episode(eng, args.prompt, resp, circ, bt, steering=steer)
    out = {"steering_on": r["steering_on"], "regions": r["regions"], "markers": r["markers"],
           "summary": r["summary"], "threshold": r.get("threshold"), "crossings": r.get("crossings"),
           "verdict": r.get("verdict")}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"replay with steering {'ON' if r['steering_on'] else 'off'}; {len(r['tokens'])} tokens")
        for reg in r["regions"]:
            print(f"  {reg['label']:<11} tokens {reg['start']}..{reg['end'] - 1}")
        print(r.get("verdict", ""))
    return 0
