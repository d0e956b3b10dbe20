"""Per-head tables from tidy statistics: normalisation, sweep slices, aggregation and comparison.

Input frames are tidy (``example_id, layer, head, metric, value``): `vlcore.analysis.stats.compute_trace_summaries`
for one example, a sweep's ``head_stats.parquet``, or `vlcore.attribution.ablation.importance_frame` rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vlcore.errors import InputError

NORMS = ("raw", "z")


def zscore_across_heads(frame: pd.DataFrame) -> pd.DataFrame:
    """Z-score each metric across *all* heads of the model, per example.

    For example ``e`` and metric ``m``: ``z = (v - mean) / std`` with mean and (population) std over
    the ``L × H`` values of ``(e, m)``. This keeps layers comparable; VL-InterpreT z-scored each
    column of heads separately, which hides differences between layers. A metric that is constant
    over heads gets z = 0; a value that is NaN (a metric that does not apply, `vlcore.analysis.stats.not_applicable`)
    stays NaN.

    >>> f = pd.DataFrame({"example_id": "e", "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
    ...                   "metric": "m", "value": [1.0, 2.0, 3.0, 4.0]})
    >>> [round(float(v), 3) for v in zscore_across_heads(f)["value"]]
    [-1.342, -0.447, 0.447, 1.342]
    """
    out = frame.copy()
    groups = out.groupby(["example_id", "metric"], observed=True)["value"]
    mean, std = groups.transform("mean"), groups.transform(lambda v: v.std(ddof=0))
    z = (out["value"] - mean) / std.where(std > 0, np.nan)
    out["value"] = z.where(out["value"].isna() | z.notna(), 0.0).astype(np.float32)
    return out


def parse_slice(spec: str | None) -> tuple[str, str]:
    """``"all" | "correct" | "incorrect" | "cat:<v>" | "ans:<v>" | "pred:<v>"`` into ``(kind, value)``.

    >>> parse_slice("cat:color")
    ('cat', 'color')
    >>> parse_slice(None)
    ('all', '')
    """
    spec = (spec or "all").strip()
    if spec in ("all", "correct", "incorrect"):
        return spec, ""
    kind, sep, value = spec.partition(":")
    if sep and kind in ("cat", "ans", "pred") and value:
        return kind, value
    raise InputError(f"unknown slice {spec!r}: use all, correct, incorrect, cat:<category>, ans:<gold answer> "
                     "or pred:<predicted answer>")


def slice_examples(predictions: pd.DataFrame, spec: str | None) -> list[str]:
    """Example ids of a sweep's predictions table in a slice (see `parse_slice`)."""
    kind, value = parse_slice(spec)
    p = predictions
    if kind == "all":
        keep = np.ones(len(p), bool)
    elif kind in ("correct", "incorrect"):
        keep = (p["correct"] == (kind == "correct")).fillna(False).to_numpy(bool)
    elif kind == "cat":
        keep = (p["category"].astype(str) == value).to_numpy()
    elif kind == "pred":
        keep = (p["prediction"].astype(str) == value).to_numpy()
    else:
        keep = np.array([value in (list(g) if g is not None else []) for g in p["gold"]], bool)
    return p.loc[keep, "example_id"].astype(str).tolist()


def slice_options(predictions: pd.DataFrame, limit: int = 30) -> list[str]:
    """The slices worth offering for a sweep: all, correct/incorrect, its categories and frequent answers."""
    opts = ["all"]
    if predictions["correct"].notna().any():
        opts += ["correct", "incorrect"]
    cats = predictions["category"].dropna().astype(str)
    opts += [f"cat:{c}" for c in cats.value_counts().index[:limit] if c]
    golds = pd.Series([a for g in predictions["gold"] if g is not None for a in g], dtype=object)
    opts += [f"ans:{a}" for a in golds.value_counts().index[:limit]]
    return opts


def aggregate_heads(heads: pd.DataFrame, example_ids: list[str] | None = None, norm: str = "raw") -> pd.DataFrame:
    """Mean ± std and n per (layer, head, metric) over examples.

    Args:
        heads: tidy statistics.
        example_ids: the examples to use (None: all).
        norm: ``raw`` or ``z`` (z-scored across heads per example before averaging).

    Returns:
        Columns ``layer, head, metric, mean, std, n``; ``std`` is the sample std (NaN for n = 1).
    """
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    frame = heads if example_ids is None else heads[heads["example_id"].astype(str).isin(set(example_ids))]
    if norm == "z":
        frame = zscore_across_heads(frame)
    grouped = frame.groupby(["layer", "head", "metric"], observed=True)["value"]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    out["metric"] = out["metric"].astype(str)
    return out


def compare_slices(heads: pd.DataFrame, ids_a: list[str], ids_b: list[str], norm: str = "raw") -> pd.DataFrame:
    """Per-head difference of two slices' means: columns ``layer, head, metric, mean`` (= a − b), ``mean_a,
    mean_b, n_a, n_b``."""
    a, b = aggregate_heads(heads, ids_a, norm), aggregate_heads(heads, ids_b, norm)
    both = a.merge(b, on=["layer", "head", "metric"], suffixes=("_a", "_b"))
    both["mean"] = both["mean_a"] - both["mean_b"]
    return both[["layer", "head", "metric", "mean", "mean_a", "mean_b", "n_a", "n_b"]]


def head_table(aggregated: pd.DataFrame) -> pd.DataFrame:
    """One row per head, one column per metric (the means), sorted by layer and head; a metric that does not
    apply to any head (NaN everywhere) keeps its column, NaN.

    >>> agg = pd.DataFrame({"layer": [0, 0], "head": [0, 0], "metric": ["a", "b"], "mean": [1.0, float("nan")]})
    >>> list(head_table(agg).columns)
    ['layer', 'head', 'a', 'b']
    """
    wide = aggregated.pivot_table(index=["layer", "head"], columns="metric", values="mean", observed=True,
                                  dropna=False)
    wide.columns.name = None
    return wide.reset_index().sort_values(["layer", "head"]).reset_index(drop=True)


def top_heads(table: pd.DataFrame, metric: str, k: int = 5, largest: bool = True) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest (or smallest) value of a metric, as ``(layer, head)``."""
    if metric not in table.columns:
        raise InputError(f"no metric {metric!r} in the table; choose one of {[c for c in table.columns][2:]}")
    ranked = table.dropna(subset=[metric]).sort_values(metric, ascending=not largest).head(k)
    return [(int(r.layer), int(r.head)) for r in ranked.itertuples()]
