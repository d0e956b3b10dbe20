"""How faithful is a relevance map? Patch-removal perturbation curves and the pointing game.

**Perturbation.** The patches are ranked by the map's value and the first ``round(f · P)`` of them
(``P`` the image's patches) are removed for each fraction ``f``, the way the model's adapter removes image
tokens (`ModelAdapter.mask_image_tokens`: e.g. through the image's attention mask, so that no token attends
to them); image summary tokens and the text are never removed. The patches are the image stream's
(`ModelAdapter.image_stream`) patch tokens, read from its `TokenLayout`. The curve is the probability of the
explained target (`ModelAdapter.target_score`)
at ``f = 0`` (the unperturbed input) and at each fraction; its area is the trapezoid rule over
``[0, f_1, …, f_k]`` (so with the default fractions it lies in ``[0, 0.9]``). Orders: ``positive``
removes the most relevant patches first (a faithful map drops the probability fast: small area),
``negative`` the least relevant first (large area), ``random`` a seeded permutation (the baseline;
several seeds are averaged). Ties keep row-major order. Every fraction of every curve of one example
runs in one batched forward pass.

**Pointing game.** For easy-VQA images (one shape on a flat background) the shape mask is every pixel
of the image as the model saw it (``trace.image``) whose colour differs from the background by more
than ``tolerance`` in some channel; the background is the most frequent colour on the image border.
The map *hits* when its top patch (largest value among patch tokens; ties: first in row-major order)
overlaps the mask: with ``min_overlap = 0`` (the default) any mask pixel inside the patch counts,
otherwise at least that fraction of the patch's pixels must be in the mask. The chance rate is the
share of patches that would count as a hit.

**Generative models** (`ModelAdapter.generates`): the maps of the generated answer's first token over the decoder's
tokens (raw attention, rollout, gradient relevancy, the logit lens) and the random baseline as a row of its own,
with the answer's log-probability curves beside the probability curves: `vlcore.attribution.generative_faithfulness`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from vlcore.data.easy_vqa import compute_shape_mask
from vlcore.errors import InputError
from vlcore.models.base import Capture
from vlcore.trace import ROLE_PATCH, Trace

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORDERS = ("positive", "negative", "random")
METHODS = ("raw_attention", "rollout", "relevancy")
LOG_FLOOR = float(np.log(np.finfo(np.float32).smallest_subnormal))  # float32's smallest positive: -103.28


@dataclass(frozen=True, eq=False)
class PerturbationCurve:
    """The explained answer's probability as patches are removed.

    Attributes:
        fractions: float64 ``[F + 1]``; starts at 0 (nothing removed).
        probabilities: float64 ``[F + 1]``; probability of ``answer`` at each fraction (for ``random``,
            the mean over the seeds).
        auc: trapezoid-rule area under the curve over ``fractions``.
        answer: the label whose probability is tracked.
        order: ``positive``, ``negative`` or ``random``.
        n_patches: patches in the image (``P``).
        n_removed: int ``[F + 1]``; patches removed at each fraction.
        log_probabilities: float64 ``[F + 1]``: the natural log of each variant's probability (for ``random``, the
            mean over the seeds of the logs), floored at ``LOG_FLOOR`` (a float32 probability that underflowed to
            0); None for a curve built by hand.
    """

    fractions: np.ndarray
    probabilities: np.ndarray
    auc: float
    answer: str
    order: str
    n_patches: int
    n_removed: np.ndarray
    log_probabilities: np.ndarray | None = None

    @property
    def log_auc(self) -> float:
        """Trapezoid-rule area under the log-probability curve (NaN without one)."""
        if self.log_probabilities is None:
            return float("nan")
        return compute_auc(self.fractions, self.log_probabilities)


def compute_patch_order(scores: np.ndarray, order: str = "positive", seed: int = 0) -> np.ndarray:
    """The order in which patches are removed: int64 ``[P]`` indices into ``scores``.

    Args:
        scores: ``[P]`` per-patch values.
        order: ``positive`` (largest first), ``negative`` (smallest first) or ``random``.
        seed: seed of the random order.

    >>> compute_patch_order(np.array([0.1, 0.5, 0.5, 0.0])).tolist()
    [1, 2, 0, 3]
    >>> compute_patch_order(np.array([0.1, 0.5, 0.5, 0.0]), "negative").tolist()
    [3, 0, 1, 2]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if order == "positive":
        return np.argsort(-scores, kind="stable")
    if order == "negative":
        return np.argsort(scores, kind="stable")
    if order == "random":
        return np.random.default_rng(seed).permutation(len(scores))
    raise InputError(f"order must be one of {ORDERS}; got {order!r}")


