"""`esr-lab bench generate`: instrumented vs plain generation throughput (run by hand)."""

from __future__ import annotations

from esr_core.models.registry import DEFAULT_MODEL


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (run by hand; speed is never asserted in tests)")
    bsub = p.add_subparsers(dest="bench_what", metavar="WHAT")
    g = bsub.add_parser("generate", help="tokens/s: plain transformers.generate vs the instrumented path")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--sae", default=None)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--repeats", type=int, default=2)
    g.set_defaults(func=run)


def run(args) -> int:
    from esr_core.steering.bench import run_generation_bench  # heavy: pulls torch
    from esr_core.steering.engines import get_engine  # heavy: pulls torch

    run_generation_bench(get_engine(args.model, args.sae), new_tokens=args.new_tokens, repeats=args.repeats)
    return 0
