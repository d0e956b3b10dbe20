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
| `pg`    | dataset browser page number (of 24 thumbnails) | `3`                   |
| `sweep` | sweep key (first 12+ hex chars of the store key) | `3f2a9c01b7de`       |
| `scope` | analysis scope: `example` or `sweep`      | `sweep`                     |
| `metric`| head-statistics metric name               | `txt2img`                   |
| `norm`  | `raw` or `z` (z-scored across all heads)  | `z`                         |
| `slice` | sweep slice: `all`, `correct`, `incorrect`, `cat:<v>`, `ans:<v>` | `cat:color` |
| `cmp`   | second slice to compare against (same syntax) | `incorrect`             |
| `tok`   | query token index in the trace            | `0`                         |
| `patch` | selected patches, `row.col` joined by `,` | `2.3,2.4`                   |
| `dir`   | attention `from` or `to` the query        | `from`                      |
| `method`| explanation: `raw`, `rollout`, `relevancy`| `rollout`                   |
| `answer`| answer label explained by relevancy       | `red`                       |
| `view`  | heatmaps page section: `matrices`, `heads`, `step`, `explain`, `export` | `heads` |
| `scale` | heatmaps colour scale: `map` (each map min–max), `shared` (across the views shown), `absolute` (0–1) | `shared` |
| `proj`  | projection: `pca`, `tsne`, `umap`         | `pca`                       |
| `color` | projection colouring: `modality`, `token`, `example`, `correct` | `modality` |
| `who`   | annotations page: annotator filter        | `ana`                       |
| `label` | annotations page: label filter            | `plausible`                 |
| `page`  | annotations page: page filter (page name) | `Attention_Heatmaps`        |
"""

from __future__ import annotations

import streamlit as st

PARAMS = (
    "ds", "loc", "img", "map", "stream", "cfg", "split", "q", "cat", "ans", "obj", "ex", "model", "layer", "head",
    "pg", "sweep", "scope", "metric", "norm", "slice", "cmp", "tok", "patch", "dir", "method", "answer", "proj", "color",
    "who", "label", "page", "view",
    "scale",  # heatmaps colour scale (issue 14)
)


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


def notice(text: str) -> None:
    """A one-line notice about the URL (a malformed or out-of-range parameter that was replaced)."""
    st.info(text, icon="🔗")


def get_int(name: str, default: int, lo: int, hi: int) -> int:
    """An integer parameter in ``[lo, hi]``; a malformed or out-of-range value gives ``default`` (or the
    nearest bound) with a one-line notice, never an exception."""
    raw = get_param(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        notice(f"Ignored `{name}={raw}` in the link: not a whole number; showing {default}.")
        return default
    if not lo <= value <= hi:
        near = min(max(value, lo), hi)
        notice(f"`{name}={raw}` is out of range ({lo}–{hi}); showing {near}.")
        return near
    return value


def get_choice(name: str, options: tuple | list, default: str) -> str:
    """A parameter that must be one of ``options``; anything else gives ``default`` with a notice."""
    raw = get_param(name)
    if raw is None or raw == "":
        return default
    if raw not in options:
        notice(f"Ignored `{name}={raw}` in the link: expected one of {', '.join(map(str, options))}.")
        return default
    return raw


def get_head(n_heads: int) -> int | None:
    """The ``head`` parameter: an index below ``n_heads`` or None for the mean (``mean`` or absent)."""
    raw = get_param("head")
    if raw in (None, "", "mean"):
        return None
    return get_int("head", 0, 0, n_heads - 1)
