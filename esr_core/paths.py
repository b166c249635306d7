"""Where things live: shipped assets in the repo, caches in a user cache directory.

In a checkout the app and the assets sit beside ``esr_core``; an installed wheel carries them
in ``esr_core/bundle`` (see setup.py), so the same code finds them either way.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
_BUNDLE = _PACKAGE / "bundle"
REPO_ROOT = _CHECKOUT if (_CHECKOUT / "assets").is_dir() or not (_BUNDLE / "assets").is_dir() else _BUNDLE
ASSETS_DIR = REPO_ROOT / "assets"
APP_FILE = REPO_ROOT / "app.py"

# what the app needs from assets/ to run on the embedded default (the wheel test checks them)
REQUIRED_ASSETS = ("sae/smollm2-135m-instruct", "catalog/smollm2-135m-instruct", "groups", "prompts", "judge",
                   "experiments/reference", "examples.json")


def cache_dir() -> Path:
    """User cache root (``ESR_LAB_CACHE`` or ``~/.cache/esr-lab``); never inside the repo."""
    env = os.environ.get("ESR_LAB_CACHE")
    root = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "esr-lab"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(*parts: str) -> Path:
    p = cache_dir().joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def offline_env() -> None:
    """Make hub libraries fail fast instead of retrying for ~46 s when there is no network."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("ESR_LAB_ONLINE") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
