"""Experiment runner: trial plan, resume after cancel, a tiny real run, distractor rules, CLI, page."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from esr_core.errors import BadInput, Cancelled
from esr_core.experiments import runner as xr
from esr_core.experiments import store
from esr_core.experiments.spec import ExperimentSpec, batches, plan_trials, prompt_for, trial_interventions
from esr_core.io import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAE = ROOT / "assets" / "sae" / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- pure: the plan

def _resolved_spec(**kw) -> ExperimentSpec:
    spec = ExperimentSpec(name="t", latents=[3, 7], prompts_per_latent=2, seeds_per_prompt=2,
                          conditions=["no_steering", "steering", "meta_prompt", "random_ablation",
                                      "detector_ablation"],
                          meta_variants=["get_back_on_track", "dont_get_distracted"],
                          boost_mode="fixed", boost=1.0, batch_size=3, **kw)
    spec.latent_prompts = {"3": ["howto-01", "howto-02"], "7": ["howto-02", "howto-05"]}
    spec.boosts = {"3": [10.0, 20.0], "7": [15.0]}
    spec.groups = {"detector_ablation": [1, 2]}
    spec.random_sets = {"0": [4, 5], "1": [6, 8], "2": [9, 10]}
    spec.median_norm, spec.dec_norms = 100.0, {"3": 1.0, "7": 2.0}
    spec.resolved = True
    return spec


def test_every_condition_replays_the_same_prompt_seed_boost_triples():
    spec = _resolved_spec()
    trials = plan_trials(spec)
    conds = spec.expanded_conditions()
    assert conds == ["no_steering", "steering", "meta_prompt", "meta_prompt:dont_get_distracted",
                     "random_ablation", "detector_ablation"]
    triples = {c: sorted((t.latent, t.prompt_id, t.seed, t.boost) for t in trials if t.condition == c)
               for c in conds}
    first = triples["steering"]
    # latent 3: 2 prompts x 2 levels x 2 seeds, latent 7: 2 prompts x 1 level x 2 seeds
    assert len(first) == 8 + 4
    assert all(v == first for v in triples.values())
    assert len({t.key for t in trials}) == len(trials) == 12 * len(conds)
    # seeds differ between reps and levels but not between conditions
    assert len({t.seed for t in trials}) == 12
    # random ablation: each trial names one of the seeded sets; others name none
    assert {t.ablation_seed for t in trials if t.condition == "random_ablation"} <= {0, 1, 2}
    assert all(t.ablation_seed is None for t in trials if t.condition != "random_ablation")
    # the plan is a pure function of the spec
    assert [t.key for t in plan_trials(spec)] == [t.key for t in trials]


def test_batches_are_a_fixed_per_condition_partition():
    spec = _resolved_spec()
    trials = plan_trials(spec)
    bs = batches(trials, 5)
    assert [t for b in bs for t in b] == trials
    assert all(len({t.condition for t in b}) == 1 and len(b) <= 5 for b in bs)
    assert [len(b) for b in bs][:3] == [5, 5, 2]


def test_condition_interventions_and_prompts():
    spec = _resolved_spec()
    trials = {}
    for t in plan_trials(spec):
        trials.setdefault(t.condition, t)  # the first trial of each condition: latent 3, boost 10
    iv = {c: trial_interventions(spec, t) for c, t in trials.items()}
    assert iv["no_steering"] == []
    assert [(i.latent, i.mode, i.strength, i.units) for i in iv["steering"]] == [(3, "add", 10.0, "raw")]
    assert [(i.latent, i.mode) for i in iv["detector_ablation"]] == [(3, "add"), (1, "ablate"), (2, "ablate")]
    rnd = trials["random_ablation"]
    assert [i.latent for i in iv["random_ablation"][1:]] == spec.random_sets[str(rnd.ablation_seed)]
    base = "Explain how to clean a cast iron pan after cooking."
    sent, variant = prompt_for(spec, trials["meta_prompt"].condition, trials["meta_prompt"].latent, base)
    assert variant == "get_back_on_track" and sent.startswith(base) and "get back on track" in sent
    sent2, v2 = prompt_for(spec, trials["meta_prompt:dont_get_distracted"].condition, trials["meta_prompt:dont_get_distracted"].latent, base)
    assert v2 == "dont_get_distracted" and sent2.endswith("Don't get distracted!")
    assert prompt_for(spec, trials["steering"].condition, trials["steering"].latent, base) == (base, None)
    assert spec.boost_norm(7, 15.0) == pytest.approx(0.3)


def test_spec_validation_rejects_bad_settings():
    with pytest.raises(BadInput):
        ExperimentSpec.from_dict({"conditions": ["steering", "bogus"]})
    with pytest.raises(BadInput):
        ExperimentSpec.from_dict({"boost_mode": "fixed"})  # no boost value
    with pytest.raises(BadInput):
        ExperimentSpec.from_dict({"relevance_rule": "maybe"})
    with pytest.raises(BadInput):
        ExperimentSpec.from_dict({"n_latent": 3})  # typo: unknown key
    s = ExperimentSpec.from_dict({"conditions": ["steering", "group_ablation:resistance_circuit"]})
    assert s.conditions[1] == "group_ablation:resistance_circuit"


# ----------------------------------------------------------------------------- distractor rules

class _FakeCatalog:
    def __init__(self, d, dead, labels, kinds):
        self.d_sae, self.dead = d, np.asarray(dead)
        self._labels = labels
        self._lat = {"topic_kind": kinds}

    def description(self, i):
        return self._labels[i]

    def top_tokens(self, i):
        return ["bread", "oven", "flour"]


class _FakeEngine:
    """activations() returns a fixed code per prompt: [T, d] with position 0 the sink."""

    def __init__(self, codes):
        self.codes = codes
        self.sae = SimpleNamespace(d_sae=next(iter(codes.values())).shape[1])

    def activations(self, messages, add_generation_prompt=True):
        return SimpleNamespace(z=torch.tensor(self.codes[messages[0]["content"]]))


def _fake_embed(texts):
    """Concrete words point one way, abstract ones the other (deterministic, no model)."""
    out = []
    for t in texts:
        t = t.lower()
        c = any(w in t for w in ("object", "place", "food", "animal", "sport", "bread", "dog", "paris"))
        a = any(w in t for w in ("style", "grammar", "punctuation", "assistant", "formatting", "comma"))
        v = np.array([1.0 if c else 0.1, 1.0 if a else 0.1, 0.2])
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def test_relevance_rules_exclude_latents_active_on_prompts_and_dead_ones():
    d = 8
    p1 = np.zeros((4, d), np.float32)
    p1[0, :] = 9.0  # the attention sink fires everything: must be ignored
    p1[2, 1] = 0.5  # latent 1 fires weakly on a prompt token
    p2 = np.zeros((3, d), np.float32)
    p2[1, 2] = 3.0  # latent 2 fires strongly on the other prompt
    eng = _FakeEngine({"a": p1, "b": p2})
    labels = ["dogs and puppies", "bread baking", "Paris", "commas and punctuation", "", "dog food",
              "a sport", "animal"]
    kinds = ["concrete", "concrete", "concrete", "format", "", "concrete", "concrete", "concrete"]
    dead = [False, False, False, False, False, False, True, False]
    cat = _FakeCatalog(d, dead, labels, kinds)
    from esr_core.experiments.distractors import select_distractors

    code = select_distractors(cat, eng, ["a", "b"], n=8, rule="code", embed_fn=_fake_embed, seed=1)
    assert set(code["latents"]) == {0, 5, 7}  # 1, 2 fire on prompts; 3 abstract; 4 unlabelled; 6 dead
    assert code["report"]["counts"]["dead"] == 1 and code["report"]["counts"]["relevant_to_prompts"] == 2
    assert code["report"]["counts"]["unlabelled"] == 1
    # paper reading with top-1 per prompt: only the strongest latent of each prompt is excluded
    from esr_core.experiments import distractors as ds

    mx, in_top = ds.prompt_activation_stats(eng, ["a", "b"], top_k=1)
    assert mx[1] == pytest.approx(0.5) and mx[0] == 0.0  # position 0 excluded
    assert set(np.flatnonzero(in_top)) == {1, 2}
    paper = select_distractors(cat, eng, ["a", "b"], n=8, rule="paper", embed_fn=_fake_embed, seed=1)
    assert set(paper["latents"]) == {0, 5, 7} and paper["report"]["rule"] == "paper"
    # seeded: same seed, same order; n caps the count
    a = select_distractors(cat, eng, ["a", "b"], n=2, embed_fn=_fake_embed, seed=3)["latents"]
    b = select_distractors(cat, eng, ["a", "b"], n=2, embed_fn=_fake_embed, seed=3)["latents"]
    assert a == b and len(a) == 2


def test_concreteness_scale_separates_concrete_from_style_labels():
    from esr_core.experiments.distractors import concreteness

    r = concreteness(["dogs and puppies", "commas and punctuation"], ["concrete", "format"],
                     [["dog", "puppy", "bark"], [",", ";", "."]], embed_fn=_fake_embed)
    assert r[0]["score"] >= 65 > r[1]["score"]
    assert r[1]["tokens"] == 0.0 and r[0]["tokens"] == 1.0


# ----------------------------------------------------------------------------- real model

needs_sae = pytest.mark.skipif(not (DEFAULT_SAE / "cfg.json").exists(), reason="default SAE not in this checkout")


@pytest.fixture(scope="module")
def engine():
    from esr_core.steering.engines import get_engine

    return get_engine("smollm2-135m-instruct")


def _tiny_spec(name: str) -> ExperimentSpec:
    return ExperimentSpec.from_dict({
        "name": name, "latents": [11, 222], "prompt_ids": ["howto-01", "howto-02", "howto-03"],
        "prompts_per_latent": 2, "conditions": ["no_steering", "steering", "meta_prompt"],
        "boost_mode": "fixed", "boost": 1.5, "max_new_tokens": 8, "batch_size": 2})


@pytest.fixture(scope="module")
def tiny_run(engine, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("exp") / "full"
    seen = []
    final = xr.run_experiment(_tiny_spec("full"), run_dir, engine=engine, progress=seen.append)
    return run_dir, final, seen


@needs_sae
def test_tiny_real_experiment_end_to_end(tiny_run):
    run_dir, final, seen = tiny_run
    assert final["stage"] == "done" and final["done"] == final["total"] == 12
    for f in ("spec.json", "generations.jsonl", "trials.jsonl", "trials.parquet", "summary.json"):
        assert (run_dir / f).exists(), f
    df = pd.read_parquet(run_dir / "trials.parquet")
    assert len(df) == 12 and set(df["condition"]) == {"no_steering", "steering", "meta_prompt"}
    assert df["response"].map(len).gt(0).all() and df["n_tokens"].le(8).all()
    attempts = df["attempts"].map(json.loads)
    assert attempts.map(lambda a: all(0 <= x["score"] <= 100 for x in a)).all()
    assert (df["n_attempts"] == attempts.map(len)).all()
    assert df.loc[df.condition == "meta_prompt", "meta_variant"].eq("get_back_on_track").all()
    # steering was applied: norm-relative boost recorded and steered text differs from unsteered
    st = df[df.condition == "steering"].set_index(["latent", "prompt_id", "seed"])
    ns = df[df.condition == "no_steering"].set_index(["latent", "prompt_id", "seed"])
    assert st["boost_norm"].round(6).eq(1.5).all()
    assert (st["response"] != ns.loc[st.index, "response"]).any()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_per_condition"] == {"meta_prompt": 4, "no_steering": 4, "steering": 4}
    row = {r["condition"]: r for r in summary["by_condition"]}["steering"]
    assert row["n_valid"] + row["n_dropped"] == 4 and 0.0 <= row["esr_lo"] <= row["esr_hi"] <= 1.0
    assert summary["complete"] is True and "steering" in summary["headline"]
    assert any(p.eta_s is not None for p in seen) and seen[-1].stage == "done"


@needs_sae
def test_resume_after_cancel_gives_exactly_the_uninterrupted_trials(engine, tiny_run, tmp_path):
    full_dir = tiny_run[0]
    run_dir = tmp_path / "interrupted"
    cancel = threading.Event()

    def stop_early(p):
        if p.done >= 3:
            cancel.set()

    with pytest.raises(Cancelled):
        xr.run_experiment(_tiny_spec("full"), run_dir, engine=engine, progress=stop_early, cancel=cancel)
    partial = read_jsonl(run_dir / store.TRIALS_FILE)
    assert 3 <= len(partial) < 12
    with pytest.raises(BadInput):  # an existing run is never silently overwritten
        xr.run_experiment(_tiny_spec("full"), run_dir, engine=engine)
    # a torn last line (crash mid-write) is ignored and that trial is redone
    with open(run_dir / store.TRIALS_FILE, "a") as f:
        f.write('{"key": "steering|11|howto')
    n_gen_before = len(read_jsonl(run_dir / store.GEN_FILE))
    final = xr.run_experiment(_tiny_spec("ignored on resume"), run_dir, engine=engine, resume=True)
    assert final["stage"] == "done" and final["new_generations"] == 12 - n_gen_before
    assert len(read_jsonl(run_dir / store.TRIALS_FILE)) == 12 + 0  # the torn line is skipped
    a = pd.read_parquet(full_dir / "trials.parquet").set_index("key")
    b = pd.read_parquet(run_dir / "trials.parquet").set_index("key")
    assert list(a.index) == list(b.index)
    assert (a["response"] == b["response"]).all()
    assert (a["attempts"] == b["attempts"]).all()
    # resuming a finished run does nothing new
    again = xr.run_experiment(_tiny_spec("x"), run_dir, engine=engine, resume=True)
    assert again["new_generations"] == 0 and again["done"] == 12


@needs_sae
def test_selected_distractors_are_silent_on_the_prompts(engine):
    from esr_core.experiments.distractors import select_distractors
    from esr_core.judge.prompts import load_prompts
    from esr_core.latents.catalog.store import load_catalog_for_names

    cat = load_catalog_for_names(engine.model.name, engine.sae)
    if cat is None:
        pytest.skip("no shipped catalog for the default SAE")
    prompts = [p["prompt"] for p in load_prompts()[:3]]
    sel = select_distractors(cat, engine, prompts, n=3, rule="code", seed=0)
    for lat in sel["latents"]:
        assert not cat.dead[lat] and sel["labels"][lat]
        assert sel["scores"][lat]["score"] >= 65
        for p in prompts:
            z = engine.activations(messages=[{"role": "user", "content": p}], add_generation_prompt=True).z
            assert float(z[1:, lat].max()) == 0.0


# ----------------------------------------------------------------------------- CLI and page

REF = store.REFERENCE_DIR
needs_ref = pytest.mark.skipif(not (REF / "summary.json").exists(),
                               reason="reference run not shipped in assets/experiments/reference")


@needs_ref
def test_reference_run_is_complete_and_small():
    summary = json.loads((REF / "summary.json").read_text())
    size = sum(f.stat().st_size for f in REF.iterdir())
    assert size < 2_000_000
    n = summary["n_per_condition"]
    assert {"no_steering", "steering", "meta_prompt", "detector_ablation", "random_ablation"} <= set(n)
    assert min(n.values()) >= 100
    df = pd.read_parquet(REF / "trials.parquet")
    assert len(df) == summary["n_trials"]
    # conditions replay the same triples
    trip = {c: set(zip(g.prompt_id, g.seed, g.boost)) for c, g in df.groupby("condition")}
    assert len({frozenset(v) for v in trip.values()}) == 1


def test_shipped_boost_sweep_covers_five_levels_around_the_calibrated_thresholds():
    sweep = ROOT / "assets" / "experiments" / "boost-sweep"
    if not (sweep / "summary.json").exists():
        pytest.skip("the boost sweep is not shipped in this checkout")
    spec = json.loads((sweep / "spec.json").read_text())
    ref = json.loads((REF / "spec.json").read_text())
    assert spec["boost_mode"] == "sweep" and spec["latents"] == ref["latents"]
    # the sweep reused the reference run's calibrations: levels are mean +- 2 sd of its thresholds
    t = np.array([ref["thresholds"][str(k)] for k in ref["latents"]])
    levels = spec["boosts"][str(spec["latents"][0])]
    assert levels == pytest.approx(np.linspace(t.mean() - 2 * t.std(ddof=1), t.mean() + 2 * t.std(ddof=1), 5))
    df = pd.read_parquet(sweep / "trials.parquet")
    assert len(df) == 200 and df.groupby("boost_sd").size().tolist() == [40] * 5
    # stronger steering, lower first-attempt scores
    means = df.groupby("boost_sd")["first_score"].mean().tolist()
    assert means == sorted(means, reverse=True)
    from esr_core.experiments.store import list_runs

    names = [(r["name"], r["shipped"]) for r in list_runs()]
    assert names[:2] == [("reference", True), ("boost-sweep", True)]


@needs_ref
def test_cli_summary_list_and_errors(capsys, tmp_path):
    from esr_core.cli import main

    assert main(["experiment", "summary", str(REF)]) == 0
    out = capsys.readouterr().out
    assert "steering" in out and "Wilson" in out
    assert main(["experiment", "summary", str(REF), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_trials"] > 0
    assert main(["experiment", "list"]) == 0
    assert "reference" in capsys.readouterr().out
    assert main(["experiment", "summary", str(tmp_path / "nope")]) == 2
    assert "No experiment run" in capsys.readouterr().err
    assert main(["experiment", "run", "--conditions", "steering,bogus"]) == 2
    assert main(["experiment", "plots", str(REF), "--out", str(tmp_path / "p"), "--no-png"]) == 0
    assert (tmp_path / "p" / "condition_comparison.html").exists()


@needs_ref
def test_page_renders_the_reference_run_with_its_rates_table():
    from conftest import open_app_page

    at = open_app_page("pages/experiments.py")
    assert not at.exception, at.exception
    assert any(t.value == "Experiments" for t in at.title)
    frames = [df.value for df in at.dataframe]
    rates = next(f for f in frames if "ESR 95 % CI" in f.columns)
    assert {"no_steering", "steering", "meta_prompt"} <= set(rates["condition"])
    assert (rates["trials"] >= 100).all()
    assert any("Wilson" in i.value or "ESR" in i.value for i in at.info)


@needs_sae
def test_rejudge_copies_generations_and_judges_again(tiny_run, tmp_path):
    full_dir = tiny_run[0]
    out = tmp_path / "rejudged"
    final = xr.rejudge(full_dir, out)
    assert final["stage"] == "done" and final["new_generations"] == 0 and final["done"] == 12
    a = pd.read_parquet(full_dir / "trials.parquet").set_index("key")
    b = pd.read_parquet(out / "trials.parquet").set_index("key")
    assert list(a.index) == list(b.index)
    assert (a["response"] == b["response"]).all() and (a["attempts"] == b["attempts"]).all()  # same judge
    assert json.loads((out / "spec.json").read_text())["environment"]["rejudged_from"] == str(full_dir)
