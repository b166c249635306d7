"""Resistance tuning (#12): noticing sentences the judge recognises, data masks and splits, a
LoRA training run that resumes to the same weights, and adapters that fail with one clear line."""

from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esr_core.errors import BadInput, EsrError  # noqa: E402
from esr_core.finetune.data import DataRecipe, build_dataset, encode_example, load_examples, splits  # noqa: E402
from esr_core.finetune.noticing import NOTICING  # noqa: E402
from esr_core.judge.restart_phrases import find_restart_phrases  # noqa: E402
from esr_core.judge.scoring import judge_response  # noqa: E402

DRIFT = "Dolphins live in warm seas and eat fish every day. They are very social animals."
ANSWER = "Put the egg in boiling water for eight minutes, then cool it in cold water."


def test_at_least_twelve_noticing_sentences_and_the_judge_sees_each_as_a_restart():
    assert len(set(NOTICING)) >= 12
    for s in NOTICING:
        text = f"{DRIFT} {s} {ANSWER}"
        assert find_restart_phrases(text), s
        j = judge_response("How do I boil an egg?", text)
        assert len(j["attempts"]) == 2 and j["attempts"][-1]["score"] > j["attempts"][0]["score"], s


def test_labels_mask_the_prompt_and_the_drift_and_keep_noticing_and_answer(engine):
    tok = engine.model.tokenizer
    ex = {"prompt": "How do I boil an egg?", "segments": [{"text": DRIFT, "loss": False},
                                                          {"text": NOTICING[0], "loss": True},
                                                          {"text": ANSWER, "loss": True}]}
    ids, labels = encode_example(tok, ex, max_len=512)
    assert len(ids) == len(labels)
    learnt = tok.decode([t for t, y in zip(ids, labels) if y != -100])
    masked = tok.decode([t for t, y in zip(ids, labels) if y == -100])
    assert NOTICING[0] in learnt and "eight minutes" in learnt and "Dolphins" not in learnt
    assert "Dolphins" in masked and "boil an egg" in masked
    assert labels[-1] == tok.eos_token_id  # the end of the answer is learnt too
    normal = {"prompt": "How do I boil an egg?", "segments": [{"text": ANSWER, "loss": True}]}
    ids, labels = encode_example(tok, normal)
    assert "eight minutes" in tok.decode([t for t, y in zip(ids, labels) if y != -100])
    with pytest.raises(BadInput, match="segments"):
        encode_example(tok, {"prompt": "x", "text": "no mask"})


def test_training_and_heldout_splits_are_disjoint():
    sp = splits()
    assert len(sp["train_prompt_ids"]) >= 300 and len(sp["heldout_prompt_ids"]) == 50
    assert not set(sp["train_prompt_ids"]) & set(sp["heldout_prompt_ids"])
    texts = {p["prompt"].lower() for p in sp["train_prompts"]}
    from esr_core.judge.prompts import load_prompts

    assert not texts & {p["prompt"].lower() for p in load_prompts()}
    assert len(sp["heldout_latents"]) == 20


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, engine):
    out = tmp_path_factory.mktemp("ftdata")
    recipe = DataRecipe(n_prompts=8, n_self_correction=6, n_normal=2, n_train_latents=3, answer_max_tokens=24,
                        drift_max_tokens=24, batch_size=8, off_topic_below=101.0)
    manifest = build_dataset(recipe, out, engine=engine)
    return out, manifest


def test_built_data_has_every_source_masks_and_no_heldout_prompt_or_latent(small_data):
    out, manifest = small_data
    ex = load_examples(out)
    sp = json.loads((out / "splits.json").read_text())
    assert manifest["n_self_correction"] == 6 and manifest["n_normal"] == 2
    assert set(manifest["drift_sources"]) == {"steered", "other_answer", "corpus"}
    assert all(manifest["drift_sources"][s] >= 1 for s in ("steered", "other_answer", "corpus"))
    held_prompts = set(sp["heldout_prompt_ids"])
    assert not {e["prompt_id"] for e in ex} & held_prompts
    assert not {e.get("latent") for e in ex} & set(sp["heldout_latents"])
    for e in ex:
        if e["kind"] == "self_correction":
            assert [s["loss"] for s in e["segments"]] == [False, True, True] and e["noticing"] in NOTICING
        else:
            assert [s["loss"] for s in e["segments"]] == [True]
    steered = [e for e in ex if e.get("drift_source") == "steered"]
    assert all("drift_score" in e for e in steered)


def test_data_build_resumes_without_regenerating(small_data, engine, monkeypatch):
    out, manifest = small_data
    monkeypatch.setattr(engine, "generate_batch", lambda *a, **k: pytest.fail("regenerated on resume"))
    again = build_dataset(DataRecipe(n_prompts=8, n_self_correction=6, n_normal=2, n_train_latents=3,
                                     answer_max_tokens=24, drift_max_tokens=24, batch_size=8, off_topic_below=101.0),
                          out, engine=engine)
    assert again == manifest


