"""Shared test set-up: offline hub, one real model per session, a test SAE when needed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite loads the base model, the tuned model, Gemma and test SAEs in one process: keep them all,
# so a session fixture's engine is never released under a later test (eviction has its own test)
os.environ.setdefault("ESR_LAB_MAX_ENGINES", "8")

import json
from pathlib import Path

import pytest

pytest_plugins = ("browser_fixtures",)  # server / browser / screenshot_on_failure, for the browser journeys

from esr_core.paths import ASSETS_DIR

DEFAULT_SAE_DIR = ASSETS_DIR / "sae" / "smollm2-135m-instruct"


def build_test_sae(folder: Path, d_sae: int = 512, k: int = 16, layer: int = 12, seed: int = 0) -> Path:
    """A small deterministic TopK SAE (unit decoder rows, tied encoder) for engine tests."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(seed)
    cfg = TopKSAEConfig(d_in=576, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        W = torch.randn(d_sae, 576, generator=g)
        W = W / W.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(str(folder))
    (folder / "esr_meta.json").write_text(json.dumps({"median_resid_norm": 100.0, "note": "test SAE"}))
    return folder


@pytest.fixture(scope="session")
def test_sae_dir(tmp_path_factory) -> Path:
    return build_test_sae(tmp_path_factory.mktemp("sae") / "test_sae")


@pytest.fixture(scope="session")
def sae_spec(test_sae_dir) -> str:
    """The shipped default SAE when present (real SAE), else the code-built test SAE."""
    if (DEFAULT_SAE_DIR / "cfg.json").exists():
        return str(DEFAULT_SAE_DIR)
    return str(test_sae_dir)


@pytest.fixture(scope="session")
def engine(sae_spec):
    from esr_core.steering.engines import get_engine

    return get_engine("smollm2-135m-instruct", sae_spec)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the test item (rep_setup / rep_call), for failure screenshots."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def warm_app_engine(model: str | None = None) -> None:
    """Finish the app's background load of ``model`` in this process, so an AppTest run (which
    cannot wait for the sidebar's polling fragment) finds the model ready."""
    from esr_core.app import engine_loader
    from esr_core.models.registry import DEFAULT_MODEL

    engine_loader.request(model or DEFAULT_MODEL).join()


def open_app_page(page: str, timeout: float = 600, model: str | None = None):
    """AppTest of app.py switched to ``page`` (e.g. "pages/experiments.py"): pages run inside the
    app frame (sidebar, engine, URL state), as in the browser."""
    from streamlit.testing.v1 import AppTest

    warm_app_engine(model)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=timeout).run()
    at.switch_page(page)
    return at.run()
