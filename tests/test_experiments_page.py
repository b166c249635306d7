"""The Experiments page as a user meets it (#11, items 15-16): a run another session is running
is not offered for Resume, this session's progress sits at the top, and the form only shows
the fields of the chosen boost mode."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import open_app_page, warm_app_engine  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from esr_core.experiments.store import PROGRESS_FILE, SPEC_FILE, RunLocked, run_lock  # noqa: E402
from esr_core.jobs import BackgroundJob  # noqa: E402

SPEC = {"name": "{name}", "model": "smollm2-135m-instruct", "n_latents": 1, "prompts_per_latent": 1,
        "conditions": ["steering"], "boost_mode": "fixed", "boost": 1.0}


def _unfinished_run(root, name: str):
    d = root / "experiments" / name
    d.mkdir(parents=True)
    (d / SPEC_FILE).write_text(json.dumps({**SPEC, "name": name}))
    (d / PROGRESS_FILE).write_text(json.dumps({"stage": "partial", "done": 1, "total": 4}))
    return d


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESR_LAB_CACHE", str(tmp_path))
    return tmp_path


def test_resume_offers_only_runs_no_other_session_is_running(cache):
    busy = _unfinished_run(cache, "busy-run")
    _unfinished_run(cache, "idle-run")
    with run_lock(busy):  # as a run of another session holds it while it writes
        at = open_app_page("pages/experiments.py")
        with pytest.raises(RunLocked):
            with run_lock(busy):
                pass
    assert not at.exception, at.exception
    options = at.selectbox(key="exp_resume_pick").options
    assert any("idle-run" in o for o in options) and not any("busy-run" in o for o in options)
    assert any("Running in another session" in c.value and "busy-run" in c.value for c in at.caption)
    assert any("busy-run" in o and "running" in o for o in at.selectbox(key="exp_pick").options)


def test_boost_fields_follow_the_mode():
    at = open_app_page("pages/experiments.py")
    labels = {n.label for n in at.number_input}
    assert "Fixed boost (× median residual norm)" in labels and "Calibration steps" not in labels
    at.selectbox(key="exp_boost_mode").select("calibrate").run()
    labels = {n.label for n in at.number_input}
    assert "Calibration steps" in labels and "Fixed boost (× median residual norm)" not in labels


def test_this_sessions_progress_is_at_the_top(cache):
    release = threading.Event()
    job = BackgroundJob("t", lambda progress, cancel: release.wait(60), run_dir=str(cache / "x"), title="tiny").start()
    try:
        warm_app_engine()
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
        at.session_state["exp_job"] = job
        at.run()
        at.switch_page("pages/experiments.py")
        at.run()
        assert not at.exception, at.exception
        order = [getattr(n, "type", "") + ":" + str(getattr(n, "value", ""))[:40] for n in _walk(at.main)]
        first_progress = next(i for i, x in enumerate(order) if x.startswith("progress"))
        first_rates = next(i for i, x in enumerate(order) if "Rates per condition" in x)
        assert first_progress < first_rates
        assert any("Experiment tiny" in m.value for m in at.markdown)
    finally:
        release.set()


def test_the_tuned_reference_shows_what_drives_its_restarts_at_both_layers(cache):
    """Both shipped attribution reports (block 15 and the block-20 readout) are plotted, each with
    its ablation evidence and the circuit's lead time in words."""
    at = open_app_page("pages/experiments.py")
    pick = at.selectbox(key="exp_pick")
    pick.select_index(next(i for i, o in enumerate(pick.options) if o.startswith("tuned-reference")))
    at.run()
    assert not at.exception, at.exception
    heads = [h.value for h in at.subheader if h.value.startswith("What drives the restarts")]
    assert len(heads) == 2 and "blocks.15.hook_resid_post" in heads[0] and "blocks.20.hook_resid_post" in heads[1]
    caps = [c.value for c in at.caption if c.value.startswith("Over 33 restarts")]
    assert len(caps) == 2 and all("random active latents" in c and "The circuit alerts before" in c for c in caps)
