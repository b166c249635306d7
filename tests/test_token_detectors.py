"""Token-level detector search (#13): the statistics, the controls and the inputs, without a model.

The controls are tested on synthetic codes where the right answer is known: a latent that
fires on one token id whatever the topic, one that fires at the start of every segment, one
that fires on garbled text, and one that is genuinely active during off-topic spans.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse

from esr_core.errors import BadInput
from esr_core.resistance import token_detectors as td
from esr_core.resistance import token_inputs as ti
from esr_core.resistance import token_report as tr
from esr_core.resistance.signals import ema, rank_auc


def test_sparse_auc_equals_dense_rank_auc_with_ties_at_zero():
    rng = np.random.default_rng(0)
    X = rng.exponential(1.0, size=(300, 7)) * (rng.random((300, 7)) < 0.2)
    X[:, 3] = 0.0  # never fires: exactly 0.5
    pos, neg = np.arange(0, 120), np.arange(120, 300)
    got = td.sparse_auc(sparse.csc_matrix(X), pos, neg)
    want = rank_auc(X[pos], X[neg])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[3] == 0.5


def test_stratified_auc_sees_through_a_token_detector():
    """A latent firing on token 7 only looks off-topic when token 7 is commoner off-topic."""
    tokens = np.array([7] * 40 + [1] * 60 + [7] * 10 + [1] * 90)
    is_pos = np.array([True] * 100 + [False] * 100)
    x = (tokens == 7).astype(float)
    assert rank_auc(x[is_pos], x[~is_pos])[0] > 0.6
    assert td.stratified_auc(x, is_pos, tokens)[0] == pytest.approx(0.5)
    genuine = is_pos.astype(float)  # on every off-topic token whatever its id
    assert td.stratified_auc(genuine, is_pos, tokens)[0] == pytest.approx(1.0)


def _synthetic_codes(n_chats: int = 40, T: int = 30, seed: int = 0) -> td.TokenCodes:
    """Codes for on / recovery / drift / shuffle / repeat chats with four planted latents.

    0: off-topic detector (active on off-topic tokens), 1: fires on token id 5 (commoner in
    off-topic text), 2: fires at segment starts (commoner in off-topic text), 3: fires on
    off-topic *and* garbled text, 4: fires on the system prompt as much as on off-topic text.
    """
    rng = np.random.default_rng(seed)
    chats, rows_codes, cls, tok, seg, chat_ix, sys_rows = [], [], [], [], [], [], []
    kinds = ["on", "recovery", "drift", "shuffle", "repeat"]
    for r in range(n_chats):
        for kind in kinds:
            c = len(chats)
            chats.append(ti.Chat(r, kind, "p", "x", []))
            for t in range(T):
                lab = {"on": "on", "drift": "drift", "shuffle": "shuffle", "repeat": "repeat"}.get(kind)
                if kind == "recovery":
                    lab = "ctx" if t < 5 else "off" if t < 20 else "restart" if t < 22 else "after"
                off = lab in ("off", "drift")
                garbled = lab in ("shuffle", "repeat")
                token = 5 if rng.random() < (0.5 if off else 0.1) else int(rng.integers(10, 60))
                sp = 0 if rng.random() < (0.5 if off else 0.1) else int(rng.integers(1, 12))
                z = np.zeros(8)
                z[0] = rng.exponential(3.0) if off and rng.random() < 0.6 else 0.0
                z[1] = 4.0 if token == 5 else 0.0
                z[2] = 4.0 if sp == 0 else 0.0
                z[3] = rng.exponential(3.0) if (off or garbled) and rng.random() < 0.6 else 0.0
                z[4] = rng.exponential(3.0) if off and rng.random() < 0.6 else 0.0
                rows_codes.append(z)
                cls.append(ti.CLASSES.index(lab))
                tok.append(token)
                seg.append(sp)
                chat_ix.append(c)
            sys_rows += [np.array([0, 0, 0, 0, 9.0, 0, 0, 0])] * 3
    M = sparse.csc_matrix(np.array(rows_codes))
    S = sparse.csc_matrix(np.array(sys_rows))
    return td.TokenCodes(codes={"h": M}, sys_codes={"h": S}, chat=np.array(chat_ix), cls=np.array(cls),
                         token=np.array(tok), seg=np.array(seg), chats=chats)


def test_search_keeps_the_off_topic_detector_and_rejects_each_confound():
    codes = _synthetic_codes()
    params = td.TokenSearchParams(n_candidates=8, min_gain=0.0)
    res = td.search_layer(codes, "h", set(range(28)), params)
    why = {c["latent"]: c["rejected_by"] for c in res["candidates"]}
    assert why[0] == []
    assert "explained by the token" in why[1]
    assert "explained by the segment position" in why[2]
    assert "fires on garbled text" in why[3]
    assert "fires on the system prompt" in why[4]
    assert res["members"] == [0]
    held = np.isin(np.array([codes.chats[c].row for c in codes.chat]), list(range(28, 40)))
    ev = td.evaluate_group(codes, "h", res["members"], held, res["threshold"])
    assert ev["token_auc_off_topic"] > 0.8
    assert ev["token_auc_garbled"] == pytest.approx(0.5)
    assert ev["crossing_rate_unsteered"] == 0.0 and ev["crossing_rate_steered_drift"] > 0.9
    assert ev["ratio_off_topic"] is None  # silent on on-topic text: no ratio rather than a division by zero
    garb = td.evaluate_group(codes, "h", [3], held, 1.0)
    assert garb["token_auc_garbled"] > 0.8 and garb["crossing_rate_shuffled"] > 0.9


def test_ema_by_chat_restarts_at_every_chat():
    x = np.array([1.0, 3, 5, 2, 8, 8, 1])
    chat = np.array([0, 0, 0, 1, 1, 2, 2])
    got = td.ema_by_chat(x, chat, 0.5)
    want = np.concatenate([ema(x[:3], 0.5), ema(x[3:5], 0.5), ema(x[5:], 0.5)])
    np.testing.assert_allclose(got, want)
    peaks = td.chat_peaks(x, chat, 0.5)
    assert peaks == {0: pytest.approx(want[:3].max()), 1: pytest.approx(want[3:5].max()), 2: pytest.approx(8.0)}


def test_chats_label_every_span_and_garbling_keeps_the_words():
    rows = [{"id": f"p{i}", "prompt": f"How do I do task {i}?",
             "answer": f"First step {i} is easy. Then do step two of task {i}. Finally finish it."} for i in range(6)]
    rows[0]["drift"] = "Penguins live in the Antarctic and eat fish."
    chats = ti.make_chats(rows)
    kinds = [c.kind for c in chats]
    assert kinds.count("on") == 6 and kinds.count("recovery") == 6 and kinds.count("drift") == 1
    rec = next(c for c in chats if c.kind == "recovery")
    labels = [lab for _, _, lab in rec.spans]
    assert labels == ["ctx", "off", "restart", "after"]
    off = next(rec.response[a:b] for a, b, lab in rec.spans if lab == "off")
    assert "task 0" not in off and "task" in off  # another prompt's answer
    restart = next(rec.response[a:b] for a, b, lab in rec.spans if lab == "restart")
    assert restart in ti.RESTARTS
    words = rows[1]["answer"].split()
    assert sorted(ti.garble(rows[1]["answer"], "shuffle", 3).split()) == sorted(words)
    rep = ti.garble(rows[1]["answer"], "repeat", 3).split()
    assert len(rep) == len(words) and rep[:6] == words[:6] and rep[6:12] == words[:6]


def test_split_is_by_prompt_and_stable_under_reordering():
    rows = [{"id": f"p{i}", "prompt": "q", "answer": "a"} for i in range(60)]
    s, h = ti.split_prompts(rows, 0.3, 0)
    assert not set(s) & set(h) and len(s) + len(h) == 60 and 8 < len(h) < 30
    s2, h2 = ti.split_prompts(list(reversed(rows)), 0.3, 0)
    assert {rows[i]["id"] for i in h} == {list(reversed(rows))[i]["id"] for i in h2}


def test_inputs_file_errors_are_clear(tmp_path):
    with pytest.raises(BadInput, match="do not exist"):
        ti.load_detector_inputs(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "q"}\n', encoding="utf-8")
    with pytest.raises(BadInput, match="'id', 'prompt' and 'answer'"):
        ti.load_detector_inputs(bad)
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": "a", "prompt": "q", "answer": "x"}\n{"id": ', encoding="utf-8")
    with pytest.raises(BadInput, match="line 2 is not JSON"):
        ti.load_detector_inputs(torn)
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"id": "a", "prompt": "q", "answer": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(BadInput, match="at least 6"):
        ti.load_detector_inputs(few)


def test_shipped_inputs_hold_no_evaluation_prompt():
    """The search reads training-split prompts only: the 50 evaluation prompts stay held out."""
    rows = ti.load_detector_inputs()
    shipped = json.loads((ti.ASSETS_DIR / "prompts" / "howto_prompts.json").read_text())
    eval_prompts = {p["prompt"] for p in (shipped["prompts"] if isinstance(shipped, dict) else shipped)}
    assert len(rows) >= 300 and not eval_prompts & {r["prompt"] for r in rows}
    assert sum(1 for r in rows if r.get("drift")) >= 100


def test_evidence_rows_put_the_new_circuit_next_to_the_old():
    extra = {"evidence": {"heldout": {"token_auc_off_topic": 0.8, "crossing_rate_unsteered": 0.03},
                          "baseline": {"name": "today's circuit",
                                       "heldout": {"token_auc_off_topic": 0.7, "crossing_rate_unsteered": 0.2}}}}
    rows = tr.evidence_rows(extra)
    assert [r["this circuit"] for r in rows] == [0.8, 0.03]
    assert [r["today's circuit"] for r in rows] == [0.7, 0.2]
    assert rows[1]["a detector should show"] == "<= 5 %"


def _with_steering_control(codes: td.TokenCodes, seed: int = 1) -> td.TokenCodes:
    """Add a steer_only chat per row (the on-topic answer read with the drift's steering on) and a
    planted latent 5 that answers to the steering vector: active on drift and steer_only tokens alike."""
    rng = np.random.default_rng(seed)
    M = codes.codes["h"].toarray()
    M[:, 5] = 0.0
    steered = np.isin(codes.cls, [ti.CLASSES.index("drift")])
    M[steered, 5] = rng.exponential(3.0, steered.sum())
    rows = sorted({c.row for c in codes.chats})
    T = 30
    extra, cls, tok, seg, chat_ix, chats = [], [], [], [], [], list(codes.chats)
    for r in rows:
        c = len(chats)
        chats.append(ti.Chat(r, "steer_only", "p", "x", [], steer=(9, 1.0)))
        for _ in range(T):
            z = np.zeros(M.shape[1])
            z[5] = rng.exponential(3.0)
            extra.append(z)
            cls.append(ti.CLASSES.index("steer_only"))
            tok.append(int(rng.integers(10, 60)))
            seg.append(int(rng.integers(0, 12)))
            chat_ix.append(c)
    return td.TokenCodes(codes={"h": sparse.csc_matrix(np.vstack([M, np.array(extra)]))}, sys_codes=codes.sys_codes,
                         chat=np.concatenate([codes.chat, chat_ix]), cls=np.concatenate([codes.cls, cls]),
                         token=np.concatenate([codes.token, tok]), seg=np.concatenate([codes.seg, seg]), chats=chats)


def test_a_latent_that_answers_to_the_steering_alone_is_rejected():
    codes = _with_steering_control(_synthetic_codes())
    res = td.search_layer(codes, "h", set(range(28)), td.TokenSearchParams(n_candidates=8, min_gain=0.0))
    cand = {c["latent"]: c for c in res["candidates"]}
    assert "fires on the steering alone" in cand[5]["rejected_by"], cand[5]
    assert cand[5]["steering_auc"] > 0.9
    assert cand[0]["rejected_by"] == [] and cand[0]["steering_auc"] == pytest.approx(0.5)
    assert res["members"] == [0]
    held = np.isin(np.array([codes.chats[c].row for c in codes.chat]), list(range(28, 40)))
    assert td.evaluate_group(codes, "h", [0], held, res["threshold"])["crossing_rate_steering_only"] == 0.0
    assert td.evaluate_group(codes, "h", [5], held, 1.0)["crossing_rate_steering_only"] > 0.9
    without = td.search_layer(_synthetic_codes(), "h", set(range(28)), td.TokenSearchParams(n_candidates=8))
    assert all(c["steering_auc"] is None for c in without["candidates"])  # no live inputs, no such control


def test_live_drifts_are_read_with_their_steering_and_bring_the_steering_control():
    rows = [{"id": f"p{i}", "prompt": f"How do I do task {i}?",
             "answer": f"First step {i} is easy. Then do step two of task {i}. Finally finish it."} for i in range(6)]
    rows[0].update(drift="Penguins live in the Antarctic.", drift_latent=12, drift_boost=40.5)
    rows[1].update(drift="Old unsteered drift text.", drift_latent=3)  # no boost recorded: read unsteered
    chats = ti.make_chats(rows)
    live = [c for c in chats if c.row == 0 and c.kind in ("drift", "steer_only")]
    assert [(c.kind, c.steer) for c in live] == [("drift", (12, 40.5)), ("steer_only", (12, 40.5))]
    assert next(c for c in chats if c.kind == "steer_only").response == rows[0]["answer"]
    assert next(c for c in chats if c.row == 1 and c.kind == "drift").steer is None
    assert not [c for c in chats if c.row == 1 and c.kind == "steer_only"]
    with pytest.raises(BadInput, match="name the steering SAE"):
        td.steering_vectors(chats, None)


def test_a_live_report_adds_its_own_column_beside_the_existing_evidence():
    group = {"members": [7], "stats": {"7": {"auc": 0.9}}, "sae": {"hook": "h"}, "description": "A circuit.",
             "evidence": {"heldout": {"token_auc_off_topic": 0.8, "crossing_rate_unsteered": 0.14},
                          "baseline": {"name": "controlled", "heldout": {"token_auc_off_topic": 0.7}}}}
    live_h = {"token_auc_off_topic": 0.85, "crossing_rate_unsteered": 0.14, "crossing_rate_steered_drift": 0.83,
              "crossing_rate_steering_only": 0.13}
    report = {"drifts_read": "with their steering on", "distractors_held_out": True, "command": "esr-lab ...",
              "layers": [{"hook": "h", "members": [3, 4], "heldout": {"token_auc_off_topic": 0.7},
                          "candidates": [{"latent": 7, "steering_auc": 0.52}],
                          "baseline": {"name": "today's", "members": [7], "heldout": live_h}}]}
    out = tr.annotate_group(group, report, "r.json")
    assert out["evidence"]["heldout"] == group["evidence"]["heldout"]  # kept, not replaced
    assert out["evidence"]["live"]["heldout"] == live_h and out["evidence"]["live"]["controlled"]["members"] == [3, 4]
    assert out["stats"]["7"] == {"auc": 0.9, "steering_auc": 0.52}
    assert "83% of held-out steered drifts" in out["description"] and "13% of on-topic answers" in out["description"]
    rows = {r["measure (held-out prompts)"]: r for r in tr.evidence_rows(out)}
    steer = rows["on-topic answers read with the drift's steering on that cross (control)"]
    assert steer["this circuit"] is None and steer["this circuit, drifts read live"] == 0.13
    assert rows["unsteered answers that cross the alert threshold"]["this circuit, drifts read live"] == 0.14
    assert tr.annotate_group(out, report, "r.json")["description"].count("Read live") == 1  # idempotent


def test_the_separation_line_says_both_counts_and_the_command():
    sep = {"run": "assets/experiments/reference", "steered_off_topic": {"crossed": 3, "n": 12},
           "unsteered": {"crossed": 0, "n": 12}, "command": "esr-lab detectors separation --record"}
    line = tr.separation_line(sep)
    assert "**3 of 12** steered" in line and "**0 of 12** unsteered" in line and "--record" in line


def _report(sha="abc", hook="blocks.24.hook_resid_post", read="with their steering on", held=("p1", "p2")):
    row = {"hook": hook, "group": "searched", "size": 2, "members": [3, 4], "token_auc": 0.67,
           "unsteered_crossing": 0.098, "threshold": 35.0}
    return {"inputs_sha1": sha, "drifts_read": read, "n_heldout": len(held), "heldout_ids": list(held),
            "layers": [{"hook": hook, "sae": {"source": "/cache/sae/L24", "d_sae": 4096}}], "layer_table": [row]}


def test_a_layer_searched_later_on_the_same_inputs_joins_the_table_and_other_inputs_are_refused():
    base = _report(hook="blocks.15.hook_resid_post")
    live_group = {"members": [1229], "evidence": {"heldout": {}, "live": {
        "report": "base.json",
        "layers": [{"hook": "blocks.15.hook_resid_post", "group": "searched", "token_auc": 0.7}]}}}
    out = tr.add_layer_rows(live_group, _report(), "l24.json", base)
    rows = out["evidence"]["live"]["layers"]
    assert [r["hook"] for r in rows] == ["blocks.15.hook_resid_post", "blocks.24.hook_resid_post"]
    assert rows[1]["report"] == "l24.json" and rows[1]["sae"] == "/cache/sae/L24" and rows[1]["d_sae"] == 4096
    assert "members" not in rows[1] and rows[1]["token_auc"] == 0.67
    kept = live_group["evidence"]["live"]["layers"]  # the group passed in is not changed
    assert kept[0]["token_auc"] == 0.7 and len(kept) == 1
    again = tr.add_layer_rows(out, _report(), "l24.json", base)  # adding it twice changes nothing
    assert again["evidence"]["live"]["layers"] == rows
    # a group made by the search keeps its own table and records its inputs itself
    searched = {"members": [7], "summary": {"inputs_sha1": "abc", "drifts_read": "with their steering on",
                                            "n_heldout": 2}, "layers": []}
    rows = tr.add_layer_rows(searched, _report(), "l24.json")["layers"]
    assert [r["hook"] for r in rows] == ["blocks.24.hook_resid_post"]
    for bad, why in ((_report(sha="zzz"), "other inputs"), (_report(read="unsteered"), "another way"),
                     (_report(held=("p1", "p9")), "other prompts")):
        with pytest.raises(BadInput, match=why):
            tr.add_layer_rows(live_group, bad, "x.json", base)
    with pytest.raises(BadInput, match="needed to compare"):
        tr.add_layer_rows(live_group, _report(), "l24.json", None)
