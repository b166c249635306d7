"""`esr-lab bench generate|experiment`: throughput against plain ``generate`` (run by hand)."""

from __future__ import annotations

from esr_core.errors import BadInput
from esr_core.models.loading import DTYPES
from esr_core.models.registry import DEFAULT_MODEL


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (run by hand; speed is never asserted in tests)")
    bsub = p.add_subparsers(dest="bench_what", metavar="WHAT")
    g = bsub.add_parser("generate", help="tokens/s: plain transformers.generate vs the instrumented live path")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--sae", default=None)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--repeats", type=int, default=2)
    g.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the live path's weights")
    g.add_argument("--plain-dtype", choices=list(DTYPES), default="float32",
                   help="plain generate's weights (float32: the ratio a user gains; same as --dtype: parity)")
    g.set_defaults(func=run)
    e = bsub.add_parser("experiment", help="tokens/s of the experiment path vs plain batched generate, at several "
                                           "batch sizes; last line ratio=<ours/plain at the default batch size>")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--sae", default=None)
    e.add_argument("--trials", type=int, default=96, help="trials in the fixed plan (steering on)")
    e.add_argument("--new-tokens", type=int, default=96)
    e.add_argument("--batch-sizes", default="8,48,96", help="comma-separated (include the default, 96 on CPU)")
    e.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights of both paths")
    e.add_argument("--threads", type=int, help="torch CPU threads")
    e.add_argument("--repeats", type=int, default=1, help="best of this many runs of each path (interleaved)")
    e.set_defaults(func=run_experiment)


def run(args) -> int:
    from esr_core.steering.bench import run_generation_bench  # heavy: pulls torch
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    run_generation_bench(get_engine(args.model, args.sae, dtype=args.dtype), new_tokens=args.new_tokens,
                         repeats=args.repeats, plain_dtype=args.plain_dtype)
    return 0


def run_experiment(args) -> int:
    try:
        sizes = sorted({int(x) for x in args.batch_sizes.split(",") if x.strip()})
    except ValueError:
        raise BadInput(f"--batch-sizes wants integers like 8,16,32; got {args.batch_sizes!r}") from None
    if not sizes or min(sizes) < 1 or args.trials < 1 or args.new_tokens < 1:
        raise BadInput("--batch-sizes, --trials and --new-tokens must be positive")
    if args.threads:
        import torch  # heavy: torch, only to set its thread count

        torch.set_num_threads(int(args.threads))
    from esr_core.experiments.bench import run_experiment_bench  # heavy: the engine
    from esr_core.steering.bench import plain_model_copy  # heavy: pulls torch
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    eng = get_engine(args.model, args.sae, dtype=args.dtype)
    run_experiment_bench(eng, plain_model_copy(eng), batch_sizes=sizes, n_trials=args.trials,
                         new_tokens=args.new_tokens, repeats=args.repeats)
    return 0
