"""Probing (VALUE, Cao et al. 2020): what each layer's hidden states know, and which heads tie words to regions.

**Representation probes.** One linear probe per layer (0 = the embedding output, ``l`` = the output of
transformer layer ``l``) on the vectors of one token kind (`TOKEN_KINDS`), predicting a label (`TARGETS`):
an example-level column (answer, category, the easy-VQA image's shape or colour) or, for patches, whether
the patch lies inside the region (``in_region``: the easy-VQA shape mask, the boxes of the VCR objects the
question names). The probe is ridge regression on one-hot targets, argmax decoded (scikit-learn's
``RidgeClassifier`` rule), solved in closed form from one Gram matrix per fold block, so every fold, the
task and its control share one pass over the data (`compute_layer_probes`).

**Attention probes** (VALUE's visual coreference). For each (word, patch) pair the features are the
word's attention to that patch in every layer and head (``L × H`` values, averaged over the word's pieces);
the label says whether the patch lies inside the region the word names. A logistic regression on
standardised features gives held-out accuracy and one weight per head: the grounding heads
(`compute_attention_probe`). `rank_heads` sets the weight ranking beside the heads' txt→img share.

**Baselines** (Hewitt & Liang 2019). Folds are split by example (``GroupKFold``, or one
``GroupShuffleSplit`` hold-out for ``folds=1``): no example has tokens on both sides; where examples share an
image (easy-VQA asks about 10 questions per image, VCR several per still) the unit is the image, so a probe
of an image's shape never meets a test image it was trained on (`split_units`). The control task
shuffles labels grouped by example: each example takes the labels of another example (at the same patch
position for patch targets), so the label distribution, and its dependence on position, is kept while
the link to the example's content is cut (`compute_control_labels`). Selectivity = accuracy − control
accuracy. The majority rate is the test share of the training set's most frequent label.

Labels (easy-VQA shape masks, VCR boxes, grounding words) are made by `vlcore.analysis.probe_labels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg
from threadpoolctl import threadpool_limits

from vlcore.errors import VLScopeError

PROBE_TYPES = ("representation", "attention")
TOKEN_KINDS = {
    "cls": "text [CLS]",
    "text_mean": "mean of the question's words",
    "words": "each word piece of the question",
    "image_cls": "image CLS",
    "patch": "image patches",
}
EXAMPLE_TARGETS = ("answer", "category", "shape", "color")
PATCH_TARGET = "in_region"
TARGETS = (*EXAMPLE_TARGETS, PATCH_TARGET)
WORD_ROLES = ("shape", "color", "object", "all")  # attention-probe words: easy-VQA shape/colour names, VCR objects
DEFAULT_COVER = 0.5  # a patch is inside the region when at least this share of its pixels is
DEFAULT_FOLDS = 5
# BLAS threads per fit. OpenBLAS threads spin while they wait: on a machine whose cores are busy with other work
# (a shared server, other sessions) two threads ran the 12-layer probe 3-15x slower than one (bench/probing.py).
BLAS_THREADS = 1
DEFAULT_ALPHA = 0.01  # ridge penalty relative to the mean eigenvalue of the training Gram matrix


class ProbingError(VLScopeError):
    """A probe cannot be fitted on the chosen tokens, target or data."""


# -- splits and baselines ---------------------------------------------------------------------------


def split_by_example(groups: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold of each row, whole examples to one fold: int ``[T]``.

    ``folds >= 2``: ``GroupKFold`` (every fold is tested once); ``folds == 1``: one ``GroupShuffleSplit``
    hold-out of a quarter of the examples (fold 1 is tested, fold 0 trains).

    Raises:
        ProbingError: fewer examples than folds (at least 2 for a hold-out).
    """
    from sklearn.model_selection import GroupKFold, GroupShuffleSplit

    codes, uniq = pd.factorize(pd.Series(groups).astype(str))
    need = max(folds, 2)
    if len(uniq) < need:
        raise ProbingError(f"a probe split by example needs at least {need} examples; this selection has "
                           f"{len(uniq)}. Use a larger sweep or fewer folds.")
    fold = np.zeros(len(codes), dtype=np.int64)
    if folds == 1:
        _, test = next(GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=seed).split(codes, groups=codes))
        fold[test] = 1
        return fold
    for f, (_, test) in enumerate(GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(codes, groups=codes)):
        fold[test] = f
    return fold