def compute_auc(fractions: np.ndarray, probabilities: np.ndarray) -> float:
    """Trapezoid-rule area under a curve.

    >>> compute_auc(np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0]))
    0.5
    """
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def compute_perturbation_curve(
    adapter,
    image,
    text: str,
    values: np.ndarray,
    answer: str | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    order: str = "positive",
    seed: int = 0,
    n_random: int = 1,
) -> PerturbationCurve:
    """Remove patches in order of ``values`` and track the answer's probability.

    Args:
        adapter: a `ModelAdapter` that can remove image tokens and score a target (one image pass).
        image: a PIL image.
        text: the question or caption.
        values: float ``[N]`` per-token map in the token order of the image stream (``adapter.image_stream``) of
            `extract_trace` for these inputs.
        answer: the label to track; None tracks the prediction on the unperturbed input.
        fractions: shares of the patches to remove, each in (0, 1].
        order: ``positive``, ``negative`` or ``random``.
        seed: seed of the (first) random order.
        n_random: for ``random``, average over seeds ``seed … seed + n_random - 1``.

    Returns:
        A `PerturbationCurve`.

    Raises:
        InputError: the values do not match the inputs' tokens, a bad order or fraction, or a model
            with no answer probability.
    """
    compute_patch_order(np.zeros(1), order)  # validates the order name
    curves = compute_perturbation_curves(
        adapter, image, text, {"map": values}, answer=answer, fractions=fractions,
        orders=(order,) if order != "random" else (), n_random=n_random if order == "random" else 0, seed=seed,
    )
    return curves[("map", order)] if order != "random" else curves[("random", "random")]


def compute_perturbation_curves(
    adapter,
    image,
    text: str,
    maps: Mapping[str, np.ndarray],
    answer: str | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    orders: Sequence[str] = ("positive", "negative"),
    n_random: int = 3,
    seed: int = 0,
) -> dict[tuple[str, str], PerturbationCurve]:
    """Several perturbation curves of one example in one batched forward pass.

    Args:
        adapter, image, text, answer, fractions: as in `compute_perturbation_curve`.
        maps: name -> float ``[N]`` map in trace order.
        orders: ``positive`` and/or ``negative``; each map gets one curve per order.
        n_random: seeds of the random baseline (0: none); its key is ``("random", "random")``.
        seed: first seed.

    Returns:
        ``{(map name, order): curve}``.
    """
    fracs = _check_fractions(fractions)
    batch = adapter.encode([image], [text])
    patch_cols, scores_of = _patch_columns(adapter, batch, text)
    n_patches = len(patch_cols)
    n_removed = np.array([0] + [int(round(f * n_patches)) for f in fracs])
    removal = []  # (key, order of patch indices)
    for name, values in maps.items():
        scores = scores_of(values, name)
        removal += [((name, o), compute_patch_order(scores, o)) for o in orders]
    randoms = [compute_patch_order(np.zeros(n_patches), "random", seed + s) for s in range(n_random)]
    drops = [patch_cols[:0]]  # row 0: the unperturbed input
    for perm in [p for _, p in removal] + randoms:
        drops += [patch_cols[perm[:k]] for k in n_removed[1:]]
    probs, label = _target_probabilities(adapter, batch, drops, answer)
    logs = np.log(np.maximum(probs, np.exp(LOG_FLOOR)))
    x = np.concatenate([[0.0], fracs])
    out, step = {}, len(fracs)

    def curve(part: slice, order: str, n: int = 1) -> PerturbationCurve:
        y = np.concatenate([[probs[0]], probs[part].reshape(n, step).mean(0)])
        log_y = np.concatenate([[logs[0]], logs[part].reshape(n, step).mean(0)])
        return PerturbationCurve(x, y, compute_auc(x, y), label, order, n_patches, n_removed, log_y)

    for i, (key, _) in enumerate(removal):
        out[key] = curve(slice(1 + i * step, 1 + (i + 1) * step), key[1])
    if randoms:
        out[("random", "random")] = curve(slice(1 + len(removal) * step, None), "random", n_random)
    return out


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    fracs = np.asarray(list(fractions), dtype=np.float64)
    if fracs.ndim != 1 or not len(fracs) or (fracs <= 0).any() or (fracs > 1).any() or (np.diff(fracs) <= 0).any():
        raise InputError(f"fractions must be increasing values in (0, 1], e.g. 0.1 … 0.9; got {list(fractions)}")
    return fracs


