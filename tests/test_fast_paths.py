"""The faster paths (#14) keep their promises: bfloat16 weights as an explicit, recorded choice
with greedy parity against plain ``generate`` in the same dtype; finished rows leaving the
batch change no tokens; an experiment batch runs no SAE when nobody reads latents."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from esr_core.errors import BadInput
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec

MODEL = "smollm2-135m-instruct"
PROMPT = "Explain how to plan a vegetable garden for a small backyard."


@pytest.fixture(scope="module")
def bf16_engine():
    from esr_core.steering.engines import get_engine

    return get_engine(MODEL, dtype="bfloat16")


def test_bfloat16_is_its_own_engine_and_says_so(bf16_engine, engine):
    from esr_core.steering.engines import engine_key, key_parts

    assert bf16_engine is not engine and bf16_engine.model.dtype == "bfloat16" and engine.model.dtype == "float32"
    assert next(bf16_engine.model.hf_model.parameters()).dtype == torch.bfloat16
    k = engine_key(MODEL, dtype="bf16")
    assert k[-1] == "dtype:bfloat16" and key_parts(k)[3] == "bfloat16" and key_parts(k)[2] is None
    assert engine_key(MODEL) == engine_key(MODEL, dtype="float32") and len(engine_key(MODEL)) == 2
    with pytest.raises(BadInput, match="dtype"):
        engine_key(MODEL, dtype="fp8")
    # the readout is the SAE's own float32 code of the bfloat16 residual
    acts = bf16_engine.activations(text="The kettle clicked off.")
    assert acts.z.dtype == torch.float32 and torch.isfinite(acts.z).all() and float(acts.z.max()) > 0


def test_bfloat16_greedy_matches_plain_generate_token_for_token(bf16_engine):
    from esr_core.steering.bench import plain_model_copy

    plain = plain_model_copy(bf16_engine)
    assert next(plain.parameters()).dtype == torch.bfloat16
    tok = bf16_engine.model.tokenizer
    ids = tok(bf16_engine.render_prompt(PROMPT), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        ref = plain.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.1)[0, ids.shape[1]:]
    got = bf16_engine.generate(GenerationSpec(prompt=PROMPT, max_new_tokens=24, temperature=0.0,
                                              repetition_penalty=1.1, watch=[5], top_k=4, runs=("steered",)))
    ref = ref.tolist()
    eos = tok.eos_token_id
    ref = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert got["steered"].token_ids == ref


def _batch(temp: float):
    prompts = ["Say hi.", "Explain how to cook rice.", "What is 2+2? Answer with one number.", "Write a haiku about rain."]
    return [GenerationSpec(prompt=p, temperature=temp, repetition_penalty=1.1, max_new_tokens=40, seed=i,
                           interventions=[Intervention(latent=100, mode="add", strength=0.5, units="norm")] if i % 2 else [],
                           watch=[], top_k=0, runs=("steered",)) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("temp", [0.0, 0.6])
def test_dropping_finished_rows_changes_no_token(engine, temp):
    full = engine.generate_batch(_batch(temp))
    compact = engine.generate_batch(_batch(temp), compact=True)
    assert any(r["steered"].stop_reason == "eos" for r in full)  # a row does end early here
    assert any(r["steered"].stop_reason == "max_new_tokens" for r in full)
    for a, b in zip(full, compact):
        assert a["steered"].token_ids == b["steered"].token_ids
        assert a["steered"].text == b["steered"].text and a["steered"].stop_reason == b["steered"].stop_reason


def test_an_experiment_batch_runs_no_sae_unless_latents_are_read(engine, monkeypatch):
    calls = []
    real = type(engine.sae).encode
    monkeypatch.setattr(type(engine.sae), "encode", lambda self, h: (calls.append(1), real(self, h))[1])
    engine.generate_batch(_batch(0.0)[:2], compact=True)
    assert calls == []
    specs = _batch(0.0)[:2]
    specs[0].watch = [7]
    out = engine.generate_batch(specs)
    assert calls and out[0]["steered"].acts.shape[1] == 1


def test_dtype_is_checked_and_recorded_in_runs_and_specs(tmp_path):
    from esr_core.app.run_record import RunRecord
    from esr_core.experiments.spec import ExperimentSpec
    from esr_core.steering.spec import RunResult

    with pytest.raises(BadInput, match="dtype"):
        ExperimentSpec(name="x", latents=[1], dtype="float8").validate()
    assert ExperimentSpec(name="x", latents=[1], dtype="bf16").validate().dtype == "bfloat16"
    assert ExperimentSpec.from_dict({"name": "old", "latents": [1]}).dtype == "float32"  # older runs
    spec = GenerationSpec(prompt="hi", max_new_tokens=2, runs=("steered",))
    rec = RunRecord(spec=spec, model=MODEL, sae="s", results={"steered": RunResult(run="steered", text="x")},
                    dtype="bfloat16")
    back = RunRecord.from_json(rec.to_json())
    assert back.dtype == "bfloat16"
    d = json.loads(rec.to_json())
    d.pop("dtype")
    assert RunRecord.from_dict(d).dtype == "float32"
    d["dtype"] = "int4"
    with pytest.raises(BadInput, match="dtype"):
        RunRecord.from_dict(d)


def test_cli_generate_and_bench_take_a_dtype(capsys):
    from esr_core.cli import main

    assert main(["generate", "--prompt", "Say hi.", "--max-new-tokens", "3", "--dtype", "bfloat16", "--json",
                 "--temperature", "0"]) == 0
    head = json.loads(capsys.readouterr().out.splitlines()[0])
    assert head["dtype"] == "bfloat16"
    assert main(["bench", "experiment", "--batch-sizes", "4,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_auto_batch_size_is_the_measured_default_unless_memory_is_short(engine, monkeypatch):
    from esr_core.steering import batch_memory as bm

    cfg = engine.model.hf_model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert bm.bytes_per_row(engine.model.hf_model, 100) == kv * 100 * 4 + cfg.vocab_size * 4
    monkeypatch.setattr(bm, "free_bytes", lambda device: 64 * 2**30)
    assert bm.auto_batch_size(engine, 128) == bm.CPU_BATCH
    per_row = bm.bytes_per_row(engine.model.hf_model, 96 + 128)
    monkeypatch.setattr(bm, "free_bytes", lambda device: 10 * per_row)
    assert bm.auto_batch_size(engine, 128) == 2  # a quarter of memory for 10 rows' worth
    monkeypatch.setattr(bm, "free_bytes", lambda device: None)
    assert bm.auto_batch_size(engine, 128) == bm.CPU_BATCH
