"""Offline, human-readable labels for SAE latents, made from the catalog's own evidence.

Why offline: the usual route (an LLM writes an explanation from top examples) needs a
large model or an API; here the only local models are the small LM and a sentence
embedder. A label is "topic: tok1, tok2, tok3":
- tokens: the latent's most characteristic activating tokens (activation mass x idf
  against corpus frequency, computed in :mod:`esr_core.latents.catalog`);
- topic: the best match, by embedding similarity (all-MiniLM-L6-v2), between an
  evidence string (those tokens, the promoted tokens that are words, and the text just
  before the peak of the top contexts) and a fixed list of topic names below; character
  classes decide format topics (punctuation, numbers, chat markup) directly, since an
  embedder is poor at those;
- confidence: the topic similarity; weak matches are labelled "maybe topic: ..." or
  token-only, and end with "(low confidence)". Each topic has a kind (concrete,
  abstract, format, language) that distractor selection can use.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata

import numpy as np

from esr_core.io import atomic_write_bytes
from esr_core.jobs import Progress, check_cancel, report_fraction
from esr_core.latents.topics import topics
from esr_core.models.embeddings import embed
from esr_core.paths import cache_subdir

log = logging.getLogger(__name__)

HIGH_CONF = 0.38  # cosine above which the topic is stated plainly
MID_CONF = 0.26  # below this only tokens are shown
DENSE = 0.20  # latents active on more than this fraction of tokens are rarely topical
LOW_MARK = " (low confidence)"

_SPECIAL = re.compile(r"^<\|?[^<>]{1,30}\|?>$")


def display_token(tok: str) -> str:
    """A readable, still-raw form of a token for labels (whitespace made visible)."""
    if tok == "":
        return "''"
    if tok.strip() == "":
        return tok.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")
    s = tok.strip()
    if any(c.isalnum() for c in s):
        return s
    return f"'{s}'"


def _char_class(tok: str) -> str:
    s = tok.strip()
    if not s:
        return "space"
    if _SPECIAL.match(s):
        return "special"
    if all(c.isdigit() or c in ".,%" for c in s) and any(c.isdigit() for c in s):
        return "digit"
    if all(unicodedata.category(c)[0] in "PS" for c in s):
        return "punct"
    if any(c.isalpha() for c in s):
        return "word"
    return "other"


def _words(tokens: list[str], n: int) -> list[str]:
    seen, out = set(), []
    for t in tokens:
        d = display_token(t)
        key = d.lower()
        if key in seen:
            continue
        seen.add(key)
        out.append(d)
        if len(out) >= n:
            break
    return out


def _format_topic(tokens: list[str]) -> tuple[str, str] | None:
    """Topics an embedder cannot see: decided from the character classes of the top tokens."""
    top = tokens[:5]
    if not top:
        return None
    classes = [_char_class(t) for t in top]
    n = len(classes)
    if classes.count("special") >= max(1, n // 2):
        return "chat markup", "format"
    if classes.count("digit") >= (n + 1) // 2 + (n > 2):
        return "numbers and digits", "format"
    if classes.count("space") >= (n + 1) // 2:
        return "line breaks and layout", "format"
    if classes.count("punct") + classes.count("space") >= max(3, (n * 3 + 3) // 4):
        return "punctuation", "format"
    if sum(t.strip().lower() in STOPWORDS for t in top) >= max(3, n - 1):
        return "function words", "language"
    return None


def _clean(text: str) -> str:
    return re.sub(r"<\|[^<>|]{1,30}\|>", " ", text).replace("\n", " ").strip()


STOPWORDS = set("""a an the and or but if of to in on at by for with from as is are was were be been being
it its this that these those he she they we you i me him her them us my your his their our not no so
do does did have has had will would can could should may might than then there here which who whom what
when where why how all any some such into over under about after before up down out off again just
also very s 's t""".split())


def _is_fragment(tok: str) -> bool:
    """A word piece that continues a word (no leading space, starts lowercase)."""
    return bool(tok) and tok[0].isalpha() and tok[0].islower() and len(tok.strip()) <= 6


def _vector_cache_path():
    return cache_subdir("labels") / "string_vectors.npz"


