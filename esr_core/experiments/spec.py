"""What an ESR experiment is: a JSON-serialisable spec, and the exact list of trials it implies.

Why a separate module: the spec is the contract between the CLI, the app page and the runner,
and it is saved as ``spec.json`` beside the results so any run can be resumed, replayed or
audited. The trial plan is a pure function of the spec, so every condition replays the same
(prompt, seed, boost) triples and a resumed run recomputes exactly the same trial keys.
Method: arXiv 2602.06941 (ESR_METHOD.md sec. 1-7).
"""

from __future__ import annotations

import json
import math
import types
import typing
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esr_core.errors import BadInput
from esr_core.experiments.conditions import (
    BASE_CONDITIONS,
    DEFAULT_META_VARIANT,
    GROUP_PREFIX,
    META_PREFIX,
    META_PROMPTS,
    check_condition_name,
    condition_interventions,
    meta_text,
    meta_variant_of,
)
from esr_core.io import read_json
from esr_core.judge.prompts import load_prompts
from esr_core.latents.groups import check_group_ref
from esr_core.models.loading import check_dtype
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import LEGACY_SAMPLER, SAMPLERS

DEFAULT_CONDITIONS = BASE_CONDITIONS
BOOST_MODES = ("calibrate", "fixed", "sweep")
RELEVANCE_RULES = ("code", "paper")
DEFAULT_DETECTOR_GROUP = "resistance_circuit"


