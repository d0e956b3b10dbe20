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
