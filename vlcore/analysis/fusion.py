"""The fusion degree (VALUE): how well a 2-means partition of a layer's token vectors recovers their modality.

Why not a few k-means restarts: on token vectors 2-means has competing local minima, and a k-means++
start often lands in the wrong one. On the bundled demo model, for ``easy_vqa/test/0`` at layer 3,
``KMeans(n_clusters=2, n_init=4, random_state=0)`` stops at inertia 1894 (NMI 0.0077, "fused") while
the lowest-inertia partition has 1821 (NMI 0.669, "not fused"). Over the first 40 test questions x 5
layers that setting missed the lowest inertia in 73 of 200 cases (the NMI off by more than 0.05 in 63),
and in the hardest case none of 200 single k-means++ starts reached it (`bench/fusion.py`).

So the partition here is the lowest-inertia one over two kinds of starts, each refined by Lloyd's
algorithm and then Hartigan's single-token moves (all starts in one batch; starts that reach the same
partition are merged):

- **principal splits**: along each of the top `N_DIRECTIONS` principal axes, the threshold on the
  tokens' projections with the lowest 2-means inertia within the span of those axes (by prefix sums);
- **random starts**: `N_STARTS` per seed, half k-means++ and half random pairs of tokens.

On the demo model this reaches the best inertia that 200 seeds of scikit-learn's k-means find in
every example and layer checked. Stability is reported, not assumed: the whole search runs for
`N_SEEDS` seeds (the principal splits are shared, the random starts differ) and the spread of the
NMI over them is returned beside the value.

Above `SUBSAMPLE` tokens the principal axes are found on a fixed subsample of that many tokens (the
splits along them are scored on all tokens), a seed's random starts converge on the subsample, and the
means of its best subsample partition start one run on all tokens. The search runs BLAS on one thread
(see `_blas_threads`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlcore.analysis.projection import ProjectionError, TokenSet

N_DIRECTIONS = 10  # principal axes scanned for the best threshold split
N_STARTS = 16  # random starts per seed (half k-means++, half random pairs)
N_SEEDS = 8  # seeds whose spread is reported
SUBSAMPLE = 2_000  # random starts converge on at most this many tokens first
MAX_ITER = 300  # Lloyd / Hartigan steps per start
FUSION_MAX_TOKENS = 20_000  # the fusion degree clusters at most this many tokens per layer (a fixed sample)


@dataclass(frozen=True, eq=False)
class TwoMeans:
    """The lowest-inertia 2-means partition found with each seed.

    Attributes:
        labels: bool ``[S, T]``: seed ``s``'s partition (token 0 always in cluster False).
        inertia: float64 ``[S]``: sum of squared distances to the cluster means.
        seeds: the ``S`` seeds.
    """

    labels: np.ndarray
    inertia: np.ndarray
    seeds: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class FusionScore:
    """The fusion degree of one layer.

    Attributes:
        nmi_modality: NMI of the first seed's partition against modality (1: clusters are the modalities).
        nmi_kind: the same against text / patch / special (NaN without kinds).
        nmi_modality_min / nmi_modality_max: the range of ``nmi_modality`` over the seeds.
        nmi_kind_min / nmi_kind_max: the range of ``nmi_kind`` over the seeds.
        inertia: the partition's inertia.
        n_seeds: how many seeds the ranges cover.
        labels: bool ``[T]``, the partition.
    """

    nmi_modality: float
    nmi_kind: float
    nmi_modality_min: float
    nmi_modality_max: float
    nmi_kind_min: float
    nmi_kind_max: float
    inertia: float
    n_seeds: int
    labels: np.ndarray


def two_means_inertia(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Inertia (sum of squared distances to the cluster means) of boolean partitions.

    Computed in float32 for float32 input (the large-set path), else in float64.

    Args:
        x: ``[T, D]`` vectors.
        labels: bool ``[T]`` or ``[R, T]``.

    Returns:
        float64 ``[R]`` (``[1]`` for one partition).

    >>> two_means_inertia(np.array([[0.], [2.], [10.], [12.]]), np.array([False, False, True, True])).tolist()
    [4.0]
    """
    x = np.asarray(x)
    x = x.astype(np.float32 if x.dtype == np.float32 else np.float64)
    xc = x - x.mean(0)
    return _inertia(xc, labels, float(np.einsum("ij,ij->", xc, xc, dtype=np.float64)))


