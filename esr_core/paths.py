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


def repo_relative(path) -> str:
    """``path`` as written from the checkout's root when it lies inside it (so a report, group or link
    names shipped files the same way on every machine); any other path, or a relative name that is no
    file here (such as an SAE-Lens ``release:sae_id``), as given."""
    if not Path(path).is_absolute() and not Path(path).exists():
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        return str(path)


def portable_name(path) -> str:
    """A path as a record shown to others names it: from the checkout's root, else ``~/...`` under the
    user's home (a cache), else as given; :func:`from_repo` reads each form back."""
    name = repo_relative(path)
    home = str(Path.home())
    return "~" + name[len(home):] if name == home or name.startswith(home + "/") else name


def from_repo(path) -> Path:
    """The absolute path a repo-relative name (or an absolute path) stands for."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else REPO_ROOT / p).resolve()


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
