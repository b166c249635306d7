"""SAE-latent interventions on the residual stream, and the maths that applies them.

Modes (ESR_METHOD.md sec. 1, 5, 9):
- ``add``:    h += v * W_dec[i]                       (the paper's steering)
- ``clamp``:  h += (v - z_i(h)) * W_dec[i]            (error-preserving path)
- ``scale``:  h += (v * z_i(h) - z_i(h)) * W_dec[i]   (same path)
- ``ablate``: clamp to 0
Units: ``raw`` (paper semantics) or ``norm`` (v times the median residual norm at the hook,
along the unit decoder direction). Positions: ``prompt``, ``generated`` or ``all``.
Adds are applied first; then the SAE encodes the steered h once and clamp/scale/ablate edit
that code. The readout reports the edited code, so a clamped latent reads its clamp value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from esr_core.errors import BadInput

MODES = ("add", "clamp", "scale", "ablate")
UNITS = ("raw", "norm")
POSITIONS = ("prompt", "generated", "all")
MAX_ABS_STRENGTH_NORM = 1_000.0  # beyond this the residual stream is pure noise
MAX_ABS_STRENGTH_RAW = 1e6


def default_units(mode: str) -> str:
    """``norm`` for add (a step along the unit direction, relative to the residual); ``raw`` for
    clamp, scale and ablate, whose values are the latent's own activation (or a factor)."""
    return "norm" if mode == "add" else "raw"


@dataclass(frozen=True)
class Intervention:
    latent: int
    mode: str = "add"
    strength: float = 0.0
    units: str = ""  # "" = the mode's default (default_units)
    positions: str = "all"

    def __post_init__(self):
        if not self.units:
            object.__setattr__(self, "units", default_units(self.mode))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Intervention":
        try:
            return cls(
                latent=int(d["latent"]),
                mode=str(d.get("mode", "add")),
                strength=float(d.get("strength", 0.0)),
                units=str(d.get("units") or default_units(str(d.get("mode", "add")))),
                positions=str(d.get("positions", "all")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"Invalid intervention {d!r}: {exc}") from None

    def label(self) -> str:
        """A chip that always says its unit: ``add #5 +0.8×‖h‖``, ``clamp #811 20 raw``, ``scale #3 ×2``."""
        if self.mode == "ablate":
            return f"ablate #{self.latent} ({self.positions})"
        if self.mode == "scale":
            return f"scale #{self.latent} ×{self.strength:g} ({self.positions})"
        value = f"{self.strength:+g}" if self.mode == "add" else f"{self.strength:g}"
        unit = "×‖h‖" if self.units == "norm" else " raw"
        return f"{self.mode} #{self.latent} {value}{unit} ({self.positions})"


def validate(iv: Intervention, d_sae: int) -> Intervention:
    """Raise :class:`BadInput` with one clear line for anything we cannot apply."""
    if iv.mode not in MODES:
        raise BadInput(f"Unknown intervention mode '{iv.mode}' (use one of {', '.join(MODES)})")
    if iv.units not in UNITS:
        raise BadInput(f"Unknown strength units '{iv.units}' (use raw or norm)")
    if iv.positions not in POSITIONS:
        raise BadInput(f"Unknown positions '{iv.positions}' (use prompt, generated or all)")
    if not isinstance(iv.latent, int) or not 0 <= iv.latent < d_sae:
        raise BadInput(f"Latent {iv.latent} is out of range: this SAE has latents 0..{d_sae - 1}")
    s = float(iv.strength)
    if math.isnan(s) or math.isinf(s):
        raise BadInput(f"Strength for latent {iv.latent} must be a finite number, got {iv.strength}")
    limit = MAX_ABS_STRENGTH_NORM if iv.units == "norm" else MAX_ABS_STRENGTH_RAW
    if abs(s) > limit:
        raise BadInput(
            f"Strength {s:g} ({iv.units}) for latent {iv.latent} is absurd; keep |strength| <= {limit:g}"
        )
    return iv


def raw_strength(iv: Intervention, dec_norm: float, median_norm: float | None) -> float:
    """Convert to raw units: the coefficient on W_dec[i] (for add and clamp)."""
    if iv.mode == "ablate":
        return 0.0
    if iv.units == "raw" or iv.mode == "scale":
        return float(iv.strength)
    if median_norm is None:
        raise BadInput("This SAE has no recorded median residual norm; use raw units")
    return float(iv.strength) * float(median_norm) / max(float(dec_norm), 1e-12)


def parse_cli_pair(text: str, what: str) -> tuple[int, float]:
    """Parse ``LATENT:VALUE`` from the CLI into (int, float) with a clear error."""
    if ":" not in text:
        raise BadInput(f"{what} expects LATENT:VALUE, got '{text}'")
    a, b = text.split(":", 1)
    try:
        latent = int(a)
    except ValueError:
        raise BadInput(f"{what}: latent id must be an integer, got '{a}'") from None
    try:
        value = float(b)
    except ValueError:
        raise BadInput(f"{what}: value must be a number, got '{b}'") from None
    return latent, value


# ----------------------------------------------------------------------------- the maths the engine's hook calls
# Tensor methods only (no torch import): ``h`` [T, d] one row's residual, ``z`` [T, d_sae] its
# SAE code, ``mask`` [T] bool the positions the intervention acts on, ``direction`` W_dec[i].


def position_mask(pos_row, prompt_len: int, which: str):
    """Which columns of one row an intervention acts on (``pos_row``: position, -1 for padding)."""
    valid = pos_row >= 0
    if which == "all":
        return valid
    if which == "prompt":
        return valid & (pos_row < prompt_len)
    return valid & (pos_row >= prompt_len)


def add_direction(h, mask, coef: float, direction) -> None:
    """``add``: h += coef * W_dec[i] at the masked positions (in place)."""
    if bool(mask.any()):
        h += mask[:, None].to(h.dtype) * (coef * direction).to(h.dtype)


def edit_code(h, z, mask, mode: str, coef: float, latent: int, direction) -> None:
    """``clamp``/``scale``/``ablate`` through the error-preserving path (in place).

    h += (target - z_i) * W_dec[i], where target is ``coef`` (clamp; 0 for ablate) or
    ``coef * z_i`` (scale); the code ``z`` is edited the same way, so the readout reports the
    clamped value.
    """
    if not bool(mask.any()):
        return
    zi = z[:, latent]
    target = zi * coef if mode == "scale" else zi.new_full(zi.shape, float(coef))
    delta = (target - zi).where(mask, zi.new_zeros(zi.shape))
    h += delta[:, None].to(h.dtype) * direction.to(h.dtype)
    z[:, latent] = target.where(mask, zi)
