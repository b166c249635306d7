"""An experiment's run folder: where runs live, the files in one, and the trial table.

A run folder holds ``spec.json`` (everything the trials need), two append-only logs
(``generations.jsonl``, ``trials.jsonl``; fsynced per record, a torn last line ignored),
``progress.json`` (for other processes and browser sessions), and, once finalised,
``trials.parquet`` and ``summary.json``. Shipped runs (``assets/experiments``) carry only the
Parquet table and the summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import pandas as pd

from esr_core.errors import BadInput, EsrError
from esr_core.experiments.boost import levels_in_sd_units
from esr_core.experiments.spec import ExperimentSpec, plan_trials
from esr_core.io import atomic_write_json, read_json_or, read_jsonl, safe_name
from esr_core.jobs import Progress, Step, Tracker
from esr_core.paths import ASSETS_DIR, cache_subdir

SPEC_FILE = "spec.json"
GEN_FILE = "generations.jsonl"
TRIALS_FILE = "trials.jsonl"
PARQUET_FILE = "trials.parquet"
SUMMARY_FILE = "summary.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = "running.lock"
REFERENCE_DIR = ASSETS_DIR / "experiments" / "reference"

TRIAL_COLUMNS = ["key", "prompt_id", "prompt", "latent", "latent_label", "boost", "boost_norm", "boost_sd",
                 "level", "condition", "meta_variant", "ablation_seed", "seed", "response", "n_tokens",
                 "stop_reason", "attempts", "n_attempts", "first_score", "last_score", "degraded", "error",
                 "judge_id"]


# ------------------------------------------------------------------------------ locations

def experiments_root() -> Path:
    return cache_subdir("experiments")


def default_run_dir(name: str) -> Path:
    safe = safe_name(name, strip=True) or "run"
    return experiments_root() / safe


def shipped_run_dirs() -> list[Path]:
    """Runs shipped in assets/experiments: the reference run first, then the others by name."""
    base = REFERENCE_DIR.parent
    others = sorted(p for p in base.iterdir() if p != REFERENCE_DIR and (p / SPEC_FILE).exists()) \
        if base.is_dir() else []
    return ([REFERENCE_DIR] if (REFERENCE_DIR / SPEC_FILE).exists() else []) + others


def list_runs(root: str | Path | None = None, include_reference: bool = True) -> list[dict]:
    """Runs under ``root`` (default: the user cache) plus the shipped runs (reference first)."""
    dirs = []
    shipped = shipped_run_dirs() if include_reference else []
    dirs += shipped
    base = Path(root) if root else experiments_root()
    if base.is_dir():
        dirs += sorted((p for p in base.iterdir() if (p / SPEC_FILE).exists()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    out = []
    for d in dirs:
        info = {"dir": str(d), "name": d.name, "reference": d == REFERENCE_DIR, "shipped": d in shipped}
        spec = read_json_or(d / SPEC_FILE)
        if isinstance(spec, dict):
            info.update(name=spec.get("name") or d.name, model=spec.get("model"),
                        conditions=spec.get("conditions"))
        else:
            info["error"] = "unreadable spec.json"
        prog = read_progress(d)
        info["locked"] = lock_holder(d) is not None
        info["stage"] = prog.get("stage", "")
        info["done"] = prog.get("done")
        info["total"] = prog.get("total")
        info["trials"] = _count_lines(d / TRIALS_FILE) if (d / TRIALS_FILE).exists() else _parquet_rows(d)
        out.append(info)
    return out


def _count_lines(p: Path) -> int:
    return len(read_jsonl(p))


def _parquet_rows(d: Path) -> int:
    p = d / PARQUET_FILE
    if not p.exists():
        return 0
    try:
        import pyarrow.parquet as pq  # heavy: pyarrow, only to count a shipped table's rows

        return int(pq.ParquetFile(p).metadata.num_rows)
    except (OSError, ValueError):
        return 0


def read_progress(run_dir: str | Path) -> dict:
    got = read_json_or(Path(run_dir) / PROGRESS_FILE, {})
    return got if isinstance(got, dict) else {}


class RunProgress:
    """Progress of a run with an ETA: to the caller's callback and to ``progress.json``."""

    def __init__(self, run_dir: Path, progress: Progress | None):
        self.run_dir = run_dir
        self.tracker = Tracker(progress)
        self.last_write = 0.0

    def __call__(self, stage: str, done: int, total: int, message: str = "", force: bool = False) -> Step:
        step = self.tracker(stage, done, total, message)
        now = time.time()
        if force or now - self.last_write > 1.0 or done >= total:
            self.last_write = now
            try:
                atomic_write_json(self.run_dir / PROGRESS_FILE, dict(step.to_dict(), updated=now))
            except OSError:
                pass
        return step


