"""Streamed text of a generation: the new piece of each token, and the final text of a run.

Byte-level tokens can end inside a multi-byte UTF-8 character; the decoder then ends in U+FFFD
until the next token completes it. Pieces hold such a character back, and the end of a run
flushes it, so the streamed pieces always join to exactly the run's final text.
"""

from __future__ import annotations

from esr_core.steering.spec import RunDone

MAX_HELD_TOKENS = 3  # a UTF-8 character has at most 4 bytes: at most 3 byte tokens wait for the last one


def new_piece(tokenizer, ids: list[int], emitted: str) -> str:
    """The new text of the last token of ``ids``, holding back at most an incomplete character.

    Only the last 3 tokens can still be waiting: older U+FFFD are final (bytes that never form
    a character) and are streamed.
    """
    for held in range(0, min(MAX_HELD_TOKENS, len(ids)) + 1):
        text = tokenizer.decode(ids[: len(ids) - held], skip_special_tokens=False)
        if not text.endswith("\ufffd") or held == min(MAX_HELD_TOKENS, len(ids)):
            break
    if not text.startswith(emitted):
        return ""  # the decoder revised earlier text: wait until it settles (the final text flushes it)
    return text[len(emitted):]


def run_done(tokenizer, run: str, ids: list[int], emitted: str, stop: str) -> RunDone:
    """The end of a run: its final text (the closing EOS left out) and the tail the pieces still lack."""
    body = ids[:-1] if stop == "eos" else ids
    final = tokenizer.decode(body, skip_special_tokens=False)
    tail = final[len(emitted):] if final.startswith(emitted) else ""
    return RunDone(run=run, text=emitted + tail if final.startswith(emitted) else final, token_ids=ids,
                   stop_reason=stop, tail=tail)
