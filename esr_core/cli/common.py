"""Helpers every command group shares: progress lines on stderr, JSON output, the SAE argument."""

from __future__ import annotations

import json
import sys
import time

from esr_core.jobs import Step
from esr_core.models.registry import default_sae_spec


class StderrProgress:
    """Progress reports as one rewritten line on stderr (at most every ``every`` seconds)."""

    def __init__(self, every: float = 0.5, newline: bool = False):
        self.every, self.newline, self.last = every, newline, 0.0

    def __call__(self, step: Step) -> None:
        now = time.time()
        final = bool(step.total) and step.done >= step.total
        if now - self.last < self.every and not final:
            return
        self.last = now
        if self.newline:
            print(step.text(), file=sys.stderr, flush=True)
        else:
            print(f"\r{step.text()[:110]:<110}", end="\n" if final else "", file=sys.stderr, flush=True)


def dump_json(obj, indent: int | None = 1) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=indent))


def sae_spec(args) -> str:
    """``--sae`` if given, else the default SAE of ``--model`` (one clear error when there is none)."""
    return args.sae or default_sae_spec(args.model)