def compute_control_labels(labels: np.ndarray, groups: np.ndarray, keys: np.ndarray | None = None,
                           seed: int = 0) -> np.ndarray:
    """Control-task labels: each example takes another example's labels (Hewitt & Liang's control task,
    with the example as the unit whose label is shuffled). The examples are shuffled in one random cycle,
    so no example keeps its own labels.

    A row takes the label of the row with the same ``key`` (e.g. the patch position) in the example it is
    mapped to; a key that example lacks gets a random label of the rows with that key. ``keys=None`` treats
    the target as example-level (each example's first label).

    >>> compute_control_labels(np.array(["a", "a", "b", "c"]), np.array([0, 0, 1, 2]), seed=0).tolist()
    ['b', 'b', 'c', 'a']
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    codes, uniq = pd.factorize(pd.Series(groups).astype(str))
    key_codes = np.zeros(len(labels), np.int64) if keys is None else pd.factorize(pd.Series(keys).astype(str))[0]
    table = pd.DataFrame({"ex": codes, "key": key_codes, "row": np.arange(len(labels))})
    first = table.drop_duplicates(["ex", "key"]).set_index(["ex", "key"])["row"]
    order = rng.permutation(len(uniq))
    cycle = np.empty(len(uniq), dtype=np.int64)
    cycle[order] = np.roll(order, -1)  # example order[i] takes the labels of example order[i + 1]
    donor = cycle[codes]
    index = pd.MultiIndex.from_arrays([donor, key_codes])
    rows = np.array(first.reindex(index).to_numpy(dtype=np.float64))  # a writable copy (NaN: key missing)
    missing = np.isnan(rows)
    if missing.any():  # a key the donor example lacks: a random row with that key
        by_key = table.groupby("key")["row"].apply(np.asarray)
        rows[missing] = [rng.choice(by_key[k]) for k in key_codes[missing]]
    return labels[rows.astype(np.int64)]


def _majority(y_train: np.ndarray, y_test: np.ndarray) -> float:
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(y_test == values[counts.argmax()]))


# -- representation probes --------------------------------------------------------------------------


def _ridge_fold_accuracy(x: np.ndarray, targets: list[np.ndarray], fold: np.ndarray, tested: list[int],
                         alpha: float) -> np.ndarray:
    """Held-out accuracy of ridge one-vs-rest probes: float ``[n_targets, n_tested]``.

    One Gram matrix per fold block; fold ``f``'s training Gram is the total minus block ``f``'s, so all
    folds and all targets cost one pass over ``x`` plus one ``D × D`` solve per fold.
    """
    x = np.asarray(x, dtype=np.float32)
    # the penalty never falls below a millionth of the features' scale: vectors that do not vary (an image CLS at
    # the embedding layer, one image's CLS in a fold) leave a Gram of float rounding, not positive definite
    floor = 1e-6 * float(np.mean(np.square(x, dtype=np.float64))) + 1e-12
    x = x - x.mean(0, keepdims=True)  # global centring keeps the float32 Gram well conditioned
    onehots = [np.eye(int(t.max()) + 1, dtype=np.float32)[t] for t in targets]
    y = np.concatenate(onehots, axis=1)
    # the blocks whose sums are needed: every fold block, or for a hold-out only the training block
    blocks = [0] if list(tested) == [1] and fold.max() == 1 else list(np.unique(fold))
    gram = {b: (x[fold == b].T @ x[fold == b]).astype(np.float64) for b in blocks}
    xy = {b: (x[fold == b].T @ y[fold == b]).astype(np.float64) for b in blocks}
    sx = {b: x[fold == b].sum(0, dtype=np.float64) for b in blocks}
    sy = {b: y[fold == b].sum(0, dtype=np.float64) for b in blocks}
    n = {b: int((fold == b).sum()) for b in blocks}
    g_all, xy_all, sx_all, sy_all = sum(gram.values()), sum(xy.values()), sum(sx.values()), sum(sy.values())
    if blocks == [0]:  # hold-out: the training block's sums are the totals; the tested block adds nothing
        gram[1], xy[1], sx[1], sy[1], n[1] = 0.0, 0.0, 0.0, 0.0, 0
    n_all = sum(n.values())
    out = np.zeros((len(targets), len(tested)))
    d = x.shape[1]
    for j, f in enumerate(tested):
        nt = n_all - n[f]
        mx, my = (sx_all - sx[f]) / nt, (sy_all - sy[f]) / nt
        g = g_all - gram[f] - nt * np.outer(mx, mx)
        c = xy_all - xy[f] - nt * np.outer(mx, my)
        lam = alpha * max(np.trace(g) / d, floor)
        w = scipy.linalg.solve(g + lam * np.eye(d), c, assume_a="pos", check_finite=False)
        scores = (x[fold == f] - mx.astype(np.float32)) @ w.astype(np.float32) + my.astype(np.float32)
        start = 0
        for k, (t, oh) in enumerate(zip(targets, onehots)):
            pred = scores[:, start : start + oh.shape[1]].argmax(1)
            out[k, j] = np.mean(pred == t[fold == f])
            start += oh.shape[1]
    return out


def compute_layer_probes(vectors: np.ndarray, labels: np.ndarray, groups: np.ndarray, keys: np.ndarray | None = None,
                         folds: int = DEFAULT_FOLDS, alpha: float = DEFAULT_ALPHA, seed: int = 0,
                         layers: Sequence[int] | None = None, blas_threads: int | None = BLAS_THREADS) -> pd.DataFrame:
    """One linear probe per layer: held-out accuracy beside the control task and the majority class.

    Args:
        vectors: ``[L + 1, T, D]`` token vectors (float16 or float32; layer 0 = embeddings).
        labels: ``[T]`` class labels (any hashable values).
        groups: ``[T]`` example of each row: folds never split an example.
        keys: ``[T]`` position keys for the control task (patch ``row,col``), None for example-level targets.
        folds: ``GroupKFold`` folds (1: one hold-out of a quarter of the examples).
        alpha: ridge penalty relative to the mean eigenvalue of the centred training Gram matrix (the mean
            feature variance times the training rows); 0.01 shrinks only directions 100 times weaker than the
            average. On the demo model's shape probes 0.001–0.01 score within 0.05 of each other, 1.0 lower.
        seed: seed of the split and the control shuffle.
        layers: which layers to probe (default all).
        blas_threads: BLAS threads while fitting (`BLAS_THREADS`); None keeps the libraries' own count.

    Returns:
        One row per layer: ``layer, accuracy, accuracy_std, control, majority, selectivity, n_train, n_test,
        n_units, n_classes`` (accuracies are means over the tested folds; ``n_units``: the distinct ``groups``).

    Raises:
        ProbingError: shapes disagree, fewer than two classes, or too few examples for the folds.
    """
    vectors = np.asarray(vectors)
    labels, groups = np.asarray(labels), np.asarray(groups)
    if vectors.ndim != 3 or vectors.shape[1] != len(labels) or len(groups) != len(labels):
        raise ProbingError(f"vectors must be [layers, tokens, width] with one label and example per token; got "
                           f"{vectors.shape}, {len(labels)} labels and {len(groups)} examples")
    codes, classes = pd.factorize(pd.Series(labels).astype(str))
    if len(classes) < 2:
        raise ProbingError(f"the target has {len(classes)} class ({', '.join(map(str, classes)) or 'none'}) in this "
                           "selection; a probe needs at least two. Pick another target or more examples.")
    fold = split_by_example(groups, folds, seed)
    tested = [1] if folds == 1 else list(range(folds))
    control = pd.factorize(pd.Series(compute_control_labels(codes, groups, keys, seed)).astype(str))[0]
    majority = np.mean([_majority(codes[fold != f], codes[fold == f]) for f in tested])
    rows = []
    for layer in (range(vectors.shape[0]) if layers is None else layers):
        with threadpool_limits(limits=blas_threads):
            acc = _ridge_fold_accuracy(vectors[layer], [codes, control], fold, tested, alpha)
        rows.append({
            "layer": int(layer), "accuracy": acc[0].mean(), "accuracy_std": acc[0].std(), "control": acc[1].mean(),
            "majority": majority, "selectivity": acc[0].mean() - acc[1].mean(),
            "n_train": int(np.mean([(fold != f).sum() for f in tested])),
            "n_test": int(np.mean([(fold == f).sum() for f in tested])),
            "n_units": int(pd.Series(groups).nunique()), "n_classes": len(classes),
        })
    return pd.DataFrame(rows)


# -- attention probes --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AttentionProbe:
    """A fitted attention probe.

    Attributes:
        summary: one row: ``accuracy, balanced_accuracy, auc, control, control_auc, majority, selectivity,
            n_pairs, n_units, positive_rate`` (``n_units``: the distinct ``groups``).
        weights: float64 ``[L, H]``: the logistic regression's weight of each head's attention (standardised
            features, fitted on every pair): positive = more attention to the region.
    """

    summary: pd.DataFrame
    weights: np.ndarray


def compute_attention_probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                            keys: np.ndarray | None = None, folds: int = 3, c: float = 1.0,
                            seed: int = 0, blas_threads: int | None = BLAS_THREADS) -> AttentionProbe:
    """Fit the visual-coreference probe: does a word's attention to a patch say the patch is in its region?

    Args:
        features: ``[Q, L, H]`` attention of the pair's word to the pair's patch in every layer and head.
        labels: bool ``[Q]``: the patch lies inside the region the word names.
        groups: ``[Q]`` example of each pair (folds never split an example).
        keys: ``[Q]`` patch position keys for the control task.
        folds: ``GroupKFold`` folds (1: one hold-out).
        c: inverse regularisation strength of the logistic regression.
        seed: seed of the split and the control shuffle.
        blas_threads: BLAS threads while fitting (`BLAS_THREADS`); None keeps the libraries' own count.

    Raises:
        ProbingError: shapes disagree, one class only, or too few examples.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    feats = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels).astype(bool)
    if feats.ndim != 3 or len(feats) != len(y) or len(groups) != len(y):
        raise ProbingError(f"attention features must be [pairs, layers, heads] with one label and example per pair; "
                           f"got {feats.shape}, {len(y)} labels and {len(groups)} examples")
    if y.all() or not y.any():
        raise ProbingError(f"every one of the {len(y)} word–patch pairs is {'inside' if y.all() else 'outside'} its "
                           "region; the probe needs both. Lower the coverage threshold or use more examples.")
    n_layers, n_heads = feats.shape[1:]
    x = feats.reshape(len(feats), -1)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    fold = split_by_example(groups, folds, seed)
    tested = [1] if folds == 1 else list(range(folds))
    control = compute_control_labels(y, groups, keys, seed)
    scores = {"accuracy": [], "balanced_accuracy": [], "auc": [], "control": [], "control_auc": [], "majority": []}

    def fit(train: np.ndarray, target: np.ndarray):
        with threadpool_limits(limits=blas_threads):
            return LogisticRegression(C=c, max_iter=300).fit(x[train], target[train])

    for f in tested:
        train, test = fold != f, fold == f
        for name, target in (("", y), ("control", control)):
            if target[train].all() or not target[train].any():
                continue
            prob = fit(train, target).predict_proba(x[test])[:, 1]
            pred = prob >= 0.5
            both = target[test].any() and not target[test].all()
            auc = roc_auc_score(target[test], prob) if both else np.nan
            if name:
                scores["control"].append(np.mean(pred == target[test]))
                scores["control_auc"].append(auc)
                continue
            tpr = pred[target[test]].mean() if target[test].any() else np.nan
            tnr = (~pred[~target[test]]).mean() if (~target[test]).any() else np.nan
            scores["accuracy"].append(np.mean(pred == target[test]))
            scores["balanced_accuracy"].append(np.nanmean([tpr, tnr]))
            scores["auc"].append(auc)
            scores["majority"].append(_majority(y[train], y[test]))
    weights = fit(np.ones(len(y), bool), y).coef_.reshape(n_layers, n_heads).astype(np.float64)
    summary = {k: float(np.nanmean(v)) if len(v) else np.nan for k, v in scores.items()}
    summary["selectivity"] = summary["accuracy"] - summary["control"]
    summary.update(n_pairs=len(y), n_units=int(pd.Series(groups).nunique()), positive_rate=float(y.mean()))
    return AttentionProbe(pd.DataFrame([summary]), weights)