def _patch_columns(adapter, batch, text: str):
    """The image stream's patch positions in the batch (its padded layout), and a function mapping a map in that
    stream's trace order to per-patch scores."""
    if getattr(adapter, "n_passes", 1) != 1:
        raise InputError(f"patch removal needs a one-image model; {adapter.model_id} reads {adapter.n_passes} images")
    layout = batch.streams[adapter.image_stream][0]
    keep = np.flatnonzero(layout.valid)
    patch_cols = layout.index(ROLE_PATCH)
    if not len(patch_cols):
        raise InputError(f"the input {text!r} has no image patches to remove")

    def scores_of(values: np.ndarray, name: str) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(keep),):
            raise InputError(
                f"map {name!r} has shape {values.shape}; these inputs have {len(keep)} tokens in the "
                f"{adapter.image_stream!r} stream. Pass a map in the token order of extract_trace for the same "
                "image and text."
            )
        full = np.zeros(layout.n_tokens)
        full[keep] = values
        return full[patch_cols]

    return patch_cols, scores_of


@torch.no_grad()
def _target_probabilities(adapter, batch, drops: list[np.ndarray], answer: str | None) -> tuple[np.ndarray, str]:
    """Probability of the target in each variant of ``batch`` without the image tokens ``drops[i]`` (``drops[0]``
    must be empty: the unperturbed input, whose top prediction is the target when ``answer`` is None)."""
    variants = adapter.mask_image_tokens(batch, drops)
    captured = adapter.capture(variants, Capture(blocks=(), hidden=False))
    _, probs, label = adapter.target_score(captured.output, answer)
    return probs.float().cpu().numpy().astype(np.float64), label


# -- pointing game ----------------------------------------------------------------------------------


def compute_patch_coverage(trace: Trace, mask: np.ndarray) -> np.ndarray:
    """Share of each grid cell's pixels (its box on the first image as the model saw it) inside the mask:
    float64 ``[rows, cols]``."""
    if not trace.images:
        raise InputError(f"trace {trace.example_id} has no image")
    boxes = trace.images[0].boxes.astype(np.int64)  # [rows, cols, 4]: x0, y0, x1, y1
    need = (int(boxes[..., 3].max()), int(boxes[..., 2].max()))
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < need[0] or m.shape[1] < need[1]:
        raise InputError(f"the mask is {np.shape(mask)}; the trace's image is {need} pixels")
    total = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    total[1:, 1:] = m.cumsum(0).cumsum(1)  # summed-area table: any box's sum in four lookups
    x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
    inside = total[y1, x1] - total[y0, x1] - total[y1, x0] + total[y0, x0]
    return inside / np.maximum((x1 - x0) * (y1 - y0), 1)


def top_patch(trace: Trace, values: np.ndarray) -> tuple[int, int]:
    """(row, col) of the patch token with the largest value (ties: first in row-major order)."""
    idx, rc = trace.patch_positions()
    if not len(idx):
        raise InputError(f"trace {trace.example_id} has no image patches")
    values = np.asarray(values)
    if values.shape != (trace.n_tokens,):
        raise InputError(f"the map has shape {values.shape}; the trace has {trace.n_tokens} tokens")
    best = int(np.argmax(values[idx]))
    return int(rc[best, 0]), int(rc[best, 1])


