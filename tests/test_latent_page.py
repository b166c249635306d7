"""A latent's page tells what the latent does (#11, items 10-11): causal token effects with values
and visible spaces, a histogram over the range the latent fires in, contexts from every
activation band with their values, and neighbours with descriptions, most similar first."""

from __future__ import annotations

import os
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esr_core.latents.catalog.store import BANDS, Catalog  # noqa: E402
from esr_core.paths import ASSETS_DIR  # noqa: E402
from esr_core.viz import latent_page as lp  # noqa: E402

SMOL = ASSETS_DIR / "catalog" / "smollm2-135m-instruct"
OCEAN, SPORTS = 5040, 811


@pytest.fixture(scope="module")
def cat():
    return Catalog.load(SMOL, overlay=False)


def test_visible_token_shows_spaces_newlines_and_empty():
    assert lp.visible_token(" Sea") == "\u2423Sea"
    assert lp.visible_token("\n\n") == "\u21b5\u21b5"
    assert lp.visible_token("\tx ") == "\u21e5x\u2423"
    assert lp.visible_token("") == "\u2205"
    assert lp.visible_token("Ocean") == "Ocean"


def test_token_effects_carry_values_visible_spaces_and_are_escaped():
    out = lp.token_effects_html([{"token": " Sea", "logit": 2.834}, {"token": "<script>", "logit": -1.5}], "promoted")
    assert "\u2423Sea" in out and "+2.83" in out and "-1.50" in out
    assert "<script>" not in out and "&lt;script&gt;" in out


def test_ocean_and_sports_latents_promote_their_own_words(cat):
    ocean = [t["token"] for t in cat.entry(OCEAN)["promoted"][:5]]
    assert {" Sea", " Ocean"} & set(ocean), ocean
    sports = [t["token"].strip().lower() for t in cat.entry(SPORTS)["promoted"][:6]]
    assert {"champions", "competed", "played", "rivals"} & set(sports), sports
    assert all(t["logit"] > 0 for t in cat.entry(OCEAN)["promoted"])
    assert all(t["logit"] < 0 for t in cat.entry(OCEAN)["suppressed"])


def test_common_component_is_removed_no_token_tops_every_latent(cat):
    # before: " between" and friends led the promoted list of thousands of latents
    top = cat.array("promo_ids")[~cat.dead, 0]
    token, n = Counter(top.tolist()).most_common(1)[0]
    assert n / len(top) < 0.05, (cat.token_str(token), n)
    assert "causal" in cat.meta.get("logit_effects", "")


def test_histogram_spans_exactly_the_latents_range_with_no_empty_bars(cat):
    e = cat.entry(OCEAN)
    fig = lp.histogram_figure(e["histogram"], e["max_act"])
    lo, hi = fig.layout.xaxis.range
    assert lo == 0 and e["max_act"] <= hi <= e["max_act"] * 1.05
    bar = fig.data[0]
    assert min(bar.y) > 0 and sum(bar.y) > 0
    assert max(x + w / 2 for x, w in zip(bar.x, bar.width)) <= e["max_act"] * 1.0001
    assert "activation" in bar.hovertemplate and "%{y} tokens" in bar.hovertemplate
    with_marker = lp.histogram_figure(e["histogram"], e["max_act"], marker=e["max_act"] * 2)
    assert with_marker.layout.xaxis.range[1] >= e["max_act"] * 2


def test_histogram_of_a_dead_latent_says_so():
    fig = lp.histogram_figure({"edges": [0, 1, 2], "counts": [0, 0]}, 0.0)
    assert not fig.data and "no nonzero" in fig.layout.annotations[0].text


def test_band_samples_lie_in_their_bands_and_carry_values(cat):
    bands = cat.entry(OCEAN)["bands"]
    assert [b["range"] for b in bands] == list(BANDS)
    mx = cat.entry(OCEAN)["max_act"]
    n = 0
    for b in bands:
        lo, hi = b["range"]
        for c in b["contexts"]:
            share = c["max_act"] / mx
            assert lo - 0.01 <= share <= hi + 0.01, (b["label"], share)
            assert abs(c["acts"][c["peak_index"]] - c["max_act"]) < 1e-3
            n += 1
    assert n >= 6  # an ocean latent fires weakly on many tokens: every band has samples
    html = lp.contexts_html(bands[0]["contexts"], OCEAN, mx)
    assert 'class="esr-context"' in html and "%" in html


def test_neighbours_listed_most_similar_first_with_descriptions(cat):
    nb = cat.entry(OCEAN)["neighbours"]
    shuffled = list(reversed(nb))
    out = lp.neighbours_html(shuffled, describe=cat.description)
    order = [int(x.split('"')[0]) for x in out.split('data-latent="')[1:]]
    assert order == [n["latent"] for n in sorted(nb, key=lambda n: -n["cosine"])]
    assert cat.description(order[0])[:10] in out or "&" in out


def test_latent_page_shows_values_bands_and_neighbour_descriptions():
    from conftest import open_app_page

    at = open_app_page("pages/latents.py")
    at.text_input(key="open_id").input(str(OCEAN)).run()
    assert not at.exception, at.exception
    html = " ".join(h.proto.body for h in at.get("html"))
    assert 'class="esr-logit" data-token=" Sea"' in html or 'data-token=" Ocean"' in html
    assert "\u2423Sea" in html or "\u2423Ocean" in html
    assert html.count('class="esr-context"') >= 8
    assert "Sampled from" in " ".join(m.value for m in at.markdown)
    assert 'class="esr-neighbour"' in html
    assert any(c.value.startswith("Method, causal") for c in at.caption)
