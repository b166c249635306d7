"""The ``esr-lab`` command line: the same capabilities as the app, for scripting.

Each area registers its subcommands from its own ``cli_<area>`` module; bad input exits
non-zero with one clear line on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import EsrError

# modules that add subcommands: each has register(subparsers)
_AREAS = ["cli_generate", "cli_sae", "cli_catalog", "cli_judge", "cli_detectors", "cli_experiment", "cli_bench"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esr-lab", description="ESR Lab: steering resistance experiments")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for area in _AREAS:
        try:
            mod = importlib.import_module(f"esr_core.{area}")
        except ModuleNotFoundError as exc:
            if exc.name == f"esr_core.{area}":
                continue  # area not built in this checkout
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .paths import offline_env

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