def _counts_as_hit(coverage: np.ndarray, min_overlap: float) -> np.ndarray:
    return coverage > 0 if min_overlap <= 0 else coverage >= min_overlap


def pointing_hit(trace: Trace, values: np.ndarray, mask: np.ndarray, min_overlap: float = 0.0) -> bool:
    """Whether the map's top patch overlaps the shape mask.

    Args:
        trace: the trace the map belongs to (grid, patch size, patch positions).
        values: float ``[N]`` map in trace order.
        mask: bool ``[h, w]`` from `compute_shape_mask`.
        min_overlap: 0 (default) counts any mask pixel in the patch; otherwise the share of the
            patch's pixels that must lie in the mask.
    """
    r, c = top_patch(trace, values)
    return bool(_counts_as_hit(compute_patch_coverage(trace, mask), min_overlap)[r, c])


def pointing_chance(trace: Trace, mask: np.ndarray, min_overlap: float = 0.0) -> float:
    """Share of patches that count as a hit: the pointing accuracy of a uniformly random patch."""
    return float(_counts_as_hit(compute_patch_coverage(trace, mask), min_overlap).mean())


# -- evaluation -------------------------------------------------------------------------------------


def compute_method_maps(trace: Trace, relevancy_values: np.ndarray, layer: int = -1, start_layer: int = 0,
                        query: int | None = None) -> dict:
    """The three maps of a trace's viewed block: raw attention (the query's row, mean over heads), rollout,
    relevancy.

    Args:
        query: the query row explained; None: the block's default query (`vlcore.attribution.relevance.trace_query`).
    """
    from vlcore.attribution.relevance import compute_raw_map, compute_rollout_map, trace_query

    query = trace_query(trace) if query is None else query
    return {
        "raw_attention": compute_raw_map(trace, layer=layer, head=None, query=query),
        "rollout": compute_rollout_map(trace, start_layer=start_layer, query=query),
        "relevancy": np.asarray(relevancy_values, dtype=np.float32),
    }


def image_block(adapter) -> str:
    """The self-attention block whose queries are the image stream's tokens (the default block when it is one):
    its maps are per image token, as patch removal needs.

    Raises:
        InputError: the model has no such block.
    """
    specs = adapter.block_specs()
    names = [adapter.default_block] + list(specs)
    found = next((n for n in names if specs[n].is_self and specs[n].query == adapter.image_stream), None)
    if found is None:
        raise InputError(f"{adapter.model_id} has no self-attention block over its image tokens "
                         f"({adapter.image_stream!r}); faithfulness compares maps over image tokens")
    return found


def faithfulness_rows(
    adapter, example, fractions: Sequence[float] = DEFAULT_FRACTIONS, n_random: int = 3, min_overlap: float = 0.0,
    layer: int = -1, start_layer: int = 0, lens_layer: int | None = None,
) -> list[dict]:
    """Per-method faithfulness of one example: one dict per method (`METHODS`; a generative model's in
    `vlcore.attribution.generative_faithfulness.GENERATIVE_METHODS`, its random baseline a row of its own).

    Keys: ``example_id, method, answer, correct, pointing_hit, pointing_chance, auc_positive,
    auc_negative, auc_random`` (a generative model's rows also ``auc_logprob_positive, auc_logprob_negative,
    auc_logprob_random``).

    Args:
        lens_layer: a generative model's logit-lens map: the residual-stream state read (None: the mean over them).
            A generative model's rollout is the one its pass stored, from layer 0: ``start_layer`` does not apply.
    """
    from vlcore.attribution.relevance import extract_relevancy
    from vlcore.run.extract import extract_trace

    if adapter.generates:
        from vlcore.attribution.generative_faithfulness import generative_faithfulness_rows

        return generative_faithfulness_rows(adapter, example, fractions, n_random, min_overlap, layer, lens_layer)
    image = example.load_image()
    block = image_block(adapter)
    trace = extract_trace(adapter, image, example.question, example.example_id, example.answers or None).select(block)
    rel = extract_relevancy(adapter, image, example.question, answer=trace.predicted, block=block)
    maps = compute_method_maps(trace, rel.values, layer=layer, start_layer=start_layer, query=rel.query)
    curves = compute_perturbation_curves(
        adapter, image, example.question, maps, answer=trace.predicted, fractions=fractions, n_random=n_random
    )
    mask = compute_shape_mask(trace.image)
    chance = pointing_chance(trace, mask, min_overlap)
    return [
        {
            "example_id": example.example_id,
            "method": name,
            "answer": trace.predicted,
            "correct": trace.correct,
            "pointing_hit": pointing_hit(trace, values, mask, min_overlap),
            "pointing_chance": chance,
            "auc_positive": curves[(name, "positive")].auc,
            "auc_negative": curves[(name, "negative")].auc,
            "auc_random": curves[("random", "random")].auc,
        }
        for name, values in maps.items()
    ]