def _inertia(xc: np.ndarray, labels: np.ndarray, total_ss: float) -> np.ndarray:
    """`two_means_inertia` of centred ``xc`` whose sum of squares is ``total_ss``."""
    lab = np.atleast_2d(labels).astype(xc.dtype)
    n1 = lab.sum(1, dtype=np.float64)
    n0 = len(xc) - n1
    s1 = (lab @ xc).astype(np.float64)  # the sums of the two clusters are s1 and -s1 (xc is centred)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((n1 > 0) & (n0 > 0), (s1**2).sum(1) * len(xc) / (n1 * n0), 0.0)
    return total_ss - between


def principal_split_starts(xc: np.ndarray, n_dirs: int = N_DIRECTIONS, seed: int = 0,
                           axes_from: np.ndarray | None = None) -> np.ndarray:
    """Centroid pairs of the best threshold split along each of the top principal axes.

    For an axis, tokens are sorted by their projection and every cut ``m`` (the first ``m`` against the
    rest) is scored by the 2-means inertia within the span of the axes: with centred coordinates and
    ``c_m`` the sum of the first ``m``, inertia is ``sum |x|^2 - |c_m|^2 T / (m (T - m))``; the lowest
    wins. (Scoring in the full space found the same partitions on all 200 demo example-layers checked, at
    ``D / n_dirs`` times the cost: 77x for ViLT-B.)

    Args:
        xc: centred ``[T, D]`` vectors (T >= 2).
        n_dirs: how many axes.
        seed: random state of the randomised SVD used above 100,000 values.
        axes_from: rows of ``xc`` to find the axes on (a sample of a large set; default all).

    Returns:
        ``[n_dirs', 2, D]`` centroid pairs, ``n_dirs' <= n_dirs``.
    """
    n = len(xc)
    k = min(n_dirs, n - 1, xc.shape[1])
    if k < 1:
        return np.zeros((0, 2, xc.shape[1]), dtype=xc.dtype)
    basis = xc if axes_from is None else axes_from
    if basis.size <= 100_000:
        axes = np.linalg.svd(basis.astype(np.float64), full_matrices=False)[2][:k]
    else:
        from sklearn.utils.extmath import randomized_svd

        axes = randomized_svd(basis, k, n_iter=4, random_state=seed)[2]
    coords = (xc @ axes.T.astype(xc.dtype)).astype(np.float64)  # [T, k]
    m = np.arange(1, n)
    sides = np.zeros((len(axes), n), dtype=bool)
    for j in range(len(axes)):
        order = np.argsort(coords[:, j], kind="stable")
        prefix = np.cumsum(coords[order], axis=0)[:-1]
        sides[j, order[int(np.argmax((prefix**2).sum(1) / (m * (n - m)))) + 1 :]] = True
    return _centroids(xc, sides)


def random_starts(xc: np.ndarray, n_starts: int, seed: int) -> np.ndarray:
    """``n_starts`` centroid pairs: the first half by k-means++ (the second centre drawn with probability
    proportional to the squared distance from the first), the rest random pairs of distinct tokens.

    Args:
        xc: ``[T, D]`` vectors (T >= 2).
        n_starts: how many pairs.
        seed: random state.

    Returns:
        ``[n_starts, 2, D]``.
    """
    rng = np.random.default_rng(seed)
    n = len(xc)
    n_pp = (n_starts + 1) // 2
    first = rng.integers(n, size=n_starts)
    sq = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
    d2 = np.maximum(sq[None] - 2 * (xc[first[:n_pp]] @ xc.T) + sq[first[:n_pp], None], 0.0)
    d2[d2.sum(1) == 0] = 1.0  # all tokens equal: any second centre
    cum = np.cumsum(d2, axis=1)
    second_pp = (cum < rng.random(n_pp)[:, None] * cum[:, -1:]).sum(1)
    second_rand = (first[n_pp:] + 1 + rng.integers(n - 1, size=n_starts - n_pp)) % n
    second = np.minimum(np.r_[second_pp, second_rand], n - 1)
    return np.stack([xc[first], xc[second]], axis=1)


