"""One steering run as a self-contained JSON record (download, re-open, replay).

A record carries what is needed to understand and replay the run: prompt and rendered prompt,
model, SAE (and the readout SAE when the readout came from a second one), the full
GenerationSpec (interventions, sampling settings, seed, watch list), the steered and default
RunResults (tokens, activations, top latents) and the groups in use.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from esr_core.errors import BadInput
from esr_core.latents.groups import LatentGroup
from esr_core.models.loading import DTYPES
from esr_core.steering.spec import COMPARE_RUN, RECORD_RUNS, GenerationSpec, RunResult

FORMAT = "esr-lab.run/1"
MAX_UPLOAD_BYTES = 50_000_000
STATUSES = ("done", "stopped", "running")
_ID = re.compile(r"[0-9a-f]{6,32}")


@dataclass
class RunRecord:
    spec: GenerationSpec
    model: str
    sae: str
    results: dict[str, RunResult]
    rendered_prompt: str = ""
    groups: list[LatentGroup] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: str = "done"  # "done" | "stopped" | "running"
    note: str = ""
    compare_model: str = ""  # the second model whose steered run is results["compare"], if any
    read_sae: str | None = None  # the readout SAE the acts and top latents came from; None = the steering SAE
    dtype: str = "float32"  # the model weights' dtype the run was generated in

    def run_title(self, run: str) -> str:
        """How a run is named on screen: the compare run by its model."""
        if run == COMPARE_RUN:
            return f"steered · {self.compare_model or 'second model'}"
        return f"{run} · {self.model}" if self.compare_model else run

    @property
    def label(self) -> str:
        ivs = ", ".join(iv.label() for iv in self.spec.interventions) or "no steering"
        if self.spec.meta_prompt:
            ivs += " + meta-prompt"
        p = self.spec.prompt.strip().replace("\n", " ")
        return f"{time.strftime('%H:%M:%S', time.localtime(self.created))} · {p[:40]} · {ivs}" + (
            f" · {self.status}" if self.status != "done" else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "id": self.id, "created": self.created, "status": self.status, "note": self.note,
            "model": self.model, "sae": self.sae, "prompt": self.spec.prompt,
            "rendered_prompt": self.rendered_prompt, "spec": self.spec.to_dict(),
            "results": {k: v.to_dict() for k, v in self.results.items()},
            "groups": [g.to_dict() for g in self.groups],
            **({"compare_model": self.compare_model} if self.compare_model else {}),
            **({"read_sae": self.read_sae} if self.read_sae else {}),
            "dtype": self.dtype,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> "RunRecord":
        if not isinstance(d, dict):
            raise BadInput("This file is not an ESR Lab run record (expected a JSON object)")
        if d.get("format") != FORMAT:
            raise BadInput(f"This file is not an ESR Lab run record (format {d.get('format')!r}, expected {FORMAT!r})")
        for k in ("spec", "results", "model", "sae"):
            if k not in d:
                raise BadInput(f"The run record has no '{k}'")
        spec = GenerationSpec.from_dict(d["spec"])
        if not isinstance(d["results"], dict):
            raise BadInput("The run record's 'results' must be an object")
        unknown = [k for k in d["results"] if k not in RECORD_RUNS]
        if unknown or not d["results"]:
            raise BadInput(f"The run record's results must be runs named {', '.join(RECORD_RUNS)}"
                           + (f" (got {len(unknown)} other name(s))" if unknown else ""))
        compare_model = str(d.get("compare_model") or "")
        if (COMPARE_RUN in d["results"]) != bool(compare_model):
            raise BadInput("The run record's 'compare' run and its 'compare_model' must come together")
        results = {k: RunResult.from_dict(v) for k, v in d["results"].items()}
        results = {k: results[k] for k in RECORD_RUNS if k in results}
        status = d.get("status", "done")
        if status not in STATUSES:
            raise BadInput(f"The run record's status must be one of {', '.join(STATUSES)}")
        read_sae = d.get("read_sae")  # records made before readout SAEs have none
        if read_sae is not None and not isinstance(read_sae, str):
            raise BadInput("The run record's 'read_sae' must be text (an SAE folder or release:sae_id)")
        dtype = d.get("dtype", "float32")  # records made before the dtype choice are float32
        if dtype not in DTYPES:
            raise BadInput(f"The run record's 'dtype' must be one of {', '.join(DTYPES)}")
        rid = str(d.get("id") or "")
        groups = [LatentGroup.from_dict(g) for g in d.get("groups") or []]
        try:
            created = float(d.get("created", time.time()))
        except (TypeError, ValueError):
            created = time.time()
        return cls(spec=spec, model=str(d["model"]), sae=str(d["sae"]), results=results,
                   rendered_prompt=str(d.get("rendered_prompt", "")), groups=groups, created=created,
                   id=rid if _ID.fullmatch(rid) else uuid.uuid4().hex[:12],
                   status="stopped" if status == "running" else status,
                   note=str(d.get("note", "")), compare_model=compare_model, read_sae=read_sae or None,
                   dtype=dtype)

    @classmethod
    def from_json(cls, text: str | bytes) -> "RunRecord":
        return cls.from_dict(_json_upload(text))


def _json_upload(text: str | bytes):
    """Parse an uploaded or pasted JSON document with a clear message for each way it can be bad."""
    if isinstance(text, bytes):
        if len(text) > MAX_UPLOAD_BYTES:
            raise BadInput(f"The file is {len(text):,} bytes; the limit is {MAX_UPLOAD_BYTES:,}")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("The file is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"The file is not valid JSON: {exc}") from None


def history_to_json(records: list[RunRecord]) -> str:
    return json.dumps({"format": FORMAT + "s", "runs": [r.to_dict() for r in records]}, indent=1)


def records_from_json(text: str | bytes) -> list[RunRecord]:
    """One record, or a whole history export."""
    data = _json_upload(text)
    if isinstance(data, dict) and data.get("format") == FORMAT + "s":
        runs = data.get("runs")
        if not isinstance(runs, list):
            raise BadInput("The history file has no 'runs' list")
        return [RunRecord.from_dict(r) for r in runs]
    return [RunRecord.from_dict(data)]