def rank_heads(weights: np.ndarray, shares: dict[str, np.ndarray] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Heads ranked by probe weight and by each given txt→img share, side by side, with the rank agreement.

    Args:
        weights: ``[L, H]`` probe weights.
        shares: name -> ``[L, H]`` share of each head (e.g. the sweep's ``txtq_to_img``).

    Returns:
        ``(table, agreement)``: one row per head (``layer, head, weight, weight_rank`` and per share
        ``<name>, <name>_rank``; rank 1 = largest), sorted by weight rank; and one row per share
        (``share, spearman, p_value``; NaN when either ranking is constant).

    >>> t, a = rank_heads(np.array([[3.0, 1.0], [2.0, 0.0]]), {"s": np.array([[0.9, 0.1], [0.5, 0.2]])})
    >>> t[["layer", "head", "weight_rank", "s_rank"]].values.tolist(), round(float(a["spearman"][0]), 3)
    ([[0, 0, 1, 1], [1, 0, 2, 2], [0, 1, 3, 4], [1, 1, 4, 3]], 0.8)
    """
    from scipy.stats import spearmanr

    w = np.asarray(weights, dtype=np.float64)
    layer, head = np.divmod(np.arange(w.size), w.shape[1])
    table = pd.DataFrame({"layer": layer, "head": head, "weight": w.ravel()})
    table["weight_rank"] = table["weight"].rank(ascending=False, method="min").astype(int)
    rows = []
    for name, share in (shares or {}).items():
        table[name] = np.asarray(share, dtype=np.float64).ravel()
        table[f"{name}_rank"] = table[name].rank(ascending=False, method="min").astype(int)
        rho = p = float("nan")
        if table[name].nunique() > 1 and table["weight"].nunique() > 1:
            res = spearmanr(table["weight"], table[name])
            rho, p = float(res.statistic), float(res.pvalue)
        rows.append({"share": name, "spearman": rho, "p_value": p})
    agreement = pd.DataFrame(rows, columns=["share", "spearman", "p_value"])
    return table.sort_values(["weight_rank", "layer", "head"]).reset_index(drop=True), agreement


# -- inputs from a sweep --------------------------------------------------------------------------------


def split_units(example_ids: np.ndarray, images: pd.Series | None) -> np.ndarray:
    """The unit that folds and the control keep whole: each example's image where it is known (``images``:
    image id by example id), else the example.

    >>> split_units(np.array(["q1", "q2", "q3"]), pd.Series({"q1": "img7", "q2": "img7"})).tolist()
    ['image:img7', 'image:img7', 'example:q3']
    """
    ids = np.asarray(example_ids, dtype=object)
    if images is None:
        return np.array([f"example:{e}" for e in ids], dtype=object)
    found = images[~images.index.duplicated()].reindex(ids).to_numpy(dtype=object)
    return np.array([f"image:{i}" if pd.notna(i) else f"example:{e}" for e, i in zip(ids, found)],
                    dtype=object)


def _kind_rows(tokens: pd.DataFrame, kind: str) -> np.ndarray:
    """Rows of a `TokenSet`'s token table that are of one `TOKEN_KINDS` kind (``text_mean``: the words)."""
    if kind not in TOKEN_KINDS:
        raise ProbingError(f"token kind must be one of {', '.join(TOKEN_KINDS)}; got {kind!r}")
    special, modality = tokens["special"].to_numpy(bool), tokens["modality"].to_numpy()
    keep = {
        "cls": special & (modality == 0) & (tokens["token"].to_numpy() == 0),
        "image_cls": special & (modality == 1),
        "patch": tokens["kind"].to_numpy() == "patch",
    }.get(kind, tokens["kind"].to_numpy() == "text")
    return np.flatnonzero(keep)


def representation_inputs(token_set, kind: str, target: str, labels: pd.DataFrame,
                          cover: pd.DataFrame | None = None, min_cover: float = DEFAULT_COVER) -> tuple:
    """Vectors and labels of one token kind for `compute_layer_probes`.

    Args:
        token_set: a `vlcore.analysis.projection.TokenSet` (a sweep's kept vectors).
        kind: one of `TOKEN_KINDS` (``text_mean`` pools each example's words by their mean).
        target: an example-level column of ``labels`` or ``in_region`` (patches only).
        labels: example-level targets indexed by example id (`vlcore.run.probe_sweep.example_label_table`).
        cover: ``example_id, row, col, cover`` per patch (`vlcore.run.probe_sweep.patch_cover_table`).
        min_cover: the share of a patch inside the region that makes it ``inside``.

    Returns:
        ``(vectors [L + 1, T, D], labels [T], groups [T], keys [T] or None)``; tokens without a label are
        left out; ``groups`` are `split_units` (the image where ``labels`` has an ``image`` column).

    Raises:
        ProbingError: an unknown kind or target, ``in_region`` on other tokens than patches, or no token with
            a label.
    """
    rows = _kind_rows(token_set.tokens, kind)
    tokens = token_set.tokens.iloc[rows]
    ids = tokens["example_id"].astype(str).to_numpy()
    keys = None
    if target == PATCH_TARGET:
        if kind != "patch":
            raise ProbingError(f"the target {PATCH_TARGET} is a patch label: choose the token kind 'patch' "
                               f"(got {kind!r}), or an example-level target for other tokens")
        table = (cover if cover is not None else pd.DataFrame(columns=["example_id", "row", "col", "cover"]))
        index = pd.MultiIndex.from_arrays([table["example_id"].astype(str), table["row"].astype(np.int64),
                                           table["col"].astype(np.int64)])
        found = pd.Series(table["cover"].to_numpy(np.float64), index=index)
        found = found[~found.index.duplicated()]
        values = found.reindex(pd.MultiIndex.from_arrays([ids, tokens["row"].to_numpy(), tokens["col"].to_numpy()]))
        y = np.where(values.to_numpy() >= min_cover, "inside", "outside").astype(object)
        y[np.isnan(values.to_numpy())] = None
        keys = (tokens["row"].astype(str) + "," + tokens["col"].astype(str)).to_numpy()
    elif target in labels.columns:
        y = labels[target].reindex(ids).to_numpy(dtype=object)
    elif target in ("shape", "color"):
        raise ProbingError(f"this sweep has no image {target} labels: they come with probe data; make a probe sweep "
                           "of easy-VQA examples (run_sweep(..., probe=True), or on the Probing page)")
    else:
        raise ProbingError(f"target {target!r} is not known for this sweep; it has {', '.join(map(str, labels.columns))}"
                           f"{' and ' + PATCH_TARGET if cover is not None and len(cover) else ''}")
    has = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in y], dtype=bool)
    if not has.any():
        raise ProbingError(f"no {TOKEN_KINDS[kind]} token of this sweep has a {target!r} label; "
                           + ("make a probe sweep of easy-VQA or VCR examples" if target in ("shape", "color", PATCH_TARGET)
                              else "pick another target"))
    rows, y, ids = rows[has], y[has], ids[has]
    keys = keys[has] if keys is not None else None
    images = labels["image"] if "image" in labels.columns else None
    if kind != "text_mean":
        return token_set.vectors[:, rows], y, split_units(ids, images), keys
    order = np.argsort(ids, kind="stable")  # pool each example's words: one row per example
    rows, y, ids = rows[order], y[order], ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sums = np.add.reduceat(np.asarray(token_set.vectors[:, rows], dtype=np.float32), starts, axis=1)
    counts = np.diff(np.r_[starts, len(ids)]).astype(np.float32)
    return sums / counts[None, :, None], y[starts], split_units(ids[starts], images), None


