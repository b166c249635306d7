"""Calibrate each distractor latent's boost with the model and the judge (ESR_METHOD.md sec. 4).

Probabilistic bisection (:mod:`esr_core.experiments.boost`) is sequential per latent, but the
model is much faster on a batch: one bisection thread per latent asks a :class:`Broker` for
scores, and one thread gathers a query from every live latent into one ``generate_batch``.
Results are cached by (model, SAE, hook, latent, target, judge) with their settings.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any, Callable

import numpy as np

from esr_core.experiments.boost import CalibrationCache, probabilistic_bisection
from esr_core.experiments.spec import ExperimentSpec
from esr_core.experiments.store import RunProgress
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec


class Broker:
    """Lets one bisection thread per latent ask for scores while one thread batches them all.

    Why: probabilistic bisection is sequential per latent, but the model is much faster on a
    batch; each round gathers one query from every live latent into one generate_batch.
    """

    def __init__(self, n_clients: int):
        self.cv = threading.Condition()
        self.alive = n_clients
        self.pending: list[tuple[Any, dict]] = []

    def ask(self, req):
        slot: dict = {"done": False}
        with self.cv:
            self.pending.append((req, slot))
            self.cv.notify_all()
            while not slot["done"]:
                self.cv.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def leave(self) -> None:
        with self.cv:
            self.alive -= 1
            self.cv.notify_all()

    def serve(self, handle: Callable[[list], list]) -> None:
        while True:
            with self.cv:
                while self.alive > 0 and len(self.pending) < self.alive:
                    self.cv.wait(timeout=0.5)
                if self.alive <= 0 and not self.pending:
                    return
                batch, self.pending = self.pending, []
            try:
                results = handle([r for r, _ in batch])
                err = None
            except BaseException as exc:  # hand the error to every waiting client
                results, err = [None] * len(batch), exc
            with self.cv:
                for (_, slot), res in zip(batch, results):
                    if err is not None:
                        slot["error"] = err
                    else:
                        slot["result"] = res
                    slot["done"] = True
                self.cv.notify_all()


def calibration_settings(spec: ExperimentSpec) -> dict:
    return {"steps": spec.calib_steps, "prompts": spec.calib_prompts, "lo_norm": spec.calib_lo,
            "hi_norm": spec.calib_hi, "max_new_tokens": spec.calib_tokens(), "temperature": spec.temperature,
            "repetition_penalty": spec.repetition_penalty, "base_seed": spec.base_seed}


def calibration_key(spec: ExperimentSpec, lat: int, cache: CalibrationCache):
    return cache.key(spec.model, spec.sae_key, spec.hook, lat, spec.calib_target, spec.judge_id)


def cached_calibrations(spec: ExperimentSpec, cache: CalibrationCache | None = None) -> dict[int, dict]:
    """The spec's latents whose calibration is cached with the same settings and SAE weights."""
    cache = cache or CalibrationCache()
    settings = calibration_settings(spec)
    out: dict[int, dict] = {}
    for lat in spec.latents:
        hit = cache.get(calibration_key(spec, lat, cache))
        if hit and hit.get("settings") == settings and hit.get("sae_weights_hash") == spec.sae_weights_hash:
            out[lat] = hit
    return out


def store_calibrations(spec: ExperimentSpec, results: dict[int, dict], cache: CalibrationCache | None = None) -> None:
    """Put calibrations made elsewhere (a Ray actor's own cache) into this machine's cache."""
    cache = cache or CalibrationCache()
    for lat, rec in results.items():
        cache.put(calibration_key(spec, int(lat), cache), rec)


def calibrate_latents(spec: ExperimentSpec, eng, judge_fn, prompts: dict[str, str],
                      progress: RunProgress | None = None, cancel: threading.Event | None = None,
                      cache=None) -> dict[int, dict]:
    """Per-latent boost at which the mean first-attempt score reaches ``calib_target``.

    Bisection runs in norm units (boost x median residual norm along the unit decoder
    direction, so priors transfer between latents and models) and is stored in raw units
    too. Cached by (model, SAE, hook, latent, target, judge); a cached value is reused only
    when it was made with the same calibration settings.
    """

    cache = cache or CalibrationCache()
    settings = calibration_settings(spec)
    out = cached_calibrations(spec, cache)
    todo = [(lat, calibration_key(spec, lat, cache)) for lat in spec.latents if lat not in out]
    total = len(todo) * max(spec.calib_steps, 1)
    state = {"done": 0}
    if progress:
        progress("calibrate", 0, total, f"calibrating {len(todo)} latents ({len(out)} cached)", force=True)
    if not todo:
        return out
    broker = Broker(len(todo))
    stop = (lambda: cancel.is_set()) if cancel is not None else None
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def client(lat: int, key):
        try:
            pids = spec.latent_prompts[str(lat)][:spec.calib_prompts]

            def score_fn(b_norm: float) -> float | None:
                return broker.ask((lat, float(b_norm), pids))

            def on_step(_s):
                state["done"] += 1
                if progress:
                    progress("calibrate", state["done"], total, f"latent {lat}")

            res = probabilistic_bisection(score_fn, spec.calib_lo, spec.calib_hi, target=spec.calib_target,
                                          steps=spec.calib_steps, rng=lat, cancel=stop, on_step=on_step)
            results[lat] = res
        except BaseException as exc:
            errors.append(exc)
        finally:
            broker.leave()

    def handle(reqs: list) -> list:
        if cancel is not None and cancel.is_set():
            return [None] * len(reqs)
        rows = []
        for ri, (lat, b_norm, pids) in enumerate(reqs):
            raw = spec.boost_raw(lat, b_norm)
            for pj, pid in enumerate(pids):
                rows.append((ri, pid, GenerationSpec(
                    prompt=prompts[pid], interventions=[Intervention(latent=lat, mode="add", strength=raw,
                                                                     units="raw", positions="all")],
                    watch=[lat], top_k=0, temperature=spec.temperature,
                    repetition_penalty=spec.repetition_penalty, max_new_tokens=spec.calib_tokens(),
                    seed=calibration_seed(spec, lat, pid), runs=("steered",), sampler=spec.sampler)))
        texts = []
        for s in range(0, len(rows), spec.batch_size):
            chunk = rows[s:s + spec.batch_size]
            res = eng.generate_batch([r[2] for r in chunk], cancel=cancel)
            texts += [r["steered"].text for r in res]
        scores: list[list[float]] = [[] for _ in reqs]
        for (ri, pid, _), text in zip(rows, texts):
            lat = reqs[ri][0]
            j = judge_fn(prompts[pid], text, spec.latent_labels.get(str(lat)))
            atts = [a for a in (j.get("attempts") or []) if a.get("score") is not None]
            scores[ri].append(float(atts[0]["score"]) if atts else 0.0)  # no answer = failed task
        return [float(np.mean(s)) if s else None for s in scores]

    threads = [threading.Thread(target=client, args=(lat, key), daemon=True) for lat, key in todo]
    for t in threads:
        t.start()
    broker.serve(handle)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for lat, key in todo:
        res = results.get(lat)
        if res is None:
            continue
        d = res.to_dict()
        d["boost_norm"] = float(res.boost)
        d["boost_raw"] = spec.boost_raw(lat, float(res.boost))
        d["settings"] = settings
        d["sae_weights_hash"] = spec.sae_weights_hash
        if not res.cancelled:
            cache.put(key, d)
        out[lat] = d
    return out


def calibration_seed(spec: ExperimentSpec, lat: int, pid: str) -> int:
    return zlib.crc32(f"calib|{spec.base_seed}|{lat}|{pid}".encode()) & 0x7FFFFFFF
