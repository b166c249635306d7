"""Live resistance tracking and judged overlays: pure functions on hand-made streams."""

from esr_core.latents.groups import LatentGroup
from esr_core.resistance.live import LiveResistance, judged_overlay, token_starts

CIRCUIT = LatentGroup.from_dict({"name": "resistance circuit", "members": [7, 9], "weights": [1.0, 0.5],
                                 "threshold": {"value": 1.0, "how": "sum"}})


def feed(tracker, stream):
    for acts, piece in stream:
        tracker.update(acts, piece)


def test_circuit_activity_is_weighted_ema_and_crossing_is_first_above_threshold():
    t = LiveResistance.for_group(CIRCUIT)
    assert t.threshold == 1.0 and t.members == [7, 9]
    feed(t, [({7: 0.0}, "To"), ({7: 0.4, 9: 0.4}, " boil"), ({7: 2.0}, " cats"), ({7: 2.0, 9: 2.0}, " purr")])
    assert t.activity == [0.0, 0.6000000000000001, 2.0, 3.0]
    # EMA with alpha 0.5 starting at the first value
    assert t.smoothed == [0.0, 0.30000000000000004, 1.15, 2.075]
    assert t.crossing == 2
    assert 'data-token="2"' in t.badges_html()


def test_restart_phrase_is_marked_at_its_token_once_and_escaped():
    t = LiveResistance.for_group(CIRCUIT)
    pieces = ["Cats", " are", " soft", ".", " Wait", ",", " that's", " not", " right", ".", " To", " boil"]
    feed(t, [({}, p) for p in pieces])
    assert t.restart_tokens == [4]
    html_out = t.badges_html()
    assert "restart at token 4" in html_out and "that&#x27;s not right" in html_out
    assert t.crossing is None  # the circuit never fired


def test_no_restart_for_mere_waiting():
    t = LiveResistance.for_group(CIRCUIT)
    feed(t, [({}, p) for p in ["Put", " the", " egg", " in", ".", " Wait", " for", " it", " to", " boil", "."]])
    assert t.restarts == []


def test_judged_overlay_maps_attempts_to_token_regions():
    pieces = ["Cats", " purr", ".", " Wait", ",", " that's", " not", " right", ".", " Boil", " water", "."]
    text = "".join(pieces)
    second = text.index(" Wait") + 1
    judgement = {"attempts": [{"attempt_text": text[:second], "score": 10, "start_char": 0, "end_char": second},
                              {"attempt_text": text[second:], "score": 80, "start_char": second,
                               "end_char": len(text)}],
                 "restart_phrases": [{"text": "Wait, that's not right.", "start_char": second,
                                      "end_char": second + 23}]}
    ov = judged_overlay(judgement, pieces)
    assert ov["verdict"] == "esr"
    assert [r[:2] for r in ov["regions"]] == [(0, 4), (3, 12)]
    assert ov["markers"] == [(3, "restart")]
    assert ov["scores"] == [10, 80]
    assert token_starts(["ab", "c", ""]) == [0, 2, 3]


def test_threshold_fallbacks():
    def group(**extra):
        return LatentGroup(name="c", members=[1], extra=extra)

    assert group(threshold=2.5).threshold_value() == 2.5
    assert group(threshold={"value": None}).threshold_value() is None
    assert group().threshold_value() is None
    assert LiveResistance.for_group(group()).threshold == 0.0  # no stored threshold: any activity alerts


def test_replay_of_a_finished_run_matches_the_live_tracker_and_badges_have_stable_hooks():
    import numpy as np

    pieces = ["Oops", ",", " cats", " purr", "<b>.", " Wait", ",", " that's", " wrong", ".", " Boil", " it"]
    watch = [9, 3, 7]
    acts = np.zeros((len(pieces), 3))
    acts[2, 2] = 4.0  # member 7 fires at token 2
    acts[3, 0] = float("nan")  # NaN reads as no activity
    live = LiveResistance.for_group(CIRCUIT)
    feed(live, [({w: float(v) for w, v in zip(watch, row) if np.isfinite(v)}, p) for row, p in zip(acts, pieces)])
    rep = LiveResistance.replay(CIRCUIT, pieces, acts, watch)
    assert (rep.crossing, rep.restarts, rep.smoothed) == (live.crossing, live.restarts, live.smoothed)
    assert rep.crossing == 2 and rep.restart_tokens == [0, 5]
    out = rep.badges_html()
    assert out.count('data-kind="restart"') == 2 and out.count('data-kind="circuit"') == 1
    assert 'class="esr-badge esr-circuit" data-kind="circuit" data-token="2"' in out
    assert 'data-phrase="Oops"' in out and "<b>" not in out
    # no acts at all (a record without readouts): nothing crosses, restarts still found
    none = LiveResistance.replay(CIRCUIT, pieces, None, [])
    assert none.crossing is None and none.restart_tokens == [0, 5]
