"""The wheel carries the app too: app.py, pages/ and assets/ go into esr_core/bundle/.

Why: ``pip install esr-lab`` from a wheel must run the app and find the shipped SAE, catalog
and groups (``esr_core.paths`` looks in the bundle when there is no checkout around it).
Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("app.py", "pages", "assets")


class BuildPyWithApp(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "esr_core" / "bundle"
        for name in BUNDLED:
            src = ROOT / name
            dst = target / name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithApp})
