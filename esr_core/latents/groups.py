"""Latent groups: named, coloured, weighted sets of latents, the one type for every group.

A group is a watch lane, a heatmap colouring and an ablation target. The resistance circuit
and the backtracking latents are groups too, found by a search and saved with their evidence
(per-member statistics, alert threshold, the SAE they belong to) in the extra fields. Groups
ship as JSON in ``assets/groups/`` (``{name, colour, members, weights, description, ...}``,
extra keys kept); groups found for other models or SAEs go to the user cache.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote, unquote

import numpy as np

from esr_core.errors import BadInput, EsrError
from esr_core.io import atomic_write_json, read_json, safe_name
from esr_core.latents.catalog.store import load_catalog_for_names, sae_weights_hash
from esr_core.paths import ASSETS_DIR, cache_dir, cache_subdir, from_repo, repo_relative
from esr_core.steering.interventions import Intervention
from esr_core.viz import palette

log = logging.getLogger(__name__)

GROUPS_DIR = ASSETS_DIR / "groups"
SHIPPED = {"circuit": GROUPS_DIR / "resistance_circuit.json", "backtracking": GROUPS_DIR / "backtracking.json"}
GROUP_FORMAT = "esr-latent-group-v1"
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
MAX_MEMBERS = 4096


class GroupUnavailable(EsrError):
    """A latent group file is missing, corrupt, or belongs to another SAE."""


@dataclass
class LatentGroup:
    name: str
    members: list[int]
    weights: list[float] = field(default_factory=list)
    colour: str = palette.GROUP_DEFAULT
    description: str = ""
    builtin: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.name = str(self.name).strip()
        if not self.name:
            raise BadInput("A latent group needs a name")
        try:
            self.members = [int(m) for m in self.members]
        except (TypeError, ValueError):
            raise BadInput(f"Group '{self.name}': members must be integer latent ids") from None
        if not self.members:
            raise BadInput(f"Group '{self.name}' has no members")
        if len(self.members) > MAX_MEMBERS:
            raise BadInput(f"Group '{self.name}' has {len(self.members)} members; the limit is {MAX_MEMBERS}")
        if any(m < 0 for m in self.members):
            raise BadInput(f"Group '{self.name}': latent ids cannot be negative")
        if not self.weights:
            self.weights = [1.0] * len(self.members)
        try:
            self.weights = [float(w) for w in self.weights]
        except (TypeError, ValueError):
            raise BadInput(f"Group '{self.name}': weights must be numbers") from None
        if len(self.weights) != len(self.members):
            raise BadInput(f"Group '{self.name}': {len(self.members)} members but {len(self.weights)} weights")
        if any(not math.isfinite(w) for w in self.weights):
            raise BadInput(f"Group '{self.name}': weights must be finite")
        if not _COLOUR.match(str(self.colour or "")):
            self.colour = palette.GROUP_DEFAULT

    # -- use --------------------------------------------------------------------------
    def lane(self, acts: np.ndarray, watch: Sequence[int], how: str = "sum") -> np.ndarray:
        """Weighted sum (or weighted mean) of the members' columns of ``acts`` [T, len(watch)]."""
        acts = np.asarray(acts, dtype=float).reshape(-1, len(watch)) if len(watch) else np.zeros((len(acts), 0))
        col = {int(w): j for j, w in enumerate(watch)}
        total = np.zeros(acts.shape[0])
        wsum = 0.0
        for m, w in zip(self.members, self.weights):
            if m in col:
                total += w * acts[:, col[m]]
                wsum += abs(w)
        if how == "mean" and wsum > 0:
            total /= wsum
        return total

    def lane_from_tops(self, tops: Sequence[Sequence[tuple[int, float]]], how: str = "sum") -> np.ndarray:
        """Same as :meth:`lane` but from per-token top-k lists (members outside the top-k count as 0)."""
        wt = dict(zip(self.members, self.weights))
        out = np.array([sum(wt.get(int(i), 0.0) * float(v) for i, v in t) for t in tops], dtype=float)
        if how == "mean":
            out /= max(sum(abs(w) for w in self.weights), 1e-12)
        return out

    def member_matrix(self, acts: np.ndarray, watch: Sequence[int]) -> np.ndarray:
        """The members' own columns [T, n_members] of ``acts`` [T, len(watch)] (unwatched members read 0)."""
        acts = np.asarray(acts, dtype=float).reshape(-1, len(watch)) if len(watch) else np.zeros((len(acts), 0))
        col = {int(w): j for j, w in enumerate(watch)}
        out = np.zeros((acts.shape[0], len(self.members)))
        for k, m in enumerate(self.members):
            if m in col:
                out[:, k] = acts[:, col[m]]
        return out

    def member_matrix_from_tops(self, tops: Sequence[Sequence[tuple[int, float]]]) -> np.ndarray:
        """Same from per-token top-k lists (a member outside a token's top-k reads 0)."""
        pos = {m: k for k, m in enumerate(self.members)}
        out = np.zeros((len(tops), len(self.members)))
        for t, row in enumerate(tops):
            for i, v in row:
                if int(i) in pos:
                    out[t, pos[int(i)]] = float(v)
        return out

    def ablations(self, positions: str = "all") -> list[Intervention]:
        """One ablate intervention per member (the group as an ablation target)."""
        return [Intervention(latent=m, mode="ablate", strength=0.0, units="raw", positions=positions)
                for m in self.members]

    def check(self, d_sae: int) -> None:
        bad = [m for m in self.members if m >= d_sae]
        if bad:
            raise BadInput(f"Group '{self.name}' names latents {bad[:5]} beyond this SAE's 0..{d_sae - 1}")

    # -- evidence from a search (the circuit, backtracking) ------------------------------
    @property
    def kind(self) -> str:
        return str(self.extra.get("kind", ""))

    @property
    def stats(self) -> dict[str, dict]:
        """Per-member statistics of the search that found the group (``{str(latent): {...}}``)."""
        s = self.extra.get("stats")
        return s if isinstance(s, dict) else {}

    @property
    def member_descriptions(self) -> dict[str, str]:
        d = self.extra.get("descriptions")
        return d if isinstance(d, dict) else {}

    @property
    def threshold(self) -> dict | None:
        """The stored alert threshold ``{"value", "how", ...}``, or None."""
        t = self.extra.get("threshold")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return {"value": float(t), "how": "sum"}
        return t if isinstance(t, dict) and t.get("value") is not None else None

    def threshold_value(self, how: str = "sum") -> float | None:
        """The alert threshold for the group's ``how`` (sum or mean of members)."""
        t = self.threshold
        if t is None:
            return None
        v = float(t["value"])
        if t.get("how", "sum") == how:
            return v
        n = max(len(self.members), 1)
        return v / n if how == "mean" else v * n  # approximate conversion (unit weights)

    def table(self) -> list[dict]:
        """One row per member for tables (CLI and page): id, weight, description, statistics."""
        rows = []
        for i, w in zip(self.members, self.weights):
            row = {"latent": int(i), "weight": float(w), "description": self.member_descriptions.get(str(i), "")}
            row.update(self.stats.get(str(i), {}))
            rows.append(row)
        return rows

    def matches(self, engine, steering: bool = False) -> bool:
        """True when the group was found on this engine's model and readout SAE (same decoder weights).

        Groups are read (watched, shaded, thresholded) from the readout SAE's code; with
        ``steering`` the question is whether its members can be *edited* (ablated), which only
        the steering SAE can do.
        """
        sae = self.extra.get("sae") or {}
        model = self.extra.get("model")
        if model and model != engine.model.name:
            return False
        want = sae.get("weights_hash") if isinstance(sae, dict) else None
        return True if not want else want == sae_weights_hash(engine.sae if steering else readout_sae(engine))

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(name=self.name, colour=self.colour, members=list(self.members), weights=list(self.weights),
                 description=self.description)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], builtin: bool = False) -> "LatentGroup":
        if not isinstance(d, dict):
            raise BadInput("A latent group must be a JSON object with name and members")
        if "name" not in d or "members" not in d:
            raise BadInput("A latent group needs 'name' and 'members'")
        if not isinstance(d["members"], list):
            raise BadInput(f"Group '{d.get('name')}': members must be a list")
        extra = {k: v for k, v in d.items() if k not in ("name", "colour", "members", "weights", "description")}
        return cls(name=d["name"], members=d["members"], weights=d.get("weights") or [],
                   colour=d.get("colour", palette.GROUP_DEFAULT), description=str(d.get("description", "")),
                   builtin=builtin, extra=extra)


