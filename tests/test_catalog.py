"""Latent catalog: build on a tiny corpus with a throwaway SAE, integrity, re-run checks,
bad inputs, Neuronpedia import round trip; the shipped catalog when it is present."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from esr_core.errors import BadInput
from esr_core.latents.catalog.build import build_catalog
from esr_core.latents.catalog.store import (
    SHIPPED_DIR,
    Catalog,
    CatalogUnavailable,
    sae_weights_hash,
    shipped_catalog_dir,
)
from esr_core.latents.neuronpedia import clear_import, import_neuronpedia, read_explanations, write_explanations
from esr_core.models.hooks import capture

SAMPLE = SHIPPED_DIR / "sample_texts.jsonl"
HOOK = "blocks.3.hook_resid_post"  # an early layer keeps the test forward cheap


def _sample():
    texts, chats = [], []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        (chats.append(d) if "messages" in d else texts.append(d["text"]))
    return texts, chats


def _throwaway_sae(model, texts, folder: Path, d_sae: int = 160, k: int = 12):
    """Decoder rows = centred residuals of the sample text (no training): latents that fire."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from esr_core.models.sae import load_sae

    ids = model.tokenizer(" ".join(texts[:6]), return_tensors="pt").input_ids[:, :256]
    h = capture(model, HOOK, ids)[HOOK][0, 1:]
    mu = h.mean(0)
    g = torch.Generator().manual_seed(0)
    D = (h - mu)[torch.randint(0, h.shape[0], (d_sae,), generator=g)]
    D = D / D.norm(dim=1, keepdim=True)
    cfg = TopKSAEConfig(d_in=model.d_model, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = HOOK
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(D)
        sae.W_enc.copy_(D.T)
        sae.b_dec.copy_(mu)
        sae.b_enc.zero_()
        sae.b_enc[-1] = -1e6  # the last latent never wins top-k: a dead latent for the test
    sae.save_model(str(folder))
    return load_sae(str(folder))


_BUILT: dict = {}


def built_catalog(tmp_path_factory):
    """Built once per test session (shared with tests/test_latent_search.py)."""
    if "v" in _BUILT:
        return _BUILT["v"]
    from esr_core.models.loading import load_model

    model = load_model()
    base = tmp_path_factory.mktemp("catalog")
    texts, chats = _sample()
    sae = _throwaway_sae(model, texts, base / "sae")
    out = base / "cat"
    seen = []
    build_catalog(model, sae, texts, chats, out, progress=lambda s: seen.append(s.fraction), budget_mb=1.0,
                  command="pytest tests/test_catalog.py")
    _BUILT["v"] = (model, sae, Catalog.load(out), out, seen)
    return _BUILT["v"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return built_catalog(tmp_path_factory)


def test_every_latent_has_an_entry_and_live_ones_a_description(built):
    _, sae, cat, _, seen = built
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    assert cat.d_sae == sae.d_sae == len(cat.descriptions())
    assert cat.meta["command"] == "pytest tests/test_catalog.py"
    assert cat.meta["sae_weights_hash"] == sae_weights_hash(sae)
    live = np.nonzero(~cat.dead)[0]
    assert len(live) > 0.8 * cat.d_sae
    for i in range(cat.d_sae):
        e = cat.entry(i)
        assert e["latent"] == i and e["description"].strip()
        assert 0.0 <= e["density"] <= 1.0
        assert e["dead"] == (e["n_active"] == 0) == (e["density"] == 0.0)
        assert len(e["promoted"]) == 10 and len(e["suppressed"]) == 10
        assert len(e["neighbours"]) == 8 and all(n["latent"] != i for n in e["neighbours"])
        assert sum(e["histogram"]["counts"]) == e["n_active"]
        assert len(e["histogram"]["edges"]) == len(e["histogram"]["counts"]) + 1
        if not e["dead"]:
            assert e["max_act"] > 0 and e["top_tokens"] and e["contexts"]["text"]
            assert e["contexts"]["text"][0]["max_act"] == pytest.approx(e["max_act"], rel=1e-5) or \
                any(c["max_act"] == pytest.approx(e["max_act"], rel=1e-5) for c in e["contexts"]["chat"])


def test_dead_latent_is_marked(built):
    _, sae, cat, _, _ = built
    i = sae.d_sae - 1
    assert cat.dead[i] and cat.density[i] == 0 and cat.max_act[i] == 0
    e = cat.entry(i)
    assert e["dead"] and e["description"].startswith("dead") and e["contexts"]["text"] == []


def test_top_examples_reach_the_recorded_activation_when_rerun(built):
    model, sae, cat, _, _ = built
    toks, starts = cat.array("tokens"), cat.array("row_starts")
    z_of_row: dict[int, np.ndarray] = {}
    checked = 0
    for i in np.nonzero(~cat.dead)[0][:: max(1, cat.d_sae // 8)]:
        for kind in ("text", "chat"):
            for c in cat.contexts(int(i), kind)[:2]:
                r = c["row"]
                if r not in z_of_row:
                    ids = torch.tensor(toks[starts[r] : starts[r + 1]].astype(np.int64)).view(1, -1)
                    with torch.no_grad():
                        z_of_row[r] = sae.encode(capture(model, sae.hook_name, ids)[sae.hook_name])[0].numpy()
                z = z_of_row[r][:, int(i)]
                assert float(z[c["position"]]) == pytest.approx(c["max_act"], rel=1e-3, abs=1e-3)
                assert c["position"] >= 1  # position 0 (attention sink) is never a top example
                # stored per-token activations match too (uint8 relative to max_act); in chats
                # only answer tokens are evaluated, the prompt part is stored as 0
                lo = c["position"] - c["peak_index"]
                want = z[lo : lo + len(c["acts"])].copy()
                first = (c["answer_start"] or 1) - lo
                want[: max(0, first)] = 0.0
                assert np.allclose(c["acts"], want, atol=cat.max_act[i] / 255 + 1e-3)
                checked += 1
    assert checked >= 8


def test_chat_contexts_are_answer_tokens_rendered_with_the_template(built):
    _, _, cat, _, _ = built
    found = 0
    for i in np.nonzero(~cat.dead)[0]:
        for c in cat.contexts(int(i), "chat"):
            assert c["position"] >= c["answer_start"]
            found += 1
    assert found > 0
    assert "<|im_start|>" in "".join(cat.token_str(t) for t in cat.array("tokens")[cat.array("row_kind").repeat(np.diff(cat.array("row_starts"))) == 1][:40])


def test_unknown_latent_gives_one_clear_line(built):
    _, _, cat, _, _ = built
    for bad in (cat.d_sae, -1, "abc", 2.5, None):
        with pytest.raises(BadInput) as ei:
            cat.entry(bad)
        assert "\n" not in str(ei.value)
    with pytest.raises(BadInput, match="0..159"):
        cat.description(10_000)


def test_corrupt_or_missing_files_give_clear_errors(built, tmp_path):
    _, _, _, out, _ = built
    with pytest.raises(CatalogUnavailable, match="No catalog"):
        Catalog.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / "catalog.json.gz").read_bytes()
    (broken / "catalog.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CatalogUnavailable, match="corrupt"):
        Catalog.load(broken)
    shutil.copy(out / "catalog.json.gz", broken / "catalog.json.gz")
    (broken / "arrays.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CatalogUnavailable, match="corrupt"):
        Catalog.load(broken)
    (broken / "arrays.npz").unlink()
    with pytest.raises(CatalogUnavailable, match="missing"):
        Catalog.load(broken)
    (broken / "catalog.json.gz").write_bytes(gzip.compress(b'{"meta": {"format": "other"}}'))
    with pytest.raises(CatalogUnavailable, match="not an esr-catalog"):
        Catalog.load(broken)


def test_neuronpedia_import_round_trip(built, tmp_path):
    _, _, cat, out, _ = built
    cat_dir = tmp_path / "np"
    shutil.copytree(out, cat_dir)
    before = Catalog.load(cat_dir)
    assert before.source == "esr-lab offline labels"
    wanted = {0: "references to baking bread", 3: "weather forecasts: rain, wind", 7: "Shakespearean address (thou)"}
    f = write_explanations(tmp_path / "explanations.jsonl.gz", wanted,
                           extra={"modelId": "smollm2-135m-instruct", "layer": "3-res", "typeName": "oai_token-act-pair"})
    with gzip.open(f, "at", encoding="utf-8") as fh:  # bad lines are counted, not fatal
        fh.write("not json\n")
        fh.write(json.dumps({"index": "x", "description": "bad index"}) + "\n")
        fh.write(json.dumps({"index": 5}) + "\n")
        fh.write(json.dumps({"index": 99999, "description": "out of range"}) + "\n")
    rep = import_neuronpedia(f, before)
    assert rep.n_imported == 3 and rep.n_bad == 3 and rep.n_out_of_range == 1
    after = Catalog.load(cat_dir)
    assert after.source == "neuronpedia import" and after.n_imported == 3
    for i, d in wanted.items():
        assert after.description(i) == d and after.entry(i)["description_source"] == "neuronpedia"
    assert after.description(1) == before.description(1)
    # plain .jsonl reads the same
    plain = write_explanations(tmp_path / "e.jsonl", wanted)
    got, rep2 = read_explanations(plain, cat.d_sae)
    assert got == wanted and rep2.n_bad == 0
    assert clear_import(after)
    assert Catalog.load(cat_dir).description(0) == before.description(0)
    with pytest.raises(BadInput, match="No such file"):
        import_neuronpedia(tmp_path / "missing.jsonl", before)


def test_build_refuses_empty_input(built, tmp_path):
    model, sae, _, _, _ = built
    with pytest.raises(BadInput):
        build_catalog(model, sae, [], [], tmp_path / "x")


def test_cancel_stops_the_build(built, tmp_path):
    from esr_core.errors import Cancelled

    model, sae, _, _, _ = built
    texts, _ = _sample()
    with pytest.raises(Cancelled):
        build_catalog(model, sae, texts, [], tmp_path / "c", cancel=lambda: True)


# ---------------------------------------------------------------- the shipped catalog


def _shipped():
    from esr_core.models.registry import DEFAULT_MODEL, get_entry
    from esr_core.models.sae import load_sae

    sae_dir = get_entry(DEFAULT_MODEL).default_sae_path
    if not (SHIPPED_DIR / DEFAULT_MODEL / "catalog.json.gz").exists():
        pytest.skip(f"no shipped catalog in {SHIPPED_DIR / DEFAULT_MODEL} (run `esr-lab catalog build`)")
    if sae_dir is None or not (sae_dir / "cfg.json").exists():
        pytest.skip("the default SAE is not in this checkout")
    sae = load_sae(str(sae_dir))
    p = shipped_catalog_dir(DEFAULT_MODEL, sae)
    if p is None:
        pytest.skip("the shipped catalog was built for other SAE weights; rebuild it with `esr-lab catalog build`")
    return sae, Catalog.load(p), p


def test_shipped_catalog_is_complete_and_small():
    sae, cat, p = _shipped()
    assert cat.d_sae == sae.d_sae
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    assert size < 12e6
    live = ~cat.dead
    assert live.mean() > 0.9
    descs = cat.descriptions()
    assert all(descs[i].strip() for i in np.nonzero(live)[0])
    assert cat.meta["n_tokens"] >= 100_000 and cat.meta["command"]
    e = cat.entry(int(np.nonzero(live)[0][0]))
    assert e["contexts"]["text"] and e["top_tokens"] and e["histogram"]["counts"]


@pytest.mark.slow
def test_shipped_top_examples_rerun():
    from esr_core.models.loading import load_model

    sae, cat, _ = _shipped()
    model = load_model()
    toks, starts = cat.array("tokens"), cat.array("row_starts")
    live = np.nonzero(~cat.dead)[0]
    for i in live[:: len(live) // 3][:3]:
        c = cat.contexts(int(i), "text")[0]
        r = c["row"]
        ids = torch.tensor(toks[starts[r] : starts[r + 1]].astype(np.int64)).view(1, -1)
        with torch.no_grad():
            z = sae.encode(capture(model, sae.hook_name, ids)[sae.hook_name])[0, c["position"], int(i)]
        assert float(z) == pytest.approx(c["max_act"], rel=2e-3, abs=2e-3)


def test_catalog_for_prefers_a_ready_catalog_and_never_matches_other_weights(built, monkeypatch):
    import esr_core.latents.catalog.build as catalog_mod
    import esr_core.latents.catalog.store as store_mod

    model, sae, cat, out, _ = built
    assert shipped_catalog_dir(model.name, sae) is None  # shipped catalogs belong to other weights
    monkeypatch.setattr(store_mod, "cached_catalog_dir", lambda model_name, s: out)
    monkeypatch.setattr(catalog_mod, "cached_catalog_dir", lambda model_name, s: out)

    def no_build(*a, **k):
        raise AssertionError("catalog_for rebuilt a catalog that was already cached")

    monkeypatch.setattr(catalog_mod, "build_catalog", no_build)
    got = catalog_mod.catalog_for(model, sae)
    assert got.path == out and got.d_sae == cat.d_sae


def test_default_corpus_falls_back_to_the_shipped_sample(built, monkeypatch):
    import esr_core.latents.catalog.build as catalog_mod
    import esr_core.sae_training.corpus as corpus_mod

    model = built[0]

    def unavailable(*a, **k):
        raise corpus_mod.CorpusUnavailable("no corpus here")

    monkeypatch.setattr(catalog_mod.corpus, "heldout_documents", unavailable)
    texts, chats, note = catalog_mod.default_corpus(model, 2000)
    assert "sample" in note and len(texts) >= 10 and len(chats) >= 3
    assert all(isinstance(t, str) and t for t in texts)
