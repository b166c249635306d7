"""Import Neuronpedia explanations (a local export) as a catalog's descriptions.

Neuronpedia's explanation exports are JSON lines with at least ``index`` (the latent)
and ``description``; other fields (modelId, layer, typeName, ...) are ignored. Imported
descriptions are stored as an overlay beside the catalog (or, for a catalog shipped in
the repo, in the user cache), so an import never rewrites the evidence and can be undone
with :func:`clear_import`. Lines that cannot be used are counted and reported, never fatal.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from esr_core.errors import BadInput
from esr_core.io import atomic_write_bytes
from esr_core.latents.catalog.store import overlay_path


@dataclass
class ImportReport:
    path: str
    n_lines: int = 0
    n_imported: int = 0
    n_bad: int = 0
    n_out_of_range: int = 0
    n_duplicates: int = 0
    problems: list[str] = field(default_factory=list)  # first few, "line N: why"
    overlay: str = ""

    def summary(self) -> str:
        s = (f"imported {self.n_imported} descriptions from {self.path} ({self.n_lines} lines; "
             f"{self.n_bad} bad, {self.n_out_of_range} out of range, {self.n_duplicates} repeated)")
        return s + (f"; e.g. {'; '.join(self.problems[:3])}" if self.problems else "")


def read_explanations(path: str | Path, d_sae: int | None = None) -> tuple[dict[int, str], ImportReport]:
    """Parse a ``.jsonl`` / ``.jsonl.gz`` export into {latent: description} (last line wins)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BadInput(f"No such file: {path}")
    rep = ImportReport(path=str(path))
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not a readable (gzipped) UTF-8 JSON-lines file: {type(exc).__name__}") from None
    out: dict[int, str] = {}

    def bad(n: int, why: str) -> None:
        rep.n_bad += 1
        if len(rep.problems) < 10:
            rep.problems.append(f"line {n}: {why}")

    for n, line in enumerate(io.StringIO(text), start=1):
        line = line.strip()
        if not line:
            continue
        rep.n_lines += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad(n, "not JSON")
            continue
        if not isinstance(obj, dict):
            bad(n, "not a JSON object")
            continue
        idx, desc = obj.get("index"), obj.get("description")
        try:
            i = int(idx)
            if isinstance(idx, float) and idx != i or isinstance(idx, bool):
                raise ValueError
        except (TypeError, ValueError):
            bad(n, f"index {idx!r} is not an integer")
            continue
        if not isinstance(desc, str) or not desc.strip():
            bad(n, "description missing or empty")
            continue
        if i < 0 or (d_sae is not None and i >= d_sae):
            rep.n_out_of_range += 1
            if len(rep.problems) < 10:
                rep.problems.append(f"line {n}: latent {i} out of range")
            continue
        if i in out:
            rep.n_duplicates += 1
        out[i] = desc.strip()
    rep.n_imported = len(out)
    return out, rep


def import_neuronpedia(path: str | Path, catalog) -> ImportReport:
    """Set ``catalog``'s descriptions from an export; returns what was imported and skipped.

    Merges with an earlier import (new lines win). Reload the catalog to see the result.
    """

    new, rep = read_explanations(path, catalog.d_sae)
    if not new:
        raise BadInput(f"No usable explanations in {path}: {rep.summary()}")
    op = overlay_path(catalog.path, catalog.meta)
    merged: dict[str, str] = {}
    if op.exists():
        try:
            merged = json.loads(gzip.decompress(op.read_bytes()).decode("utf-8")).get("descriptions", {})
        except Exception:
            merged = {}
    merged.update({str(k): v for k, v in new.items()})
    doc = {"source": "neuronpedia import", "files": [str(Path(path).name)],
           "sae_weights_hash": catalog.meta.get("sae_weights_hash"), "descriptions": merged}
    atomic_write_bytes(op, gzip.compress(json.dumps(doc, ensure_ascii=False).encode("utf-8"), mtime=0))
    rep.overlay = str(op)
    return rep


def clear_import(catalog) -> bool:
    """Drop imported descriptions (back to the offline labels); True if there were some."""
    op = overlay_path(catalog.path, catalog.meta)
    if op.exists():
        op.unlink()
        return True
    return False


def write_explanations(path: str | Path, descriptions: dict[int, str], extra: dict | None = None) -> Path:
    """Write an export in Neuronpedia's line format (tests and sharing labels)."""
    path = Path(path)
    lines = [json.dumps({"index": int(i), "description": d, **(extra or {})}, ensure_ascii=False)
             for i, d in sorted(descriptions.items())]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    atomic_write_bytes(path, gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path