def parse_members(text: str) -> tuple[list[int], list[float]]:
    """Parse typed ids: ``"12, 40:0.5 7"`` -> members [12, 40, 7], weights [1, 0.5, 1]."""
    members, weights = [], []
    for tok in re.split(r"[\s,;]+", str(text or "").strip()):
        if not tok:
            continue
        lat, _, w = tok.partition(":")
        try:
            members.append(int(lat.lstrip("#")))
        except ValueError:
            raise BadInput(f"'{lat}' is not a latent id (use integers like 12, 40:0.5)") from None
        try:
            weights.append(float(w) if w else 1.0)
        except ValueError:
            raise BadInput(f"'{w}' is not a weight for latent {lat}") from None
    if not members:
        raise BadInput("Type at least one latent id")
    return members, weights


def readout_sae(engine):
    """The SAE whose code an engine's readouts come from (its steering SAE unless it has a readout SAE)."""
    return getattr(engine, "read_sae", None) or engine.sae


def sae_identity(engine, sae=None) -> dict:
    """Which SAE a group belongs to (``sae``, else the engine's readout SAE): decoder hash plus source."""
    sae = sae or readout_sae(engine)
    src = repo_relative(sae.source)
    return {"weights_hash": sae_weights_hash(sae), "fingerprint": sae.key, "source": src,
            "hook": sae.hook_name, "d_sae": int(sae.d_sae)}