def embed_cached(strings: list[str], batch: int = 256, progress: Progress | None = None, cancel=None) -> np.ndarray:
    """Embeddings of short strings, remembered across builds in the user cache."""
    path = _vector_cache_path()
    known: dict[str, np.ndarray] = {}
    if path.exists():
        try:
            z = np.load(path, allow_pickle=False)
            known = dict(zip(z["strings"].tolist(), z["vecs"]))
        except (OSError, ValueError, KeyError):
            known = {}
    todo = [x for x in dict.fromkeys(strings) if x not in known]
    for a in range(0, len(todo), batch):
        check_cancel(cancel, "Labelling")
        chunk = todo[a : a + batch]
        for x, v in zip(chunk, embed(chunk, batch_size=batch)):
            known[x] = v.astype(np.float16)
        report_fraction(progress, "labels", (a + batch) / max(1, len(todo)),
                        f"embedded {min(a + batch, len(todo))}/{len(todo)} evidence strings")
    if todo:
        keys = list(known)
        buf = io.BytesIO()
        np.savez(buf, strings=np.array(keys), vecs=np.stack([known[k] for k in keys]).astype(np.float16))
        atomic_write_bytes(path, buf.getvalue())
    if not strings:
        return np.zeros((0, 384), np.float32)
    return np.stack([known[x] for x in strings]).astype(np.float32)


def _token_key(tok: str) -> str | None:
    """The string embedded for a token: stripped text; None for markup and empty pieces."""
    s = _clean(tok)
    return s or None


def describe_latent(words: list[str], topic: str, kind: str, conf: float, density: float) -> tuple[str, bool]:
    """The label string and whether it is low-confidence."""
    toks = ", ".join(words[:3]) if words else "(no clear tokens)"
    low = conf < HIGH_CONF or not words or density > DENSE
    if density > DENSE:
        base = f"frequent ({density:.0%} of tokens): {toks}"
    elif conf >= MID_CONF and topic:
        base = f"{topic}: {toks}" if not low else f"maybe {topic}: {toks}"
    else:
        base = toks
    return base + (LOW_MARK if low else ""), low


