"""URL state: the short query-parameter names every page uses, in one place.

| name    | meaning                                   | example                     |
|---------|-------------------------------------------|-----------------------------|
| `ds`    | dataset kind: easy_vqa, vcr, webqa, vqa, generic | `vqa`                |
| `loc`   | dataset hub id, or a path under VLSCOPE_DATA_ROOTS | `merve/vqav2-small` |
| `img`   | VCR `vcr1images` folder / WebQA `imgs.tsv`, under VLSCOPE_DATA_ROOTS | |
| `map`   | generic column mapping, `role:column,...` | `image:picture,question:prompt` |
| `stream`| `1` to stream a large hub dataset         | `1`                         |
| `cfg`   | dataset config (subset)                   | `default`                   |
| `split` | dataset split                             | `test`                      |
| `ex`    | example id                                | `easy_vqa/test/12`          |
| `model` | model: `demo` or a hub id                 | `dandelin/vilt-b32-mlm`     |
| `layer` | layer index                               | `11`                        |
| `head`  | head index, or `mean`                     | `3`                         |
"""

from __future__ import annotations

import streamlit as st

PARAMS = ("ds", "loc", "img", "map", "stream", "cfg", "split", "ex", "model", "layer", "head")


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
