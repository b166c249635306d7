"""Experiments on Ray (#14): a real local cluster (127.0.0.1, 2 CPUs, no dashboard) runs a plan
on 2 actors and gives the same trial table as the in-process run; an actor killed mid-run is
replaced, its batch retried, and every trial is logged exactly once; no Ray, one clear line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from esr_core.experiments import runner as xr
from esr_core.experiments import store
from esr_core.experiments.spec import ExperimentSpec
from esr_core.io import read_jsonl

ray = pytest.importorskip("ray", reason="the cluster extra (pip install 'esr-lab[cluster]') is not installed")

DEFAULT_SAE = Path(__file__).resolve().parent.parent / "assets" / "sae" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not (DEFAULT_SAE / "cfg.json").exists(), reason="needs the default SAE")


def _plan(name: str, **kw) -> ExperimentSpec:
    """2 latents x 2 prompts, steered, greedy; one trial per batch so the actors share the work."""
    return ExperimentSpec.from_dict({
        "name": name, "latents": [11, 222], "prompt_ids": ["howto-01", "howto-02", "howto-03"],
        "prompts_per_latent": 2, "conditions": ["steering"], "boost_mode": "fixed", "boost": 1.5,
        "max_new_tokens": 10, "batch_size": 1, "temperature": 0.0, **kw})


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process_table(engine, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run one thread each: the same numerics
    try:
        d = tmp_path_factory.mktemp("inproc") / "run"
        xr.run_experiment(_plan("inproc"), d, engine=engine)
    finally:
        torch.set_num_threads(threads)
    return pd.read_parquet(d / "trials.parquet").set_index("key").sort_index()


def _table(d: Path) -> pd.DataFrame:
    return pd.read_parquet(d / "trials.parquet").set_index("key").sort_index()


def test_two_actors_give_the_in_process_trial_table(cluster, in_process_table, tmp_path):
    from esr_core.experiments.ray_executor import RayExecutor

    ex = RayExecutor(workers=2, threads=1)
    final = xr.run_experiment(_plan("ray"), tmp_path / "run", executor=ex)
    assert final["stage"] == "done" and final["executor"] == "ray" and final["done"] == 4
    got = _table(tmp_path / "run")
    assert list(got.index) == list(in_process_table.index)
    assert (got["response"] == in_process_table["response"]).all()
    assert (got["attempts"] == in_process_table["attempts"]).all()
    assert got["batch_id"].nunique() == 4
    assert ray.is_initialized()  # a cluster the run joined is left running


class _KillOneActorAfterTheFirstBatch:
    """Wraps the Ray executor: once the first batch is logged, kill an actor (mid-run)."""

    name = "ray"

    def __init__(self, inner):
        self.inner, self.killed = inner, None

    def run(self, spec, jobs, prompts, judge_fn, cancel=None):
        for i, res in enumerate(self.inner.run(spec, jobs, prompts, judge_fn, cancel)):
            if i == 0:
                self.killed = self.inner.actors(spec)[0]
                ray.kill(self.killed, no_restart=True)
            yield res

    def calibrate(self, *a, **kw):
        return self.inner.calibrate(*a, **kw)

    def close(self):
        self.inner.close()


def test_a_killed_actor_loses_nothing_and_every_trial_is_logged_once(cluster, in_process_table, tmp_path):
    from esr_core.experiments.ray_executor import RayExecutor

    inner = RayExecutor(workers=2, threads=1)
    ex = _KillOneActorAfterTheFirstBatch(inner)
    final = xr.run_experiment(_plan("ray-kill"), tmp_path / "run", executor=ex)
    assert ex.killed is not None and inner.replaced >= 1
    assert final["stage"] == "done" and final["done"] == 4
    for log in (store.GEN_FILE, store.TRIALS_FILE):
        keys = [r["key"] for r in read_jsonl(tmp_path / "run" / log)]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 4, log
    got = _table(tmp_path / "run")
    assert (got["response"] == in_process_table["response"]).all()


def test_ray_calibration_spreads_latents_and_fills_the_cache(cluster, tmp_path, monkeypatch):
    """Boost calibration runs on the actors, and its results land in this machine's cache."""
    from esr_core.experiments.boost import CalibrationCache
    from esr_core.experiments.calibrate import cached_calibrations
    from esr_core.experiments.ray_executor import RayExecutor

    monkeypatch.setenv("ESR_LAB_CACHE", str(tmp_path / "cache"))
    spec = _plan("ray-cal", boost_mode="calibrate", calib_steps=1, max_new_tokens=6)
    ex = RayExecutor(workers=2, threads=1)
    seen = []
    xr.run_experiment(spec, tmp_path / "run", executor=ex, progress=seen.append, stop_after=0)
    done = ExperimentSpec.load(tmp_path / "run" / store.SPEC_FILE)
    assert set(done.thresholds) == {"11", "222"} and all(v > 0 for v in done.thresholds.values())
    assert set(cached_calibrations(done, CalibrationCache())) == {11, 222}
    assert any("Ray actors" in (p.message or "") for p in seen)


def test_executor_ray_without_ray_is_one_clear_line(monkeypatch, capsys):
    from esr_core.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["experiment", "run", "--executor", "ray", "--latent-ids", "11", "--prompts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "esr-lab[cluster]" in err[0]
    assert main(["experiment", "run", "--workers", "2", "--latent-ids", "11"]) == 2
    assert "--executor ray" in capsys.readouterr().err


def test_experiments_page_offers_ray_and_a_run_job_uses_it(cluster, tmp_path):
    """With Ray installed the new-run form offers "Run on: ray" and a number of actors; the app's
    background run job takes the Ray executor and finishes the plan."""
    from conftest import open_app_page

    at = open_app_page("pages/experiments.py")
    assert not at.exception, at.exception
    where = at.radio(key="exp_executor")
    assert list(where.options) == ["in-process", "ray"] and where.value == "in-process"
    assert at.number_input(key="exp_workers").value == 2
    job = xr.start_run_job(_plan("ray-job"), tmp_path / "run", executor=xr.make_executor("ray", workers=1, threads=1))
    job.join()
    assert job.error is None, job.error
    assert len(read_jsonl(tmp_path / "run" / store.TRIALS_FILE)) == 4
