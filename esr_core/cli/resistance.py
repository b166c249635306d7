"""``esr-lab detectors ...``: find the resistance circuit and backtracking latents, show them, replay text."""

from __future__ import annotations

import json
from pathlib import Path

from esr_core.cli.common import StderrProgress
from esr_core.errors import BadInput
from esr_core.experiments.attribution import AttributionParams, attribution_group, run_attribution
from esr_core.io import atomic_write_json, read_json, read_jsonl, read_text_arg
from esr_core.latents.groups import (
    GroupUnavailable,
    LatentGroup,
    cached_group_path,
    group_for,
    load_group,
    member_descriptions,
    sae_identity,
    save_group,
    shipped_group,
)
from esr_core.models.registry import DEFAULT_MODEL
from esr_core.paths import from_repo, portable_name
from esr_core.models.sae import load_sae
from esr_core.resistance.backtracking import BacktrackingParams, find_backtracking
from esr_core.resistance.detectors import DetectorParams, find_detectors
from esr_core.resistance.token_detectors import TokenSearchParams, run_search
from esr_core.resistance.token_inputs import (
    INPUTS_PATH,
    LIVE_INPUTS_PATH,
    build_detector_inputs,
    check_boost_range,
    generate_live_drifts,
    load_detector_inputs,
    write_inputs,
)
from esr_core.resistance.token_report import (
    add_layer_rows,
    annotate_group,
    best_layer,
    group_dict,
    layer_table,
    save_report,
)
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

    t = dsub.add_parser("token-search", help="token-level detector search at one or more layers, with controls "
                                             "(token id, segment position, garbling, system prompt) and held-out prompts")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--sae", action="append", default=[], metavar="SPEC",
                   help="an SAE to search (repeat for several layers; default: the model's own)")
    t.add_argument("--inputs", default=None, help="detector inputs JSONL (default: assets/prompts/detector_inputs.jsonl)")
    t.add_argument("--n-prompts", type=int, default=None, help="use only the first N prompts (a small sample)")
    t.add_argument("--max-size", type=int, default=26)
    t.add_argument("--baseline", default=None, metavar="GROUP_JSON",
                   help="compare with this group on the same held-out tokens (default: the shipped circuit)")
    t.add_argument("--report", default=None, help="write the full report (every candidate and control) here")
    t.add_argument("--out", default=None, help="write the best layer's group here")
    t.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    t.set_defaults(func=run_token_search)

    a = dsub.add_parser("attribute", help="latents that drive a run's restarts (gradient x activation), "
                                          "confirmed by ablating them against random latents")
    a.add_argument("--model", default="smollm2-135m-esr")
    a.add_argument("--sae", default=None, help="steering SAE (default: the model's)")
    a.add_argument("--read-sae", default=None, help="readout SAE to attribute to (default: the steering SAE)")
    a.add_argument("--run", default="assets/experiments/tuned-reference", help="a run folder with restarts")
    a.add_argument("--conditions", default="steering,meta_prompt")
    a.add_argument("--limit", type=int, default=None, help="use at most this many restarts")
    a.add_argument("--top-k", type=int, default=10)
    a.add_argument("--random-draws", type=int, default=5)
    a.add_argument("--report", default=None, help="write the full report here (default: <run>/attribution.json, "
                                                  "or <run>/attribution.<hook>.json with --read-sae)")
    a.add_argument("--group-out", default=None, help="also write the top latents as a group here")
    a.add_argument("--compare-group", action="append", default=[], metavar="GROUP_JSON",
                   help="also report the overlap of the top latents with this group (repeat for several)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=run_attribute)

    sp = dsub.add_parser("separation", help="how often a circuit crosses its threshold on a run's steered "
                                            "off-topic answers vs its unsteered ones (replayed with their steering)")
    sp.add_argument("--model", default=DEFAULT_MODEL)
    sp.add_argument("--read-sae", default=None, help="readout SAE the group belongs to (default: the steering SAE)")
    sp.add_argument("--run", default="assets/experiments/reference")
    sp.add_argument("--group", action="append", default=[], metavar="GROUP_JSON",
                    help="a circuit file (repeat to compare; default: the circuit for this engine)")
    sp.add_argument("-n", type=int, default=12, help="answers of each kind")
    sp.add_argument("--off-topic-below", type=float, default=30.0,
                    help="a steered answer counts as off-topic when the judge scored its first attempt below this")
    sp.add_argument("--record", action="store_true",
                    help="write the result into each --group file's evidence (the Resistance page shows it)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=run_separation)

    an = dsub.add_parser("annotate", help="add a token-search report's evidence and controls to a group file")
    an.add_argument("--report", required=True)
    an.add_argument("--group", required=True, help="the group the report compared with (its baseline)")
    an.add_argument("--out", default=None, help="default: overwrite --group")
    an.add_argument("--add-layers", action="store_true",
                    help="only add --report's layers (searched later on the same inputs, e.g. another SAE) to the "
                         "group's per-layer table, keeping its evidence")
    an.set_defaults(func=run_annotate)

    i = dsub.add_parser("inputs", help="build the detector inputs file from `esr-lab finetune data` output, or "
                                       "(--live) write fresh steered drifts that record their steering")
    i.add_argument("--data", default=None, help="the fine-tuning data folder (answers.jsonl, drifts.jsonl)")
    i.add_argument("--live", action="store_true",
                   help="generate a fresh steered drift for every prompt of --source with this model, recording its "
                        "latent and boost, so token-search reads it with the steering on (the live condition)")
    i.add_argument("--source", default=None, help="with --live: the prompts and answers (default: the shipped inputs)")
    i.add_argument("--model", default=DEFAULT_MODEL, help="with --live: the model that drifts")
    i.add_argument("--latents", default=None,
                   help="with --live: distractor latents, comma-separated (default: the source's drift latents, "
                        "which are the fine-tuning training latents, disjoint from the evaluation run's)")
    i.add_argument("--boost-range", default="0.25,0.6", metavar="LO,HI",
                   help="with --live: boosts drawn uniformly from LO..HI x the median residual norm")
    i.add_argument("--seed", type=int, default=7)
    i.add_argument("--out", default=None, help="default: assets/prompts/detector_inputs.jsonl "
                                               "(--live: assets/prompts/detector_inputs_live.jsonl)")
    i.set_defaults(func=run_inputs)

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


def _live_inputs(args) -> int:
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    rows = load_detector_inputs(args.source)
    try:
        lo, hi = (float(x) for x in args.boost_range.split(","))
        latents = ([int(x) for x in args.latents.split(",") if x.strip()] if args.latents
                   else sorted({int(r["drift_latent"]) for r in rows if r.get("drift_latent") is not None}))
    except ValueError:
        raise BadInput("--boost-range takes LO,HI and --latents comma-separated integers") from None
    check_boost_range(lo, hi)  # before the model loads
    engine = get_engine(args.model, None)
    for j in latents:
        engine.sae.check_latent(j, "the steering SAE")
    out = generate_live_drifts(engine, rows, latents, (lo, hi), seed=args.seed,
                               progress=StderrProgress(newline=True))
    path = write_inputs(out, args.out or LIVE_INPUTS_PATH)
    print(f"{len(out)} prompts, {sum(1 for r in out if r.get('drift'))} with a live drift (judged off-topic) -> {path}")
    return 0


def run_inputs(args) -> int:
    if args.live:
        return _live_inputs(args)
    if not args.data:
        raise BadInput("Name the fine-tuning data folder with --data, or use --live")
    d = Path(args.data)
    missing = [n for n in ("answers.jsonl", "drifts.jsonl") if not (d / n).exists()]
    if missing:
        raise BadInput(f"{d} lacks {', '.join(missing)} (run `esr-lab finetune data` first)")
    info = build_detector_inputs(read_jsonl(d / "answers.jsonl"), read_jsonl(d / "drifts.jsonl"),
                                 args.out or INPUTS_PATH)
    print(f"{info['rows']} prompts, {info['with_drift']} with a steered drift -> {args.out or INPUTS_PATH}")
    return 0



def run_token_search(args) -> int:
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    params = TokenSearchParams(n_prompts=args.n_prompts, max_size=args.max_size).validate()
    rows = load_detector_inputs(args.inputs, params.n_prompts)  # bad input fails before a model loads
    engine = get_engine(args.model, None)
    saes = [load_sae(s) for s in args.sae] if args.sae else [engine.sae]
    base = load_group(args.baseline) if args.baseline else shipped_group("circuit", args.model)
    baselines = {}
    if base is not None and (base.extra.get("sae") or {}).get("hook") and base.threshold_value("sum") is not None:
        baselines[base.extra["sae"]["hook"]] = {"name": f"today's {base.name}", "members": base.members,
                                                "threshold": base.threshold_value("sum")}
    report = run_search(engine.model, saes, params, rows=rows, baselines=baselines, steer_sae=engine.sae,
                        progress=None if args.json else StderrProgress(newline=True))
    report["layer_table"] = layer_table(report)
    report["inputs"] = portable_name(args.inputs or INPUTS_PATH)
    report["command"] = "esr-lab detectors token-search " + " ".join(
        [f"--model {args.model}"] + [f"--sae {portable_name(s)}" for s in args.sae]
        + ([f"--inputs {args.inputs}"] if args.inputs else [])
        + ([f"--n-prompts {args.n_prompts}"] if args.n_prompts else []))
    if args.report:
        save_report(report, args.report)
    best = best_layer(report)
    sae = next(s for s in saes if s.hook_name == best["hook"])

    group = LatentGroup.from_dict(group_dict(report, best, member_descriptions(engine, best["members"], sae),
                                             sae_identity(engine, sae)))
    if args.out:
        save_group(group, args.out)
    if args.json:
        print(json.dumps(report["layer_table"]))
    else:
        for row in report["layer_table"]:
            print("  ".join(f"{k}={v}" for k, v in row.items() if k != "members"))
        print(f"best: {best['hook']} ({len(best['members'])} latents: {best['members']})"
              + (f"; group written to {args.out}" if args.out else ""))
    return 0 if best["members"] else 1


def run_attribute(args) -> int:
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    if not (Path(args.run) / "spec.json").exists():
        raise BadInput(f"{args.run} is not an experiment run folder (no spec.json)")
    engine = get_engine(args.model, args.sae, read_sae=args.read_sae)
    read = engine.read_sae if engine.has_readout_sae else None
    circuit = group_for(engine, "circuit")  # the readout SAE's circuit: the detectors to compare with
    params = AttributionParams(conditions=tuple(c for c in args.conditions.split(",") if c), limit=args.limit,
                               top_k=args.top_k, random_draws=args.random_draws)
    rep = run_attribution(engine, args.run, read, params, detectors=circuit.members if circuit else [],
                          progress=None if args.json else StderrProgress(newline=True),
                          detector_threshold=circuit.threshold_value("sum") if circuit else None)
    top = {t["latent"] for t in rep["top"]}
    rep["overlap_with_groups"] = {f: sorted(top & set(load_group(f).members)) for f in args.compare_group}
    rep["command"] = (f"esr-lab detectors attribute --model {args.model} --run {args.run}"
                      + (f" --read-sae {args.read_sae}" if args.read_sae else "") + f" --top-k {args.top_k}"
                      + f" --random-draws {args.random_draws}"
                      + (f" --limit {args.limit}" if args.limit else "")
                      + "".join(f" --compare-group {f}" for f in args.compare_group))
    # the steering SAE's report is attribution.json; a readout SAE's is named after its hook
    out = Path(args.report) if args.report else Path(args.run) / (
        f"attribution.{read.hook_name}.json" if read is not None else "attribution.json")
    atomic_write_json(out, rep)
    if args.group_out:
        save_group(attribution_group(rep, engine, read), args.group_out)
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "rows"}))
    else:
        print(f"{rep['n_restarts']} restarts, top {len(rep['top'])} latents at {rep['read_hook']}: "
              f"{[t['latent'] for t in rep['top']]}")
        print(f"ablating them changes the restart token's log-probability by {rep['mean_delta_logp_top']:+.3f} "
              f"(random latents: {rep['mean_delta_logp_random']:+.3f}); lower on "
              f"{rep['share_top_lowers_more']:.0%} of restarts; overlap with the circuit: "
              f"{rep['overlap_with_detectors'] or 'none'}")
        print(f"report written to {out}")
    return 0


