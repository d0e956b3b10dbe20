"""VLScope in a notebook: a trace in one call, each of the app's main charts in one more.

    import vlcore.notebook as vn

    trace = vn.run(example="easy_vqa/test/0")             # or vn.run(image="cat.png", text="what is it?")
    vn.heatmap(trace, query="shape", method="rollout")    # where a word (or [CLS], a patch) looks in the image
    blip = vn.run("Salesforce/blip-itm-base-coco", example="easy_vqa/test/0")  # any supported family
    vn.heatmap(blip, block="text.cross")                  # a block by name (default: the trace's view)
    clip = vn.run("openai/clip-vit-base-patch32", example="easy_vqa/test/0", labels=["circle", "square"])
    vn.head_summary(trace, metric="cls_to_img")           # one number per layer × head
    vn.matrix(trace, block="txt2img", layer=3, head=1)    # query × key attention
    vn.projection(trace, layer=4)                         # the token vectors of one layer in 2-D

Each chart is an Altair chart (it renders in Jupyter, VS Code and Colab; ``chart.save("map.png")`` writes a
file) built by the same `vlcore` functions and chart builders as the app's pages, with the pages' defaults:
a chart here draws the data its page draws for the same trace and settings. The chart functions lift
Altair's 5,000-row limit (`altair.data_transformers.disable_max_rows`), as a full attention matrix or a
sweep's scatter has more rows; the app draws them too.

Every family works (ViLT, BLIP, CLIP / SigLIP): a trace holds named attention blocks (``trace.blocks``) over
token streams (``trace.streams``); `heatmap`, `query_map`, `matrix` and `head_summary` take ``block=`` (default
the trace's view), `projection` takes ``stream=`` (each stream has its own vector space).

Public API (``source`` is a `Trace`, a list of traces, pooled, or a sweep folder: `sweep`,
``vlscope extract``, or a sweep started on the Run model page):

- `run` (model, image, text | example) → `vlcore.trace.Trace`; `load_model` → the model adapter.
- `sweep` (model, dataset, split, limit) → the folder of a sweep's per-head summaries and token vectors.
- `head_summary` (source, metric) → layer × head heatmap of one statistic (Head statistics page).
- `heatmap` (trace, query, layer, head, method) → a map over the image: raw attention, rollout or gradient
  relevancy (Attention heatmaps page); `query_map` → the same map as numbers, float32 ``[N]``.
- `matrix` (trace, block, layer, head) → the query × key matrix or one modality block of it.
- `projection` (source, layer, method) → one layer's token vectors in 2-D (Embeddings page).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from vlcore.errors import InputError
from vlcore.trace import Trace

METHODS = {"attention": "raw attention", "rollout": "attention rollout", "relevancy": "gradient relevancy"}
_ALIASES = {"raw": "attention"}  # the app's name for raw attention (URL ``method=raw``)
_ADAPTERS: dict[tuple[str, str], object] = {}
_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trace → (adapter, example) it came from


def _no_row_limit() -> None:
    """Lift Altair's 5,000-row limit for the charts this module returns (it stays lifted in the session)."""
    alt.data_transformers.disable_max_rows()


class _NoStore:
    """`vlcore.run.extract.trace_for_example`'s store when nothing is kept: every call computes the trace."""

    notices: tuple = ()

    def get_or_compute_trace(self, key: str, compute):
        return compute(), False


# ---------------------------------------------------------------------------------------
# Traces and sweeps
# ---------------------------------------------------------------------------------------


