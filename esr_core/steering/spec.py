"""What a generation request is, and what it streams back.

A :class:`GenerationSpec` describes one prompt run as up to two *runs*: ``steered`` (with the
spec's interventions) and ``default`` (none), same seed and sampling settings, so they can be
compared token for token. The engine streams :class:`PromptReadout`, :class:`TokenEvent` and
:class:`RunDone` objects; :class:`RunResult` collects one run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from esr_core.errors import BadInput
from esr_core.io import check_text
from esr_core.steering.interventions import Intervention
from esr_core.steering.interventions import validate as validate_intervention

RUN_NAMES = ("steered", "default")
# a record may also hold a second model's steered run (steering.compare), shown between the two
COMPARE_RUN = "compare"
RECORD_RUNS = ("steered", COMPARE_RUN, "default")
STOP_REASONS = ("", "eos", "max_new_tokens", "cancelled", "stopped", "error")
MAX_NEW_TOKENS = 2048
MAX_PROMPT_TOKENS = 4096
MAX_PROMPT_CHARS = 40_000
# how a sampled token is drawn (esr_core.steering.sampling): "cdf" since 2026-12, "multinomial" before
SAMPLERS = ("cdf", "multinomial")
LEGACY_SAMPLER = "multinomial"  # what a stored spec without a ``sampler`` field was drawn with


@dataclass
class GenerationSpec:
    prompt: str
    interventions: list[Intervention] = field(default_factory=list)
    watch: list[int] = field(default_factory=list)
    top_k: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 128
    seed: int = 0
    chat: bool = True
    system_prompt: str | None = None
    runs: tuple[str, ...] = RUN_NAMES
    stop_at_eos: bool = True
    # interventions applied to the default run too (e.g. an ablation that is part of the condition)
    default_interventions: list[Intervention] = field(default_factory=list)
    # a prompt over the model's limit: "error" (the default) or "keep_end" (drop its start)
    truncate: str = "error"
    # an instruction appended to the prompt (the meta-prompt condition); answers are judged
    # against ``prompt`` alone, so the instruction never counts as part of the task
    meta_prompt: str | None = None
    # the random stream of sampled tokens (same distribution either way): see steering.sampling
    sampler: str = "cdf"

    def sent_prompt(self) -> str:
        """The user message the model gets: the prompt, then the meta-prompt if any."""
        meta = (self.meta_prompt or "").strip()
        return f"{self.prompt.rstrip()} {meta}" if meta else self.prompt

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interventions"] = [iv.to_dict() for iv in self.interventions]
        d["default_interventions"] = [iv.to_dict() for iv in self.default_interventions]
        d["runs"] = list(self.runs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationSpec":
        if not isinstance(d, dict) or "prompt" not in d:
            raise BadInput("A generation spec needs at least a 'prompt'")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["interventions"] = [Intervention.from_dict(x) for x in d.get("interventions", [])]
        kw["default_interventions"] = [Intervention.from_dict(x) for x in d.get("default_interventions", [])]
        kw["watch"] = [int(x) for x in d.get("watch", [])]
        kw["runs"] = tuple(d.get("runs", RUN_NAMES))
        kw.setdefault("sampler", LEGACY_SAMPLER)  # written before the field existed: replay it exactly
        try:
            return cls(**kw)
        except TypeError as exc:
            raise BadInput(f"Invalid generation spec: {exc}") from None

    def interventions_for(self, run: str) -> list[Intervention]:
        return list(self.interventions) if run == "steered" else list(self.default_interventions)

    def validate(self, d_sae: int | None = None) -> "GenerationSpec":
        """Check everything that can be checked without the model; with ``d_sae`` also every
        latent id (interventions, watch list), so a bad request fails before any model loads."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadInput("The prompt is empty: type a question or task first")
        check_text(self.prompt, "The prompt")
        if self.meta_prompt is not None:
            if not isinstance(self.meta_prompt, str):
                raise BadInput("meta_prompt must be text")
            check_text(self.meta_prompt, "The meta-prompt")
            self.meta_prompt = self.meta_prompt.strip() or None
        if self.truncate not in ("error", "keep_end"):
            raise BadInput(f"truncate must be 'error' or 'keep_end', got {self.truncate!r}")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            if self.truncate != "keep_end":
                raise BadInput(f"The prompt is {len(self.prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,} "
                               "(truncate it to keep its end)")
            self.prompt = self.prompt[-MAX_PROMPT_CHARS:]
        if self.sampler not in SAMPLERS:
            raise BadInput(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not self.runs or any(r not in RUN_NAMES for r in self.runs):
            raise BadInput(f"runs must be a non-empty subset of {RUN_NAMES}")
        for name, v in (("temperature", self.temperature), ("top_p", self.top_p),
                        ("repetition_penalty", self.repetition_penalty)):
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise BadInput(f"{name} must be a finite number, got {v}")
        if self.temperature < 0 or self.temperature > 5:
            raise BadInput(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.5 <= self.repetition_penalty <= 5:
            raise BadInput(f"repetition_penalty must be in [0.5, 5], got {self.repetition_penalty}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise BadInput(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= 256:
            raise BadInput(f"top_k must be in 0..256, got {self.top_k}")
        try:
            self.seed = int(self.seed)
        except (TypeError, ValueError):
            raise BadInput(f"seed must be an integer, got {self.seed!r}") from None
        if d_sae is not None:
            for iv in list(self.interventions) + list(self.default_interventions):
                validate_intervention(iv, d_sae)
            bad = [i for i in self.watch if not 0 <= int(i) < d_sae]
            if bad:
                raise BadInput(f"Watched latent {bad[0]} is out of range: this SAE has latents 0..{d_sae - 1}")
        return self


@dataclass
class PromptReadout:
    """SAE readout over the prompt tokens of one run (position 0 is the attention sink)."""

    run: str
    rendered_prompt: str
    token_ids: list[int]
    tokens: list[str]
    acts: np.ndarray  # [n_prompt_tokens, n_watch]
    top: list[list[tuple[int, float]]]


@dataclass
class TokenEvent:
    run: str
    step: int
    token_id: int
    text: str
    acts: dict[int, float]
    top: list[tuple[int, float]]
    special: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "step": self.step, "token_id": self.token_id, "text": self.text,
                "acts": {str(k): round(float(v), 5) for k, v in self.acts.items()},
                "top": [[int(i), round(float(v), 5)] for i, v in self.top]}


@dataclass
class RunDone:
    """The end of a run. ``tail`` is text held back from the last token events (an incomplete
    UTF-8 character at the end): the streamed pieces plus ``tail`` are exactly ``text``."""

    run: str
    text: str
    token_ids: list[int]
    stop_reason: str  # "eos" | "max_new_tokens" | "cancelled"
    tail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "done": True, "text": self.text, "tail": self.tail, "n_tokens": len(self.token_ids),
                "stop_reason": self.stop_reason}


@dataclass
class RunResult:
    run: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    special: list[bool] = field(default_factory=list)
    acts: np.ndarray | None = None  # [n_generated, n_watch]
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    stop_reason: str = ""
    prompt: PromptReadout | None = None
    watch: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "run": self.run, "text": self.text, "token_ids": list(map(int, self.token_ids)),
            "pieces": self.pieces, "special": self.special, "stop_reason": self.stop_reason,
            "watch": list(self.watch),
            "acts": [] if self.acts is None else np.round(self.acts, 5).tolist(),
            "top": [[[int(i), round(float(v), 5)] for i, v in t] for t in self.top],
        }
        if self.prompt is not None:
            p = self.prompt
            d["prompt"] = {"rendered_prompt": p.rendered_prompt, "token_ids": p.token_ids, "tokens": p.tokens,
                           "acts": np.round(p.acts, 5).tolist(),
                           "top": [[[int(i), round(float(v), 5)] for i, v in t] for t in p.top]}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        try:
            watch = [int(x) for x in d.get("watch", [])]
            acts = _matrix(d.get("acts"), len(watch))
            r = cls(run=str(d["run"]), text=str(d.get("text", "")), token_ids=[int(x) for x in d.get("token_ids", [])],
                    pieces=[str(x) for x in d.get("pieces", [])], special=[bool(x) for x in d.get("special", [])],
                    acts=acts, top=[[(int(i), float(v)) for i, v in t] for t in d.get("top", [])],
                    stop_reason=str(d.get("stop_reason", "")), watch=watch)
            if r.run not in RECORD_RUNS or r.stop_reason not in STOP_REASONS:
                raise BadInput(f"A run must be named {', '.join(RECORD_RUNS)} and stop for one of "
                               f"{', '.join(x for x in STOP_REASONS if x)}")
            p = d.get("prompt")
            if p:
                r.prompt = PromptReadout(run=r.run, rendered_prompt=str(p.get("rendered_prompt", "")),
                                         token_ids=[int(x) for x in p.get("token_ids", [])],
                                         tokens=[str(x) for x in p.get("tokens", [])],
                                         acts=_matrix(p.get("acts"), len(watch)),
                                         top=[[(int(i), float(v)) for i, v in t] for t in p.get("top", [])])
            return r
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"Invalid run record: {exc}") from None


def _matrix(rows, width: int) -> np.ndarray:
    rows = rows or []
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), width)


def collect(events, spec: GenerationSpec) -> dict[str, RunResult]:
    """Fold a stream of events into one :class:`RunResult` per run."""
    out = {r: RunResult(run=r, watch=list(spec.watch)) for r in spec.runs}
    acts: dict[str, list] = {r: [] for r in spec.runs}
    for ev in events:
        if isinstance(ev, PromptReadout):
            out[ev.run].prompt = ev
        elif isinstance(ev, TokenEvent):
            r = out[ev.run]
            r.token_ids.append(ev.token_id)
            r.pieces.append(ev.text)
            r.special.append(ev.special)
            r.top.append(ev.top)
            acts[ev.run].append([ev.acts.get(i, 0.0) for i in spec.watch])
        elif isinstance(ev, RunDone):
            r = out[ev.run]
            if ev.tail and r.pieces:
                r.pieces[-1] += ev.tail  # the held-back end belongs to the last token
            r.text = ev.text
            r.stop_reason = ev.stop_reason
    for r in spec.runs:
        out[r].acts = np.asarray(acts[r], dtype=np.float32).reshape(len(acts[r]), len(spec.watch))
    return out
