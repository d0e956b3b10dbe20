"""Project rules that are cheap to check: a UI-free core, no unsafe loading."""

from __future__ import annotations

import re

from tests.conftest import ROOT

PY_FILES = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]


def test_only_vlcore_ui_imports_streamlit():
    bad = []
    for path in (ROOT / "vlcore").rglob("*.py"):
        if "ui" in path.relative_to(ROOT / "vlcore").parts[:1]:
            continue
        if re.search(r"^\s*(import streamlit|from streamlit)", path.read_text(), re.M):
            bad.append(str(path.relative_to(ROOT)))
    assert bad == []


def test_nothing_unpickles_or_trusts_remote_code():
    pattern = re.compile(r"pickle\.loads?\(|trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    hits = [f"{p.relative_to(ROOT)}:{m.group(0)}" for p in PY_FILES for m in pattern.finditer(p.read_text())]
    assert hits == []


def _vlcore_import_graph() -> dict[str, set[str]]:
    """Subpackage (or top-level module) -> the vlcore subpackages/modules it imports, lazy imports included."""
    import ast

    graph: dict[str, set[str]] = {}
    base = ROOT / "vlcore"
    for path in base.rglob("*.py"):
        rel = path.relative_to(base).parts
        src = rel[0] if len(rel) > 1 else path.stem
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlcore."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("vlcore.")]
            else:
                continue
            for target in targets:
                dst = target.split(".")[1]
                if dst != src:
                    graph.setdefault(src, set()).add(dst)
    return graph


# Imports flow one way (STYLE.md 2): a layer imports only from layers below it.
LAYERS = [
    {"ui", "notebook", "cli", "console", "__main__"},
    {"charts", "attribution"},
    {"run"},
    {"analysis"},
    {"storage", "models"},
    {"data"},
    {"trace", "errors", "app_files", "__init__"},
]


def test_subpackages_import_downwards_only():
    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = _vlcore_import_graph()
    unknown = sorted(set(graph) - set(level))
    assert unknown == [], f"place these in LAYERS: {unknown}"
    upward = sorted((src, dst) for src, dsts in graph.items() for dst in dsts if level[dst] <= level[src]
                    and not (src in LAYERS[0] and dst in LAYERS[0]))
    assert upward == []
