"""Find explicit restart language ("wait, that's not right", "let me try again") in a response.

The ESR judge may only start a new attempt where the model says, in so many words, that
it is abandoning what it wrote (arXiv 2602.06941, judge rubric). Everything here is about
avoiding false splits: a phrase counts only at the start of a sentence (after an optional
interjection such as "Oh," or "Sorry,"), never inside code or quotes, and ambiguous words
("wait", "actually") count only in their restart sense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# interjections that may precede the core phrase ("Oh wait,", "Sorry, I got off track")
_PREFIX = (r"(?:(?:oh|ah|hmm+|um+|uh+|well|okay|ok|so|but|now|no|sorry|actually|anyway|anyways|"
           r"oops|whoops|hold\s+on|wait)\b[,!.…—–-]*\s+){0,3}")

_THAT = r"(?:that(?:'s|’s|\s+is|\s+was|\s+isn't|\s+isn’t|\s+wasn't|\s+wasn’t)|this(?:'s|’s|\s+is|\s+was|\s+isn't|\s+wasn't))"
_END = r"(?=\s*(?:[.,!;:?…—–)-]|\*|$))"  # the phrase must end the clause: "that's not right." not "... right for wool"

# (kind, core pattern); the first matching core at a sentence start wins
_CORES: list[tuple[str, str]] = [
    ("correction", _THAT + r"\s+(?:not\s+(?:right|correct|quite\s+right|what\s+(?:you|I)\s+\w+)|wrong|incorrect|"
                   r"a\s+mistake|off[- ]topic|irrelevant|not\s+relevant|not\s+related)" + _END),
    ("correction", _THAT + r"\s+(?:not|n't)\s+(?:related|relevant)\s+to\s+(?:the|your|my)\s+\w+"),
    ("correction", r"i\s+(?:made|have\s+made|'ve\s+made|’ve\s+made)\s+(?:a|an)\s+(?:mistake|error)"),
    ("correction", r"i\s+was\s+(?:wrong|mistaken|incorrect)"),
    ("correction", r"i\s+(?:misspoke|misread|misunderstood)"),
    ("correction", r"(?:my\s+mistake|my\s+bad|my\s+apologies|apologies|mistake\s+on\s+my\s+part)"),
    ("correction", r"sorry\s+(?:about\s+that|for\s+(?:the|that|my)\s+(?:confusion|mistake|error|tangent|digression))"),
    ("correction", r"scratch\s+that"),
    ("correction", r"(?:oops|whoops|oh\s+no)\b"),
    ("correction", r"no,?\s+wait\b"),
    ("correction", r"correction\s*:"),
    ("retry", r"(?:let\s+me|let's|let’s|let\s+us|i'll|i’ll|i\s+will|i\s+should|i\s+need\s+to)\s+"
              r"(?:try|start|begin|do)\s+(?:(?:this|that|it)\s+)?(?:again|over|from\s+(?:the\s+)?(?:scratch|beginning|top))\b"),
    ("retry", r"(?:let\s+me|let's|let’s|let\s+us|i'll|i’ll)\s+(?:restart|redo|rethink|reconsider|correct\s+(?:that|this|myself|my\s+\w+)|"
              r"fix\s+(?:that|this|my\s+\w+)|re-?answer|re-?do)\b"),
    ("retry", r"(?:starting|start)\s+(?:over|again)\b"),
    ("retry", r"(?:let's|let’s|let\s+me|let\s+us)\s+(?:take\s+a\s+step\s+back|go\s+back\s+to\s+(?:the|your|my)\s+(?:question|task|original|beginning))"),
    ("refocus", r"i(?:'ve|’ve|\s+have)?\s+(?:got|gotten|gone|went|drifted|wandered|strayed|veered|been\s+getting)\s+"
                r"(?:a\s+(?:bit|little)\s+)?(?:off[- ]?(?:track|topic|course)|sidetracked|distracted|carried\s+away|"
                r"away\s+from\s+(?:the|your)\s+(?:question|topic|task|point))"),
    ("refocus", r"i(?:'m|’m|\s+am)\s+(?:getting|going)\s+(?:a\s+(?:bit|little)\s+)?(?:off[- ]?(?:track|topic)|sidetracked|distracted)"),
    ("refocus", r"i\s+digress(?:ed)?\b"),
    ("refocus", r"(?:let\s+me|let's|let’s|let\s+us|i'll|i’ll|i\s+should|i\s+need\s+to)\s+"
                r"(?:refocus|focus\s+(?:back\s+)?on\s+(?:the|your)\s+(?:question|task|topic)|"
                r"get\s+back\s+(?:on\s+(?:track|topic)|to\s+(?:the|your|our)\s+(?:question|topic|task|point|original|main|actual)))"),
    ("refocus", r"(?:(?:getting|going|coming|returning|turning)\s+)?back\s+(?:on\s+(?:track|topic)|to\s+(?:the|your|our)\s+"
                r"(?:question|topic|task|point|original\s+question|actual\s+question|main\s+question|request))\b"),
    ("refocus", r"to\s+get\s+back\s+on\s+(?:track|topic)"),
    ("revise", r"(?:i'd|i’d|i\s+would|let\s+me|i\s+want\s+to|i\s+need\s+to|i\s+should)\s+(?:like\s+to\s+)?"
               r"(?:revise|correct|amend|rephrase)\s+(?:my|that|this|the)\s+(?:answer|response|reply|explanation|statement)"),
    ("revise", r"let\s+me\s+(?:revise|rephrase)\b"),
    ("revise", r"on\s+second\s+thought"),
    # a bare "wait" in its interrupting sense: "Wait," "Wait!" "Wait a minute," (never "Wait for ...")
    ("interjection", r"wait(?:\s+a\s+(?:minute|moment|second|sec))?\s*(?:[,!…—–]|\.\.\.|-\s)"),
    ("interjection", r"hold\s+on(?:\s+a\s+(?:minute|moment|second|sec))?\s*(?:[,!…—–]|\.\.\.)"),
]

_CORE_RES = [(kind, re.compile(_PREFIX + "(?:" + pat + ")", re.IGNORECASE)) for kind, pat in _CORES]

# things a sentence may open with before the words: markdown, quotes, brackets, bullets
_LEAD = re.compile(r"[\s*_#>\"“(\[]*")
_BOUNDARY = re.compile(r"(?:[.!?…]+[\"”’')\]*]*\s+|\n+|\s[—–]\s*|—|\s--\s|\.\.\.\s*|;\s+)")

_FENCE = re.compile(r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_DQUOTE = re.compile(r"\"[^\"\n]{0,200}\"|“[^”\n]{0,200}”|«[^»\n]{0,200}»")
# a single-quoted span opens after a non-word char and closes before one (so "that's" is no quote)
_SQUOTE = re.compile(r"(?<![\w'’])['‘][^'‘’\n]{1,120}?['’](?![\w'’])")


@dataclass(frozen=True)
class RestartPhrase:
    text: str
    start_char: int
    end_char: int
    kind: str

    def as_dict(self) -> dict:
        return {"text": self.text, "start_char": self.start_char, "end_char": self.end_char, "kind": self.kind}


def mask_literal_spans(text: str) -> str:
    """Same-length copy of ``text`` with code and quoted spans blanked, so they never split."""
    chars = list(text)

    def blank(m: re.Match) -> None:
        for i in range(m.start(), m.end()):
            if chars[i] != "\n":
                chars[i] = "x"

    for rx in (_FENCE, _INLINE_CODE, _DQUOTE, _SQUOTE):
        masked = "".join(chars)
        for m in rx.finditer(masked):
            blank(m)
    return "".join(chars)


def _sentence_starts(masked: str) -> list[int]:
    starts = {0}
    for m in _BOUNDARY.finditer(masked):
        starts.add(m.end())
    out = []
    for s in sorted(starts):
        lead = _LEAD.match(masked, s)
        pos = lead.end() if lead else s
        # a numbered/bulleted list marker ("3. ", "- ") opens a list item, not a restart
        if pos < len(masked):
            out.append(pos)
    return sorted(set(out))


def find_restart_phrases(text: str) -> list[RestartPhrase]:
    """All explicit restart phrases, in order, with char offsets into ``text``."""
    if not text:
        return []
    masked = mask_literal_spans(text)
    found: list[RestartPhrase] = []
    last_end = -1
    for pos in _sentence_starts(masked):
        if pos < last_end:
            continue
        for kind, rx in _CORE_RES:
            m = rx.match(masked, pos)
            if m:
                end = m.end()
                # drop trailing punctuation/space from the reported phrase
                while end > pos and text[end - 1] in " \t,—–-":
                    end -= 1
                found.append(RestartPhrase(text[pos:end], pos, end, kind))
                last_end = end
                break
    return found