@dataclass
class ExperimentSpec:
    """Everything that determines a run's trials. Resolved fields are filled by the runner."""

    name: str = ""
    model: str = "smollm2-135m-instruct"
    sae: str | None = None  # SAE folder / release:id; None = the model's default
    # prompts: the pool the runner draws each latent's prompts from (ids of the prompt set)
    prompt_ids: list[str] = field(default_factory=list)
    n_latents: int = 20
    prompts_per_latent: int = 5
    seeds_per_prompt: int = 1
    base_seed: int = 0
    # distractors: given explicitly, or selected (distractor_selection) with these settings
    latents: list[int] = field(default_factory=list)
    relevance_rule: str = "code"
    min_concreteness: float = 65.0
    selection_seed: int = 0
    conditions: list[str] = field(default_factory=lambda: list(DEFAULT_CONDITIONS))
    meta_variants: list[str] = field(default_factory=lambda: [DEFAULT_META_VARIANT])
    detector_group: str = DEFAULT_DETECTOR_GROUP
    random_ablation_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # boosts
    boost_mode: str = "calibrate"
    boost: float | None = None  # fixed mode: the value, in boost_units
    boost_units: str = "norm"  # norm = multiple of the median residual norm (unit decoder direction)
    calib_target: float = 30.0
    calib_steps: int = 4
    calib_prompts: int = 1
    calib_lo: float = 0.0  # norm units
    calib_hi: float = 4.0
    calib_max_new_tokens: int | None = None  # None = max_new_tokens
    sweep_levels: int = 5
    sweep_span_sd: float = 3.0
    # sampling (paper: temperature 0.6, repetition penalty 1.1)
    temperature: float = 0.6
    repetition_penalty: float = 1.1
    max_new_tokens: int = 128
    judge: str = "offline"
    batch_size: int = 0  # trials per forward batch; 0 = auto (from free memory, recorded when resolved)
    dtype: str = "float32"  # the model weights' dtype (bfloat16: faster, slightly different numbers)
    sampler: str = "cdf"  # the random stream of sampled tokens (steering.sampling); a run before it: multinomial
    # ---- resolved by the runner (recorded so a resume replays exactly) ----
    hook: str = ""
    sae_key: str = ""
    sae_weights_hash: str = ""
    median_norm: float | None = None
    judge_id: str = ""
    latent_labels: dict[str, str] = field(default_factory=dict)
    latent_prompts: dict[str, list[str]] = field(default_factory=dict)
    dec_norms: dict[str, float] = field(default_factory=dict)
    boosts: dict[str, list[float]] = field(default_factory=dict)  # raw boost levels per latent
    thresholds: dict[str, float] = field(default_factory=dict)  # calibrated raw thresholds
    calibration: dict[str, Any] = field(default_factory=dict)  # per-latent calibration records
    groups: dict[str, list[int]] = field(default_factory=dict)  # ablation sets by name
    random_sets: dict[str, list[int]] = field(default_factory=dict)  # seed -> latents
    selection: dict[str, Any] = field(default_factory=dict)  # distractor-selection report
    skipped_conditions: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    like: str = ""  # the run whose resolved plan this one reuses on another model (esr-lab experiment run --like)
    resolved: bool = False

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentSpec":
        if not isinstance(d, dict):
            raise BadInput("An experiment spec must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInput(f"Unknown experiment setting(s): {', '.join(unknown)}")
        if d.get("resolved") and "sampler" not in d:  # resolved before the field existed: replay it exactly
            d = {**d, "sampler": LEGACY_SAMPLER}
        for name, value in d.items():
            check_type(name, value, _HINTS[name])
        try:
            spec = cls(**d)
        except TypeError as exc:
            raise BadInput(f"Invalid experiment spec: {exc}") from None
        return spec.validate()

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentSpec":
        p = Path(path)
        if not p.exists():
            raise BadInput(f"No experiment spec at {p}")
        return cls.from_dict(read_json(p, f"Experiment spec {p}"))

    def validate(self) -> "ExperimentSpec":
        def pos_int(name, lo=1, hi=10**6):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise BadInput(f"{name} must be an integer in {lo}..{hi}, got {v!r}")

        pos_int("n_latents", 1, 10_000)
        self.dtype = check_dtype(self.dtype)
        if self.sampler not in SAMPLERS:
            raise BadInput(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        pos_int("prompts_per_latent", 1, 1_000)
        pos_int("seeds_per_prompt", 1, 100)
        pos_int("max_new_tokens", 1, 2048)
        pos_int("batch_size", 0, 512)
        pos_int("calib_steps", 0, 100)
        pos_int("calib_prompts", 1, 100)
        pos_int("sweep_levels", 2, 50)
        if self.boost_mode not in BOOST_MODES:
            raise BadInput(f"boost_mode must be one of {', '.join(BOOST_MODES)}, got {self.boost_mode!r}")
        if self.boost_units not in ("norm", "raw"):
            raise BadInput(f"boost_units must be norm or raw, got {self.boost_units!r}")
        if self.boost_mode == "fixed":
            if self.boost is None or not isinstance(self.boost, (int, float)) or not math.isfinite(self.boost):
                raise BadInput("boost_mode 'fixed' needs a finite --boost value")
        if self.relevance_rule not in RELEVANCE_RULES:
            raise BadInput(f"relevance_rule must be 'code' or 'paper', got {self.relevance_rule!r}")
        if not 0 < float(self.calib_target) < 100:
            raise BadInput(f"calib_target must be in (0, 100), got {self.calib_target}")
        if not (math.isfinite(self.calib_lo) and math.isfinite(self.calib_hi) and self.calib_hi > self.calib_lo):
            raise BadInput(f"calibration range needs calib_lo < calib_hi, got [{self.calib_lo}, {self.calib_hi}]")
        if not 0 <= float(self.temperature) <= 5:
            raise BadInput(f"temperature must be in [0, 5], got {self.temperature}")
        if not self.conditions:
            raise BadInput("An experiment needs at least one condition")
        for c in self.conditions:
            check_condition_name(c)
            if c.startswith(GROUP_PREFIX):
                check_group_ref(c[len(GROUP_PREFIX):])
        check_group_ref(self.detector_group)
        if len(set(self.conditions)) != len(self.conditions):
            raise BadInput("Conditions are listed twice")
        for v in self.meta_variants:
            if v not in META_PROMPTS:
                raise BadInput(f"Unknown meta-prompt variant {v!r} (have: {', '.join(META_PROMPTS)})")
        if not self.random_ablation_seeds:
            raise BadInput("random_ablation_seeds must not be empty")
        if self.prompt_ids:
            known = {p["id"] for p in load_prompts()}
            missing = [p for p in self.prompt_ids if p not in known]
            if missing:
                raise BadInput(f"Unknown prompt id(s): {', '.join(missing[:5])}")
        return self

    # -------------------------------------------------------------- derived values
    def boost_norm(self, latent: int, raw: float) -> float:
        """A raw boost in norm units: multiples of the median residual norm along the unit direction."""
        return float(raw) * self.dec_norms.get(str(latent), 1.0) / self.median_norm if self.median_norm else math.nan

    def boost_raw(self, latent: int, norm: float) -> float:
        """A norm-unit boost as the raw coefficient on the latent's decoder row."""
        return float(norm) * float(self.median_norm or 0.0) / max(self.dec_norms.get(str(latent), 1.0), 1e-12)

    def calib_tokens(self) -> int:
        return int(self.calib_max_new_tokens or self.max_new_tokens)

    def expanded_conditions(self) -> list[str]:
        """Conditions with ``meta_prompt`` expanded to its variants (first variant keeps the
        plain name so the paper comparison finds it), skipped conditions removed."""
        out = []
        for c in self.conditions:
            if c in self.skipped_conditions:
                continue
            if c == "meta_prompt":
                for i, v in enumerate(self.meta_variants):
                    out.append("meta_prompt" if i == 0 else META_PREFIX + v)
            else:
                out.append(c)
        return out


_HINTS = typing.get_type_hints(ExperimentSpec)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        plural = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], 'values') if args else 'values'}"
    if origin is dict:
        return "an object"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, tp.__name__)


