"""Where things live: shipped assets in the repo, caches in a user cache directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"


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