def member_descriptions(engine, members: Sequence[int], sae=None) -> dict[str, str]:
    """Catalog descriptions of the members when a catalog already exists (never builds one here)."""
    try:
        cat = load_catalog_for_names(engine.model.name, sae or readout_sae(engine))
        if cat is None:
            return {}
        return {str(i): str(cat.description(int(i)) or "") for i in members}
    except EsrError as exc:  # the catalog is optional: a missing or stale one must not block a search
        log.info("no catalog descriptions: %s", exc)
        return {}


def save_group(group: LatentGroup, path: str | Path) -> Path:
    """Write a group atomically (a crash never leaves half a file)."""
    d = group.to_dict()
    d.setdefault("format", GROUP_FORMAT)
    atomic_write_json(path, d)
    return Path(path)


def load_group(path: str | Path) -> LatentGroup:
    """One group from a JSON file; a missing or corrupt file raises :class:`GroupUnavailable`."""
    p = Path(path)
    d = read_json(p, f"Latent group {p}", error=GroupUnavailable)
    try:
        return LatentGroup.from_dict(d, builtin=True)
    except BadInput as exc:
        raise GroupUnavailable(f"Latent group {p}: {exc}") from None


def shipped_group_path(which: str = "circuit", model: str | None = None) -> Path:
    """Where the shipped group lives: ``resistance_circuit.json`` for the default model, and
    ``resistance_circuit.<model>.json`` for another model that reads the same SAE (the tuned one)."""
    p = SHIPPED[which]
    return p.with_name(f"{p.stem}.{safe_model(model)}.json") if model else p


def safe_model(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model))


def shipped_group(which: str = "circuit", model: str | None = None) -> LatentGroup | None:
    """The shipped circuit or backtracking group (``model``'s own if it has one), or None."""
    for path in ([shipped_group_path(which, model)] if model else []) + [SHIPPED.get(which)]:
        try:
            if path is not None and path.exists():
                return load_group(path)
        except GroupUnavailable:
            continue
    return None


_GROUP_NAME = re.compile(r"^[\w][\w .:-]{0,80}$")


def _norm_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(name).strip().lower())


def allowed_group_file(path: str | Path) -> Path | None:
    """``path`` (relative to the checkout) when it is a .json file inside the shipped assets or
    the user cache; None anywhere else, so a name from a config or URL never opens other files."""
    p = from_repo(path)
    if p.suffix != ".json":
        return None
    for root in (ASSETS_DIR, cache_dir()):
        if p.is_relative_to(Path(root).resolve()):
            return p
    return None


def check_group_ref(name: str) -> Path | None:
    """Refuse a group reference that is neither a plain name nor a .json file inside the shipped
    assets or the user cache (one clear line); the file's path for an allowed .json, else None.
    Reads nothing, so configs are checked before any model loads."""
    name = str(name or "").strip()
    if name.endswith(".json"):
        p = allowed_group_file(name)
        if p is None:
            raise BadInput(f"Group file '{name}' is outside the shipped assets and the user cache; "
                           "copy it into the cache's groups folder and use its name")
        return p
    if not _GROUP_NAME.match(name) or ".." in name:
        raise BadInput(f"'{name}' is not a group name (letters, digits, spaces, - _ . :)")
    return None


