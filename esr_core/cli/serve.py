"""``esr-lab serve``: start the Streamlit app (from a checkout or an installed wheel)."""

from __future__ import annotations

import subprocess
import sys

from esr_core.errors import EsrError
from esr_core.paths import APP_FILE, offline_env


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the ESR Lab app in the browser (streamlit run app.py)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--headless", action="store_true", help="do not open a browser window")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    if not APP_FILE.exists():
        raise EsrError(f"The app is not installed with this package ({APP_FILE} is missing)")
    offline_env()
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.port", str(args.port),
           "--browser.gatherUsageStats", "false"] + (["--server.headless", "true"] if args.headless else [])
    return subprocess.call(cmd, cwd=str(APP_FILE.parent))