def attention_inputs(probe: dict, role: str = "all", min_cover: float = DEFAULT_COVER) -> tuple:
    """Word–patch pairs of a probe payload for `compute_attention_probe`.

    Args:
        probe: `vlcore.run.probe_sweep.load_sweep_probe` output.
        role: which grounding words: ``shape``, ``color`` (easy-VQA), ``object`` (VCR) or ``all``.
        min_cover: the share of a patch inside the word's region that makes the pair positive.

    Returns:
        ``(features [Q, L, H] float32, labels bool [Q], groups [Q] (`split_units`), keys [Q], words [Q])``.

    Raises:
        ProbingError: an unknown role, or no word of that role in the sweep.
    """
    if role not in WORD_ROLES:
        raise ProbingError(f"word role must be one of {', '.join(WORD_ROLES)}; got {role!r}")
    word_role = np.asarray(probe["word_role"], dtype=object)
    keep = (np.ones(len(probe["pair_word"]), bool) if role == "all"
            else (word_role[probe["pair_word"]] == role) if len(word_role) else np.zeros(0, bool))
    if not keep.any():
        have = sorted(set(probe["word_role"])) or ["none"]
        raise ProbingError(f"this sweep has no {role if role != 'all' else 'grounding'} words in its questions "
                           f"(word roles present: {', '.join(have)}); pick another role or a larger sweep")
    word = probe["pair_word"][keep]
    ids = np.asarray(probe["example_ids"], dtype=object)[probe["word_example"][word]]
    image = probe["labels"].get("image")
    groups = split_units(ids, pd.Series(image, index=probe["example_ids"]) if image is not None else None)
    rc = probe["pair_rc"][keep]
    keys = np.char.add(np.char.add(rc[:, 0].astype(str), ","), rc[:, 1].astype(str))
    labels = probe["pair_cover"][keep].astype(np.float32) >= min_cover
    return probe["pair_attention"][keep].astype(np.float32), labels, groups, keys, word


def word_patch_share(features: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Each head's attention share from the grounding words to the image's patches: ``[L, H]``, the sum of a
    word's attention over its pairs (every patch of its example), averaged over words."""
    order = np.argsort(np.asarray(words), kind="stable")
    sorted_words = np.asarray(words)[order]
    starts = np.flatnonzero(np.r_[True, sorted_words[1:] != sorted_words[:-1]])
    per_word = np.add.reduceat(np.asarray(features, dtype=np.float64)[order], starts, axis=0)
    return per_word.mean(0)
