"""Streamed pieces always join to the final text, even when byte tokens never form a character.

Issue #11, 21a: steering SmolLM2 hard (latent 5 at 8x the median norm) makes it emit byte-level
tokens that never complete a UTF-8 character; the engine used to hold them back for ever, so
the pieces (and the judge's character offsets on them) no longer matched the final text.
"""

from __future__ import annotations

import json

from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec, RunDone, TokenEvent, collect

TEA = GenerationSpec(prompt="Explain how to make a cup of tea.", seed=1, temperature=0.0, max_new_tokens=16,
                     interventions=[Intervention(latent=5, mode="add", strength=8.0, units="norm")], top_k=0)


def test_pieces_join_to_the_final_text_with_broken_utf8(engine):
    events = list(engine.stream(TEA))
    for run in TEA.runs:
        pieces = [e.text for e in events if isinstance(e, TokenEvent) and e.run == run]
        done = next(e for e in events if isinstance(e, RunDone) and e.run == run)
        assert "".join(pieces) + done.tail == done.text, run
        assert len(done.tail) <= 3 * 4  # at most the last three byte tokens are ever held back
    steered = next(e for e in events if isinstance(e, RunDone) and e.run == "steered")
    assert steered.text.count("\ufffd") >= 4, "this spec no longer produces broken UTF-8: pick another"
    # streamed as they come: all but the last three tokens' replacement characters are already out
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent) and e.run == "steered")
    assert streamed.count("\ufffd") >= steered.text.count("\ufffd") - 3
    res = collect(events, TEA)
    for run in TEA.runs:  # collected results: one piece per token, joined = the text
        assert "".join(res[run].pieces) == res[run].text and len(res[run].pieces) == len(res[run].token_ids)


def test_judge_offsets_land_on_the_right_tokens_after_broken_utf8(engine):
    """Attempt char offsets (into the text) map onto the token pieces of the same run."""
    from esr_core.resistance.live import judged_overlay, token_starts

    res = engine.generate(TEA)["steered"]
    starts = token_starts(res.pieces)
    assert starts[-1] + len(res.pieces[-1]) == len(res.text)
    judgement = {"attempts": [{"start_char": 0, "end_char": len(res.text), "score": 10.0}]}
    ov = judged_overlay(judgement, res.pieces)
    first = next(i for i, p in enumerate(res.pieces) if p)  # char 0 is in the first token with text
    assert ov["regions"][0][:2] == (first, len(res.pieces))
    # a mid-text character lands on the token whose piece holds it
    k = len(res.text) // 2
    tok = ov["regions"][0][0]
    judgement = {"attempts": [{"start_char": k, "end_char": len(res.text), "score": 10.0}]}
    tok = judged_overlay(judgement, res.pieces)["regions"][0][0]
    assert starts[tok] <= k < starts[tok] + len(res.pieces[tok])


def test_cli_json_stream_joins_with_its_tail(capsys):
    from esr_core.cli import main

    assert main(["generate", "--prompt", TEA.prompt, "--steer", "5:8", "--max-new-tokens", "16", "--seed", "1",
                 "--temperature", "0", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for run in ("steered", "default"):
        pieces = "".join(x["text"] for x in lines if x.get("run") == run and "step" in x)
        done = next(x for x in lines if x.get("run") == run and x.get("done"))
        assert pieces + done["tail"] == done["text"]