def _cfg(**kw):
    from esr_core.finetune.train import LoraTrainConfig

    base = dict(r=4, alpha=8, dropout=0.1, lr=1e-3, epochs=1, batch_size=2, max_len=64, bf16=False,
                checkpoint_every=2, max_steps=4)
    base.update(kw)
    return LoraTrainConfig(**base)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_training_changes_the_adapter_and_resume_gives_the_same_weights(small_data, tmp_path, engine):
    import torch

    from esr_core.errors import Cancelled
    from esr_core.finetune.train import train_adapter

    data, _ = small_data
    full = train_adapter(data, tmp_path / "full", _cfg())
    assert full["steps"] == 4 and full["trainable_parameters"] > 0
    w = _weights(tmp_path / "full")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in w.items())  # B starts at zero
    calls = {"n": 0}

    def cancel_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        train_adapter(data, tmp_path / "cut", _cfg(), cancel=cancel_after_two)
    resumed = train_adapter(data, tmp_path / "cut", _cfg(), resume=True)
    assert resumed["steps"] == 4
    w2 = _weights(tmp_path / "cut")
    assert set(w) == set(w2) and all(torch.equal(w[k], w2[k]) for k in w)
    with pytest.raises(BadInput, match="other settings"):
        train_adapter(data, tmp_path / "cut", _cfg(r=8), resume=True)


def test_training_with_the_steering_on_differs(small_data, tmp_path, engine):
    import torch

    from esr_core.finetune.train import train_adapter

    data, _ = small_data
    train_adapter(data, tmp_path / "off", _cfg(max_steps=2))
    train_adapter(data, tmp_path / "on", _cfg(max_steps=2, steer=True, hook_name=engine.sae.hook_name),
                  sae=engine.sae)
    a, b = _weights(tmp_path / "off"), _weights(tmp_path / "on")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BadInput, match="SAE"):
        train_adapter(data, tmp_path / "x", _cfg(steer=True))


