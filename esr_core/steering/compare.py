"""One steering, two models, streamed together: a third column for the steering lab.

The second model (e.g. the resistance-tuned SmolLM2 next to its base) runs the same spec's
steered run in a worker thread; its events are renamed ``compare`` and merged into the first
model's stream as they arrive, so the three answers (steered | compare | default) grow side by
side. The models must share the SAE (same latent ids); each engine keeps its own hook, so the
two runs never see each other's steering. Closing the stream (Stop) stops the worker too.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
from collections.abc import Iterator

from esr_core.errors import BadInput, EsrError
from esr_core.steering.spec import COMPARE_RUN, RECORD_RUNS, GenerationSpec, RunResult, collect

_END = object()


def compare_spec(spec: GenerationSpec) -> GenerationSpec:
    """The spec the second model runs: the same request, steered run only."""
    s = copy.deepcopy(spec)
    s.runs = ("steered",)
    return s


def check_pair(primary, secondary) -> None:
    """Both engines must read the same SAE at the same hook, or latent ids would mean different things."""
    if primary is secondary:
        raise BadInput("Compare with another model, not the same one")
    if primary.sae.key != secondary.sae.key or primary.sae.hook_name != secondary.sae.hook_name:
        raise BadInput(f"{secondary.model.name} reads another SAE than {primary.model.name}: its latent ids differ, "
                       "so the same steering cannot be compared")


def stream_two(primary, secondary, spec: GenerationSpec, cancel: threading.Event | None = None) -> Iterator:
    """``primary.stream(spec)`` with ``secondary``'s steered run interleaved as ``compare`` events."""
    check_pair(primary, secondary)
    q: queue.Queue = queue.Queue(maxsize=512)
    stop = threading.Event()

    def work() -> None:
        try:
            for ev in secondary.stream(compare_spec(spec), cancel=stop):
                q.put(dataclasses.replace(ev, run=COMPARE_RUN))
        except EsrError as exc:
            q.put(exc)
        finally:
            q.put(_END)

    worker = threading.Thread(target=work, name="esr-compare", daemon=True)
    worker.start()
    finished = False

    def drain(block: bool) -> Iterator:
        nonlocal finished
        while not finished:
            try:
                item = q.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if block:
                    continue
                return
            if item is _END:
                finished = True
                return
            if isinstance(item, EsrError):
                raise item
            yield item

    try:
        for ev in primary.stream(spec, cancel=cancel):
            yield ev
            yield from drain(block=False)
        if cancel is not None and cancel.is_set():
            return
        yield from drain(block=True)
    finally:
        stop.set()


def collect_all(events, spec: GenerationSpec) -> dict[str, RunResult]:
    """Results per run, the ``compare`` run included when its events are there."""
    own = [e for e in events if getattr(e, "run", None) != COMPARE_RUN]
    out = collect(own, spec)
    other = [dataclasses.replace(e, run="steered") for e in events if getattr(e, "run", None) == COMPARE_RUN]
    if other:
        r = collect(other, compare_spec(spec))["steered"]
        r.run = COMPARE_RUN
        out[COMPARE_RUN] = r
    return {k: out[k] for k in RECORD_RUNS if k in out}
