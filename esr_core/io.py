"""Files: atomic writes, append-only JSON logs, JSON reads with one clear error, safe names.

Why one module: every result ESR Lab writes (runs, catalogs, caches) must survive a crash
mid-write, and every file it reads may be missing, torn or not UTF-8; the rules for both
live here once instead of in each caller.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from esr_core.errors import BadInput


def safe_name(name: str, strip: bool = False) -> str:
    """A file-name-safe version of ``name`` (letters, digits, ``-_.`` kept; the rest ``_``)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    return out.strip("._") if strip else out


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def save_pretrained_atomically(out: str | os.PathLike, *parts: Any) -> Path:
    """Save Hugging Face objects (model, tokenizer) into a sibling temp folder, then swap it in,
    so a crash mid-save never leaves a half-written model folder behind."""
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save must not leak files into this one
    try:
        for part in parts:
            part.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_json(path: str | os.PathLike, what: str | None = None, error: type[Exception] = BadInput) -> Any:
    """Parse a JSON file; a missing, non-UTF-8 or malformed file raises ``error`` with one line."""
    path = Path(path)
    label = what or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{label} does not exist") from None
    except OSError as exc:
        raise error(f"{label} cannot be read: {exc.strerror or exc}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{label} is not UTF-8 text") from None
    except ValueError as exc:
        raise error(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_json_or(path: str | os.PathLike, default: Any = None) -> Any:
    """Like :func:`read_json`, but a missing or unreadable file gives ``default``."""
    try:
        return read_json(path)
    except BadInput:
        return default


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and fsync; a torn last line is skipped by :func:`read_jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a log, one per line; torn or foreign lines are skipped.

    A crash can cut the last line anywhere, even inside a multi-byte character, so the file
    is read as bytes and each line decoded on its own; a line that is not a JSON object
    (a torn tail, a stray value) is skipped: that record is simply redone on resume.
    """
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def seal_log(path: str | os.PathLike) -> None:
    """Cut a torn last line (crash mid-write) so the next record starts on a clean line.

    The torn bytes carry no complete record, so they are dropped rather than kept: ending
    them with a newline would leave half a multi-byte character in the file for ever.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "rb+") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def read_text_arg(value: str, what: str) -> str:
    """A text argument that may be ``@file`` or ``-`` (stdin); non-UTF-8 input is a clear error."""
    if value == "-":
        data = sys.stdin.buffer.read()
        label = f"{what} on stdin"
    elif value.startswith("@"):
        p = Path(value[1:]).expanduser()
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise BadInput(f"{what} file {p} cannot be read: {exc.strerror or exc}") from None
        label = f"{what} file {p}"
    else:
        return check_text(value, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{label} is not UTF-8 text") from None


def check_text(value: str, what: str) -> str:
    """Reject strings that carry undecodable bytes (``surrogateescape`` from a non-UTF-8 argv)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid UTF-8 text") from None
    return value