def load_model(model="demo", device: str = "auto"):
    """The model adapter (`vlcore.models.base.ModelAdapter`), loaded once per (model, device) in this process.

    Args:
        model: ``"demo"`` (the bundled ViLT), a checkpoint folder, a hub id, or an adapter (returned as is).
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    if not isinstance(model, (str, Path)):
        return model
    key = (str(model), device)
    if key not in _ADAPTERS:
        from transformers.utils import logging as hf_logging

        from vlcore.models.registry import load_adapter

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a notebook's output
        try:
            _ADAPTERS[key] = load_adapter(str(model), device=device)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
    return _ADAPTERS[key]


def _to_image(image):
    """A PIL image from a file path, a PIL image, or an array ``[H, W]`` or ``[H, W, 3|4]`` (see `run`)."""
    from PIL import Image

    from vlcore.data.example import open_image_bytes

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"image file not found: {path}; give an existing file, a PIL image or an array")
        return open_image_bytes(path.read_bytes(), path.name)  # the user's own file, as on the command line
    array = np.asarray(image)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or array.dtype.kind not in "uif":
        raise InputError(f"image must be a file path, a PIL image or an [H, W] / [H, W, 3] array; got "
                         f"{type(image).__name__} with shape {array.shape} and dtype {array.dtype}")
    if array.dtype != np.uint8:
        values = array.astype(np.float64)
        top = 1.0 if array.dtype.kind == "f" and values.max(initial=0) <= 1.0 else 255.0
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > top:
            raise InputError(f"image array values must lie in [0, 1] (floats) or [0, 255]; got "
                             f"{values.min():g} to {values.max():g}")
        array = np.rint(values * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(array)


def _several_images(image) -> bool:
    """Whether ``image`` is a list of images (paths, PIL images, arrays of 2+ dimensions), not one image given as
    a nested list of pixel rows."""
    from PIL import Image

    return isinstance(image, (list, tuple)) and len(image) > 0 and all(
        isinstance(im, (Image.Image, str, Path)) or (isinstance(im, np.ndarray) and im.ndim >= 2) for im in image)


def _example(image, text: str | None, example, store):
    """The `Example` to run: a dataset id (``easy_vqa/test/0``), an `Example`, or an image and a text."""
    from vlcore.data.example import Example, content_hash, to_rgb

    if example is not None:
        if image is not None or text is not None:
            raise InputError("give either example=... or image=... and text=..., not both")
        if isinstance(example, Example):
            return example
        from vlcore.data.sources import resolve_example

        return resolve_example(str(example), store)
    if image is None or not isinstance(text, str) or not text.strip():
        raise InputError("run() needs image=... (a path, PIL image or array) and text=... (a non-empty question), "
                         "or example=... such as 'easy_vqa/test/0'")
    if _several_images(image):
        pictures = [to_rgb(_to_image(im)) for im in image]  # several images in one prompt (a generative model)
    else:
        pictures = [to_rgb(_to_image(image))]
    digest = "|".join(content_hash(im, text) for im in pictures)
    return Example(example_id=f"upload/{content_hash(pictures[0], digest)[:16]}", question=text, image=pictures[0],
                   source="upload", extra_images=tuple(pictures[1:]))


def run(model="demo", image=None, text: str | None = None, example=None, device: str = "auto", store=None,
        top_k: int = 5, labels=None) -> Trace:
    """Run a model on one image and text, or on a dataset example, and return its `Trace`.

    Args:
        model: ``"demo"``, a checkpoint folder, a hub id, or a loaded adapter (see `load_model`).
        image: a file path, a PIL image, or an array ``[H, W]`` / ``[H, W, 3]`` (uint8; floats in [0, 1] are
            scaled by 255, other numbers must lie in [0, 255]); for a generative model also a list of them (several
            images in one prompt, one grid each in the trace).
        text: the question or caption.
        example: instead of ``image`` and ``text``: an example id such as ``"easy_vqa/test/0"``, or an `Example`.
        device: ``auto``, ``cpu`` or ``cuda``.
        store: a `vlcore.storage.store.Store` to read and keep traces in (the app's cache); None computes every time.
        top_k: predictions kept.
        labels: candidate labels for zero-shot classification (a model that offers it, e.g. CLIP or SigLIP):
            the prediction is then the top labels; None keeps the model's own task.

    Returns:
        The trace (the same one the Run model page makes for that example): tokens, attentions
        ``[L, H, N, N]``, hidden states ``[L + 1, N, D]`` and the prediction.

    Raises:
        VLScopeError: a missing or unreadable image, an empty text, an unknown example or model.
    """
    from vlcore.run.extract import trace_for_example

    ex = _example(image, text, example, store)
    adapter = _with_labels(load_model(model, device), labels)
    if image is not None and ex.extra_images and adapter.n_passes == 1 and not adapter.several_images:
        raise InputError(f"{adapter.model_id} reads one image per question; got {1 + len(ex.extra_images)}. Pass one "
                         "image, or use a generative model, which reads several in one prompt")
    trace, _ = trace_for_example(adapter, ex, store if store is not None else _NoStore(), top_k=top_k)
    _INPUTS[trace] = (adapter, ex)
    return trace


def _with_labels(adapter, labels):
    """The adapter classifying over ``labels`` (a view: the cached adapter is unchanged), or as it is for None.

    Raises:
        InputError: the model cannot classify over candidate labels.
    """
    if labels is None:
        return adapter
    if isinstance(labels, str):
        labels = [part.strip() for part in labels.split(",") if part.strip()]
    if not adapter.takes_candidates:
        raise InputError(f"{adapter.model_id} (task {adapter.task}) cannot classify over candidate labels; leave "
                         "labels out, or use a model that can (its family lists the task zero_shot)")
    return adapter.with_candidates(list(labels))


def sweep(model="demo", dataset: str = "easy_vqa", split: str = "test", limit: int | None = 64,
          out: str | Path | None = None, batch_size: int = 8, device: str = "auto") -> Path:
    """Per-head summaries and token vectors of many examples (`vlcore.run.sweep.run_sweep`); returns the folder.

    Args:
        out: the folder; by default the app's store, where the Run model, Head statistics and Embeddings pages
            find it. A finished sweep in that folder is reused, an unfinished one resumed.
    """
    from vlcore.data.catalog import load_examples
    from vlcore.storage.store import Store
    from vlcore.run.sweep import run_sweep, sweep_key

    examples = load_examples(dataset, split, limit)
    adapter = load_model(model, device)
    name = f"{dataset}/{split}"
    if out is None:
        out = Store().sweep_dir(sweep_key(adapter, name, [e.example_id for e in examples]))
    return run_sweep(adapter, examples, out, dataset=name, batch_size=batch_size)


def _inputs(trace: Trace, what: str):
    """The adapter and example a trace from `run` was made from."""
    found = _INPUTS.get(trace)
    if found is None:
        raise InputError(f"{what} runs the model again, so it needs a trace made by vlcore.notebook.run in this "
                         f"session (this one, {trace.example_id}, was not)")
    return found


# ---------------------------------------------------------------------------------------
# Head statistics
# ---------------------------------------------------------------------------------------


def _metric_names(heads: pd.DataFrame) -> list[str]:
    """The metrics present, in the statistics page's order (built-ins, custom, head importance last)."""
    from vlcore.attribution.ablation import METRIC as IMPORTANCE
    from vlcore.analysis.stats import metric_names

    present = set(heads["metric"].astype(str))
    return [m for m in metric_names() if m in present] + ([IMPORTANCE] if IMPORTANCE in present else [])


def _trace_heads(trace: Trace, include_special: bool, importance: bool, block: str | None = None) -> pd.DataFrame:
    from vlcore.analysis.stats import compute_trace_summaries

    view = _select(trace, block)
    if view.attentions is None:
        raise InputError(f"trace {trace.example_id} carries no attentions for block {view.view!r}; use "
                         "vlcore.notebook.run")
    heads = compute_trace_summaries(view, include_special=include_special)
    if importance:
        from vlcore.attribution.ablation import extract_head_importance, importance_frame
        from vlcore.run.extract import model_image_input

        adapter, ex = _inputs(trace, "head importance")
        drop, _, _ = extract_head_importance(adapter, model_image_input(adapter, ex), trace.text, block=view.view)
        heads = pd.concat([heads, importance_frame(trace.example_id, drop)], ignore_index=True)
    return heads


def _sweep_heads(path: Path, slice_: str) -> tuple[pd.DataFrame, list[str], str]:
    from vlcore.attribution.ablation import load_sweep_importance
    from vlcore.analysis.head_table import slice_examples
    from vlcore.storage.sweeps import load_sweep

    preds, heads = load_sweep(path)
    if not len(preds):
        raise InputError(f"no sweep in {path}: make one with vlcore.notebook.sweep or vlscope extract")
    importance = load_sweep_importance(path)
    if importance is not None:
        heads = pd.concat([heads, importance], ignore_index=True)
    heads["metric"] = heads["metric"].astype(str)
    ids = slice_examples(preds, slice_)
    if not ids:
        raise InputError(f"the slice {slice_!r} has no examples in this sweep; choose another slice")
    return heads, ids, f"{slice_} (n = {len(ids)})"


def head_summary(source, metric: str | None = None, norm: str = "raw", include_special: bool = False,
                 slice: str = "all", selected: tuple[int, int] | None = None,
                 block: str | None = None) -> alt.HConcatChart:
    """Layer × head heatmap of one statistic, with the mean over heads per layer beside it.

    Args:
        source: a trace, a list of traces (mean over them), or a sweep folder.
        metric: a name of `vlcore.analysis.stats.metric_names` (default: the first, as on the page), or
            ``"ablation_drop"``: head importance, computed for traces made by `run`.
        norm: ``raw``, or ``z`` (z-scored across heads per example, then averaged).
        include_special: count [CLS], [SEP] and the image CLS in the modality blocks (traces only).
        slice: for a sweep: ``all``, ``correct``, ``incorrect``, ``cat:<category>``, ``ans:<answer>``...
        selected: a (layer, head) to outline.
        block: traces: the attention block summarised (default each trace's view, e.g. BLIP's ``text.cross``);
            a metric that does not apply to a block is n/a (NaN). A sweep holds its model's default block.
    """
    from vlcore.attribution.ablation import METRIC as IMPORTANCE
    from vlcore.charts.stats import build_head_heatmap_chart
    from vlcore.analysis.head_table import aggregate_heads

    _no_row_limit()
    if isinstance(source, (str, Path)):
        heads, ids, label = _sweep_heads(Path(source), slice)
    else:
        traces = [source] if isinstance(source, Trace) else list(source)
        if not traces:
            raise InputError("head_summary needs a trace, a list of traces or a sweep folder; got an empty list")
        heads = pd.concat([_trace_heads(t, include_special, metric == IMPORTANCE, block) for t in traces],
                          ignore_index=True)
        ids, label = None, traces[0].example_id if len(traces) == 1 else f"{len(traces)} traces"
    metrics = _metric_names(heads)
    metric = metrics[0] if metric is None else metric
    if metric not in metrics:
        raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(metrics + [IMPORTANCE])}")
    aggregated = aggregate_heads(heads, ids, norm)
    return build_head_heatmap_chart(aggregated, metric, title=f"{metric} · {label}", diverging=norm == "z",
                                    selected=selected)


