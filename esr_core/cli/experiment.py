"""``esr-lab experiment ...``: run, resume, summarise, plot, list ESR experiments, and the correction overlay."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from esr_core.cli.common import StderrProgress
from esr_core.errors import BadInput, EsrError
from esr_core.experiments.boost import import_run_calibrations
from esr_core.experiments.overlay import OverlayParams, compute_overlay
from esr_core.experiments.overlay_summary import SOURCE_LABELS, describe, overlay_path
from esr_core.experiments.report import finalize, load_summary, run_figures, summary_text
from esr_core.experiments.runner import draw_random_sets, make_executor, rejudge, run_experiment
from esr_core.experiments.spec import ExperimentSpec
from esr_core.experiments.store import REFERENCE_DIR, SPEC_FILE, default_run_dir, list_runs, load_spec
from esr_core.io import atomic_write_json, read_json
from esr_core.judge.scoring import get_judge
from esr_core.latents.catalog.store import load_catalog_for_names
from esr_core.latents.groups import group_for, load_group
from esr_core.models.loading import check_model
from esr_core.models.registry import default_sae_spec
from esr_core.models.sae import load_sae
from esr_core.viz.result_plots import correction_overlay_figure, export_figure


def register(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="ESR experiments: run, summary, plots, overlay, list")
    sub = p.add_subparsers(dest="experiment_command", metavar="ACTION")

    r = sub.add_parser("run", help="run (or --resume) an experiment; results land in a run directory")
    r.add_argument("--config", help="JSON file with experiment settings (see docs/EXPERIMENTS.md)")
    r.add_argument("--name", help="run name (default: exp-<time>)")
    r.add_argument("--model", help="model name (default smollm2-135m-instruct)")
    r.add_argument("--sae", help="SAE folder or release:sae_id (default: the model's default SAE)")
    r.add_argument("--latents", type=int, help="number of distractor latents to select")
    r.add_argument("--latent-ids", help="comma-separated distractor latents (skips selection)")
    r.add_argument("--prompts", type=int, help="prompts per latent (= trials per latent and condition)")
    r.add_argument("--conditions", help="comma-separated: no_steering,steering,meta_prompt,detector_ablation,"
                                        "random_ablation,group_ablation:<name>")
    r.add_argument("--meta-variants", help="comma-separated: get_back_on_track,dont_get_distracted,ignore_label")
    r.add_argument("--max-new-tokens", type=int)
    r.add_argument("--boost-mode", choices=["calibrate", "fixed", "sweep"])
    r.add_argument("--boost", type=float, help="fixed boost value (with --boost-mode fixed)")
    r.add_argument("--boost-units", choices=["norm", "raw"], help="units of --boost (default norm)")
    r.add_argument("--calib-steps", type=int, help="bisection steps per latent")
    r.add_argument("--calib-prompts", type=int, help="prompts scored per bisection step")
    r.add_argument("--relevance", choices=["code", "paper"], help="relevance rule for distractor selection")
    r.add_argument("--batch-size", type=int, help="trials per forward batch (default: auto, 96 on CPU and 256 on a GPU, "
                                                  "fewer if free memory is short; recorded in the run)")
    r.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="model weights (default float32); recorded in the run, a resume keeps it")
    r.add_argument("--seed", type=int, help="base seed of the trials")
    r.add_argument("--judge", help="judge name: offline (default) or llm")
    r.add_argument("--out", help="run directory (default: user cache experiments/<name>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out (or named --name)")
    r.add_argument("--no-judge", action="store_true", help="only generate; a later --resume judges")
    r.add_argument("--limit", type=int, help="stop after about this many new trials (whole batches)")
    r.add_argument("--calibration-from", metavar="RUN_DIR",
                   help="reuse the boost calibrations stored in an earlier run (same model, SAE, target, judge)")
    r.add_argument("--like", metavar="RUN_DIR", help="the same trials as RUN_DIR (latents, prompts, boosts, seeds) "
                                                      "on --model: compare models on one plan")
    r.add_argument("--detector-group", metavar="FILE",
                   help="with --like: ablate this model's own detector group (and random sets of its size) "
                        "instead of the other run's")
    r.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a busy machine); "
                                              "with --executor ray: per actor")
    r.add_argument("--executor", choices=["in-process", "ray"], default="in-process",
                   help="where batches and judging run: this process (default) or Ray actors (esr-lab[cluster])")
    r.add_argument("--address", help="with --executor ray: a cluster to join ('auto', ray://host:10001; "
                                     "default RAY_ADDRESS, else a local Ray)")
    r.add_argument("--workers", type=int, help="with --executor ray: actors, each holding one engine and judge "
                                               "(default: one per CPU, at most 8)")
    r.add_argument("--gpus-per-worker", type=float, help="with --executor ray: num_gpus per actor (e.g. 0.5)")
    r.add_argument("--json", action="store_true", help="print the final summary as JSON")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("summary", help="rates per condition with Wilson intervals")
    s.add_argument("run_dir")
    s.add_argument("--recompute", action="store_true", help="rebuild trials.parquet and summary.json from the logs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)

    pl = sub.add_parser("plots", help="export the result figures as HTML (and PNG)")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    pl.add_argument("--no-png", action="store_true", help="HTML only")
    pl.set_defaults(func=cmd_plots)

    rj = sub.add_parser("rejudge", help="judge a run's responses again (e.g. after a judge change)")
    rj.add_argument("run_dir")
    rj.add_argument("--out", help="where the re-judged run goes (default: <run>-rejudged)")
    rj.add_argument("--judge", help="judge name (default: the run's)")
    rj.add_argument("--json", action="store_true")
    rj.set_defaults(func=cmd_rejudge)

    ov = sub.add_parser("overlay", help="circuit and backtracking activity aligned at correction points "
                                        "(teacher-forced replay; saved as RUN_DIR/overlay.json)")
    ov.add_argument("run_dir", help="an experiment run (its multi-attempt trials are replayed with their "
                                    "steering), or any folder for synthetic recoveries only")
    ov.add_argument("--synthetic", type=int, default=48, metavar="N",
                    help="synthetic recoveries replayed with steering off (default 48; 0: none)")
    ov.add_argument("--window", type=int, default=40, metavar="W", help="tokens either side of the correction")
    ov.add_argument("--no-trials", action="store_true", help="leave out the run's multi-attempt trials")
    ov.add_argument("--baseline", type=int, metavar="N", help="on-topic answers for the baseline (default: all)")
    ov.add_argument("--force", action="store_true", help="recompute even if the inputs are unchanged")
    ov.add_argument("--plot", action="store_true", help="also export the figures to RUN_DIR/plots (HTML, PNG)")
    ov.add_argument("--read-sae", metavar="PATH", help="read the circuit from this readout SAE (another hook); "
                                                      "steering still goes through the run's SAE")
    ov.add_argument("--threads", type=int, help="torch CPU threads")
    ov.add_argument("--json", action="store_true", help="print overlay.json")
    ov.set_defaults(func=cmd_overlay)

    ld = sub.add_parser("leads", help="over a run's recoveries: does the circuit cross before the restart phrase? "
                                      "(saved as RUN_DIR/leads.json)")
    ld.add_argument("run_dir")
    ld.add_argument("--group", help="the circuit group file (default: the shipped circuit for the run's model)")
    ld.add_argument("--read-sae", metavar="PATH", help="read the circuit from this readout SAE (default: the run's)")
    ld.add_argument("--demo", type=int, default=0, metavar="N",
                    help="also rerun the recoveries as the lab does and save the best N as demo candidates")
    ld.add_argument("--json", action="store_true")
    ld.set_defaults(func=cmd_leads)

    ls = sub.add_parser("list", help="runs in the user cache (and the shipped reference run)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _spec_from_args(args):
    d: dict = {}
    if args.config:
        d = read_json(args.config, f"Config file {args.config}")
        if not isinstance(d, dict):
            raise BadInput(f"{args.config} must hold a JSON object")
    simple = {"name": args.name, "model": args.model, "sae": args.sae, "n_latents": args.latents,
              "prompts_per_latent": args.prompts, "max_new_tokens": args.max_new_tokens,
              "boost_mode": args.boost_mode, "boost": args.boost, "boost_units": args.boost_units,
              "calib_steps": args.calib_steps, "calib_prompts": args.calib_prompts,
              "relevance_rule": args.relevance, "batch_size": args.batch_size, "dtype": args.dtype, "base_seed": args.seed,
              "judge": args.judge}
    d.update({k: v for k, v in simple.items() if v is not None})
    if args.boost is not None and not args.boost_mode:
        d["boost_mode"] = "fixed"
    if args.conditions:
        d["conditions"] = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if args.meta_variants:
        d["meta_variants"] = [c.strip() for c in args.meta_variants.split(",") if c.strip()]
    if args.latent_ids:
        try:
            d["latents"] = [int(x) for x in args.latent_ids.split(",") if x.strip()]
        except ValueError:
            raise BadInput(f"--latent-ids must be integers, got {args.latent_ids!r}") from None
    if not d.get("name"):
        d["name"] = args.out and Path(args.out).name or time.strftime("exp-%Y%m%d-%H%M%S")
    return ExperimentSpec.from_dict(d)


def like_run(run_dir: str | Path, model: str | None, name: str, detector_group: str | None = None) -> ExperimentSpec:
    """Another run's resolved plan (latents, prompts, boosts, seeds, ablation sets, conditions) for
    ``model``: two models compared on exactly the same trials, boosts calibrated once. With
    ``detector_group`` the model ablates its own detectors (random sets redrawn to their size)."""
    src = Path(run_dir) / SPEC_FILE
    d = read_json(src, f"The run spec {src}")
    if not isinstance(d, dict) or not d.get("resolved"):
        raise BadInput(f"{src} is not a resolved run (run it first, or use --calibration-from)")
    if not model:
        raise BadInput("--like needs --model: the model to run the same trials on")
    d.update(name=name, model=model, environment={}, like=Path(run_dir).name)
    spec = ExperimentSpec.from_dict(d)
    if detector_group:
        g = load_group(detector_group)
        sae = load_sae(spec.sae or default_sae_spec(model))
        g.check(sae.d_sae)
        cat = load_catalog_for_names(model, sae)
        spec.detector_group = str(detector_group)
        spec.groups["detector_ablation"] = [int(m) for m in g.members]
        draw_random_sets(spec, spec.groups["detector_ablation"], sae.d_sae, cat.dead if cat is not None else None)
    return spec


def cmd_run(args) -> int:
    executor = make_executor(args.executor, args.address, args.workers, args.gpus_per_worker, args.threads)
    if args.executor != "ray" and (args.address or args.workers or args.gpus_per_worker):
        raise BadInput("--address, --workers and --gpus-per-worker need --executor ray")
    if args.threads and executor is None:
        import torch  # heavy: torch, only to set its thread count

        torch.set_num_threads(int(args.threads))
    if args.resume and (args.out or args.name):
        run_dir = Path(args.out) if args.out else default_run_dir(args.name)
        if not (run_dir / SPEC_FILE).exists():
            raise BadInput(f"Nothing to resume in {run_dir} (no spec.json)")
        spec = ExperimentSpec.load(run_dir / SPEC_FILE)
    elif args.resume:
        raise BadInput("--resume needs --out DIR or --name NAME of the run to continue")
    elif args.like:
        spec = like_run(args.like, model=args.model, name=args.name or f"{Path(args.like).name}-{args.model}",
                        detector_group=args.detector_group)
        run_dir = Path(args.out) if args.out else default_run_dir(spec.name)
    else:
        spec = _spec_from_args(args)
        run_dir = Path(args.out) if args.out else default_run_dir(spec.name)
    if getattr(args, "calibration_from", None):
        src = Path(args.calibration_from) / SPEC_FILE
        doc = read_json(src, f"The run spec {src}")
        got = import_run_calibrations(doc)
        print(f"imported {len(got)} calibrations from {src}", file=sys.stderr)
    check_model(spec.model)  # unknown or unavailable models and SAEs fail before anything heavy loads
    load_sae(spec.sae or default_sae_spec(spec.model))
    print(f"run directory: {run_dir}", file=sys.stderr)
    final = run_experiment(spec, run_dir, resume=args.resume, judge=not args.no_judge, progress=StderrProgress(every=2.0, newline=True),
                           stop_after=args.limit, executor=executor)
    summary = finalize(run_dir)
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "progress": final, "summary": summary}, indent=1))
    else:
        print(summary_text(summary, run_dir))
    return 0


def _existing_run(path: str) -> Path:
    p = Path(path)
    if (p / SPEC_FILE).exists():
        return p
    q = default_run_dir(path)
    if (q / SPEC_FILE).exists():
        return q
    raise BadInput(f"No experiment run at {path} (no spec.json)")


def cmd_summary(args) -> int:
    run_dir = _existing_run(args.run_dir)
    summary = finalize(run_dir) if args.recompute else load_summary(run_dir)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(summary_text(summary, run_dir))
    return 0


def cmd_plots(args) -> int:
    run_dir = _existing_run(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "plots"
    written, png_error = [], None
    for name, fig in run_figures(run_dir).items():
        try:
            written += export_figure(fig, out / name, png=not args.no_png and png_error is None)
        except EsrError as exc:  # PNG unavailable: HTML is written; say so once
            png_error = str(exc)
            written.append(out / f"{name}.html")
    for w in written:
        print(w)
    if png_error:
        print(f"esr-lab: PNG skipped: {png_error}", file=sys.stderr)
    return 0


def cmd_rejudge(args) -> int:
    run_dir = _existing_run(args.run_dir)
    out = Path(args.out) if args.out else None
    final = rejudge(run_dir, out, judge_fn=get_judge(args.judge) if args.judge else None)
    target = out or (run_dir.with_name(run_dir.name + "-rejudged"))
    if out is None and run_dir == REFERENCE_DIR:
        target = default_run_dir(load_spec(run_dir).name + "-rejudged")
    summary = finalize(target)
    print(json.dumps({"run_dir": str(target), "progress": final}, indent=1) if args.json
          else summary_text(summary, target))
    return 0


def cmd_list(args) -> int:
    runs = list_runs()
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    if not runs:
        print("no experiment runs yet (esr-lab experiment run ...)")
    for r in runs:
        tag = " [reference]" if r.get("reference") else ""
        print(f"{r['name']}{tag}: {r.get('trials', 0)} trials, {r.get('stage') or 'finished'} - {r['dir']}")
    return 0


def _overlay_text(ov: dict, path) -> str:
    lines = [f"overlay: {path}",
             f"window {ov['window'][0]}..{ov['window'][1]} tokens around the correction, EMA alpha {ov['ema_alpha']}, "
             f"circuit {ov['groups']['circuit']['members']}, backtracking "
             f"{len((ov['groups'].get('backtracking') or {}).get('members') or [])} latents",
             f"on-topic baseline ({ov['baseline']['n_answers']} unsteered answers): circuit "
             f"{ov['baseline'].get('circuit')}, backtracking {ov['baseline'].get('backtracking')}",
             f"{'source':<34}{'episodes':>9}  {'steering':<10}{'signal':<14}{'off-topic':>12}{'correction':>12}"
             f"{'after':>12}"]
    for s, b in ov.get("sources", {}).items():
        for name, reg in (b.get("regions") or {}).items():
            cells = []
            for r in ("off_topic", "correction", "after_correction"):
                x = reg.get(r, {})
                cells.append(f"{x['ratio']:.2f}x" if x.get("ratio") is not None else
                             ("n/a" if x.get("mean") is None else f"{x['mean']:.3g}"))
            lines.append(f"{SOURCE_LABELS.get(s, s):<34}{b['n_episodes']:>9}  {str(b['steering']):<10}{name:<14}"
                         + "".join(f"{c:>12}" for c in cells))
        if not b.get("regions"):
            lines.append(f"{SOURCE_LABELS.get(s, s):<34}{b['n_episodes']:>9}  {str(b['steering']):<10}(no episodes)")
    lines.append("ratios are region means over the on-topic baseline (distractor: raw means)")
    sec = ov.get("seconds") or {}
    lines.append(f"replayed {sec.get('chats_replayed')} chats in {sec.get('forward')} s (total {sec.get('total')} s)")
    lines.append(describe(ov))
    return "\n".join(lines)


def cmd_leads(args) -> int:
    from esr_core.experiments.mechanism import demo_candidates, recovery_leads  # heavy: the engine
    from esr_core.steering.engines import get_engine  # heavy: torch, transformers

    folder = Path(args.run_dir)
    spec = load_spec(folder)
    eng = get_engine(spec.model, spec.sae, args.read_sae)
    circuit = load_group(args.group) if args.group else group_for(eng, "circuit")
    if circuit is None:
        raise BadInput(f"No resistance circuit for {spec.model}"
                       + (f" read from {args.read_sae}" if args.read_sae else "")
                       + ": pass --group FILE or run `esr-lab detectors find`")
    if not circuit.matches(eng):
        raise BadInput(f"The group {args.group} was found on another model or readout SAE: pass --read-sae "
                       "with the SAE it belongs to")
    out = recovery_leads(folder, eng, circuit, progress=StderrProgress(every=5.0, newline=True))
    out["circuit"] = {"name": circuit.name, "members": list(circuit.members), "threshold": circuit.threshold_value()}
    atomic_write_json(folder / "leads.json", out)
    if args.demo:
        demos = demo_candidates(folder, eng, circuit, progress=StderrProgress(every=5.0, newline=True))
        atomic_write_json(folder / "demo_candidates.json", demos[: args.demo])
        for c in demos[: args.demo]:
            print(f"demo: {c['verdict']} scores {c['scores']} crossing {c['crossing']} restart {c['restart']} "
                  f"#{c['setup']['latent']} seed {c['setup']['seed']}: {c['setup']['prompt']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        share = out["crossing_first_share"]
        print(f"{out['n_recoveries']} recoveries; {out['n_with_crossing_and_restart']} with a crossing and a restart; "
              f"crossing first in {'n/a' if share is None else f'{100 * share:.0f} %'}; median lead "
              f"{out['median_lead_tokens']} tokens; {out['n_without_crossing']} never crossed")
    return 0


def cmd_overlay(args) -> int:
    if args.threads:
        import torch  # heavy: torch, only to set its thread count

        torch.set_num_threads(int(args.threads))
    folder = Path(args.run_dir)
    if not (folder / SPEC_FILE).exists() and (default_run_dir(args.run_dir) / SPEC_FILE).exists():
        folder = default_run_dir(args.run_dir)
    params = OverlayParams(window=args.window, n_synthetic=args.synthetic, include_trials=not args.no_trials,
                           n_baseline=args.baseline)
    engine = None
    if args.read_sae:
        from esr_core.steering.engines import get_engine  # heavy: torch, transformers

        load_sae(args.read_sae)  # a missing or corrupt SAE fails before the model loads
        spec = load_spec(folder) if (folder / SPEC_FILE).exists() else None
        engine = get_engine(spec.model, spec.sae, args.read_sae) if spec else get_engine(read_sae=args.read_sae)
    ov = compute_overlay(folder, engine=engine, params=params, progress=StderrProgress(every=2.0, newline=True),
                         force=args.force)
    if args.plot:
        for s in ov.get("sources", {}):
            try:
                for w in export_figure(correction_overlay_figure(ov, s), folder / "plots" / f"correction_overlay_{s}"):
                    print(w, file=sys.stderr)
            except EsrError as exc:
                print(f"esr-lab: PNG skipped: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(ov, indent=1))
    else:
        print(_overlay_text(ov, overlay_path(folder)))
    return 0
