"""Latent search (semantic + lexical), "which latents fire on this text", and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_catalog import _shipped, built_catalog

from esr_core.errors import BadInput
from esr_core.latents.search import latents_firing_on, search_latents


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return built_catalog(tmp_path_factory)


def _a_described_word(cat) -> tuple[str, set[int]]:
    """A topic word taken from an actual (confident) description, and the latents that use it."""
    descs = cat.descriptions()
    for i in np.argsort(-cat.density):
        d = descs[int(i)]
        if cat.dead[i] or "low confidence" in d or ":" not in d:
            continue
        word = max(re.findall(r"[a-z]{4,}", d.split(":")[0].lower()) or [""], key=len)
        if word:
            return word, {j for j, x in enumerate(descs) if word in x.lower()}
    pytest.skip("no confident description in this small catalog")


def test_search_finds_a_latent_whose_description_has_the_word(built):
    _, _, cat, _, _ = built
    word, owners = _a_described_word(cat)
    res = search_latents(cat, word, top=5)
    assert res and set(res[0]) == {"latent", "description", "score", "density", "max_act"}
    assert any(r["latent"] in owners for r in res[:5]), (word, res)
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)


def test_search_by_a_top_token(built):
    _, _, cat, _, _ = built
    i = int(np.nonzero(~cat.dead)[0][0])
    tok = next((t.strip().lower() for t in cat.top_tokens(i) if re.fullmatch(r"\s?[A-Za-z]{4,}", t)), None)
    if tok is None:
        pytest.skip("no word-like top token")
    res = search_latents(cat, tok, top=20)
    hits = [r["latent"] for r in res]
    owners = [j for j in range(cat.d_sae) if tok in [t.strip().lower() for t in cat.top_tokens(j)]]
    assert set(hits) & set(owners)


def test_search_filters_and_bad_input(built):
    _, _, cat, _, _ = built
    for q in ("", "   ", None):
        with pytest.raises(BadInput, match="empty"):
            search_latents(cat, q)
    with pytest.raises(BadInput):
        search_latents(cat, "rain", top=0)
    with pytest.raises(BadInput):
        search_latents(cat, "rain", min_density=2)
    lo = float(np.median(cat.density[~cat.dead]))
    res = search_latents(cat, "rain", top=50, min_density=lo)
    assert res and all(r["density"] >= lo for r in res)
    dead = int(np.nonzero(cat.dead)[0][0])
    assert dead not in [r["latent"] for r in search_latents(cat, cat.description(dead), top=cat.d_sae)]
    assert dead in [r["latent"] for r in search_latents(cat, cat.description(dead), top=cat.d_sae, include_dead=True)]


def test_latents_firing_on_text(built):
    model, sae, cat, _, _ = built
    text = "The rain and strong winds will move along the coast tonight."
    res = latents_firing_on((model, sae), text, top=10, catalog=cat)
    assert 0 < len(res) <= 10
    keys = {"latent", "description", "max_act_on_text", "relative", "token_index", "token"}
    for r in res:
        assert set(r) == keys and r["token_index"] >= 1  # position 0 is ignored
        assert r["relative"] == pytest.approx(r["max_act_on_text"] / cat.max_act[r["latent"]], rel=1e-3)
        assert r["description"] == cat.description(r["latent"])
    rel = [r["relative"] for r in res]
    assert rel == sorted(rel, reverse=True)
    with pytest.raises(BadInput):
        latents_firing_on((model, sae), "  ", catalog=cat)


def test_cli_json_outputs(built, monkeypatch, capsys):
    import esr_core.latents.catalog.store as catalog_store
    from esr_core.cli import main

    _, sae, cat, out, _ = built
    monkeypatch.setattr(catalog_store, "cached_catalog_dir", lambda model_name, s: out)
    word, _ = _a_described_word(cat)
    assert main(["search", word, "--top", "3", "--json", "--sae", sae.source]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 3 and all({"latent", "description", "score", "density"} <= set(r) for r in res)
    i = res[0]["latent"]
    assert main(["latent", str(i), "--json", "--sae", sae.source]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["latent"] == i and e["description"] == cat.description(i) and "contexts" in e
    assert main(["fires", "Knead the dough and bake the bread.", "--json", "--top", "5", "--sae", sae.source]) == 0
    f = json.loads(capsys.readouterr().out)
    assert f and {"latent", "description", "relative", "token"} <= set(f[0])
    assert main(["latent", str(cat.d_sae + 5), "--sae", sae.source]) == 2
    assert "not in this catalog" in capsys.readouterr().err
    assert main(["search", "", "--sae", sae.source]) == 2
    assert "empty" in capsys.readouterr().err


def test_shipped_catalog_search():
    _, cat, _ = _shipped()
    word, owners = _a_described_word(cat)
    res = search_latents(cat, word, top=10)
    assert any(r["latent"] in owners for r in res)


def test_background_warm_up_readies_search_vectors_and_the_query_embedder(monkeypatch):
    from esr_core.app import session as svc
    from esr_core.latents.search import search_index
    from esr_core.models import embeddings

    _, cat, _ = _shipped()
    monkeypatch.setattr(embeddings, "_MODEL", None)
    svc.warm_search_in_background(cat).join(timeout=300)
    assert embeddings._MODEL is not None  # the first real query will not pay for loading it
    assert search_index(cat)._emb is not None and search_index(cat)._emb.shape[0] == cat.d_sae == 8192