def _matches(value, tp) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_matches(v, args[1]) for v in value.values()))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_type(name: str, value, tp) -> None:
    """One clear line when a setting has the wrong JSON type ("temperature": "hot")."""
    if not _matches(value, tp):
        raise BadInput(f"Experiment setting '{name}' must be {_type_name(tp)}, got {json.dumps(value)[:60]}")


def prompt_for(spec: ExperimentSpec, condition: str, latent: int, base: str) -> tuple[str, str | None]:
    """The prompt a trial sends (base prompt plus any meta-prompt) and the meta variant used."""
    v = meta_variant_of(condition, spec.meta_variants)
    if v is None:
        return base, None
    return f"{base} {meta_text(v, spec.latent_labels.get(str(latent), ''))}", v


@dataclass(frozen=True)
class Trial:
    """One planned trial; ``key`` identifies it across resumes."""

    key: str
    condition: str
    latent: int
    prompt_id: str
    seed: int
    boost: float  # raw units (for no_steering: the paired level, not applied)
    level: int  # index into the latent's boost levels
    rep: int
    ablation_seed: int | None = None


def trial_seed(base_seed: int, latent: int, prompt_id: str, level: int, rep: int) -> int:
    """Deterministic per-(latent, prompt, level, rep) seed, shared by every condition."""
    return (zlib.crc32(f"{base_seed}|{latent}|{prompt_id}|{level}|{rep}".encode()) & 0x7FFFFFFF)


def trial_key(condition: str, latent: int, prompt_id: str, seed: int, boost: float) -> str:
    return f"{condition}|{latent}|{prompt_id}|{seed}|{boost:.6g}"


def plan_trials(spec: ExperimentSpec) -> list[Trial]:
    """All trials of a resolved spec, ordered condition by condition (the batch order)."""
    if not spec.resolved:
        raise BadInput("The spec is not resolved yet (latents, prompts and boosts are chosen by the runner)")
    base: list[tuple[int, str, int, float, int, int]] = []
    for latent in spec.latents:
        levels = spec.boosts.get(str(latent), [])
        for pid in spec.latent_prompts.get(str(latent), []):
            for li, b in enumerate(levels):
                for rep in range(spec.seeds_per_prompt):
                    base.append((latent, pid, trial_seed(spec.base_seed, latent, pid, li, rep), float(b), li, rep))
    seeds = list(spec.random_ablation_seeds)
    out = []
    for cond in spec.expanded_conditions():
        for j, (latent, pid, seed, b, li, rep) in enumerate(base):
            aseed = seeds[zlib.crc32(f"{latent}|{pid}|{li}|{rep}".encode()) % len(seeds)] \
                if cond == "random_ablation" else None
            # no_steering keeps the paired boost in its record (not applied) so that every
            # condition carries the same (prompt, seed, boost) triple
            out.append(Trial(key=trial_key(cond, latent, pid, seed, b), condition=cond, latent=latent,
                             prompt_id=pid, seed=seed, boost=b, level=li, rep=rep, ablation_seed=aseed))
    return out


def batches(trials: list[Trial], batch_size: int) -> list[list[Trial]]:
    """Fixed partition into batches (per condition): a resumed run re-forms the same batches,
    so each trial is generated with the same batch companions (bit-identical numerics)."""
    out: list[list[Trial]] = []
    cur: list[Trial] = []
    for t in trials:
        if cur and (len(cur) >= batch_size or cur[-1].condition != t.condition):
            out.append(cur)
            cur = []
        cur.append(t)
    if cur:
        out.append(cur)
    return out


def ablation_set(spec: ExperimentSpec, t: Trial) -> list[int]:
    """The latents a trial's condition ablates (resolved into the spec by the runner)."""
    if t.condition == "detector_ablation" or t.condition.startswith(GROUP_PREFIX):
        return [int(m) for m in spec.groups.get(t.condition, [])]
    if t.condition == "random_ablation":
        return [int(m) for m in spec.random_sets.get(str(t.ablation_seed), [])]
    return []


def trial_interventions(spec: ExperimentSpec, t: Trial) -> list[Intervention]:
    """The interventions one trial runs with: its distractor boost (raw units, every position)
    unless unsteered, plus its condition's ablation set."""
    boost = Intervention(latent=t.latent, mode="add", strength=float(t.boost), units="raw", positions="all")
    return condition_interventions(t.condition, [boost], ablation_set(spec, t))