# ---------------------------------------------------------------------------------------
# Attention maps and matrices
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """The query of a map: token indices of the block's query stream (several give the mean of their maps) and the
    patch cells they are."""

    tokens: np.ndarray
    cells: list[tuple[int, int]]
    label: str


def _select(trace: Trace, block: str | None) -> Trace:
    """The trace viewing ``block`` (an attention block's name; None: the trace's own view).

    Raises:
        InputError: the trace has no such block.
    """
    if block is None:
        return trace
    if block not in trace.blocks:
        raise InputError(f"block {block!r} is not an attention block of this trace; its blocks: "
                         f"{', '.join(trace.blocks)}")
    return trace.select(block)


def _preferred_query(origin: Trace, view: Trace) -> int | None:
    """The token that explains the prediction in the viewed block: the model's `ModelAdapter.default_query` for a
    trace made by `run`, else the one the trace recorded, else its first special text token or image CLS; None when
    no single token does (a tower whose head pools every patch)."""
    from vlcore.attribution.relevance import QUERY_META, layout_query

    found = _INPUTS.get(origin)
    if found is not None:
        return found[0].default_query(view.view, view.layout)
    recorded = view.meta.get(QUERY_META)
    if isinstance(recorded, dict) and view.view in recorded:
        return recorded[view.view]
    return layout_query(view.layout)


