"""Sentences that notice a drift and turn back to the task.

They cover the paper's phrase types (ESR_METHOD.md sec. 10: almost all of theirs begin "Wait,
that's not quite right"; we want variety so the tuned model does not learn one string). Every
sentence must be a restart for the offline judge, or a recovery would not be counted: the
tests check each one with :func:`esr_core.judge.restart_phrases.find_restart_phrases`.
"""

from __future__ import annotations

import random

NOTICING: tuple[str, ...] = (
    "Wait, that's not quite right.",
    "Actually, I got off track.",
    "Let me start over.",
    "Back to your question.",
    "Hold on, that's not related to your question.",
    "Sorry, I got sidetracked.",
    "Oops, that was off-topic.",
    "Let me get back to your question.",
    "Wait, I drifted away from the question.",
    "Scratch that.",
    "I digress.",
    "On second thought, let me revise my answer.",
    "That's not what you asked.",
    "My mistake, let me try again.",
    "Hmm, I'm getting off track.",
    "Let me refocus on your question.",
)


def pick(rng: random.Random) -> str:
    return rng.choice(NOTICING)
