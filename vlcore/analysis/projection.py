"""Layer-wise 2-D projections of token vectors pooled over examples, and nearest neighbours.

Unlike VL-InterpreT, which fits one t-SNE per example, every projection here is **one fit on the
pooled tokens of all the chosen examples** (one example, a sweep, or a slice of one), so points of
different examples share one space. Neighbours are searched in the raw hidden space of a layer
(cosine), never in the 2-D coordinates.

Token sets:

- one example: every token of its `Trace` (``hidden [L + 1, N, D]``);
- a sweep: the bounded sample the sweep kept (`vlcore.run.sweep.load_sweep_vectors`): every text token,
  the image CLS and at most ``K`` patches per example (``K = 16`` by default), every layer, fp16.

The fusion degree (VALUE's NMI between a 2-means partition and the tokens' modality) is computed in
`vlcore.analysis.fusion` on these token sets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlcore.errors import VLScopeError
from vlcore.trace import Trace

METHODS = ("pca", "tsne", "umap")
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
ALIGNS = ("sign", "joint", "none")
KINDS = ("text", "patch", "special")
DEFAULT_PERPLEXITY = 30.0
UMAP_NEIGHBOURS = 15


class ProjectionError(VLScopeError):
    """A projection cannot be computed for the chosen tokens or method."""


@dataclass(frozen=True, eq=False)
class TokenSet:
    """Token vectors of one or more examples, pooled.

    Attributes:
        vectors: float16 ``[L + 1, T, D]``: ``vectors[0]`` is the embedding output.
        tokens: ``T`` rows: ``example_id``, ``token`` (index in the example's trace), ``text``,
            ``modality`` (0 text, 1 image), ``special``, ``row``, ``col`` (-1 unless a patch),
            ``kind`` (one of `KINDS`) and ``correct`` (True / False / None).
        thumbs: uint8 ``[T, p, p, 3]`` patch pixels (zeros for other tokens) or None.
    """

    vectors: np.ndarray
    tokens: pd.DataFrame
    thumbs: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def n_layers(self) -> int:
        """Transformer layers (the set holds ``n_layers + 1`` vector sets)."""
        return int(self.vectors.shape[0]) - 1

    def layer(self, layer: int) -> np.ndarray:
        """float32 ``[T, D]`` vectors of one layer (0 = embeddings)."""
        return np.asarray(self.vectors[layer], dtype=np.float32)

    def subset(self, keep: np.ndarray) -> TokenSet:
        """The tokens where the boolean ``[T]`` mask ``keep`` is True."""
        idx = np.flatnonzero(keep)
        thumbs = self.thumbs[idx] if self.thumbs is not None else None
        return TokenSet(self.vectors[:, idx], self.tokens.iloc[idx].reset_index(drop=True), thumbs)


def token_set_fingerprint(token_set: TokenSet) -> str:
    """A digest of everything a token set holds: its vectors, its token table (example ids, token indices and
    text, modality, kind, patch position, correctness) and its thumbnails.

    Caches of results derived from a token set are keyed on this, never on example ids or text: the same id
    from two datasets (another gold answer, another image) or from two models gives another digest.
    About 1 s per GB of vectors.

    >>> a = TokenSet(np.zeros((1, 2, 3), np.float16), pd.DataFrame({"example_id": ["e", "e"], "correct": [True, None]}))
    >>> b = TokenSet(a.vectors, a.tokens.assign(correct=[False, None]))
    >>> token_set_fingerprint(a) == token_set_fingerprint(b), token_set_fingerprint(a) == token_set_fingerprint(a)
    (False, True)
    """
    digest = hashlib.blake2b(digest_size=16)
    for array in (token_set.vectors, token_set.thumbs):
        if array is None:
            digest.update(b"none")
            continue
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    frame = token_set.tokens
    digest.update(repr(list(frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()


def token_kind(modality: np.ndarray, special: np.ndarray) -> np.ndarray:
    """``text`` / ``patch`` / ``special`` per token.

    >>> token_kind(np.array([0, 0, 1, 1]), np.array([True, False, True, False])).tolist()
    ['special', 'text', 'special', 'patch']
    """
    return np.where(special, "special", np.where(np.asarray(modality) == 0, "text", "patch"))


def _tokens_frame(example_id, token, text, modality, special, patch_rc, correct) -> pd.DataFrame:
    rc = np.asarray(patch_rc).reshape(-1, 2)
    return pd.DataFrame({
        "example_id": np.asarray(example_id, dtype=object), "token": np.asarray(token, dtype=np.int64),
        "text": list(text), "modality": np.asarray(modality, dtype=np.int8),
        "special": np.asarray(special, dtype=bool), "row": rc[:, 0].astype(np.int64), "col": rc[:, 1].astype(np.int64),
        "kind": token_kind(modality, special), "correct": list(correct),
    })


def token_set_from_traces(traces: list[Trace]) -> TokenSet:
    """Every token of each trace, pooled (all traces must come from one model).

    Raises:
        ProjectionError: no trace, a trace without hidden states, or traces of different widths.
    """
    if not traces:
        raise ProjectionError("no example to project: pick at least one example")
    missing = [t.example_id for t in traces if t.hidden is None]
    if missing:
        raise ProjectionError(f"traces of {', '.join(missing)} carry no hidden states; re-run them on the Run model page")
    shapes = {t.hidden.shape[0::2] for t in traces}
    if len(shapes) > 1:
        raise ProjectionError(f"the examples come from models of different sizes {sorted(shapes)}; pick one model")
    vectors = np.concatenate([t.hidden for t in traces], axis=1)
    frame = _tokens_frame(
        [t.example_id for t in traces for _ in t.tokens], [i for t in traces for i in range(t.n_tokens)],
        [s for t in traces for s in t.tokens], np.concatenate([t.modality for t in traces]),
        np.concatenate([t.special for t in traces]), np.concatenate([t.patch_rc for t in traces]),
        [t.correct for t in traces for _ in t.tokens],
    )
    return TokenSet(vectors, frame, np.concatenate([_trace_thumbs(t) for t in traces]))


def _trace_thumbs(trace: Trace) -> np.ndarray:
    """Each token's image cell (its box on the image of its own grid), cut to the first grid's cell size;
    zeros for tokens off the image. A cell of another size (a tile grid, a merged cell) is sampled to that size."""
    p = trace.patch_px
    thumbs = np.zeros((trace.n_tokens, p, p, 3), dtype=np.uint8)
    layout = trace.layout
    for i, (r, c) in enumerate(trace.patch_rc):
        g = int(layout.image_of[i])
        if r < 0 or g < 0 or g >= len(layout.images):
            continue
        grid = layout.images[g]
        x0, y0, x1, y1 = (int(v) for v in grid.boxes[r, c])
        crop = grid.image[y0:y1, x0:x1]
        if crop.size == 0:
            continue
        ys = np.minimum((np.arange(p) * crop.shape[0]) // p, crop.shape[0] - 1)
        xs = np.minimum((np.arange(p) * crop.shape[1]) // p, crop.shape[1] - 1)
        thumbs[i] = crop[ys][:, xs]
    return thumbs


def token_set_from_sweep(vectors: dict, predictions: pd.DataFrame | None = None) -> TokenSet:
    """A `TokenSet` from `vlcore.run.sweep.load_sweep_vectors`' dict, with correctness from the predictions.

    Raises:
        ProjectionError: the sweep kept no vectors (``vectors`` is None).
    """
    if vectors is None:
        raise ProjectionError(
            "this sweep kept no token vectors (it was made before sweeps kept them, or with vector_patches=None); "
            "run the sweep again on the Run model page, or look at one example")
    ids = [vectors["example_ids"][i] for i in vectors["example"]]
    correct: dict = {}
    if predictions is not None and len(predictions):
        correct = dict(zip(predictions["example_id"].astype(str), predictions["correct"]))
    flags = [None if correct.get(e) is None or pd.isna(correct.get(e)) else bool(correct[e]) for e in ids]
    frame = _tokens_frame(ids, vectors["token"], vectors["text"], vectors["modality"], vectors["special"],
                          vectors["patch_rc"], flags)
    return TokenSet(vectors["vectors"], frame, vectors.get("thumbs"))


# ---------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------


def min_tokens(method: str, perplexity: float = DEFAULT_PERPLEXITY) -> int:
    """Fewest tokens a method can project.

    >>> min_tokens("pca"), min_tokens("tsne", 30), min_tokens("umap")
    (3, 31, 17)
    """
    return {"pca": 3, "tsne": int(np.floor(perplexity)) + 1, "umap": UMAP_NEIGHBOURS + 2}[method]


def check_method(method: str, n_tokens: int, perplexity: float = DEFAULT_PERPLEXITY) -> None:
    """Raise a `ProjectionError` when ``method`` is unknown, unavailable or has too few tokens."""
    if method not in METHODS:
        raise ProjectionError(f"projection method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "umap" and not umap_available():
        raise ProjectionError("UMAP needs the umap-learn package, which is not installed: pip install umap-learn "
                              "(or use PCA or t-SNE)")
    need = min_tokens(method, perplexity)
    if n_tokens < need:
        hint = "lower the perplexity, " if method == "tsne" else ""
        raise ProjectionError(
            f"{METHOD_NAMES[method]} needs at least {need} tokens"
            + (f" (perplexity {perplexity:g})" if method == "tsne" else "")
            + f"; this selection has {n_tokens}. To fix: {hint}show more tokens (all tokens, a sweep) or use PCA.")


def umap_available() -> bool:
    """True when ``umap-learn`` can be imported."""
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def compute_projection(x: np.ndarray, method: str = "pca", seed: int = 0,
                       perplexity: float = DEFAULT_PERPLEXITY) -> np.ndarray:
    """One 2-D fit on all rows of ``x``.

    Args:
        x: ``[T, D]`` token vectors (pooled over examples).
        method: ``pca`` (`pca_components`), ``tsne`` (PCA init) or ``umap`` (cosine metric).
        seed: random state of every method.
        perplexity: t-SNE perplexity.

    Returns:
        float32 ``[T, 2]``.

    Raises:
        ProjectionError: unknown method, umap-learn missing, or too few tokens.
    """
    x = np.asarray(x, dtype=np.float32)
    check_method(method, len(x), perplexity)
    if method == "pca":
        return apply_pca(x, *pca_components(x, seed))
    if method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
        return tsne.fit_transform(x).astype(np.float32)
    import umap

    return umap.UMAP(n_components=2, n_neighbors=UMAP_NEIGHBOURS, metric="cosine",
                     random_state=seed).fit_transform(x).astype(np.float32)


def pca_components(x: np.ndarray, seed: int = 0, n_iter: int = 4, oversample: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The top-2 principal axes of ``x``.

    Small inputs (up to 2 million values) use an exact SVD. Larger ones use randomised subspace
    iteration (Halko et al.; ``n_iter`` power steps with QR, ``oversample`` extra directions) on the
    centred data without forming the covariance: 50,000 x 768 in well under a second, axes equal to
    the exact ones to float32 precision whenever the top eigenvalues are separated.

    Args:
        x: float32 ``[T, D]``.
        seed: random state of the starting subspace.
        n_iter: power iterations.
        oversample: extra directions.

    Returns:
        ``(mean [D], components [2, D])``, each component's largest-magnitude loading positive.
    """
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(0)
    xc = x - mean
    if x.size <= 2_000_000:
        comps = np.linalg.svd(xc.astype(np.float64), full_matrices=False)[2][:2]
    else:
        q = np.random.default_rng(seed).normal(size=(x.shape[1], 2 + oversample)).astype(np.float32)
        for _ in range(n_iter):
            q = np.linalg.qr(xc.T @ (xc @ q))[0]
        vt = np.linalg.svd(xc @ q, full_matrices=False)[2]
        comps = (q @ vt[:2].T).T
    comps = np.asarray(comps, dtype=np.float32)
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    return mean, np.ascontiguousarray(comps * np.where(signs == 0, 1, signs)[:, None])


def align_signs(coords: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Flip each axis of ``coords`` whose correlation with the same axis of ``reference`` is negative.

    Both are ``[T, 2]`` coordinates of the same tokens (two layers). A new array is returned.

    >>> align_signs(np.array([[1., -2.], [-1., 2.]]), np.array([[1., 2.], [-1., -2.]])).tolist()
    [[1.0, 2.0], [-1.0, -2.0]]
    """
    a = coords - coords.mean(0)
    b = reference - reference.mean(0)
    signs = np.where((a * b).sum(0) < 0, -1.0, 1.0)
    return (coords * signs).astype(coords.dtype)


def fit_joint_pca(token_set: TokenSet, max_rows: int = 50_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One PCA for every layer: fitted on the tokens of all layers pooled (sampled to ``max_rows``).

    Returns:
        ``(mean [D], components [2, D])``; project a layer with `apply_pca`.
    """
    n_vec = token_set.vectors.shape[0] * token_set.n_tokens
    flat = token_set.vectors.reshape(n_vec, -1)
    if n_vec > max_rows:
        flat = flat[np.sort(np.random.default_rng(seed).choice(n_vec, max_rows, replace=False))]
    return pca_components(np.asarray(flat, dtype=np.float32), seed)


def apply_pca(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``(x - mean) @ components.T`` as float32 ``[T, 2]``."""
    c = np.ascontiguousarray(components.T, dtype=np.float32)
    return (np.asarray(x, dtype=np.float32) @ c - mean @ c).astype(np.float32)


def compute_layer_projections(token_set: TokenSet, method: str = "pca", align: str = "sign",
                              layers: list[int] | None = None, perplexity: float = DEFAULT_PERPLEXITY,
                              seed: int = 0) -> dict[int, np.ndarray]:
    """A 2-D projection per layer, each one fit on the pooled tokens.

    Args:
        token_set: the pooled tokens.
        method: one of `METHODS`.
        align: PCA only: ``sign`` flips each layer's axes to agree with the previous layer's,
            ``joint`` fits one PCA on all layers, ``none`` keeps each fit as it is.
        layers: which layers (0 = embeddings); all by default. ``sign`` fits every layer up to the last asked.
        perplexity: t-SNE perplexity.
        seed: random state.

    Returns:
        ``{layer: float32 [T, 2]}``.
    """
    layers = list(range(token_set.n_layers + 1)) if layers is None else list(layers)
    if method == "pca" and align == "joint":
        check_method(method, token_set.n_tokens)
        mean, comps = fit_joint_pca(token_set, seed=seed)
        return {i: apply_pca(token_set.layer(i), mean, comps) for i in layers}
    if method == "pca" and align == "sign":
        out, prev = {}, None
        for i in range(max(layers) + 1):
            coords = compute_projection(token_set.layer(i), "pca", seed)
            prev = coords if prev is None else align_signs(coords, prev)
            if i in layers:
                out[i] = prev
        return out
    return {i: compute_projection(token_set.layer(i), method, seed, perplexity) for i in layers}


# ---------------------------------------------------------------------------------------
# Neighbours (the fusion degree is in vlcore.analysis.fusion)
# ---------------------------------------------------------------------------------------


def compute_neighbours(token_set: TokenSet, layer: int, query: int, k: int = 5) -> pd.DataFrame:
    """The ``k`` nearest tokens of each modality to one token, by cosine similarity in the raw hidden space.

    Args:
        token_set: the pooled tokens (neighbours come from every example in it).
        layer: 0 = embeddings.
        query: row of the query token in ``token_set``; it is never its own neighbour.
        k: neighbours per modality.

    Returns:
        Columns ``modality`` (``text``/``image``), ``rank``, ``example_id``, ``token``, ``text``, ``kind``,
        ``similarity``, ``row`` (index in the token set); best first within each modality.
    """
    from sklearn.neighbors import NearestNeighbors

    if not 0 <= query < token_set.n_tokens:
        raise ProjectionError(f"token row {query} is outside the {token_set.n_tokens} tokens shown")
    x = token_set.layer(layer)
    modality = token_set.tokens["modality"].to_numpy()
    frames = []
    for mod, name in ((0, "text"), (1, "image")):
        pool = np.flatnonzero((modality == mod) & (np.arange(len(x)) != query))
        if not len(pool):
            continue
        nn = NearestNeighbors(n_neighbors=min(k, len(pool)), metric="cosine", algorithm="brute").fit(x[pool])
        dist, pos = nn.kneighbors(x[query : query + 1])
        rows = pool[pos[0]]
        info = token_set.tokens.iloc[rows]
        frames.append(pd.DataFrame({
            "modality": name, "rank": np.arange(1, len(rows) + 1), "example_id": info["example_id"].to_numpy(),
            "token": info["token"].to_numpy(), "text": info["text"].to_numpy(), "kind": info["kind"].to_numpy(),
            "similarity": 1.0 - dist[0], "row": rows,
        }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["modality", "rank", "example_id", "token", "text", "kind", "similarity", "row"])


def find_token(token_set: TokenSet, example_id: str, token: int) -> int | None:
    """Row of ``(example_id, token)`` in the set, or None when that token is not in it."""
    t = token_set.tokens
    hit = np.flatnonzero((t["example_id"].to_numpy() == example_id) & (t["token"].to_numpy() == token))
    return int(hit[0]) if len(hit) else None


def coordinates_frame(token_set: TokenSet, coords: np.ndarray, layer: int) -> pd.DataFrame:
    """2-D coordinates with the token information, for charts and the CSV download.

    Returns:
        Columns ``layer, x, y, example_id, token, text, kind, modality`` (``text``/``image``), ``correct``
        (``correct``/``incorrect``/``unknown``), ``uid`` (``example_id#token``).
    """
    t = token_set.tokens
    correct = t["correct"].map(lambda c: "unknown" if c is None or pd.isna(c) else ("correct" if c else "incorrect"))
    return pd.DataFrame({
        "layer": layer, "x": coords[:, 0], "y": coords[:, 1], "example_id": t["example_id"].to_numpy(),
        "token": t["token"].to_numpy(), "text": t["text"].to_numpy(), "kind": t["kind"].to_numpy(),
        "modality": np.where(t["modality"].to_numpy() == 0, "text", "image"), "correct": correct.to_numpy(),
        "uid": t["example_id"].astype(str).to_numpy() + "#" + t["token"].astype(str).to_numpy(),
    })