def refine_two_means(xc: np.ndarray, starts: np.ndarray, max_iter: int = MAX_ITER) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm with Hartigan's single-token moves, from many centroid pairs at once.

    A Lloyd step assigns every token to the nearer centroid (a tie goes to cluster False). When that
    changes nothing, the token whose move to the other cluster lowers the inertia most (the exact change
    is ``n_to / (n_to + 1) |x - c_to|^2 - n_from / (n_from - 1) |x - c_from|^2``) is moved, which leaves
    many of Lloyd's fixed points that k-means stops in. A partition stops when neither step improves it.
    Starts whose partitions coincide are merged, since their futures are identical.

    Args:
        xc: centred ``[T, D]`` vectors.
        starts: ``[R, 2, D]`` centroid pairs.
        max_iter: most steps.

    Returns:
        ``(partitions bool [U, T], owner int [R])``: start ``r`` ended in ``partitions[owner[r]]``.
    """
    n = len(xc)
    sq = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
    tol = float(sq.mean()) * (1e-4 if xc.dtype == np.float32 else 1e-10)  # smaller gains are rounding noise
    c0, c1 = starts[:, 0], starts[:, 1]
    first = (xc @ (c1 - c0).T > ((c1**2).sum(1) - (c0**2).sum(1)) / 2).T
    labels, owner, moving = _merge(first, np.arange(len(starts)), np.ones(len(starts), dtype=bool))
    total = xc.sum(0)
    for _ in range(max_iter):
        n1 = labels.sum(1)
        rows = np.flatnonzero(moving & (n1 > 0) & (n1 < n))
        if not len(rows):
            break
        new, changed = _step(xc, sq, total, labels[rows], tol)
        labels = labels.copy()
        labels[rows] = new
        moving = np.zeros(len(labels), dtype=bool)
        moving[rows[changed]] = True
        labels, owner, moving = _merge(labels, owner, moving)
    return labels, owner


def _step(xc: np.ndarray, sq: np.ndarray, total: np.ndarray, labels: np.ndarray,
          tol: float) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd step for each partition in ``labels [r, T]`` (both sides non-empty), or a Hartigan move where
    Lloyd changes nothing. Returns the new partitions and which changed."""
    n1 = labels.sum(1)[:, None].astype(np.float64)
    n0 = len(xc) - n1
    s1 = labels.astype(xc.dtype) @ xc
    c1, c0 = s1 / n1, (total - s1) / n0
    dots = (np.concatenate([c0, c1]) @ xc.T).astype(np.float64)  # [2r, T]
    d0 = sq[None] - 2 * dots[: len(c0)] + (c0**2).sum(1, dtype=np.float64)[:, None]  # [r, T]
    d1 = sq[None] - 2 * dots[len(c0) :] + (c1**2).sum(1, dtype=np.float64)[:, None]
    new = d1 < d0
    changed = (new != labels).any(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(labels, n0 / (n0 + 1) * d0 - n1 / (n1 - 1) * d1, n1 / (n1 + 1) * d1 - n0 / (n0 - 1) * d0)
    gain[np.where(labels, n1 <= 1, n0 <= 1)] = np.inf  # never empty a cluster
    best = gain.argmin(1)
    move = ~changed & (gain[np.arange(len(best)), best] < -tol)
    new[~changed] = labels[~changed]
    new[np.flatnonzero(move), best[move]] ^= True
    return new, changed | move


def _merge(labels: np.ndarray, owner: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep one row per distinct partition (token 0 in cluster False, rows in order of first appearance),
    remapping ``owner`` and keeping each kept row's ``moving`` flag."""
    labels = labels ^ labels[:, :1]
    index: dict[bytes, int] = {}
    inverse = np.array([index.setdefault(row.tobytes(), len(index)) for row in np.packbits(labels, axis=1)])
    first = np.unique(inverse, return_index=True)[1]
    return labels[first], inverse[owner], moving[first]


def compute_two_means(x: np.ndarray, seeds: Sequence[int] = (0,), n_starts: int = N_STARTS,
                      n_dirs: int = N_DIRECTIONS, subsample: int = SUBSAMPLE) -> TwoMeans:
    """The lowest-inertia 2-means partition of ``x``, searched once per seed.

    Every seed shares the principal splits and adds its own ``n_starts`` random starts (see the module
    docstring); all of them run in one batch of `refine_two_means` steps.

    Args:
        x: ``[T, D]`` vectors, ``T >= 2``.
        seeds: random states; the spread of the results over them shows how stable the search is.
        n_starts: random starts per seed.
        n_dirs: principal axes.
        subsample: above this many tokens a seed's random starts converge on a fixed subsample, and only its
            best partition there is refined on all tokens.

    Returns:
        A `TwoMeans` with one partition per seed.

    Raises:
        ProjectionError: fewer than 2 tokens.
    """
    x = np.asarray(x)
    if len(x) < 2:
        raise ProjectionError(f"the fusion degree needs at least 2 tokens; got {len(x)}")
    with _SEARCH_LOCK, _blas_threads(1):  # one search at a time: limits set and restored in order
        return _search(x, tuple(int(s) for s in seeds), n_starts, n_dirs, subsample)


_SEARCH_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _threadpools():
    from threadpoolctl import ThreadpoolController  # a scikit-learn dependency

    return ThreadpoolController()


def _blas_threads(n: int):
    """Limit BLAS to ``n`` threads in a ``with`` block, as scikit-learn's KMeans does around its own loop.
    The search's matrix products are thin (a few dozen centroids), and BLAS threads cost more than they
    save on them, most on a busy machine: at load 6 on 2 cores, one example's layer took 34 ms on one thread
    and 356 ms on two; 20,000 x 768 vectors 0.5-0.8 s against 2.4 s."""
    return _threadpools().limit(limits=n, user_api="blas")


def _search(x: np.ndarray, seeds: tuple[int, ...], n_starts: int, n_dirs: int, subsample: int) -> TwoMeans:
    """`compute_two_means` without the checks."""
    xc = np.asarray(x, dtype=np.float64 if x.size <= 4_000_000 else np.float32)
    xc = xc - xc.mean(0)
    if len(xc) <= subsample:
        fixed = principal_split_starts(xc, n_dirs)
        own = np.concatenate([random_starts(xc, n_starts, s) for s in seeds])
        per_seed = n_starts
    else:  # axes from a fixed subsample; each seed's best partition of it starts one run on all tokens
        sub = xc[np.sort(np.random.default_rng(0).choice(len(xc), subsample, replace=False))]
        fixed = principal_split_starts(xc, n_dirs, axes_from=sub)
        parts, owner = refine_two_means(sub, np.concatenate([random_starts(sub, n_starts, s) for s in seeds]))
        inertia = two_means_inertia(sub, parts)[owner].reshape(len(seeds), n_starts)
        own = _centroids(sub, parts[owner.reshape(len(seeds), n_starts)[np.arange(len(seeds)), inertia.argmin(1)]])
        per_seed = 1
    parts, owner = refine_two_means(xc, np.concatenate([fixed, own]))
    inertia = _inertia(xc, parts, float(np.einsum("ij,ij->", xc, xc, dtype=np.float64)))[owner]
    best = []
    for i in range(len(seeds)):
        cands = np.r_[np.arange(len(fixed)), len(fixed) + i * per_seed + np.arange(per_seed)]
        best.append(cands[np.argmin(inertia[cands])])
    return TwoMeans(parts[owner[best]], inertia[best], seeds)


def _centroids(xc: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[U, 2, D]`` cluster means of boolean partitions (a side left empty gets the overall mean)."""
    n1 = labels.sum(1)[:, None]
    s1 = labels.astype(xc.dtype) @ xc
    s0 = xc.sum(0) - s1
    return np.stack([s0 / np.maximum(len(xc) - n1, 1), s1 / np.maximum(n1, 1)], axis=1)


def compute_fusion_nmi(x: np.ndarray, modality: np.ndarray, kind: np.ndarray | None = None, seed: int = 0,
                       n_seeds: int = N_SEEDS, n_starts: int = N_STARTS, n_dirs: int = N_DIRECTIONS) -> FusionScore:
    """NMI of the lowest-inertia 2-means partition of ``x`` against ``modality`` (and ``kind``).

    Args:
        x: ``[T, D]`` token vectors of one layer.
        modality: ``[T]`` labels (0 text, 1 image).
        kind: ``[T]`` finer labels (text / patch / special), optional.
        seed: the first seed (its partition is the value); the spread covers ``seed .. seed + n_seeds - 1``.
        n_seeds: seeds in the spread.
        n_starts: random starts per seed (`compute_two_means`).
        n_dirs: principal splits (`compute_two_means`).

    Returns:
        A `FusionScore`: 1 means the clusters are the modalities (not fused), 0 that they tell nothing
        about modality (fused).

    Raises:
        ProjectionError: fewer than 2 tokens.
    """
    from sklearn.metrics import normalized_mutual_info_score as nmi

    fit = compute_two_means(x, range(seed, seed + max(1, n_seeds)), n_starts, n_dirs)
    mod = np.array([nmi(np.asarray(modality), lab) for lab in fit.labels])
    kinds = np.array([nmi(np.asarray(kind), lab) for lab in fit.labels]) if kind is not None else np.full(len(mod), np.nan)
    return FusionScore(float(mod[0]), float(kinds[0]), float(mod.min()), float(mod.max()), float(kinds.min()),
                       float(kinds.max()), float(fit.inertia[0]), len(fit.seeds), fit.labels[0])


FUSION_COLUMNS = ["layer", "nmi_modality", "nmi_kind", "nmi_modality_min", "nmi_modality_max", "nmi_kind_min",
                  "nmi_kind_max", "n_seeds", "n_tokens"]


def compute_fusion(token_set: TokenSet, layers: list[int] | None = None, max_tokens: int = FUSION_MAX_TOKENS,
                   seed: int = 0, n_seeds: int = N_SEEDS) -> pd.DataFrame:
    """The fusion degree at every layer, with its spread over seeds.

    Args:
        token_set: pooled tokens; at most ``max_tokens`` of them (a fixed random sample) are clustered.
        layers: which layers (0 = embeddings); all by default.
        max_tokens: token cap per layer.
        seed: sampling seed and first k-means seed.
        n_seeds: k-means seeds in the spread (the sample stays fixed).

    Returns:
        Columns `FUSION_COLUMNS`.
    """
    layers = list(range(token_set.n_layers + 1)) if layers is None else list(layers)
    idx = np.arange(token_set.n_tokens)
    if len(idx) > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_tokens, replace=False))
    modality = token_set.tokens["modality"].to_numpy()[idx]
    kind = token_set.tokens["kind"].to_numpy()[idx]
    rows = []
    for i in layers:
        s = compute_fusion_nmi(token_set.vectors[i][idx], modality, kind, seed, n_seeds)
        rows.append({"layer": i, "nmi_modality": s.nmi_modality, "nmi_kind": s.nmi_kind,
                     "nmi_modality_min": s.nmi_modality_min, "nmi_modality_max": s.nmi_modality_max,
                     "nmi_kind_min": s.nmi_kind_min, "nmi_kind_max": s.nmi_kind_max, "n_seeds": s.n_seeds,
                     "n_tokens": len(idx)})
    return pd.DataFrame(rows, columns=FUSION_COLUMNS)
