"""The ``esr-lab`` command line: a fixed list of command groups, one module each.

``generate`` (generate), ``sae`` (corpus, train-sae, sae-metrics), ``latents`` (search, latent,
fires, catalog), ``judge`` (judge, prompts), ``resistance`` (detectors), ``experiment``
(experiment), ``finetune`` (finetune), ``bench`` (bench), ``serve`` (serve: the app); ``common``
holds what they share. A missing group fails loudly.

May import: everything below it (core files through finetune); never app.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from esr_core.errors import EsrError
from esr_core.paths import offline_env

# the command groups, in help order: each module has register(subparsers); a missing one fails loudly
COMMAND_GROUPS = ("generate", "sae", "latents", "judge", "resistance", "experiment", "finetune", "bench", "serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esr-lab", description="ESR Lab: steering resistance experiments")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        importlib.import_module(f"esr_core.cli.{group}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    offline_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EsrError as exc:
        print(f"esr-lab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esr-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