def find_group(name: str) -> LatentGroup | None:
    """A latent group by name: built-in (name or file stem, spaces and underscores alike), saved
    in the user cache (``groups/<name>.json``), or a group file inside assets/ or the user cache.
    Anything else (other paths, ``..``) is refused with one clear line; None when not found."""
    name = str(name or "").strip()
    p = check_group_ref(name)
    if p is not None:
        return load_group(p) if p.exists() else None
    user = cache_subdir("groups") / f"{safe_name(name)}.json"
    if user.exists():
        gs = groups_from_json(user.read_bytes())
        if gs:
            return gs[0]
    want = _norm_name(name)
    groups, _errors = load_builtin_groups()
    for g in groups:
        if _norm_name(g.name) == want or _norm_name(Path(str(g.extra.get("file", ""))).stem) == want:
            return g
    return None


def cached_group_path(model_name: str, sae_key: str, which: str = "circuit") -> Path:
    """Where a group found for a non-default model/SAE is kept (user cache, never the repo)."""
    name = "resistance_circuit" if which == "circuit" else "backtracking"
    return cache_subdir("groups") / f"{safe_name(f'{model_name}_{sae_key}')}_{name}.json"


def group_for(engine, which: str = "circuit") -> LatentGroup | None:
    """The group for this engine: the shipped one if it matches the SAE, else a cached one, else None."""
    g = shipped_group(which, engine.model.name)
    if g is not None and g.matches(engine):
        return g
    for path in sorted(SHIPPED[which].parent.glob(f"{SHIPPED[which].stem}.*.json")):  # per model / readout SAE
        try:
            g = load_group(path)
        except GroupUnavailable:
            continue
        if g.matches(engine):
            return g
    p = cached_group_path(engine.model.name, readout_sae(engine).key, which)
    if p.exists():
        try:
            g = load_group(p)
            return g if g.matches(engine) else None
        except GroupUnavailable:
            return None
    return None


def groups_to_json(groups: Sequence[LatentGroup]) -> str:
    return json.dumps({"groups": [g.to_dict() for g in groups]}, indent=2)


def groups_from_json(text: str | bytes) -> list[LatentGroup]:
    """Accept ``{"groups": [...]}``, a list of groups, or a single group object."""
    try:
        data = json.loads(text)
    except UnicodeDecodeError:
        raise BadInput("Not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"Not valid JSON: {exc}") from None
    if isinstance(data, dict) and "groups" in data:
        data = data["groups"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise BadInput("Expected a group object or a list of groups")
    return [LatentGroup.from_dict(d) for d in data]


def load_builtin_groups(folder: Path | str = GROUPS_DIR) -> tuple[list[LatentGroup], list[str]]:
    """All groups in ``folder/*.json`` (each file: one group, a list, or {"groups": [...]}) and any errors."""
    folder = Path(folder)
    groups, errors = [], []
    if not folder.is_dir():
        return groups, errors
    for p in sorted(folder.glob("*.json")):
        try:
            for g in groups_from_json(p.read_bytes()):
                g.builtin = True
                g.extra.setdefault("file", p.name)
                groups.append(g)
        except (OSError, BadInput) as exc:
            errors.append(f"{p.name}: {exc}")
    return groups, errors


# -- compact URL encoding: name~colour~id*w_id_id|name2~... ----------------------------
def encode_groups(groups: Sequence[LatentGroup]) -> str:
    parts = []
    for g in groups:
        mem = "_".join(str(m) if w == 1.0 else f"{m}*{w:g}" for m, w in zip(g.members, g.weights))
        parts.append(f"{quote(g.name, safe='').replace('~', '%7E')}~{g.colour.lstrip('#')}~{mem}")
    return "|".join(parts)


def decode_groups(text: str) -> list[LatentGroup]:
    out = []
    for part in str(text or "").split("|"):
        if not part.strip():
            continue
        bits = part.split("~")
        if len(bits) != 3:
            raise BadInput(f"Bad group in the URL: '{part[:40]}'")
        name, col, mem = bits
        members, weights = [], []
        for m in mem.split("_"):
            if not m:
                continue
            lat, _, w = m.partition("*")
            try:
                members.append(int(lat))
                weights.append(float(w) if w else 1.0)
            except ValueError:
                raise BadInput(f"Bad group member in the URL: '{m}'") from None
        out.append(LatentGroup(name=unquote(name), members=members, weights=weights, colour="#" + col))
    return out
