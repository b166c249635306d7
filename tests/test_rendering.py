"""Pure unit tests: token heatmap HTML, timeline figure, latent groups, URL state, run records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from esr_core.app import forms, latent_view, live_run, session, url_state
from esr_core.app.run_record import RunRecord, history_to_json, records_from_json
from esr_core.errors import BadInput
from esr_core.latents.group_scales import catalog_scales, normalised_lane, observed_scales
from esr_core.latents.groups import (
    LatentGroup,
    decode_groups,
    encode_groups,
    groups_from_json,
    groups_to_json,
    load_builtin_groups,
    parse_members,
)
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec, PromptReadout, RunDone, TokenEvent
from esr_core.viz.timeline import Series, selected_point, summarise, timeline_figure
from esr_core.viz.token_heatmap import opacity, render_heatmap, scale_max


# ---------------------------------------------------------------- heatmap
def test_heatmap_escapes_every_token_and_tooltip():
    evil = ['<script>alert(1)</script>', '" onmouseover="x', "a & b", "<img src=x onerror=y>"]
    out = render_heatmap(evil, [1, 2, 3, 4], tops=[[(1, 0.5)]] * 4, label="<b>lbl</b>")
    assert "<script>" not in out and "<img" not in out and "<b>lbl" not in out
    assert "&lt;script&gt;" in out and "&amp;" in out
    assert 'onmouseover="x' not in out


def test_position_zero_and_special_tokens_do_not_set_the_scale():
    vals = [24000.0, 1.0, 2.0, 50.0]
    special = [False, False, False, True]
    assert scale_max(vals, special) == 2.0
    out = render_heatmap(["<s>", "a", "b", "</s>"], vals, special=special)
    assert 'data-v="2"' in out and "esr-special" in out
    assert "0</span><span" in out.replace(" ", "") or ">2<" in out  # legend shows the max 2


def test_opacity_scales_keep_weak_activations_visible():
    assert opacity(0, 10) == 0 and opacity(10, 10) == 1 and opacity(20, 10) == 1
    assert opacity(1, 100, "sqrt") == pytest.approx(0.1)
    assert opacity(1, 100, "log") > opacity(1, 100, "sqrt") > opacity(1, 100, "linear")
    assert opacity(float("nan"), 10) == 0 and opacity(1, 0) == 0


def test_newlines_get_a_glyph_and_a_break_and_tooltip_has_top_latents():
    out = render_heatmap(["x", "a\nb", "c"], [0, 1, 0], tops=[[], [(42, 3.5)], []], describe=lambda i: "cooking")
    assert "a\u21b5b" in out and "<br>" in out
    assert "#42: 3.5 (cooking)" in out
    assert 'data-i="1"' in out


def test_negative_values_and_selection_marker():
    out = render_heatmap(["x", "a", "b"], [0, -2, 2], selected=2)
    assert "rgba(31,119,180" in out  # negative hue
    assert "outline:2px solid #000" in out


# ---------------------------------------------------------------- timeline
def test_timeline_lanes_styles_regions_markers():
    s = [Series("#1", [0, 1, 2], run="steered"), Series("#1", [0, 0.5, 1], run="default"),
         Series("grp", [1, 1, 1], run="steered", lane="groups", colour="#009E73"),
         Series("circuit", [0, 3, 0], lane="circuit", threshold=2.0)]
    fig = timeline_figure(s, regions=[(0, 2, "off-topic", "rgba(255,0,0,0.1)")], markers=[(1, "wait")], selected=2)
    assert len(fig.data) == 4
    assert fig.data[0].line.dash == "solid" and fig.data[1].line.dash == "dash"
    assert fig.data[0].line.color == fig.data[1].line.color  # same latent, same colour
    assert fig.data[2].yaxis == "y2" and fig.data[3].yaxis == "y3"
    texts = [a.text for a in fig.layout.annotations]
    assert "off-topic" in texts and "wait" in texts and "circuit" in texts
    assert list(fig.data[0].customdata[2][:2]) == ["steered", 2]


def test_timeline_handles_nan_and_empty():
    fig = timeline_figure([Series("#1", [float("nan"), 1.0])])
    assert math.isnan(fig.data[0].y[0])
    assert timeline_figure([]) is not None


def test_selected_point_parses_plotly_events():
    ev = {"selection": {"points": [{"x": 3, "y": 1.0, "customdata": ["default", 3, "x"]}]}}
    assert selected_point(ev) == ("default", 3)
    assert selected_point({"selection": {"points": [{"x": 4.0}]}}) == ("steered", 4)
    assert selected_point({"selection": {"points": []}}) is None and selected_point(None) is None


def test_summarise():
    sm = summarise([0, 1, 5, 2], default=[0, 0, 0, 0], threshold=2)
    assert sm["peak"] == 5 and sm["peak_at"] == 2 and sm["first_crossing"] == 2
    assert sm["area"] == 8 and sm["delta_vs_default"] == 2


# ---------------------------------------------------------------- groups
def test_group_lane_sum_mean_and_ablation():
    g = LatentGroup("g", [3, 5], [1.0, 0.5])
    acts = np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 2.0]])  # watch [5, 9, 3]
    assert g.lane(acts, [5, 9, 3]).tolist() == [4.5, 2.0]
    assert g.lane(acts, [5, 9, 3], "mean").tolist() == [3.0, pytest.approx(2 / 1.5)]
    ab = g.ablations("generated")
    assert [(a.latent, a.mode, a.positions) for a in ab] == [(3, "ablate", "generated"), (5, "ablate", "generated")]
    assert g.lane_from_tops([[(3, 2.0), (7, 1.0)], []]).tolist() == [2.0, 0.0]


# ---------------------------------------------------------------- several latents, each on its own scale
def test_normalised_lane_puts_each_latent_on_its_own_scale():
    # latent A lives on a scale of 10, latent B on a scale of 1: each at its own peak counts the same
    acts = np.array([[10.0, 0.0], [0.0, 1.0], [5.0, 0.5], [0.0, 0.0]])
    out = normalised_lane(acts, [1.0, 1.0], scales=[10.0, 1.0])
    assert out.tolist() == [1.0, 1.0, 1.0, 0.0]
    # the raw sum would let A drown B (10 vs 1)
    assert (acts @ [1.0, 1.0]).tolist()[:2] == [10.0, 1.0]
    # weights still apply, and "mean" divides by the sum of |weights|
    assert normalised_lane(acts, [2.0, 1.0], scales=[10.0, 1.0])[:2].tolist() == [2.0, 1.0]
    assert normalised_lane(acts, [2.0, 1.0], scales=[10.0, 1.0], how="mean")[:2].tolist() == \
        [pytest.approx(2 / 3), pytest.approx(1 / 3)]


def test_normalised_lane_missing_scale_falls_back_to_the_observed_max():
    acts = np.array([[4.0, 0.0], [0.0, 2.0], [2.0, 1.0]])
    # B has no catalog scale (None, NaN, 0, negative): it falls back to its max in these acts (2)
    for missing in (None, float("nan"), 0.0, -3.0):
        assert normalised_lane(acts, [1.0, 1.0], scales=[4.0, missing]).tolist() == [1.0, 1.0, 1.0]
    # no scales at all (e.g. a non-default SAE without a catalog): every member by its own observed max
    assert normalised_lane(acts, [1.0, 1.0]).tolist() == [1.0, 1.0, 1.0]
    # an explicit fallback (the max over all runs shown) wins over the max in this one run
    assert normalised_lane(acts, [1.0, 1.0], scales=[4.0, None], fallback=[None, 4.0]).tolist() == [1.0, 0.5, 0.75]
    # a member never active anywhere contributes 0 (no division by zero)
    silent = np.array([[1.0, 0.0], [2.0, 0.0]])
    assert normalised_lane(silent, [1.0, 1.0]).tolist() == [0.5, 1.0]


def test_normalised_lane_is_nan_safe():
    acts = np.array([[float("nan"), 1.0], [10.0, float("inf")], [5.0, 0.5]])
    out = normalised_lane(acts, [1.0, 1.0], scales=[10.0, 1.0])
    assert np.isfinite(out).all()
    assert out.tolist() == [1.0, 1.0, 1.0]
    assert observed_scales(acts).tolist() == [10.0, 1.0]
    assert observed_scales(acts, mask=[True, False, True]).tolist() == [5.0, 1.0]
    with pytest.raises(BadInput):
        normalised_lane(acts, [1.0], scales=[1.0, 1.0])


def test_catalog_scales_read_each_latents_catalog_max():
    class Cat:
        max_act = np.array([0.0, 10.0, 1.0, float("nan")], dtype=np.float32)

    assert catalog_scales(Cat(), [1, 2, 0, 3, 99]) == [10.0, 1.0, None, None, None]
    assert catalog_scales(None, [1, 2]) == [None, None]


def test_group_heatmap_values_normalise_per_latent_across_runs():
    spec = GenerationSpec(prompt="Hi", watch=[5, 7], max_new_tokens=3)
    live = live_run.LiveRun(spec=spec, model="m", sae="s")
    for run in spec.runs:
        live.add(PromptReadout(run=run, rendered_prompt="<u>Hi", token_ids=[1, 2], tokens=["<u>", "Hi"],
                               acts=np.array([[900.0, 90.0], [0.0, 0.0]], dtype=np.float32), top=[[], []]))
    live.add(TokenEvent(run="steered", step=0, token_id=10, text="A", acts={5: 10.0, 7: 0.0}, top=[(5, 10.0)]))
    live.add(TokenEvent(run="steered", step=1, token_id=11, text="B", acts={5: 0.0, 7: 1.0}, top=[(7, 1.0)]))
    live.add(TokenEvent(run="default", step=0, token_id=12, text="C", acts={5: 0.0, 7: 2.0}, top=[(7, 2.0)]))
    rec = live.record("done")
    g = LatentGroup("g", [5, 7])

    class Cat:
        max_act = np.zeros(10, dtype=np.float32)

    Cat.max_act[5] = 20.0  # #5 has a catalog max; #7 does not (max 0): it takes its max over both runs (2)
    views, note = live_run.group_heatmap_values(rec.results, g, Cat())
    assert views["steered"][1] == [0.5, 0.5] and views["default"][1] == [1.0]
    assert "catalog max for #5" in note and "max in these runs for #7" in note
    raw, note = live_run.group_heatmap_values(rec.results, g, Cat(), normalise=False)
    assert raw["steered"][1] == [10.0, 1.0] and note == "raw weighted sum"
    # with the prompt shown, position 0 (the attention sink, 900 and 90) does not set the fallback scale
    views, note = live_run.group_heatmap_values(rec.results, g, None, include_prompt=True)
    assert views["steered"][1][1:] == [0.0, 1.0, 0.5] and note == "each latent ÷ its max in these runs"
    vals, note = live_run.normalised_member_series(np.array([[900.0, 90.0], [10.0, 0.0], [0.0, 2.0]]), g, Cat())
    assert vals[1:].tolist() == [0.5, 1.0]


def test_group_validation():
    with pytest.raises(BadInput):
        LatentGroup("", [1])
    with pytest.raises(BadInput):
        LatentGroup("g", [])
    with pytest.raises(BadInput):
        LatentGroup("g", [1, 2], [1.0])
    with pytest.raises(BadInput):
        LatentGroup("g", [1], [float("nan")])
    with pytest.raises(BadInput):
        LatentGroup("g", [10]).check(5)
    assert LatentGroup("g", [1], colour="red").colour == "#009E73"
    assert parse_members("12, 40:0.5 #7") == ([12, 40, 7], [1.0, 0.5, 1.0])
    with pytest.raises(BadInput):
        parse_members("12, x")


def test_group_json_and_url_round_trip(tmp_path):
    gs = [LatentGroup("off topic / détecteurs", [1, 2, 3], [1, 0.25, 2], "#aa0011", "d", extra={"auc": [1, 1, 1]}),
          LatentGroup("b~|x", [9])]
    back = groups_from_json(groups_to_json(gs))
    assert [g.to_dict() for g in back] == [g.to_dict() for g in gs]
    url = decode_groups(encode_groups(gs))
    assert [(g.name, g.members, g.weights, g.colour) for g in url] == [(g.name, g.members, g.weights, g.colour) for g in gs]
    (tmp_path / "circuit.json").write_text(json.dumps(gs[0].to_dict()))
    (tmp_path / "bad.json").write_text("{oops")
    groups, errors = load_builtin_groups(tmp_path)
    assert [g.name for g in groups] == [gs[0].name] and groups[0].builtin and len(errors) == 1
    with pytest.raises(BadInput):
        groups_from_json("[1, 2]")


# ---------------------------------------------------------------- URL state
def test_url_state_round_trip():
    vs = url_state.ViewState(prompt="How & why?", interventions=[Intervention(12, "add", 4.5, "norm", "all"),
                                                                   Intervention(7, "ablate", 0, "raw", "generated")],
                             watch=[1, 2], groups=[LatentGroup("g", [1, 2])], seed=3, temperature=0.6,
                             max_new_tokens=32, latent=9, query="cooking")
    params = url_state.to_params(vs)
    assert params["iv"] == "12:add:4.5:norm:all,7:ablate:0:raw:generated"
    back = url_state.from_params(params)
    assert back.prompt == vs.prompt and back.interventions == vs.interventions and back.watch == [1, 2]
    assert back.seed == 3 and back.temperature == 0.6 and back.max_new_tokens == 32 and back.latent == 9
    assert back.groups[0].members == [1, 2] and not back.errors


def test_url_state_ignores_mangled_pieces():
    back = url_state.from_params({"iv": "12:zap:4", "w": "1,x", "seed": "abc", "t": "nan", "p": "ok"})
    assert back.prompt == "ok" and back.interventions == [] and back.watch == [] and back.seed is None
    assert back.temperature is None and len(back.errors) == 3
    assert url_state.from_params({"iv": "5:add:inf"}).interventions == []


# ---------------------------------------------------------------- run records and live runs
def _live() -> live_run.LiveRun:
    spec = GenerationSpec(prompt="Hi", interventions=[Intervention(5, "add", 4.0)], watch=[5], max_new_tokens=3)
    live = live_run.LiveRun(spec=spec, model="m", sae="s", groups=[LatentGroup("g", [5])])
    for run in spec.runs:
        live.add(PromptReadout(run=run, rendered_prompt="<u>Hi", token_ids=[1, 2], tokens=["<u>", "Hi"],
                               acts=np.array([[0.0], [1.0]], dtype=np.float32), top=[[], [(5, 1.0)]]))
    live.add(TokenEvent(run="steered", step=0, token_id=10, text="A", acts={5: 2.0}, top=[(5, 2.0)]))
    live.add(TokenEvent(run="default", step=0, token_id=11, text="B", acts={5: 0.0}, top=[]))
    live.add(TokenEvent(run="steered", step=1, token_id=12, text="<b>", acts={5: 3.0}, top=[(5, 3.0)]))
    return live


def test_live_run_partial_record_keeps_tokens():
    live = _live()
    assert live.texts == {"steered": "A<b>", "default": "B"} and live.n_tokens == {"steered": 2, "default": 1}
    rec = live.record("stopped")
    assert rec.status == "stopped" and rec.results["steered"].text == "A<b>"
    assert rec.results["steered"].stop_reason == "cancelled"
    assert rec.results["steered"].acts[:, 0].tolist() == [2.0, 3.0]
    live.add(RunDone(run="default", text="B", token_ids=[11], stop_reason="eos"))
    assert live.record("done").results["default"].stop_reason == "eos"


def test_a_closed_live_run_ignores_late_tokens():
    """After Stop the old script run may still add a token while the next one files the record."""
    live = _live()
    rec = live.end("stopped")
    assert rec.status == "stopped" and len(rec.results["steered"].token_ids) == 2
    late = TokenEvent(run="steered", step=2, token_id=13, text="C", acts={5: 1.0}, top=[])
    assert live.add(late) is None
    assert live.n_tokens == {"steered": 2, "default": 1} and live.texts["steered"] == "A<b>"
    assert live.end("done") is None and live.status == "stopped"  # the first close wins
    assert len(live.record().results["steered"].token_ids) == 2


def test_run_record_json_round_trip_and_errors():
    rec = _live().record("done")
    back = RunRecord.from_json(rec.to_json())
    assert back.to_dict() == rec.to_dict()
    assert back.results["steered"].prompt.tokens == ["<u>", "Hi"]
    many = records_from_json(history_to_json([rec, back]))
    assert len(many) == 2
    for bad, msg in [("{oops", "not valid JSON"), ("[]", "not an ESR Lab run record"),
                     (json.dumps({"format": "esr-lab.run/1"}), "has no"), (b"\xff\xfe", "not UTF-8")]:
        with pytest.raises(BadInput, match=msg):
            records_from_json(bad)
    d = rec.to_dict()
    d["spec"]["interventions"] = [{"latent": "x"}]
    with pytest.raises(BadInput):
        RunRecord.from_dict(d)


def test_token_values_for_latent_group_and_prompt():
    rec = _live().record("done")
    r = rec.results["steered"]
    pieces, vals, special, tops = live_run.token_values(r, latent=5)
    assert pieces == ["A", "<b>"] and vals == [2.0, 3.0]
    pieces, vals, _, _ = live_run.token_values(r, group=LatentGroup("g", [5], [2.0]), include_prompt=True)
    assert pieces == ["<u>", "Hi", "A", "<b>"] and vals == [0.0, 2.0, 4.0, 6.0]
    _, vals, _, _ = live_run.token_values(r, latent=99)  # not watched: from the top-k lists
    assert vals == [0.0, 0.0]


# ---------------------------------------------------------------- form parsing
def test_form_parsing_errors_are_one_clear_line():
    assert forms.make_intervention("#12", "add", "4", "norm", "all", 100).latent == 12
    for args, msg in [(("12", "add", "1e9", "norm", "all"), "absurd"), (("12", "add", "nan", "norm", "all"), "finite"),
                      (("100", "add", "1", "norm", "all"), "out of range"), (("x", "add", "1", "norm", "all"), "latent id"),
                      (("1", "add", "", "norm", "all"), "not a number")]:
        with pytest.raises(BadInput, match=msg):
            forms.make_intervention(*args, d_sae=100)
    assert forms.make_intervention("3", "ablate", "junk", "raw", "generated", 100).strength == 0.0
    assert forms.parse_watch("1, 2 2;3", 10) == [1, 2, 3]
    spec = forms.build_spec("Hi", [Intervention(1, "add", 2.0)], [4], [LatentGroup("g", [6, 7])], 10,
                          ablate_groups=[LatentGroup("a", [8])], max_new_tokens=5)
    assert spec.watch == [4, 1, 6, 7, 8] and [iv.mode for iv in spec.interventions] == ["add", "ablate"]
    with pytest.raises(BadInput, match="prompt is empty"):
        forms.build_spec("  ", [], [], [], 10)


def test_search_by_ids_without_catalog():
    assert [r["latent"] for r in latent_view.search(None, "#12 40", d_sae=100)] == [12, 40]
    assert latent_view.search(None, "  ") == []
    with pytest.raises(BadInput, match="catalog"):
        latent_view.search(None, "cooking")
    with pytest.raises(BadInput, match="out of range"):
        latent_view.search(None, "500", d_sae=100)


def test_examples_file_is_valid():
    ex = session.load_examples()
    assert ex and all({"prompt", "latent"} <= set(e) and ("strength" in e or e.get("interventions")) for e in ex)
    for e in ex:
        if e.get("interventions"):  # written as the lab's interventions (a trial of an experiment)
            from esr_core.steering.interventions import Intervention

            assert [Intervention.from_dict(d).latent for d in e["interventions"]][0] == e["latent"]
            assert session.example_norm_strength(e, 170.63) == pytest.approx(0.455, abs=0.001)
        else:
            forms.make_intervention(e["latent"], e.get("mode", "add"), e["strength"], e.get("units", "norm"),
                                    e.get("positions", "all"), 8192)


def test_cli_generate_flags_become_interventions():
    import argparse

    from esr_core.cli import generate as cli_generate
    from esr_core.errors import BadInput

    ap = argparse.ArgumentParser()
    cli_generate.register(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["generate", "--prompt", "hi", "--steer", "5:2.5", "--steer-raw", "6:40", "--clamp", "7:3",
                          "--scale", "8:0.5", "--ablate", "9,10", "--positions", "generated"])
    spec = cli_generate.spec_from_args(args)
    got = [(i.latent, i.mode, i.strength, i.units, i.positions) for i in spec.interventions]
    assert got == [(5, "add", 2.5, "norm", "generated"), (6, "add", 40.0, "raw", "generated"),
                   (7, "clamp", 3.0, "raw", "generated"), (8, "scale", 0.5, "raw", "generated"),
                   (9, "ablate", 0.0, "raw", "generated"), (10, "ablate", 0.0, "raw", "generated")]
    with pytest.raises(BadInput):
        cli_generate.spec_from_args(ap.parse_args(["generate", "--prompt", "hi", "--steer", "five:2"]))


def test_timeline_labels_never_overlap_and_latents_avoid_role_colours():
    from esr_core.viz import palette
    from esr_core.viz.timeline import Marker, Region, Series, label_levels, timeline_figure

    assert label_levels([0, 1, 2, 30], min_gap=4) == [0, 1, 2, 0]
    assert label_levels([0, 0, 0, 0, 0], min_gap=4, max_rows=3) == [0, 1, 2, -1, -1]
    fig = timeline_figure([Series("#7", [0.0] * 40), Series("#9", [1.0] * 40)],
                          regions=[Region(0, 10, "attempt 1"), Region(10, 40, "attempt 2")],
                          markers=[Marker(11, "circuit crossing"), Marker(12, "restart")])
    notes = [a for a in fig.layout.annotations if a.text in ("attempt 1", "attempt 2", "circuit crossing", "restart")]
    assert len(notes) == 4
    spots = {(a.yshift, a.x) for a in notes}
    close = [a for a in notes if a.text in ("attempt 2", "circuit crossing", "restart")]
    assert len({a.yshift for a in close}) == 3 and len(spots) == 4  # three labels within 2 tokens: 3 rows
    assert fig.layout.margin.t >= 44 + 17 * 3  # room above the plot for the three rows, under the title
    lines = [t.line.color for t in fig.data]
    assert not {palette.CIRCUIT, palette.BACKTRACKING} & set(lines)
    legend = timeline_figure([Series("circuit", [1.0, 2.0], run="unsteered")]).data[0].name
    assert legend == "circuit (unsteered)" and "(steered)" not in legend
