"""Finished runs kept on the server by id, so a shared URL or a reload reopens them.

Runs live in the user cache (``runs/<id>.json``, written atomically). The store is bounded: it
keeps the newest :data:`MAX_RUNS` runs and at most :data:`MAX_BYTES` in all, oldest removed
first. Ids are random (48 bits): a URL that names a run is the way to share it.
"""

from __future__ import annotations

import re
from pathlib import Path

from esr_core.app.run_record import RunRecord
from esr_core.errors import BadInput
from esr_core.io import atomic_write_text
from esr_core.paths import cache_subdir

MAX_RUNS = 500
MAX_BYTES = 200_000_000
_ID = re.compile(r"^[0-9a-f]{8,32}$")


def _dir() -> Path:
    return cache_subdir("runs")


def valid_id(run_id: str) -> bool:
    return bool(_ID.match(str(run_id or "")))


def save(rec: RunRecord) -> None:
    """Keep ``rec`` (replacing an older copy) and trim the store to its bounds."""
    if not valid_id(rec.id):
        raise BadInput(f"'{rec.id}' is not a run id")
    atomic_write_text(_dir() / f"{rec.id}.json", rec.to_json())
    _trim()


def load(run_id: str) -> RunRecord | None:
    """The stored run, or None when it is unknown, expired or unreadable."""
    if not valid_id(run_id):
        return None
    p = _dir() / f"{run_id}.json"
    try:
        return RunRecord.from_json(p.read_bytes())
    except (OSError, BadInput):
        return None


def _trim() -> None:
    files = sorted(_dir().glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    total = 0
    for k, f in enumerate(files):
        total += f.stat().st_size
        if k >= MAX_RUNS or total > MAX_BYTES:
            f.unlink(missing_ok=True)
