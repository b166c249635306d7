"""Helpers for the browser tests: a `streamlit run` subprocess and Debian's chromium via Playwright."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTEFACTS = REPO / "test-artefacts"
CHROMIUM = os.environ.get("ESR_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamlitServer:
    """``streamlit run app.py`` on a free port; waits for /_stcore/health."""

    def __init__(self, env: dict | None = None, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ARTEFACTS / f"streamlit-{self.port}.log"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                    "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "StreamlitServer":
        ARTEFACTS.mkdir(exist_ok=True)
        exe = Path(sys.executable).parent / "streamlit"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(exe), "run", str(REPO / "app.py"), "--server.port", str(self.port), "--server.headless", "true",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"streamlit did not answer /_stcore/health in {self.timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


class Browser:
    """Playwright's sync API driving /usr/bin/chromium with a fresh user-data-dir."""

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self.pages: list = []
        self._pw = sync_playwright().start()
        # launch() gives every run a fresh temporary user-data-dir (Playwright refuses one in args);
        # TMPDIR points it at our own folder so it is removed afterwards
        self._dir = tempfile.mkdtemp(prefix="esr-chromium-")
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                                env={**os.environ, "TMPDIR": self._dir})
        return self

    def new_page(self, width: int = 1500, height: int = 1100):
        ctx = self.browser.new_context(viewport={"width": width, "height": height})
        ctx.set_default_timeout(60_000)
        page = ctx.new_page()
        self.pages.append(page)
        return page

    def shoot_open_pages(self, prefix: str) -> list[Path]:
        """Screenshots of every page still open (evidence when a test fails in CI)."""
        out = []
        for k, page in enumerate(self.pages):
            try:
                if not page.is_closed():
                    out.append(shot(page, f"{prefix}-{k}"))
            except Exception:  # noqa: BLE001 - a dead page must not hide the real failure
                pass
        self.pages = []
        return out

    def __exit__(self, *exc) -> None:
        try:
            self.browser.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self._dir, ignore_errors=True)


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


def shot(page, name: str) -> Path:
    ARTEFACTS.mkdir(exist_ok=True)
    p = ARTEFACTS / f"{name}.png"
    page.screenshot(path=str(p), full_page=True)
    return p


def wait_app_idle(page, timeout: float = 180_000) -> None:
    """Wait until Streamlit has finished the current script run: no 'running' indicator and no stale
    element left from the previous run (the indicator shows only after a delay; stale elements, kept
    on screen until the run replaces or drops them, are marked data-stale at once)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout)
    page.wait_for_function(
        "() => (!document.querySelector('[data-testid=\"stStatusWidget\"]') || "
        "!document.querySelector('[data-testid=\"stStatusWidget\"]').textContent.match(/Running|Stop/)) && "
        "!document.querySelector('[data-testid=\"stElementContainer\"][data-stale=\"true\"]')",
        timeout=timeout)