def separation_record(res: dict, args) -> dict:
    """What `detectors separation --record` stores in a group's evidence."""
    return {"run": portable_name(args.run), "n": args.n, "off_topic_below": args.off_topic_below,
            "steered_off_topic": res["steered_off_topic"], "unsteered": res["unsteered"], "threshold": res["threshold"],
            "command": f"esr-lab detectors separation --model {args.model} --run {portable_name(args.run)} -n {args.n}"
                       + (f" --read-sae {portable_name(args.read_sae)}" if args.read_sae else "")
                       + f" --off-topic-below {args.off_topic_below:g} --group GROUP --record"}


def run_separation(args) -> int:
    from esr_core.experiments.mechanism import circuit_separation  # heavy: pandas (the run's trial table)
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    if args.record and not args.group:
        raise BadInput("--record writes into group files: name them with --group")
    if not (Path(args.run) / "spec.json").exists():
        raise BadInput(f"{args.run} is not an experiment run folder (no spec.json)")
    engine = get_engine(args.model, None, read_sae=args.read_sae)
    groups = [load_group(g) for g in args.group] or [group_for(engine, "circuit")]
    out = []
    for k, g in enumerate(groups):
        if g is None or not g.matches(engine):
            raise BadInput("The circuit does not belong to this model's readout SAE (pass --read-sae)")
        res = circuit_separation(args.run, engine, g, n=args.n, off_topic_below=args.off_topic_below)
        out.append({"group": g.name, "members": g.members, **res})
        if args.record:
            d = g.to_dict()
            d.setdefault("evidence", {})["separation"] = separation_record(res, args)
            save_group(LatentGroup.from_dict(d), args.group[k])
        if not args.json:
            print(f"{g.name} {g.members[:8]}{'...' if len(g.members) > 8 else ''}: crosses on "
                  f"{res['steered_off_topic']['crossed']}/{res['steered_off_topic']['n']} steered off-topic answers, "
                  f"{res['unsteered']['crossed']}/{res['unsteered']['n']} unsteered")
    if args.json:
        print(json.dumps(out))
    return 0


def run_annotate(args) -> int:
    group = load_group(args.group).to_dict()
    if args.add_layers:
        live = (group.get("evidence") or {}).get("live")
        base = read_json(from_repo(live["report"])) if live and live.get("report") else None
        out = add_layer_rows(group, read_json(args.report), portable_name(args.report), base)
        save_group(LatentGroup.from_dict(out), args.out or args.group)
        rows = (out["evidence"]["live"] if live else out)["layers"]
        print(f"{args.out or args.group}: per-layer table now has {len(rows)} rows "
              f"({', '.join(sorted({r['hook'] for r in rows}))})")
        return 0
    out = annotate_group(group, read_json(args.report), args.report)
    save_group(LatentGroup.from_dict(out), args.out or args.group)
    ev = out["evidence"]
    print(f"{args.out or args.group}: {ev['n_passing']} of {len(out['members'])} members pass the controls "
          f"(failed: {ev['rejected'] or 'none'})")
    return 0
