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
| `model` | model: `demo`, `demo-generative` or a hub id | `org/model-name`         |
| `block` | attention block shown (heatmaps, statistics): a name of the model's `block_specs()` | `text.cross` |
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
| `probe` | probing page: `representation` or `attention` | `attention`             |
| `tkind` | probing token kind: `cls`, `text_mean`, `words`, `image_cls`, `patch` | `cls`   |
| `target`| probing target (`answer`, `category`, `shape`, `color`, `in_region`) or words (`shape`, `object`, `all`...) | `shape` |
| `cover` | probing: share of a patch's pixels inside the region that counts as inside | `0.5` |
| `task`  | `zero_shot`: classify over candidate labels (a model that offers it, e.g. a dual encoder) | `zero_shot` |
| `labels`| zero-shot candidate labels typed by the user, comma-separated (default: the dataset's answers) | `cat,dog` |
| `attn`  | a generative model's attention weights: `eager` for the fallback (default: recomputed from sdpa) | `eager` |
| `new`   | a generative model's most new tokens (greedy decoding; default: the model's, 16) | `32` |

Writes are batched: `set_params` records them and the app's entry point (`vlcore.ui.navigation`) applies them
in **one** URL update at the end of the run (`apply_params`), so one rerun adds at most one browser history
entry and one Back press goes back one view. Reads (`get_param`, `current_params`) see this run's writes.
A script run without the entry point (a test page) writes at once.

The view is carried across pages: the example, model, layer, head and the dataset that identifies the example
(`CARRIED`) are remembered in the session on every page that carries them, and a page opened with none of them
in its URL (Streamlit's sidebar navigation drops the query string) gets them back.
"""

from __future__ import annotations

import functools

import streamlit as st
from streamlit import config as st_config
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

PARAMS = (
    "ds", "loc", "img", "map", "stream", "cfg", "split", "q", "cat", "ans", "obj", "ex", "model", "layer", "head",
    "pg", "sweep", "scope", "metric", "norm", "slice", "cmp", "tok", "patch", "dir", "method", "answer", "proj", "color",
    "who", "label", "page", "view",
    "scale",  # heatmaps colour scale (issue 14)
    "probe", "tkind", "target", "cover",  # probing page (issue 18): probe type, token kind, target, region share
    "block",  # attention block of the heatmaps and statistics pages (issue 15, vlcore.ui.blocks)
    "task", "labels",  # zero-shot classification and its typed candidate labels (issue 15, vlcore.ui.prediction)
    "attn",  # a generative model's attention weights: sdpa (default) or eager (issue 16, vlcore.ui.context)
    "new",  # a generative model's max new tokens (issue 16, vlcore.ui.context)
)
CARRIED = ("ex", "model", "layer", "head", "ds", "loc", "img", "map", "stream", "cfg", "split", "task", "labels",
           "attn", "new")

_PENDING = "_vlscope_url_pending"  # {name: value, or None to remove}: this run's writes, applied once
_BATCHED = "_vlscope_url_batched"  # set by begin_run: the entry point applies the writes at the end of the run
_CARRY = "_vlscope_carry"  # {name: value}: the CARRIED part of the last view on a carrying page
_PAGE = "_vlscope_page"  # (page, carries) of the current run


def _check(name: str) -> None:
    if name not in PARAMS:
        raise KeyError(f"unknown URL parameter {name!r}; add it to vlcore.ui.state.PARAMS")


def _leave_pages_folder_mode() -> None:
    """Run every page through the app's entry point (`vlcore.ui.navigation`).

    Streamlit treats an app with a ``pages/`` folder as a folder app, which runs a linked page *without* the entry
    point, until the process's first `st.navigation` call (streamlit/streamlit#10276). A shared link opened first
    on a fresh server would run its page without the Home title, the carried view and the one-update URL. This
    ends that mode the way `st.navigation` does and reruns the page through the entry point, once per process.
    Not under AppTest: it re-detects the folder before every run, and the rerun would drop a clicked button.
    """
    if not PagesManager.uses_pages_directory:
        return
    PagesManager.uses_pages_directory = False
    if not _under_app_test() and get_script_run_ctx(suppress_warning=True) is not None:
        st.rerun()


def _under_app_test() -> bool:
    return bool(st_config.get_option("global.appTest"))


def current_params() -> dict[str, str]:
    """The URL's parameters as this run has set them so far (the URL itself changes at the end of the run)."""
    _leave_pages_folder_mode()
    view = st.query_params.to_dict()
    for name, value in st.session_state.get(_PENDING, {}).items():
        if value is None:
            view.pop(name, None)
        else:
            view[name] = value
    return view


def get_param(name: str, default: str | None = None) -> str | None:
    """A query parameter's value, or ``default``."""
    _check(name)
    return current_params().get(name, default)


def set_params(**values: str | int | None) -> None:
    """Write view state into the URL; None removes a parameter. Applied once at the end of the run."""
    for name in values:
        _check(name)
    _leave_pages_folder_mode()
    page = st.session_state.get(_PAGE)
    view = current_params()
    changed = {}
    for name, value in values.items():
        text = None if value is None else str(value)
        if page is not None and page[1] and name in CARRIED:
            carried = st.session_state.setdefault(_CARRY, {})
            if text is None:
                carried.pop(name, None)
            else:
                carried[name] = text
        if view.get(name) != text:
            changed[name] = text
    if not changed:
        return
    if st.session_state.get(_BATCHED):
        st.session_state.setdefault(_PENDING, {}).update(changed)
        return
    for name, text in changed.items():  # no entry point (a test page): write now
        if text is None:
            st.query_params.pop(name, None)
        else:
            st.query_params[name] = text


def carried_params() -> dict[str, str]:
    """The current view's `CARRIED` parameters (for links that open the same example on another page)."""
    view = current_params()
    return {name: view[name] for name in CARRIED if name in view}


def begin_run(page: str, carries: bool) -> None:
    """Start a run of ``page`` (called by the entry point before the page runs).

    Writes left from an interrupted run of another page are dropped (a page switch comes with its own URL).
    On a page that ``carries`` the view: a URL with any `CARRIED` parameter names the view (and is remembered);
    a URL with none of them (the sidebar navigation) gets the remembered view back.
    """
    state = st.session_state
    if state.get(_PAGE, (None,))[0] != page:
        state.pop(_PENDING, None)
    state[_PAGE], state[_BATCHED] = (page, carries), True
    _apply_before_stop()
    if not carries:
        return
    view = current_params()
    if any(name in view for name in CARRIED):
        state[_CARRY] = {name: view[name] for name in CARRIED if name in view}
    elif state.get(_CARRY):
        state.setdefault(_PENDING, {}).update(state[_CARRY])


def apply_params() -> None:
    """Apply this run's URL writes in one update (one browser history entry); no-op when nothing changed."""
    pending = st.session_state.pop(_PENDING, None)
    if not pending:
        return
    view = st.query_params.to_dict()
    for name, value in pending.items():
        if value is None:
            view.pop(name, None)
        else:
            view[name] = value
    if view != st.query_params.to_dict():
        st.query_params.from_dict(view)


def _apply_before_stop() -> None:
    """Make ``st.stop()`` apply this run's URL writes first: once a run is stopping, Streamlit sends nothing more,
    so the end-of-run update would be lost (a page that stops after an error would keep a stale URL)."""
    if getattr(st.stop, "_vlscope_applies_url", False):
        return
    stop = st.stop

    @functools.wraps(stop)
    def stop_after_url_update():
        apply_params()
        stop()

    stop_after_url_update._vlscope_applies_url = True
    st.stop = stop_after_url_update


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
