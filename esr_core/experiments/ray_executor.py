"""Experiments on a Ray cluster: batches and boost calibration on actors, the driver writes.

Each worker is a Ray actor holding one engine (model + SAE) and one judge on its own CPU
share (and ``num_gpus`` when asked for). The driver keeps every actor busy with one batch of
the plan's fixed partition at a time, logs results as they arrive (in any order: the logs are
keyed by trial) and, when an actor dies, starts a replacement and gives the unfinished batch to
the next free actor. A batch is always generated with the same companions and seeds, so a
retried or remote batch gives the same tokens as the in-process run on the same hardware and
thread count. A killed driver resumes from the logs like any run.

``address`` None starts (or joins, via ``RAY_ADDRESS``) a local Ray; "auto" or
``ray://host:10001`` joins an existing cluster, whose nodes need esr-lab installed.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Iterator

from esr_core.errors import BadInput, Cancelled
from esr_core.experiments.calibrate import cached_calibrations, calibrate_latents, store_calibrations
from esr_core.experiments.executors import BatchJob, BatchResult, do_job, environment_of, make_judge
from esr_core.experiments.spec import ExperimentSpec
from esr_core.jobs import CancelLike, is_cancelled

log = logging.getLogger(__name__)
MAX_REPLACEMENTS = 8  # actors started to replace dead ones, per run, before the run gives up


def require_ray():
    """The ``ray`` module, or one clear line on how to get it."""
    try:
        import ray  # heavy: ray, optional (pip install 'esr-lab[cluster]')
    except ImportError:
        raise BadInput("--executor ray needs Ray: pip install 'esr-lab[cluster]' (or pip install ray)") from None
    return ray


class TrialWorker:
    """What one actor holds: an engine and a judge, loaded on first use, and the jobs it runs."""

    def __init__(self, model: str, sae: str | None, judge: str, threads: int | None = None, tag: str = "",
                 dtype: str = "float32"):
        if threads:
            import torch  # heavy: torch, only to set the actor's thread count

            torch.set_num_threads(int(threads))
        self._args = (model, sae, judge, dtype)
        self._eng = None
        self._judge = None
        self._env = None
        self.tag = tag or f"pid {os.getpid()}"

    def _engine(self):
        if self._eng is None:
            from esr_core.steering.engines import get_engine  # heavy: torch, transformers

            self._eng = get_engine(self._args[0], self._args[1], dtype=self._args[3])
        return self._eng

    def _judge_fn(self, spec: ExperimentSpec):
        if self._judge is None:
            self._judge = make_judge(spec)
        return self._judge

    def pid(self) -> int:
        return os.getpid()

    def run_job(self, spec_d: dict, job: BatchJob, prompts: dict[str, str]) -> BatchResult:
        spec = ExperimentSpec.from_dict(spec_d)
        res = do_job(spec, self._engine, self._judge_fn(spec) if job.judge else None, job, prompts)
        res.worker = self.tag
        if job.generated is None:
            if self._env is None:  # once per actor: versions and device do not change
                self._env = environment_of(self._engine())
            res.environment = self._env
        return res

    def calibrate(self, spec_d: dict, latents: list[int], prompts: dict[str, str]) -> dict:
        spec = ExperimentSpec.from_dict(spec_d)
        spec.latents = list(latents)
        return calibrate_latents(spec, self._engine(), self._judge_fn(spec), prompts)


class RayExecutor:
    """Batches on ``workers`` Ray actors (default: one per CPU the cluster offers, at most 8)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
                 threads: int | None = None, cpus_per_worker: float = 1.0):
        self.ray = require_ray()
        if workers is not None and workers < 1:
            raise BadInput(f"--workers must be at least 1, got {workers}")
        self.address, self.n_workers, self.gpus = address, workers, gpus_per_worker
        self.cpus, self.threads = cpus_per_worker, threads
        self._started_ray = False
        self._actors: list = []
        self._spawned = 0
        self.replaced = 0

    # -- cluster and actors ----------------------------------------------------------------
    def _init(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        addr = self.address or os.environ.get("RAY_ADDRESS")
        kw = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
        ray.init(address=addr, **kw) if addr else ray.init(**kw)
        self._started_ray = True

    def _spawn(self, spec: ExperimentSpec):
        opts = {"num_cpus": self.cpus, "max_restarts": 0}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        self._spawned += 1
        tag = f"actor {self._spawned}"
        return self.ray.remote(TrialWorker).options(**opts).remote(
            spec.model, spec.sae, spec.judge, self.threads or max(1, int(self.cpus)), tag, spec.dtype)

    def actors(self, spec: ExperimentSpec) -> list:
        """The live actors, started on first use."""
        self._init()
        if not self._actors:
            n = self.n_workers or max(1, min(8, int(self.ray.cluster_resources().get("CPU", 1) // self.cpus)))
            self._actors = [self._spawn(spec) for _ in range(n)]
        return self._actors

    def _replace(self, dead, spec: ExperimentSpec):
        self.replaced += 1
        if self.replaced > MAX_REPLACEMENTS:
            raise BadInput(f"{self.replaced} Ray actors died in this run; the logged trials are kept, resume later")
        log.warning("a Ray actor died; starting a replacement and retrying its batch")
        new = self._spawn(spec)
        self._actors = [new if a is dead else a for a in self._actors]
        return new

    # -- the executor interface -------------------------------------------------------------
    def run(self, spec: ExperimentSpec, jobs: Iterable[BatchJob], prompts: dict[str, str], judge_fn,
            cancel: CancelLike = None) -> Iterator[BatchResult]:
        """Results in completion order; each actor has one batch in flight at a time."""
        ray = self.ray
        spec_d = spec.to_dict()
        queue = list(jobs)
        idle = list(self.actors(spec))
        inflight: dict = {}  # object ref -> (actor, job)
        prompts_ref = ray.put(prompts)
        try:
            while queue or inflight:
                if is_cancelled(cancel):
                    yield BatchResult(-1, cancelled=True)
                    return
                while queue and idle:
                    actor, job = idle.pop(0), queue.pop(0)
                    inflight[actor.run_job.remote(spec_d, job, prompts_ref)] = (actor, job)
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    actor, job = inflight.pop(ref)
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        queue.insert(0, job)  # the batch is retried whole, on another actor
                        idle.append(self._replace(actor, spec))
                        continue
                    idle.append(actor)
                    yield res
        finally:
            for ref in inflight:
                ray.cancel(ref, force=True)

    def calibrate(self, spec: ExperimentSpec, eng, judge_fn, prompts, progress=None, cancel: CancelLike = None):
        """Latents spread round-robin over the actors; cached calibrations are not recomputed."""
        ray = self.ray
        cached = cached_calibrations(spec)
        todo = [lat for lat in spec.latents if lat not in cached]
        if not todo:
            return cached
        actors = self.actors(spec)
        parts = [todo[i::len(actors)] for i in range(len(actors))]
        spec_d = spec.to_dict()
        refs = [a.calibrate.remote(spec_d, part, prompts) for a, part in zip(actors, parts) if part]
        if progress:
            progress("calibrate", 0, len(todo), f"calibrating {len(todo)} latents on {len(refs)} Ray actors",
                     force=True)
        out = dict(cached)
        pending = list(refs)
        while pending:
            if is_cancelled(cancel):
                for r in pending:
                    ray.cancel(r, force=True)
                raise Cancelled("Experiment cancelled during boost calibration")
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for r in done:
                out.update({int(k): v for k, v in ray.get(r).items()})
            if progress and done:
                progress("calibrate", len(out) - len(cached), len(todo), "calibrating on Ray actors", force=True)
        store_calibrations(spec, {k: v for k, v in out.items() if k not in cached})
        return {lat: out[lat] for lat in spec.latents if lat in out}

    def close(self) -> None:
        for a in self._actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor that is already gone is fine
                pass
        self._actors = []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False
