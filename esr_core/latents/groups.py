"""Latent groups: named, coloured, weighted sets of latents used as a watch lane, a heatmap
colouring and an ablation target. Built-in groups ship as JSON in ``assets/groups/``
(``{name, colour, members, weights, description}``, extra keys kept), e.g. the resistance circuit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote, unquote

import numpy as np

from esr_core.errors import BadInput
from esr_core.steering.interventions import Intervention
from esr_core.paths import ASSETS_DIR

GROUPS_DIR = ASSETS_DIR / "groups"
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
MAX_MEMBERS = 4096


@dataclass
class LatentGroup:
    name: str
    members: list[int]
    weights: list[float] = field(default_factory=list)
    colour: str = "#009E73"
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
            self.colour = "#009E73"

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
                   colour=d.get("colour", "#009E73"), description=str(d.get("description", "")),
                   builtin=builtin, extra=extra)


# -- several latents on one colour scale: each divided by its own scale --------------------
def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def catalog_scales(catalog, members: Sequence[int]) -> list[float | None]:
    """Each member's max activation in ``catalog`` (its ``max_act`` array), None where it has none.

    None for every member when there is no catalog (e.g. a non-default SAE), and for a latent
    outside the catalog or one never active in it (max 0)."""
    mx = getattr(catalog, "max_act", None) if catalog is not None else None
    if mx is None:
        return [None] * len(members)
    out: list[float | None] = []
    for m in members:
        m = int(m)
        out.append(_positive(mx[m]) if 0 <= m < len(mx) else None)
    return out


def observed_scales(member_acts, mask: Sequence[bool] | None = None) -> np.ndarray:
    """Per-member max |activation| over the rows where ``mask`` is true (all rows if None); NaN reads 0."""
    a = np.asarray(member_acts, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    a = np.where(np.isfinite(a), np.abs(a), 0.0)
    if mask is not None:
        keep = np.asarray(list(mask), dtype=bool)[: a.shape[0]]
        keep = np.concatenate([keep, np.ones(a.shape[0] - len(keep), dtype=bool)])
        a = a[keep]
    return a.max(axis=0) if a.shape[0] else np.zeros(a.shape[1])


def resolve_scales(scales: Sequence[float | None] | None, fallback: Sequence[float] | None,
                   n: int) -> tuple[np.ndarray, list[str]]:
    """One scale per member and where it came from: ``"catalog"`` (``scales``), ``"observed"``
    (``fallback``: the max seen in the run) or ``"none"`` (never active anywhere: contributes 0)."""
    own = list(scales) if scales is not None else [None] * n
    fb = list(fallback) if fallback is not None else [None] * n
    out, src = np.zeros(n), []
    for k in range(n):
        s = _positive(own[k]) if k < len(own) else None
        if s is not None:
            out[k] = s
            src.append("catalog")
            continue
        f = _positive(fb[k]) if k < len(fb) else None
        out[k] = f or 0.0
        src.append("observed" if f is not None else "none")
    return out, src


def normalised_lane(member_acts, weights: Sequence[float], scales: Sequence[float | None] | None = None,
                    fallback: Sequence[float] | None = None, how: str = "sum") -> np.ndarray:
    """Weighted sum over members of ``activation / that member's own scale``, per token.

    ``member_acts`` [T, n_members]; ``scales`` each member's own scale (catalog max or a high
    quantile; None/NaN/<=0 = unknown); an unknown scale falls back to ``fallback`` (e.g. the max
    observed in the runs shown), else to the max |activation| of that member in ``member_acts``.
    So a latent at its own peak contributes its weight whatever its raw units: two latents with
    scales 10 and 1 contribute equally at 10 and 1. NaN activations read 0; ``how="mean"``
    divides by the sum of |weights|.
    """
    a = np.asarray(member_acts, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    n = a.shape[1]
    w = np.asarray(list(weights), dtype=float)
    if w.shape != (n,):
        raise BadInput(f"{n} member columns but {w.size} weights")
    a = np.where(np.isfinite(a), a, 0.0)
    seen = observed_scales(a)
    given = list(fallback) if fallback is not None else []
    fb = [(given[k] if k < len(given) and _positive(given[k]) else seen[k]) for k in range(n)]
    s, _ = resolve_scales(scales, fb, n)
    safe = np.where(s > 0, s, 1.0)
    total = (a / safe * np.where(s > 0, 1.0, 0.0)) @ w if n else np.zeros(a.shape[0])
    if how == "mean":
        total = total / max(float(np.sum(np.abs(w))), 1e-12)
    return total


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


def groups_to_json(groups: Sequence[LatentGroup]) -> str:
    return json.dumps({"groups": [g.to_dict() for g in groups]}, indent=2)


def groups_from_json(text: str | bytes) -> list[LatentGroup]:
    """Accept ``{"groups": [...]}``, a list of groups, or a single group object."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
            for g in groups_from_json(p.read_text()):
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
