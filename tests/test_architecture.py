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


def test_no_module_outside_models_names_a_family_or_branches_on_a_task_string():
    """The adapter contract (`vlcore/models/base.py`) is the only way the core and the pages read a model: no
    family named in an identifier, an import or a string (docstrings and comments may), no ``.task == "..."``."""
    import ast

    words = re.compile(r"(?i)vilt|blip|siglip|llava|paligemma|idefics|qwen")
    clip_name = re.compile(r"CLIP|Clip(?=[A-Z_]|$)|(^|_)clip_(model|adapter|vision|text|processor)")  # not np.clip

    def names_family(name: str, module: bool = False) -> bool:
        return bool(words.search(name) or clip_name.search(name)) or (module and name == "clip")

    def is_task(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "task") or (
            isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "task")

    def is_text(node) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) or (
            isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(is_text(e) for e in node.elts))

    allowed = {("vlcore/app_files.py", "vilt-tiny-easyvqa"),  # the bundled demo checkpoints' folders (paths)
               ("vlcore/app_files.py", "llava-tiny-easyvqa")}
    hits = []
    for path in sorted([*(ROOT / "vlcore").rglob("*.py"), *(ROOT / "pages").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("vlcore/models/"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found = words.search(node.value) or re.search(r"(?i)(?<![a-z])clip(?![a-z])", node.value)
                bad = node.value if found and (rel, node.value) not in allowed else None
            elif isinstance(node, (ast.Name, ast.Attribute, ast.FunctionDef, ast.ClassDef)):
                name = getattr(node, "id", None) or getattr(node, "attr", None) or node.name
                bad = name if names_family(name) else None
            elif isinstance(node, (ast.alias, ast.ImportFrom)):
                module = (node.name if isinstance(node, ast.alias) else node.module) or ""
                bad = module if any(names_family(part, module=True) for part in module.split(".")) else None
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                bad = "a task compared with a string" if any(map(is_task, sides)) and any(map(is_text, sides)) else None
            else:
                bad = None
            if bad:
                hits.append(f"{rel}:{node.lineno}: {bad[:60]!r}")
    assert hits == []