def _query(view: Trace, query, origin: Trace | None = None) -> Query:
    """A token index, a token's text, a patch ``(row, col)``, a list of patches, or None (the block's default
    query, `_preferred_query`), as a `Query` on the viewed block's query stream."""
    from vlcore.analysis import query_maps as hm
    from vlcore.trace import ROLE_PATCH

    if query is None:
        tokens = hm.default_query(view, _preferred_query(origin or view, view) if view.view in view.blocks else None)
        if len(tokens) == 1:
            return Query(tokens, [], f"token {int(tokens[0])} “{view.tokens[int(tokens[0])]}”")
        return Query(tokens, [], f"mean of all {len(tokens)} patches (no single token is read)")
    if isinstance(query, str):
        text = view.text_index(include_special=True)
        hits = [int(i) for i in text if view.tokens[i].lower() == query.lower()]
        if not hits:
            raise InputError(f"no text token {query!r} in block {view.view!r}'s queries; its text tokens are "
                             f"{[view.tokens[i] for i in text]}")
        query = hits[0]
    if isinstance(query, (int, np.integer)):
        if not 0 <= int(query) < view.n_tokens:
            raise InputError(f"query token {query} is outside the {view.n_tokens} query tokens of block {view.view!r} "
                             "(0 is its first, e.g. [CLS])")
        tok = int(query)
        return Query(np.array([tok]), [], f"token {tok} “{view.tokens[tok]}”")
    cells = [query] if len(query) == 2 and all(isinstance(v, (int, np.integer)) for v in query) else list(query)
    cells = [(int(r), int(c)) for r, c in cells]
    rows, cols = view.grid
    bad = [cell for cell in cells if not (0 <= cell[0] < rows and 0 <= cell[1] < cols)]
    if bad or not cells:
        raise InputError(f"patch cells must lie in the {rows}×{cols} grid as (row, col); got {bad or cells}")
    if not len(view.layout.index(ROLE_PATCH)):
        image_blocks = [n for n, b in view.blocks.items() if b.is_self and hm.layout_has_patches(view.streams[b.query])]
        raise InputError(f"block {view.view!r} has no patch queries (its queries are the {view.block.query} stream); "
                         f"patch queries need a block over the image: {', '.join(image_blocks) or 'none'}")
    label = f"patch {hm.format_patches(cells)}" if len(cells) == 1 else f"mean of {len(cells)} patches"
    return Query(hm.patch_token_indices(view, cells), cells, label)


