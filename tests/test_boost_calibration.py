"""Boost calibration: bisection on synthetic score curves, cache keys, sweep levels."""

import json
import math

import numpy as np
import pytest

from esr_core.errors import BadInput
from esr_core.experiments.boost import (
    CalibrationCache,
    CalibrationResult,
    boost_sweep_levels,
    levels_in_sd_units,
    observation_confidence,
    probabilistic_bisection,
)

ROOT = 7.0 + 0.8 * math.log(100 / 30 - 1)  # s(b) = 30 at b ~ 7.678


def score(b):
    return 100.0 / (1.0 + math.exp((b - 7.0) / 0.8))


def test_confidence_rule_direction():
    below, p = observation_confidence(0.0, 30.0)
    assert below and p == pytest.approx(0.9473, abs=1e-3)  # gibberish: boost too high
    below, p = observation_confidence(90.0, 30.0)
    assert not below and p > 0.99                            # on-topic: boost too low
    for s in (0, 10, 29, 31, 60, 100):
        assert 0.5 <= observation_confidence(s)[1] <= 1.0


def test_bisection_finds_known_root():
    steps = []
    r = probabilistic_bisection(score, 0.0, 20.0, target=30.0, steps=10, on_step=steps.append)
    assert r.boost == pytest.approx(ROOT, abs=0.25)
    assert r.steps_done == 10 and len(r.history) == 10 and len(steps) == 10 and not r.cancelled
    # first query is the prior median; a score of ~100 there says "go higher"
    assert r.history[0].boost == pytest.approx(10.0, abs=0.01)
    assert r.history[0].below_target is True  # s(10) ~ 2 < 30
    assert r.ci90_lo <= r.boost <= r.ci90_hi
    json.dumps(r.to_dict())  # serialisable
    back = CalibrationResult.from_dict(r.to_dict())
    assert back.boost == r.boost and back.history[3] == r.history[3]


def test_bisection_with_noisy_scores_and_rng_passthrough():
    seen = []

    def noisy(b, rng):
        seen.append(1)
        return float(np.clip(score(b) + rng.normal(0, 8), 0, 100))

    for seed in range(3):
        r = probabilistic_bisection(noisy, 0.0, 20.0, steps=20, rng=seed)
        assert r.boost == pytest.approx(ROOT, abs=0.6)
    assert len(seen) == 60


def test_bisection_prior_skip_and_cancel():
    r = probabilistic_bisection(lambda b: None, 0.0, 10.0, steps=3, prior_mean=3.0, prior_sd=1.0)
    assert r.boost == pytest.approx(3.0, abs=0.01)  # no information: the prior median
    assert all(h.score is None for h in r.history)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    r = probabilistic_bisection(score, 0.0, 20.0, steps=10, cancel=cancel)
    assert r.cancelled and r.steps_done == 2
    with pytest.raises(BadInput):
        probabilistic_bisection(score, 5.0, 5.0)


def test_cache_keys_distinguish_judge_and_sae(tmp_path):
    cache = CalibrationCache(tmp_path)
    k1 = cache.key("smollm2-135m", "saeA", "blocks.15.hook_resid_post", 42, 30.0, "judge-v1")
    k_judge = cache.key("smollm2-135m", "saeA", "blocks.15.hook_resid_post", 42, 30.0, "judge-v2")
    k_sae = cache.key("smollm2-135m", "saeB", "blocks.15.hook_resid_post", 42, 30.0, "judge-v1")
    k_target = cache.key("smollm2-135m", "saeA", "blocks.15.hook_resid_post", 42, 50.0, "judge-v1")
    assert len({k1.file_name(), k_judge.file_name(), k_sae.file_name(), k_target.file_name()}) == 4
    cache.put(k1, {"boost": 1.5})
    assert cache.get(k1) == {"boost": 1.5}
    assert cache.get(k_judge) is None and cache.get(k_sae) is None and cache.get(k_target) is None
    r = probabilistic_bisection(score, 0.0, 20.0, steps=2)
    cache.put(k_sae, r)
    again = CalibrationCache(tmp_path)
    assert again.get(k_sae)["boost"] == r.boost
    assert {k.sae_key for k, _ in again.entries()} == {"saeA", "saeB"}
    (tmp_path / k1.file_name()).write_text("{torn")
    assert again.get(k1) is None


def test_cache_default_lives_in_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESR_LAB_CACHE", str(tmp_path / "c"))
    assert CalibrationCache().path == tmp_path / "c" / "calibration"


def test_sweep_levels():
    th = [4.0, 6.0, 8.0]  # mean 6, sd 2 -> 6 +- 6 -> lower end clipped to 0.02 * 6
    levels = boost_sweep_levels(th, n_levels=9, span_sd=3.0)
    assert len(levels) == 9 and levels[0] == pytest.approx(0.12) and levels[-1] == pytest.approx(12.0)
    assert all(b > 0 for b in levels) and levels == sorted(levels)
    levels = boost_sweep_levels([10.0, 12.0], n_levels=5, span_sd=1.0)  # sd = sqrt(2)
    assert levels == pytest.approx([11 - 2 ** 0.5, 11 - 2 ** 0.5 / 2, 11, 11 + 2 ** 0.5 / 2, 11 + 2 ** 0.5])
    assert levels_in_sd_units(levels, [10.0, 12.0]) == pytest.approx([-1, -0.5, 0, 0.5, 1])
    assert boost_sweep_levels([4.0], n_levels=3, span_sd=2.0) == pytest.approx([2.0, 4.0, 6.0])
    with pytest.raises(BadInput):
        boost_sweep_levels([])


def test_import_run_calibrations_keys_by_run_and_refuses_bad_specs(tmp_path):
    from esr_core.errors import BadInput
    from esr_core.experiments.boost import CalibrationCache, import_run_calibrations

    cache = CalibrationCache(tmp_path)
    doc = {"model": "m", "sae_key": "s", "hook": "blocks.1.hook_resid_post", "calib_target": 30.0,
           "judge_id": "offline-v1",
           "calibration": {"7": {"boost_raw": 12.5, "settings": {"steps": 6}}, "9": {"note": "no value"}}}
    assert import_run_calibrations(doc, cache) == [7]
    got = cache.get(cache.key("m", "s", "blocks.1.hook_resid_post", 7, 30.0, "offline-v1"))
    assert got["boost_raw"] == 12.5
    # another judge is another key: nothing leaks across
    assert cache.get(cache.key("m", "s", "blocks.1.hook_resid_post", 7, 30.0, "llm")) is None
    with pytest.raises(BadInput):
        import_run_calibrations(dict(doc, calibration={}), cache)
    with pytest.raises(BadInput):
        import_run_calibrations({k: v for k, v in doc.items() if k != "hook"}, cache)