def describe_catalog(cat, progress: Progress | None = None, cancel=None,
                     batch: int = 256, snippets: bool | None = None) -> tuple[dict, np.ndarray]:
    """Label every latent of a :class:`~esr_core.latents.catalog.store.Catalog`.

    Returns (label columns, search vectors [d_sae, 384]). Why token averages: embedding
    one evidence sentence per latent costs minutes per thousand latents on a busy CPU,
    while the distinct top tokens of a whole SAE are a few thousand short strings; a
    latent's evidence vector is the score-weighted mean of its top tokens' embeddings
    (+ its promoted words, + the text before its peak for SAEs of <= 4096 latents).
    The search vector of a label is the mean of its topic's and its shown tokens' vectors.
    """
    d = cat.d_sae
    if snippets is None:
        snippets = d <= 4096
    tl = topics()
    temb = embed([f"{t['name']}: {t['hints']}" for t in tl])
    topic_row = {t["name"]: j for j, t in enumerate(tl)}
    live = [i for i in range(d) if not cat.dead[i]]
    tt_ids = cat.array("top_tok_ids")
    tt_sc = cat.array("top_tok_scores").astype(np.float32)
    pr_ids = cat.array("promo_ids")
    # distinct strings to embed
    key_of: dict[int, str | None] = {}
    promo_of: dict[int, list[str]] = {}
    strings: dict[str, int] = {}
    for i in live:
        for t in tt_ids[i][:8]:
            if t >= 0 and int(t) not in key_of:
                key_of[int(t)] = _token_key(cat.token_str(t))
        pw = []
        for t in pr_ids[i]:
            raw = cat.token_str(t)
            w = raw.strip()
            if raw[:1] == " " and w.isalpha() and len(w) >= 3:
                pw.append(w)
        promo_of[i] = pw[:5]
    for k in list(key_of.values()) + [w for v in promo_of.values() for w in v]:
        if k and k not in strings:
            strings[k] = len(strings)
    # latents whose top tokens are word pieces: label with the whole words at their peaks
    words_of: dict[int, list[str]] = {}
    for i in live:
        acts = [cat.token_str(t) for t in tt_ids[i][:5] if t >= 0]
        pw = [w for w, _ in cat.peak_words(i, "text")][:6]
        inside = sum(any(a.strip() and a.strip() != w and a.strip() in w for w in pw) for a in acts[:3])
        if acts and pw and (inside >= 2 or sum(_is_fragment(t) for t in acts) >= max(2, (len(acts) + 1) // 2)):
            if pw:
                words_of[i] = pw
                for w in pw[:3]:
                    if w not in strings:
                        strings[w] = len(strings)
    snip = {}
    if snippets:
        for i in live:
            ss = [_clean(x) for x in cat.snippets(i, "text", 2)]
            ss = [x for x in ss if x]
            if ss:
                snip[i] = " | ".join(ss)
    todo = list(strings) + list(snip.values())
    vecs = embed_cached(todo, batch=batch, cancel=cancel,
                        progress=lambda s: report_fraction(progress, "labels", 0.9 * s.fraction, s.message))
    svec = {i: vecs[len(strings) + j] for j, i in enumerate(snip)}
    cols = {"description": [""] * d, "topic": [""] * d, "topic_kind": [""] * d,
            "confidence": [0.0] * d, "low_confidence": [True] * d}
    search = np.zeros((d, temb.shape[1]), np.float32)
    n_tok = int(cat.meta.get("n_tokens", 0))
    for i in range(d):
        if cat.dead[i]:
            cols["description"][i] = f"dead: never active on the {n_tok:,} evaluated tokens"
            cols["topic_kind"][i] = "dead"
    for n_done, i in enumerate(live):
        acts = [cat.token_str(t) for t in tt_ids[i] if t >= 0]
        ev = np.zeros(temb.shape[1], np.float32)
        for t, w in zip(tt_ids[i][:8], tt_sc[i][:8]):
            k = key_of.get(int(t)) if t >= 0 else None
            if k:
                ev += float(w) * vecs[strings[k]]
        nrm = np.linalg.norm(ev)
        ev = ev / nrm if nrm > 0 else ev
        if i in words_of:
            wv = np.mean([vecs[strings[w]] for w in words_of[i][:3]], axis=0)
            ev = ev + wv / max(np.linalg.norm(wv), 1e-8)
        if promo_of[i]:
            pv = np.mean([vecs[strings[w]] for w in promo_of[i]], axis=0)
            ev = ev + 0.5 * pv / max(np.linalg.norm(pv), 1e-8)
        if i in svec:
            ev = ev + svec[i]
        ev = ev / max(np.linalg.norm(ev), 1e-8)
        sims = temb @ ev
        j = int(np.argmax(sims))
        conf = float(sims[j])
        topic, kind = tl[j]["name"], tl[j]["kind"]
        fmt = _format_topic(acts)
        if fmt is not None:
            topic, kind = fmt
            conf = max(conf, HIGH_CONF)
        words = words_of[i][:3] if i in words_of else _words(acts, 3)
        desc, low = describe_latent(words, topic, kind, conf, float(cat.density[i]))
        cols["description"][i] = desc
        cols["topic"][i] = topic
        cols["topic_kind"][i] = kind
        cols["confidence"][i] = round(conf, 3)
        cols["low_confidence"][i] = low
        sv = np.zeros(temb.shape[1], np.float32)
        shown = [strings[w] for w in words_of[i][:3]] if i in words_of else \
            [strings[key_of[int(t)]] for t in tt_ids[i][:3] if t >= 0 and key_of.get(int(t))]
        for j in shown:
            sv += vecs[j]
        sv = sv / max(np.linalg.norm(sv), 1e-8)
        if conf >= MID_CONF and topic in topic_row:
            sv = sv + temb[topic_row[topic]]
        search[i] = sv / max(np.linalg.norm(sv), 1e-8)
        if n_done % 2000 == 0:
            report_fraction(progress, "labels", 0.9 + 0.1 * n_done / max(1, len(live)),
                            f"labelled {n_done}/{len(live)} latents")
    report_fraction(progress, "labels", 1.0, f"labelled {len(live)} live latents")
    return cols, search
