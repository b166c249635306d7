"""What a hostile file, URL or config cannot do (#11, items 21-23): inject HTML through run names,
open files outside the assets and the cache, grow the engine cache without bound, run code from
a checkpoint or a source archive, or leak credentials from a judge URL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esr_core.app.run_record import RunRecord, records_from_json  # noqa: E402
from esr_core.app.session import check_model_choice, check_sae_choice  # noqa: E402
from esr_core.errors import BadInput, EsrError  # noqa: E402
from esr_core.latents.groups import find_group  # noqa: E402
from esr_core.steering.spec import GenerationSpec, RunResult  # noqa: E402
from esr_core.viz.lab_html import live_card, resistance_line, run_view, verdict_line  # noqa: E402

EVIL = '"><script>alert(1)</script><b x="'


def _record(**over) -> dict:
    rec = RunRecord(spec=GenerationSpec(prompt="hi"), model="m", sae="s",
                    results={"steered": RunResult(run="steered", text="ok", stop_reason="eos")}).to_dict()
    rec.update(over)
    return rec


# ------------------------------------------------------------------ 21: run JSON into HTML
def test_uploaded_run_with_unknown_run_names_or_statuses_is_refused():
    bad_run = _record()
    bad_run["results"] = {EVIL: bad_run["results"]["steered"]}
    with pytest.raises(BadInput, match="runs named steered, compare, default"):
        records_from_json(json.dumps(bad_run))
    inner = _record()
    inner["results"]["steered"]["run"] = EVIL
    with pytest.raises(BadInput):
        records_from_json(json.dumps(inner))
    with pytest.raises(BadInput, match="status"):
        records_from_json(json.dumps(_record(status=EVIL)))
    stop = _record()
    stop["results"]["steered"]["stop_reason"] = EVIL
    with pytest.raises(BadInput):
        records_from_json(json.dumps(stop))
    rec = records_from_json(json.dumps(_record(id=EVIL)))[0]
    assert rec.id != EVIL and rec.id.isalnum()  # an id that is not ours is replaced


def test_every_value_reaching_the_lab_html_is_escaped():
    for html in (live_card(EVIL, EVIL, 3, EVIL, ""), resistance_line(EVIL, None, [], ""),
                 verdict_line(EVIL, EVIL, [1.0], run=EVIL), run_view(EVIL, EVIL, EVIL, 1, EVIL, True)):
        assert "<script>" not in html and "&lt;script&gt;" in html


# ------------------------------------------------------------------ 22: names that become paths
@pytest.mark.parametrize("name", ["../../etc/passwd.json", "/etc/passwd.json", "../../../x", "/etc/passwd",
                                  "assets/../../outside.json"])
def test_group_names_cannot_leave_the_assets_and_the_cache(name):
    with pytest.raises(BadInput):
        find_group(name)


def test_experiment_config_with_a_group_path_is_refused_before_anything_loads():
    from esr_core.experiments.spec import ExperimentSpec

    for bad in ({"conditions": ["steering", "group_ablation:../../etc/passwd.json"]},
                {"conditions": ["steering", "group_ablation:/etc/x"]}, {"detector_group": "../../../etc/passwd.json"}):
        with pytest.raises(BadInput, match="outside the shipped assets|not a group name"):
            ExperimentSpec.from_dict({"name": "x", **bad})


@pytest.mark.parametrize("value", ["/etc", "../../..", "/tmp/any-folder", "~/.ssh"])
def test_url_model_and_sae_must_be_registry_assets_or_cache(value):
    with pytest.raises(BadInput):
        check_model_choice(value)
    with pytest.raises(BadInput):
        check_sae_choice(value)


def test_url_with_a_local_path_is_ignored_with_a_message():
    from conftest import warm_app_engine
    from streamlit.testing.v1 import AppTest

    warm_app_engine()
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
    at.query_params["model"] = "/etc"
    at.query_params["sae"] = "/tmp"
    at.run()
    assert not at.exception, at.exception
    assert at.session_state.get("model_choice") != "/etc" and at.session_state.get("sae_choice") != "/tmp"
    assert any("Ignored from the URL" in e for e in at.session_state["_url_errors"])


def test_an_evicted_engine_releases_its_hook(monkeypatch, tmp_path):
    from conftest import build_test_sae

    from esr_core.models.hooks import hook_module
    from esr_core.steering import engines

    monkeypatch.setattr(engines, "_ENGINES", OrderedDict())  # a cache of our own: the session's stays
    monkeypatch.setattr(engines, "MAX_ENGINES", 1)
    a = engines.get_engine("smollm2-135m-instruct", str(build_test_sae(tmp_path / "a", d_sae=64, layer=10)))
    module = hook_module(a.model, a.sae.hook_name)
    hook_id = a._handle.id
    assert hook_id in module._forward_hooks
    b = engines.get_engine("smollm2-135m-instruct", str(build_test_sae(tmp_path / "b", d_sae=64, layer=10, seed=1)))
    assert engines.loaded_engines() == [("smollm2-135m-instruct", str(tmp_path / "b"))]
    assert a.closed and hook_id not in module._forward_hooks and b._handle.id in module._forward_hooks
    b.close()


# ------------------------------------------------------------------ 23: code in files, credentials in URLs
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/esr-lab-pwned",))


def test_a_checkpoint_never_runs_code(tmp_path):
    import torch

    from esr_core.sae_training.train import load_checkpoint

    Path("/tmp/esr-lab-pwned").unlink(missing_ok=True)
    evil = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "x": _Payload()}, evil)
    with pytest.raises(BadInput, match="cannot be read"):
        load_checkpoint(evil)
    assert not Path("/tmp/esr-lab-pwned").exists()
    good = tmp_path / "ok.pt"
    torch.save({"step": 3, "params": {"W": torch.ones(2)}}, good)
    assert load_checkpoint(good)["step"] == 3


def test_source_archives_are_fetched_as_files_checked_by_sha256_never_built(tmp_path, monkeypatch):
    from esr_core.sae_training import sources

    data = b"not really a tarball"
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(data)
    index = tmp_path / "index" / "pkg" / "1.0"
    index.mkdir(parents=True)
    entry = {"packagetype": "sdist", "filename": "pkg-1.0.tar.gz", "url": (tmp_path / "pkg-1.0.tar.gz").as_uri(),
             "digests": {"sha256": hashlib.sha256(data).hexdigest()}}
    (index / "json").write_text(json.dumps({"urls": [entry]}))

    def no_subprocess(*a, **k):
        raise AssertionError(f"a subprocess was started: {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    out = sources.download_sdist("pkg", "1.0", tmp_path / "dest", index=(tmp_path / "index").as_uri())
    assert out.read_bytes() == data
    entry["digests"]["sha256"] = "0" * 64
    (index / "json").write_text(json.dumps({"urls": [entry]}))
    with pytest.raises(EsrError, match="sha256"):
        sources.download_sdist("pkg", "1.0", tmp_path / "dest2", index=(tmp_path / "index").as_uri())


def test_judge_urls_lose_their_credentials_everywhere(monkeypatch):
    from esr_core.judge.llm import LlmJudge, public_url

    assert public_url("https://bob:s3cret@api.example.com:8443/v1?key=abc#x") == "https://api.example.com:8443/v1"
    monkeypatch.setenv("ESR_TEST_JUDGE_KEY", "k")
    judge = LlmJudge(provider="openai", base_url="http://bob:s3cret@127.0.0.1:9/v1", model="m",
                     key_env="ESR_TEST_JUDGE_KEY", timeout=5)
    assert "s3cret" not in judge.judge_id and "bob" not in judge.judge_id
    with pytest.raises(EsrError) as exc:
        judge("How do I boil an egg?", "Boil water.")
    assert "s3cret" not in str(exc.value) and "127.0.0.1" in str(exc.value)
