"""Compare models (#12): the same steering on the base and the resistance-tuned model, streamed
together as a third column; each model's text is exactly what it gives alone (no leak)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esr_core.app.live_run import LiveRun  # noqa: E402
from esr_core.app.run_record import RunRecord  # noqa: E402
from esr_core.errors import BadInput  # noqa: E402
from esr_core.steering.interventions import Intervention  # noqa: E402
from esr_core.steering.spec import GenerationSpec  # noqa: E402

TUNED = "smollm2-135m-esr"


def _spec(n=12):
    return GenerationSpec(prompt="How do I boil an egg?", interventions=[
        Intervention(latent=5040, mode="add", strength=0.6, units="norm")], watch=[5040], seed=3, temperature=0.6,
        max_new_tokens=n)


@pytest.fixture(scope="module")
def pair():
    from esr_core.steering.engines import get_engine

    return get_engine("smollm2-135m-instruct"), get_engine(TUNED)


def test_streamed_together_each_model_gives_its_own_text(pair):
    from esr_core.steering.compare import collect_all, stream_two

    base, tuned = pair
    spec = _spec()
    events = list(stream_two(base, tuned, spec))
    res = collect_all(events, spec)
    assert list(res) == ["steered", "compare", "default"]
    alone_base = base.generate(spec)
    alone_tuned = tuned.generate(_spec())
    assert res["steered"].text == alone_base["steered"].text
    assert res["default"].text == alone_base["default"].text
    assert res["compare"].text == alone_tuned["steered"].text
    assert len(res["compare"].token_ids) == 12 and res["compare"].acts.shape == (12, 1)
    # the two models differ: the tuned weights are really in use
    assert tuned.model.name != base.model.name

    # the live record keeps the third column and round-trips through JSON
    live = LiveRun(spec=spec, model=base.model.name, sae=base.sae.source, compare_model=TUNED)
    for ev in events:
        live.add(ev)
    rec = live.record("done")
    assert rec.compare_model == TUNED and list(rec.results) == ["steered", "compare", "default"]
    back = RunRecord.from_json(rec.to_json())
    assert back.compare_model == TUNED and back.results["compare"].text == res["compare"].text
    assert back.run_title("compare") == f"steered · {TUNED}"


def test_pairs_that_cannot_be_compared_are_refused(pair):
    from esr_core.steering.compare import check_pair

    base, _ = pair
    with pytest.raises(BadInput, match="not the same one"):
        check_pair(base, base)


def test_a_record_with_a_compare_run_needs_its_model():
    spec = _spec(2)
    rec = RunRecord(spec=spec, model="m", sae="s", results={}, compare_model="")
    d = rec.to_dict()
    d["results"] = {"steered": {"run": "steered", "text": "a"}, "compare": {"run": "compare", "text": "b"}}
    with pytest.raises(BadInput, match="compare_model"):
        RunRecord.from_dict(d)
    d["compare_model"] = TUNED
    assert RunRecord.from_dict(d).results["compare"].text == "b"
    d["results"]["other"] = {"run": "steered"}
    with pytest.raises(BadInput, match="runs named"):
        RunRecord.from_dict(d)


def test_the_lab_runs_the_same_steering_on_a_second_model_as_a_third_column():
    from conftest import open_app_page

    from esr_core.app import engine_loader

    at = open_app_page("pages/steering.py")
    engine_loader.request(TUNED, at.session_state.engine.sae.source).join()  # the key the lab asks for
    at.text_area(key="w_prompt").input("How do I boil an egg?")
    at.number_input(key="w_max_new_tokens").set_value(8)
    at.text_input(key="iv_latent").input("5040")
    at.text_input(key="iv_strength").input("0.6")
    at.button(key="add_iv").click().run()
    box = at.selectbox(key="w_compare_with")
    assert any("resistance-tuned" in o for o in box.options), box.options
    box.select(TUNED).run()  # the value; AppTest formats it to find the option
    at.button(key="generate").click().run()
    assert not [e.value for e in at.error] and not at.exception, ([e.value for e in at.error], at.exception)
    rec = at.session_state.history[-1]
    assert list(rec.results) == ["steered", "compare", "default"] and rec.compare_model == TUNED
    assert all(len(r.token_ids) == 8 for r in rec.results.values())
    verdicts = [m.value for m in at.markdown if "Verdict (" in m.value]
    assert any(f"steered · {TUNED}" in v for v in verdicts) and len(verdicts) == 2
    assert any(f"steered · {TUNED}" in m.value for m in at.markdown)  # the heatmap column header