def _layer_head(trace: Trace, layer: int, head: int | None) -> tuple[int, int | None]:
    """``layer`` (negative counts from the end) and ``head`` checked against the trace's viewed block."""
    if trace.attentions is None:
        raise InputError(f"trace {trace.example_id} carries no attentions for block {trace.view!r} (a summary-only "
                         "sweep); use vlcore.notebook.run")
    if not -trace.n_layers <= layer < trace.n_layers:
        raise InputError(f"layer {layer} is outside the model's {trace.n_layers} layers (0 to {trace.n_layers - 1})")
    if head is not None and not 0 <= head < trace.n_heads:
        raise InputError(f"head {head} is outside the model's {trace.n_heads} heads (0 to {trace.n_heads - 1}, "
                         "or None for the mean)")
    return layer % trace.n_layers, head


def _method(method: str) -> str:
    method = _ALIASES.get(method, method)
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def _direction(direction: str) -> str:
    from vlcore.analysis.query_maps import DIRECTIONS

    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    return direction


def _relevancy(origin: Trace, view: Trace, answer: str | None) -> np.ndarray:
    """Gradient relevancy of the viewed block's default query for ``answer``: the single-stream rules on a self block
    with a query row, through the pooling block for a tower whose head pools it, the bi-modal rules on a cross block
    (values over its keys: the image)."""
    from vlcore.attribution.dispatch import extract_block_relevancy
    from vlcore.run.extract import model_image_input

    adapter, ex = _inputs(origin, "relevancy")
    return extract_block_relevancy(adapter, model_image_input(adapter, ex), ex.question, answer, view.view)


