"""Long work: one progress report type, one cancel token, one background job.

Why one of each: catalog builds, SAE training, detector searches, experiments and the
correction overlay all run for minutes; the CLI prints their progress, the app draws it and
offers Stop. With one :class:`Step` (what stage, how far, ETA), one :class:`Cancel` and one
:class:`BackgroundJob` every long task is driven the same way from both.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from esr_core.errors import Cancelled, EsrError

log = logging.getLogger(__name__)


@dataclass
class Step:
    """Where a long task is: ``done`` of ``total`` units of ``stage`` (total 0: unknown)."""

    stage: str
    done: float = 0
    total: float = 0
    message: str = ""
    eta_s: float | None = None
    elapsed_s: float | None = None

    @property
    def fraction(self) -> float:
        return float(min(max(self.done / self.total, 0.0), 1.0)) if self.total else 0.0

    def text(self) -> str:
        head = f"{self.stage}: {self.done:g}/{self.total:g}" if self.total else self.stage
        eta = f", ETA {self.eta_s / 60:.1f} min" if self.eta_s else ""
        return f"{head}{eta}" + (f" · {self.message}" if self.message else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[Step], None]


def report(progress: Progress | None, stage: str, done: float = 0, total: float = 0, message: str = "") -> None:
    """Send one :class:`Step` to ``progress`` (if any) and to the debug log."""
    step = Step(stage=stage, done=done, total=total, message=message)
    log.info("%s", step.text())
    if progress is not None:
        progress(step)


def report_fraction(progress: Progress | None, stage: str, fraction: float, message: str = "") -> None:
    """:func:`report` for work measured as a fraction: ``done`` is a percentage of 100."""
    report(progress, stage, round(100.0 * min(max(float(fraction), 0.0), 1.0), 1), 100, message)


class Cancel:
    """A cancel token: ``set()`` from anywhere, ``check()`` inside the work loop.

    ``threading.Event`` and plain callables are accepted wherever a Cancel is (see
    :func:`is_cancelled`), so callers that already hold one need no adapter.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        return self._event.is_set()


CancelLike = Cancel | threading.Event | Callable[[], bool] | None


def is_cancelled(cancel: CancelLike) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def check_cancel(cancel: CancelLike, what: str = "Work") -> None:
    """Raise :class:`Cancelled` when the token is set."""
    if is_cancelled(cancel):
        raise Cancelled(f"{what} cancelled")


class Tracker:
    """Turns (stage, done, total) calls into :class:`Step` reports with an ETA per stage."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.t0 = time.time()
        self.stage, self.stage_t0, self.start_done = "", self.t0, 0.0

    def __call__(self, stage: str, done: float, total: float, message: str = "") -> Step:
        now = time.time()
        if stage != self.stage:
            self.stage, self.stage_t0, self.start_done = stage, now, done
        made, el = done - self.start_done, now - self.stage_t0
        eta = (el / made) * (total - done) if made > 0 and total > done else (0.0 if total and done >= total else None)
        step = Step(stage=stage, done=done, total=total, message=message, eta_s=eta, elapsed_s=round(now - self.t0, 1))
        if self.progress is not None:
            self.progress(step)
        return step


class BackgroundJob:
    """``work(progress, cancel)`` in a daemon thread: last :class:`Step`, result or error, real cancel.

    The app keeps one per long task in the session; a page rerun reads ``step`` and
    ``running`` without touching the work, and Stop calls :meth:`cancel`. Errors never
    escape the thread: an :class:`EsrError` keeps its message, anything else is logged and
    summarised in one line.
    """

    def __init__(self, name: str, work: Callable[[Progress, Cancel], Any], on_cancel: Callable[[], None] | None = None,
                 **info: Any):
        self.name = name
        self.info = info  # what the job is about (e.g. its run folder), for the page that shows it
        self._work = work
        self._on_cancel = on_cancel
        self.cancel_token = Cancel()
        self.step = Step(stage="starting")
        self.error: str | None = None
        self.cancelled = False
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, name=f"esr-{name}", daemon=True)

    def start(self) -> "BackgroundJob":
        self.thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_token.set()

    def _progress(self, step: Step) -> None:
        self.step = step

    def _run(self) -> None:
        try:
            self.result = self._work(self._progress, self.cancel_token)
        except Cancelled as exc:
            self.cancelled, self.error = True, str(exc)
            self.step = Step(stage="cancelled", done=self.step.done, total=self.step.total, message=str(exc))
            if self._on_cancel is not None:
                try:
                    self._on_cancel()
                except Exception:  # what is on disk stays; a summary can be rebuilt later
                    log.exception("%s: clean-up after cancel failed", self.name)
        except EsrError as exc:
            self.error = str(exc)
            self.step = Step(stage="failed", done=self.step.done, total=self.step.total, message=str(exc))
        except Exception as exc:  # keep the app alive; the message goes to the page
            log.exception("%s failed", self.name)
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.step = Step(stage="failed", done=self.step.done, total=self.step.total, message=self.error)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