def test_bad_adapters_fail_with_one_clear_line(tmp_path, small_data):
    from esr_core.finetune.train import train_adapter
    from esr_core.models.adapters import check_adapter, merged_dir

    with pytest.raises(EsrError, match="incomplete"):
        check_adapter(tmp_path / "nothing", "smollm2-135m-instruct")
    data, _ = small_data
    good = tmp_path / "good"
    train_adapter(data, good, _cfg(max_steps=1))
    other = tmp_path / "other"
    shutil.copytree(good, other)
    meta = json.loads((other / "esr_adapter.json").read_text())
    meta["base_model"] = "gemma3-270m"
    (other / "esr_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(EsrError, match="made for 'gemma3-270m'"):
        check_adapter(other, "smollm2-135m-instruct")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(EsrError, match="corrupt"):
        check_adapter(corrupt, "smollm2-135m-instruct")
    torn = tmp_path / "torn"
    shutil.copytree(good, torn)
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    from esr_core.models.loading import resolve_model_path

    base_path, _ = resolve_model_path("smollm2-135m-instruct")
    with pytest.raises(EsrError):
        merged_dir("test-torn", base_path, torn, "smollm2-135m-instruct")
    with pytest.raises(BadInput, match="mask fields"):
        bad = tmp_path / "bad_data"
        bad.mkdir()
        (bad / "examples.jsonl").write_text(json.dumps({"id": "x", "prompt": "p", "text": "no segments"}) + "\n")
        load_examples(bad)


def test_validation_prompts_are_kept_out_of_training_and_never_heldout(small_data):
    from esr_core.finetune.train import LoraTrainConfig, split_examples
    from esr_core.finetune.validate import validation_items

    data, _ = small_data
    examples = load_examples(data)
    keep, val = split_examples(examples, LoraTrainConfig(validation_prompts=2, max_examples=3))
    assert len(val) == 2 and len(keep) <= 3
    assert not {e["prompt_id"] for e in keep} & set(val)
    assert split_examples(examples, LoraTrainConfig(validation_prompts=2))[1] == val  # seeded
    items = validation_items(data, val, n=10)
    assert [it["prompt_id"] for it in items] == val
    heldout = set(splits()["heldout_latents"])
    assert all(it["latent"] not in heldout for it in items)
    with pytest.raises(BadInput, match="held-out"):
        validation_items(data, [splits()["heldout_prompt_ids"][0]], n=1)


def test_the_shipped_adapter_loads_merges_and_does_not_restart_unsteered():
    from esr_core.models.adapters import adapter_dir, check_adapter
    from esr_core.models.registry import get_entry
    from esr_core.steering.engines import get_engine
    from esr_core.steering.spec import GenerationSpec

    entry = get_entry("smollm2-135m-esr")
    meta = check_adapter(entry.adapter, entry.base)
    assert meta["base_model"] == "smollm2-135m-instruct" and meta["config"]["r"] == 32
    assert (adapter_dir(entry.adapter) / "adapter_model.safetensors").stat().st_size <= 20_000_000
    assert not set(meta["splits"]["train_latents"]) & set(meta["splits"]["heldout_latents"])
    eng = get_engine("smollm2-135m-esr")
    from esr_core.judge.prompts import load_prompts

    for prompt in [p["prompt"] for p in load_prompts()[:2]]:  # two evaluation prompts
        res = eng.generate(GenerationSpec(prompt=prompt, temperature=0.0, max_new_tokens=96, runs=("default",)))
        text = res["default"].text
        assert len(text) > 40 and not find_restart_phrases(text), text


def test_training_levers_filter_and_mix_the_examples_as_asked():
    """The sweep's levers (mixing ratio, drift sources, noticing variety) pick exactly the
    examples they say, seeded, and reject settings that leave nothing to learn."""
    from esr_core.finetune.noticing import NOTICING
    from esr_core.finetune.train import LoraTrainConfig, apply_levers, trained_mix

    sources = ("steered", "other_answer", "corpus")
    ex = [{"id": f"sc{i}", "kind": "self_correction", "prompt_id": f"p{i}", "drift_source": sources[i % 3],
           "noticing": NOTICING[i % len(NOTICING)]} for i in range(60)]
    ex += [{"id": f"n{i}", "kind": "normal", "prompt_id": f"q{i}"} for i in range(30)]
    assert trained_mix(apply_levers(ex, LoraTrainConfig()))["self_correction_share"] == round(60 / 90, 3)
    mixed = apply_levers(ex, LoraTrainConfig(self_correction_share=0.9))
    assert trained_mix(mixed) == {**trained_mix(mixed), "n_self_correction": 60, "n_normal": 7}
    low = apply_levers(ex, LoraTrainConfig(self_correction_share=0.2))  # too few normals: fewer corrections
    assert trained_mix(low)["n_normal"] == 30 and trained_mix(low)["n_self_correction"] == 8
    assert [e["id"] for e in mixed] == [e["id"] for e in apply_levers(ex, LoraTrainConfig(self_correction_share=0.9))]
    steered = apply_levers(ex, LoraTrainConfig(drift_sources=("steered",)))
    assert trained_mix(steered)["drift_sources"] == {"steered": 20}
    few = apply_levers(ex, LoraTrainConfig(noticing_variants=4))
    assert {e["noticing"] for e in few if e["kind"] == "self_correction"} == set(NOTICING[:4])
    for bad in ({"self_correction_share": 0.0}, {"self_correction_share": float("nan")},
                {"drift_sources": ("nowhere",)}, {"noticing_variants": 0}, {"noticing_variants": 99}):
        with pytest.raises(BadInput):
            LoraTrainConfig(**bad).validate()
    with pytest.raises(BadInput, match="No self-correction"):
        apply_levers([e for e in ex if e["kind"] == "normal"], LoraTrainConfig())


def test_the_validation_split_keeps_every_drift_source_in_training():
    """Pure: drift sources assigned as the data builder does (a Random(seed) shuffle, corpus
    last). The old split (split_version 1, Random(seed).sample) took exactly the corpus-drift
    prompts, so training saw no corpus drift; the split's own stream keeps about 3/4 of each."""
    import random

    from esr_core.finetune.train import LoraTrainConfig, split_examples, trained_mix

    ids = [f"train-{i:03d}" for i in range(1, 361)]
    order = ids[:]
    random.Random(42).shuffle(order)
    source = {i: "steered" for i in order[:180]} | {i: "other_answer" for i in order[180:270]} | \
        {i: "corpus" for i in order[270:]}
    examples = [{"id": f"sc-{i}", "kind": "self_correction", "prompt_id": i, "drift_source": source[i],
                 "noticing": "Scratch that."} for i in ids]
    old, _ = split_examples(examples, LoraTrainConfig(validation_prompts=90, split_version=1))
    assert trained_mix(old)["drift_sources"] == {"steered": 180, "other_answer": 90}  # the defect, reproduced
    keep, val = split_examples(examples, LoraTrainConfig(validation_prompts=90))
    mix = trained_mix(keep)["drift_sources"]
    assert len(val) == 90 and sum(mix.values()) == 270
    assert all(0.6 <= mix[s] / n <= 0.9 for s, n in (("steered", 180), ("other_answer", 90), ("corpus", 90)))