def evaluate_faithfulness(
    adapter,
    examples: Sequence,
    limit: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n_random: int = 3,
    min_overlap: float = 0.0,
    layer: int = -1,
    start_layer: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    details: list | None = None,
    lens_layer: int | None = None,
) -> pd.DataFrame:
    """Pointing accuracy and perturbation AUCs of raw attention, rollout and relevancy (a generative model: also
    the logit lens, and the random baseline as a row; see `vlcore.attribution.generative_faithfulness`).

    Args:
        adapter: a `ModelAdapter` with a gradient pass, image-token removal and a self-attention block over its
            image tokens (`image_block`), or a generative model whose answer block reads its image tokens.
        examples: `Example` records (image, question); the first ``limit`` are used.
        limit: how many examples (None: all).
        fractions, n_random: perturbation settings (see `compute_perturbation_curves`).
        min_overlap: pointing-game overlap rule (see `pointing_hit`).
        layer: the raw-attention layer; start_layer: the rollout's first layer.
        progress: called as ``progress(done, total, seconds_elapsed)`` after each example.
        details: if a list, the per-example rows are appended to it.
        lens_layer: a generative model's logit-lens state (None: the mean over states).

    Returns:
        One row per method: ``method, n, pointing_accuracy, pointing_chance, auc_positive, auc_negative,
        auc_random, positive_below_random`` (means over examples; the last is the share of examples whose
        positive-order AUC is below the random-order AUC), and for a generative model the log-probability AUCs
        ``auc_logprob_positive, auc_logprob_negative, auc_logprob_random``.

    Raises:
        InputError: no examples.
    """
    chosen = list(examples)[:limit] if limit is not None else list(examples)
    if not chosen:
        raise InputError("faithfulness needs at least one example; got none")
    rows, start = [], time.perf_counter()
    for i, example in enumerate(chosen):
        rows += faithfulness_rows(adapter, example, fractions, n_random, min_overlap, layer, start_layer, lens_layer)
        if progress is not None:
            progress(i + 1, len(chosen), time.perf_counter() - start)
    frame = pd.DataFrame(rows)
    if details is not None:
        details.append(frame)
    return summarise_faithfulness(frame)


def summarise_faithfulness(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-method means of per-example rows (see `evaluate_faithfulness`)."""
    frame = frame.assign(positive_below_random=frame["auc_positive"] < frame["auc_random"],
                         pointing_hit=frame["pointing_hit"].astype(float))
    logs = {c: (c, "mean") for c in ("auc_logprob_positive", "auc_logprob_negative", "auc_logprob_random")
            if c in frame}
    summary = frame.groupby("method", sort=False).agg(
        n=("example_id", "size"),
        pointing_accuracy=("pointing_hit", "mean"),
        pointing_chance=("pointing_chance", "mean"),
        auc_positive=("auc_positive", "mean"),
        auc_negative=("auc_negative", "mean"),
        auc_random=("auc_random", "mean"),
        positive_below_random=("positive_below_random", "mean"),
        **logs,
    )
    return summary.reset_index()
