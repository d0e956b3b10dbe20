"""URL state: the short query-parameter names every page uses, in one place.

| name    | meaning                                   | example                     |
|---------|-------------------------------------------|-----------------------------|
| `ds`    | dataset kind: easy_vqa, vcr, webqa, vqa, generic | `vqa`                |
| `loc`   | dataset hub id, or a path under VLSCOPE_DATA_ROOTS | `merve/vqav2-small` |
| `img`   | VCR `vcr1images` folder / WebQA `imgs.tsv`, under VLSCOPE_DATA_ROOTS | |
| `map`   | generic column mapping, `role:column,...` | `image:picture,question:prompt` |
| `stream`| `1` to stream a large hub dataset         | `1`                         |
| `q`     | browser search text                       | `circle`                    |
| `cat`   | browser categories, comma-separated       | `shape,color`               |
| `ans`   | browser answer filter                     | `red`                       |
| `obj`   | browser objects filter, comma-separated   | `car,person`                |
| `cfg`   | dataset config (subset)                   | `default`                   |
| `split` | dataset split                             | `test`                      |
| `ex`    | example id                                | `easy_vqa/test/12`          |
| `model` | model: `demo` or a hub id                 | `dandelin/vilt-b32-mlm`     |
| `layer` | layer index                               | `11`                        |
| `head`  | head index, or `mean`                     | `3`                         |
"""

from __future__ import annotations

import streamlit as st

PARAMS = ("ds", "loc", "img", "map", "stream", "cfg", "split", "q", "cat", "ans", "obj", "ex", "model", "layer", "head")


def get_param(name: str, default: str | None = None) -> str | None:
    """A query parameter's value, or ``default``."""
    if name not in PARAMS:
        raise KeyError(f"unknown URL parameter {name!r}; add it to vlcore.ui.state.PARAMS")
    return st.query_params.get(name, default)


def set_params(**values: str | int | None) -> None:
    """Write view state into the URL; None removes a parameter."""
    for name, value in values.items():
        if name not in PARAMS:
            raise KeyError(f"unknown URL parameter {name!r}")
        if value is None:
            st.query_params.pop(name, None)
        elif st.query_params.get(name) != str(value):
            st.query_params[name] = str(value)


def get_filters() -> dict:
    """The browser's filters from the URL: ``query``, ``categories``, ``answer``, ``objects``."""
    def split(name: str) -> list[str]:
        return [v for v in (get_param(name, "") or "").split(",") if v]

    return {"query": get_param("q", "") or "", "categories": split("cat"), "answer": get_param("ans", "") or "",
            "objects": split("obj")}


def set_filters(query: str, categories: list[str], answer: str, objects: list[str]) -> None:
    """Write the browser's filters into the URL (empty filters are removed)."""
    set_params(q=query.strip() or None, cat=",".join(categories) or None, ans=answer.strip() or None,
               obj=",".join(objects) or None)