def _query_side(view: Trace, direction: str) -> Trace:
    """The trace a query is named on: the viewed block's queries, except a cross block's ``to`` map, whose query is
    one of its keys (e.g. patches that BLIP's text reads: the text tokens that read them)."""
    from vlcore.analysis import query_maps as hm

    return hm.side_trace(view, "key") if not view.block.is_self and direction == "to" else view


def query_map(trace: Trace, query=None, layer: int = -1, head: int | None = None, method: str = "attention",
              direction: str = "from", start_layer: int = 0, answer: str | None = None,
              block: str | None = None) -> np.ndarray:
    """The map `heatmap` draws: float32, one value per token of the stream it lies on (`map_trace`).

    ``attention``: the query's row (``from``: a map over the block's keys) or column (``to``: over its queries) of
    one layer's attention, one head or the mean over heads. ``rollout`` (self blocks): the same of the attention
    rollout from ``start_layer`` (into the pooling head for a tower that pools every patch). ``relevancy``:
    gradient relevancy for ``answer`` (default: the prediction) from the block's default query, whatever the
    query (a forward and backward pass: the trace must come from `run`); on a cross block a map over its keys.

    Args:
        query: a token index, a token's text, a patch ``(row, col)``, a list of patches, or None: the token the
            model reads its prediction from in this block (ViLT's and BLIP's [CLS], CLIP's image CLS; every patch
            when a pooling head reads them all).
        block: the attention block (default: the trace's view), e.g. ``"text.cross"``, ``"vision.self"``.
    """
    from vlcore.analysis import query_maps as hm

    method, direction = _method(method), _direction(direction)
    view = _select(trace, block)
    layer, head = _layer_head(view, layer, head)
    if method == "relevancy":
        return _relevancy(trace, view, answer)
    q = _query(_query_side(view, direction), query, trace)
    if method == "attention":
        return hm.compute_query_map(view.head_attention(layer, head), q.tokens, direction)
    from vlcore.attribution.relevance import compute_rollout

    if query is None and len(q.tokens) > 1 and direction == "from":  # a pooled tower: into its pooling head
        from vlcore.attribution.towers import compute_tower_rollout

        return compute_tower_rollout(trace, view.view, None, start_layer)
    return hm.compute_query_map(compute_rollout(view, start_layer), q.tokens, direction)


def _explained(trace: Trace) -> str:
    """What relevancy explains by default: the predicted answer, or the pair's score of a model that scores pairs."""
    found = _INPUTS.get(trace)
    return trace.predicted if found is None or found[0].answers_compare else "match"


def map_trace(trace: Trace, method: str = "attention", direction: str = "from", block: str | None = None) -> Trace:
    """The trace whose layout a `query_map` lies on (its flat accessors read that stream): the viewed block's keys
    for ``from`` maps and relevancy, its queries for ``to`` maps (`vlcore.analysis.query_maps.map_trace`)."""
    from vlcore.analysis import query_maps as hm

    view = _select(trace, block)
    return hm.map_trace(view, "from" if _method(method) == "relevancy" else _direction(direction))


