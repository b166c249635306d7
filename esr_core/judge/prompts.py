"""Our own benign how-to prompt set and the default model's unsteered answers to it.

The prompts are the task side of every ESR trial; the unsteered answers are the
"on-topic" reference used to calibrate the offline judge and to build on-/off-topic
pairs for the detector search. Both ship in ``assets/prompts/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from esr_core.errors import EsrError, SaeUnavailable
from esr_core.io import atomic_write_text
from esr_core.models.loading import load_model
from esr_core.paths import ASSETS_DIR
from esr_core.steering.spec import GenerationSpec

log = logging.getLogger(__name__)

PROMPTS_PATH = ASSETS_DIR / "prompts" / "howto_prompts.json"
ANSWERS_PATH = ASSETS_DIR / "prompts" / "default_answers.jsonl"

# settings of the shipped unsteered answers (greedy, as the paper's "no steering" baseline
# but deterministic so the file is reproducible)
ANSWER_SETTINGS = {
    "model": "smollm2-135m-instruct",
    "temperature": 0.0,
    "repetition_penalty": 1.1,
    "max_new_tokens": 192,
    "chat": True,
    "seed": 0,
}


class PromptSetError(EsrError):
    """The shipped prompt set or answers file is missing or corrupt."""


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """The how-to prompts as ``[{"id", "prompt", "topic"}]``, validated."""
    p = Path(path) if path else PROMPTS_PATH
    if not p.exists():
        raise PromptSetError(f"Prompt set {p} is missing (it ships with the repository)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"Prompt set {p} is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise PromptSetError(f"Prompt set {p} must be a non-empty JSON list")
    seen = set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item.get(k).strip()
                                                 for k in ("id", "prompt", "topic")):
            raise PromptSetError(f"Prompt set {p}: entry {i} needs non-empty string id, prompt, topic")
        if item["id"] in seen:
            raise PromptSetError(f"Prompt set {p}: duplicate id {item['id']!r}")
        seen.add(item["id"])
    return data


def load_default_answer_records(path: str | Path | None = None) -> list[dict]:
    """All records of the answers file (``{"id", "prompt", "answer", "settings"}``)."""
    p = Path(path) if path else ANSWERS_PATH
    if not p.exists():
        raise PromptSetError(f"Default answers {p} are missing; regenerate with `esr-lab prompts answer`")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise PromptSetError(f"Default answers {p}: line {n} is not valid JSON; "
                                 "regenerate with `esr-lab prompts answer`") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("answer"), str):
            raise PromptSetError(f"Default answers {p}: line {n} needs string 'id' and 'answer'")
        out.append(rec)
    if not out:
        raise PromptSetError(f"Default answers {p} are empty; regenerate with `esr-lab prompts answer`")
    return out


def load_default_answers(path: str | Path | None = None) -> dict[str, str]:
    """``{prompt id: unsteered answer}`` of the default model."""
    return {r["id"]: r["answer"] for r in load_default_answer_records(path)}


def _generate_with_engine(prompts: list[str], model: str) -> tuple[list[str], str] | None:
    try:
        from esr_core.steering.engines import get_engine  # heavy: pulls torch
        pass
    except ImportError:
        return None

    s = ANSWER_SETTINGS
    try:
        eng = get_engine(model)
    except SaeUnavailable:
        return None  # the engine needs an SAE even for unsteered runs; none built yet
    specs = [GenerationSpec(prompt=p, interventions=[], temperature=s["temperature"],
                            repetition_penalty=s["repetition_penalty"], max_new_tokens=s["max_new_tokens"],
                            seed=s["seed"], chat=True, runs=("default",)) for p in prompts]
    res = eng.generate_batch(specs)
    # stripped like the HF path, so both backends write the same file for the same greedy tokens
    return [r["default"].text.strip() for r in res], "esr_core.steering.engine.generate_batch"


def _generate_with_hf(prompts: list[str], model: str, progress: Callable[[int, int], None] | None,
                      batch_size: int = 10) -> tuple[list[str], str]:
    """Plain HF greedy ``generate`` in left-padded batches (pad = <|im_end|>, already in every
    chat prompt, so the repetition penalty sees the same token set as unbatched)."""
    import torch  # heavy: torch


    lm = load_model(model)
    tok, hf = lm.tokenizer, lm.hf_model
    s = ANSWER_SETTINGS
    texts: list[str] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for b in range(0, len(prompts), batch_size):
            chunk = prompts[b:b + batch_size]
            rendered = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=False) for p in chunk]
            enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(s["seed"])
            with torch.no_grad():
                out = hf.generate(**enc, do_sample=False, repetition_penalty=s["repetition_penalty"],
                                  max_new_tokens=s["max_new_tokens"], pad_token_id=tok.pad_token_id)
            n_in = enc["input_ids"].shape[1]
            texts += [tok.decode(row[n_in:], skip_special_tokens=True).strip() for row in out]
            if progress:
                progress(len(texts), len(prompts))
    finally:
        tok.padding_side = old_side
    return texts, f"transformers.generate, left-padded batches of {batch_size} (hf_model of esr_core.models.loading.load_model)"


def generate_default_answers(model: str = "smollm2-135m-instruct", path: str | Path | None = None,
                             backend: str = "auto",
                             progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """(Re)generate the unsteered answers file; ``backend`` is auto | engine | hf."""
    prompts = load_prompts()
    texts_src = None
    if backend in ("auto", "engine"):
        texts_src = _generate_with_engine([p["prompt"] for p in prompts], model)
        if texts_src is None and backend == "engine":
            raise EsrError("esr_core.steering.engine is not available in this checkout; use --backend hf")
    if texts_src is None:
        texts_src = _generate_with_hf([p["prompt"] for p in prompts], model, progress)
    texts, source = texts_src
    settings = dict(ANSWER_SETTINGS, model=model, generated_with=source,
                    generated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    recs = [{"id": p["id"], "prompt": p["prompt"], "answer": t, "settings": settings}
            for p, t in zip(prompts, texts)]
    atomic_write_text(Path(path) if path else ANSWERS_PATH,
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return recs