# ------------------------------------------------------------------------------ one writer per run folder

_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


class RunLocked(BadInput):
    """Another session (or process) is running this experiment folder."""


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def lock_holder(run_dir: str | Path) -> dict | None:
    """Who is running ``run_dir`` now ({pid, host, since}), or None (a stale lock counts as none)."""
    p = Path(run_dir) / LOCK_FILE
    info = read_json_or(p)
    if not isinstance(info, dict):
        return None
    if info.get("host") != socket.gethostname():
        return info  # another machine: trust it
    if int(info.get("pid", -1)) == os.getpid():
        with _HELD_LOCK:
            return info if str(p.resolve()) in _HELD else None
    return info if _alive(info.get("pid")) else None


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """Hold ``running.lock`` in ``run_dir`` while a run writes to it; a second writer gets
    :class:`RunLocked` with one clear line (a lock left by a dead process is taken over)."""
    p = Path(run_dir) / LOCK_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    key = str(p.resolve())
    for attempt in range(2):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock_holder(run_dir)
            if holder is not None or attempt:
                since = time.strftime("%H:%M", time.localtime(holder.get("since", 0))) if holder else "?"
                raise RunLocked(f"The run in {Path(run_dir).name} is already running (another session, since "
                                f"{since}); open it to follow its progress") from None
            p.unlink(missing_ok=True)  # stale: its writer is gone
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
    with _HELD_LOCK:
        _HELD.add(key)
    try:
        yield
    finally:
        with _HELD_LOCK:
            _HELD.discard(key)
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ tables

def load_spec(run_dir: str | Path) -> ExperimentSpec:
    return ExperimentSpec.load(Path(run_dir) / SPEC_FILE)


def trial_table(run_dir: str | Path, spec: ExperimentSpec | None = None) -> pd.DataFrame:
    """One row per trial (judged trials; generated-but-unjudged ones appear with no attempts)."""
    run_dir = Path(run_dir)
    spec = spec or load_spec(run_dir)
    judged = {r["key"]: r for r in read_jsonl(run_dir / TRIALS_FILE) if "key" in r}
    if not judged and not (run_dir / GEN_FILE).exists() and (run_dir / PARQUET_FILE).exists():
        return read_parquet_table(run_dir)
    rows = list(judged.values())
    for g in read_jsonl(run_dir / GEN_FILE):
        if g.get("key") in judged:
            continue
        r = dict(g)
        r.update(latent_label=spec.latent_labels.get(str(g["latent"]), ""),
                 boost_norm=spec.boost_norm(g["latent"], g["boost"]), attempts=None, n_attempts=None,
                 first_score=None, last_score=None, degraded=None, error=None, judge_id=None)
        rows.append(r)
        judged[g["key"]] = r
    df = pd.DataFrame(rows)
    for c in TRIAL_COLUMNS:
        if c not in df.columns:
            df[c] = None
    if len(df):
        df["boost_sd"] = boost_sd(spec, df["boost"].astype(float).tolist())
        df["attempts"] = df["attempts"].map(lambda a: None if a is None or (isinstance(a, float) and math.isnan(a))
                                            else (a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)))
        order = {t.key: i for i, t in enumerate(plan_trials(spec))} if spec.resolved else {}
        df["_o"] = df["key"].map(lambda k: order.get(k, 10**9))
        df = df.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
    extra = [c for c in df.columns if c not in TRIAL_COLUMNS]
    return df[TRIAL_COLUMNS + extra]


def boost_sd(spec: ExperimentSpec, boosts: list[float]) -> list[float]:
    th = [v for v in spec.thresholds.values() if v is not None]
    if len(th) < 1:
        return [math.nan] * len(boosts)
    try:
        return levels_in_sd_units(boosts, th)
    except EsrError:
        return [math.nan] * len(boosts)


def read_parquet_table(run_dir: str | Path) -> pd.DataFrame:
    p = Path(run_dir) / PARQUET_FILE
    if not p.exists():
        raise BadInput(f"No trial table at {p}")
    return pd.read_parquet(p)


def load_trials(run_dir: str | Path) -> pd.DataFrame:
    """The run's trial table: live logs when present, else the Parquet file (shipped runs)."""
    run_dir = Path(run_dir)
    if (run_dir / TRIALS_FILE).exists() or (run_dir / GEN_FILE).exists():
        return trial_table(run_dir)
    return read_parquet_table(run_dir)