def heatmap(trace: Trace, query=None, layer: int = -1, head: int | None = None, method: str = "attention",
            direction: str = "from", start_layer: int = 0, answer: str | None = None, opacity: float = 0.8,
            smooth: bool = False, width: int = 340, block: str | None = None) -> alt.LayerChart:
    """A map over the image as the model saw it (`query_map`), drawn as on the Attention heatmaps page.

    Args:
        trace: a trace with an image.
        query: a token index, a token's text (``"shape"``), a patch ``(row, col)``, a list of patches (the mean of
            their maps), or None: the block's default query (see `query_map`).
        layer: attention layer (negative counts from the end).
        head: a head, or None for the mean over heads.
        method: ``attention`` (raw), ``rollout`` or ``relevancy``.
        direction: ``from`` the query (its attention row) or ``to`` it (how much each token attends to it).
        start_layer: rollout's first layer.
        answer: relevancy's answer (default: the prediction).
        opacity: the heat's opacity at the top of the colour scale.
        smooth: bilinear upsampling of the patch grid.
        width: width in pixels.
        block: the attention block (default: the trace's view): BLIP's ``text.cross`` (text over the image),
            ``vision.self``; CLIP's ``vision.self``. A block whose map has no image (``text.self``) is refused with
            the blocks that have one.
    """
    from vlcore.charts import heatmaps as ch
    from vlcore.analysis import query_maps as hm

    _no_row_limit()
    if not hm.trace_has_images(trace):
        raise InputError(f"trace {trace.example_id} has no image tokens: there is no image to draw a map on")
    method, direction = _method(method), _direction(direction)
    view = _select(trace, block)
    on = map_trace(trace, method, direction, block)
    if not hm.has_patches(on):
        raise InputError(f"{hm.no_image_reason(view)} (a {direction!r} map of {view.view} lies on its "
                         f"{on.block.query} tokens, not on the image)")
    values = query_map(trace, query, layer, head, method, direction, start_layer, answer, block)
    side = _query_side(view, direction)
    q = _query(side, query, trace) if method != "relevancy" else None
    cells = q.cells if q is not None and side.layout is on.layout else []
    title = (f"{METHODS[method]} {direction} {q.label}" if method != "relevancy"
             else f"gradient relevancy for “{answer or _explained(trace)}”")
    if view.view != trace.view or len(trace.blocks) > 1:
        title += f" · {view.view}"
    return ch.build_attention_overlay_chart(on, values, cells, opacity, smooth, title=title, width=width,
                                            select_name=None)


def matrix(trace: Trace, block: str | None = None, layer: int = -1, head: int | None = None,
           size: int = 440, quadrant: str | None = None) -> alt.LayerChart:
    """The query × key attention of one layer (rows attend, columns are attended to), as on the heatmaps page.

    Args:
        block: an attention block of the trace (``"text.cross"``, ``"vision.self"``; default its view), or, for
            short, a modality quadrant of the viewed block (see ``quadrant``).
        layer: layer (negative counts from the end).
        head: a head, or None for the mean over heads.
        size: the larger side in pixels.
        quadrant: None (every token, rules between text and image), or a modality block without the special
            tokens: ``txt2txt``, ``txt2img`` (text queries, patch keys), ``img2txt``, ``img2img``.
    """
    from vlcore.charts import heatmaps as ch

    _no_row_limit()
    if block in ch.BLOCK_TITLES and block not in trace.blocks:
        block, quadrant = None, block
    if block not in (None, "full") and block not in trace.blocks:
        raise InputError(f"block must be None, one of this trace's attention blocks ({', '.join(trace.blocks)}) or "
                         f"a quadrant ({', '.join(ch.BLOCK_TITLES)}); got {block!r}")
    view = _select(trace, None if block == "full" else block)
    layer, head = _layer_head(view, layer, head)
    att = view.head_attention(layer, head)
    head_label = f"layer {layer}, " + ("mean over heads" if head is None else f"head {head}")
    named = f"{view.view} · " if len(trace.blocks) > 1 else ""
    if quadrant in (None, "full"):
        return ch.build_matrix_chart(view, att, title=f"{named}{head_label}: query × key", size=size)
    if quadrant not in ch.BLOCK_TITLES:
        raise InputError(f"block must be None or one of {', '.join(ch.BLOCK_TITLES)}; got {quadrant!r}")
    rows, cols = view.block_index(quadrant)
    if not len(rows) or not len(cols):
        raise InputError(f"block {view.view!r} has no {ch.BLOCK_TITLES[quadrant]} part (its queries are the "
                         f"{view.block.query} stream, its keys the {view.block.key} stream)")
    return ch.build_block_chart(view, att, quadrant, size=size).properties(
        title=f"{named}{ch.BLOCK_TITLES[quadrant]} · {head_label}")


# ---------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------


def _stream_view(trace: Trace, stream: str | None) -> Trace:
    """The trace viewing a block whose queries are ``stream`` (a self block first); None: the trace itself.

    Raises:
        InputError: no block reads that stream.
    """
    if stream is None:
        return trace
    blocks = sorted(trace.blocks.items(), key=lambda kv: not kv[1].is_self)
    name = next((n for n, b in blocks if b.query == stream and trace.hiddens.get(stream) is not None), None)
    if name is None:
        have = [n for n in trace.streams if trace.hiddens.get(n) is not None]
        raise InputError(f"stream must be one of {', '.join(have)} (streams with hidden states); got {stream!r}")
    return trace.select(name)


def _token_set(source, stream: str | None = None):
    from vlcore.analysis.projection import token_set_from_sweep, token_set_from_traces

    if isinstance(source, (str, Path)):
        from vlcore.storage.sweeps import load_sweep, load_sweep_vectors

        preds, _ = load_sweep(source)
        return token_set_from_sweep(load_sweep_vectors(source), preds)
    traces = [source] if isinstance(source, Trace) else list(source)
    return token_set_from_traces([_stream_view(t, stream) for t in traces])


def projection(source, layer: int = -1, method: str = "pca", color: str = "modality", align: str = "sign",
               perplexity: float = 30.0, width: int = 560, height: int = 460, stream: str | None = None) -> alt.Chart:
    """One layer's token vectors in 2-D, one fit over every token of the source, as on the Embeddings page.

    Args:
        source: a trace, a list of traces (pooled into one fit), or a sweep folder (its sampled tokens).
        layer: 0 is the embedding output, ``n_layers`` the last layer; negative counts from the end.
        method: ``pca``, ``tsne`` or ``umap`` (``pip install vlscope[umap]``).
        color: ``modality``, ``token``, ``example`` or ``correct``.
        align: PCA only: ``sign`` (each layer's axes agree with the previous layer's), ``joint`` (one fit
            for all layers) or ``none``.
        perplexity: t-SNE perplexity.
        stream: traces: the token stream projected (``"vision"``, ``"text"``; default each trace's viewed block's
            queries: ViLT's joint stream, BLIP's text, CLIP's vision). Each stream has its own space and width,
            so one is projected at a time. A sweep holds its model's main stream.
    """
    from vlcore.charts.embeddings import COLOR_BY, build_projection_chart, thumbnail_uris
    from vlcore.analysis.projection import ALIGNS, METHOD_NAMES, compute_layer_projections, coordinates_frame
    from vlcore.analysis.projection import METHODS as PROJECTIONS

    _no_row_limit()
    for name, value, allowed in (("method", method, PROJECTIONS), ("align", align, ALIGNS), ("color", color, COLOR_BY)):
        if value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    tokens = _token_set(source, stream)
    n = tokens.n_layers
    if not -(n + 1) <= layer <= n:
        raise InputError(f"layer {layer} is outside 0 (embeddings) to {n} (the last layer)")
    layer %= n + 1
    coords = compute_layer_projections(tokens, method, align, layers=[layer], perplexity=perplexity)[layer]
    frame = coordinates_frame(tokens, coords, layer).assign(
        image=thumbnail_uris(tokens.thumbs, tokens.tokens["kind"].to_numpy() == "patch"))
    title = f"{METHOD_NAMES[method]} of {tokens.n_tokens:,} tokens · " + ("embeddings" if layer == 0 else f"layer {layer}")
    return build_projection_chart(frame, color, title=title, width=width, height=height)


__all__ = ["METHODS", "Query", "head_summary", "heatmap", "load_model", "map_trace", "matrix", "projection", "query_map",
           "run", "sweep"]
