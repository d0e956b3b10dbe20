"""Projections, fusion degree and neighbours: pooling, known NMI answers, brute-force neighbours, the fit cache,
and sweep vectors equal to the full trace's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlcore.analysis.fusion import compute_fusion, compute_fusion_nmi
from vlcore.analysis.projection import (
    ProjectionError,
    TokenSet,
    align_signs,
    check_method,
    compute_layer_projections,
    compute_neighbours,
    compute_projection,
    coordinates_frame,
    find_token,
    token_kind,
    umap_available,
)


def synthetic_set(n_examples: int = 3, n_tok: int = 12, d: int = 16, layers: int = 3, seed: int = 0,
                  separated: bool = True) -> TokenSet:
    """Text tokens near +c, image tokens near -c (separated), or all around 0 (mixed)."""
    rng = np.random.default_rng(seed)
    modality = np.tile(np.r_[np.zeros(n_tok // 2), np.ones(n_tok - n_tok // 2)].astype(np.int8), n_examples)
    special = np.zeros(len(modality), dtype=bool)
    centre = rng.normal(size=d) * 10
    vectors = rng.normal(size=(layers + 1, len(modality), d))
    if separated:
        vectors += np.where(modality[:, None] == 0, centre, -centre)[None]
    rows = np.where(modality == 1, np.arange(len(modality)) % 4, -1)
    frame = pd.DataFrame({
        "example_id": np.repeat([f"e{i}" for i in range(n_examples)], n_tok).astype(object),
        "token": np.tile(np.arange(n_tok), n_examples), "text": [f"t{i}" for i in range(len(modality))],
        "modality": modality, "special": special, "row": rows, "col": rows,
        "kind": token_kind(modality, special), "correct": [True] * len(modality),
    })
    return TokenSet(vectors.astype(np.float16), frame)


def test_one_fit_pools_examples_same_vector_same_point():
    ts = synthetic_set()
    vec = ts.vectors.copy()
    vec[:, 5] = vec[:, 12 + 7]  # token 5 of e0 equals token 7 of e1, in every layer
    ts = TokenSet(vec, ts.tokens)
    for method in ("pca",):
        for align in ("sign", "joint", "none"):
            coords = compute_layer_projections(ts, method, align)
            for layer, xy in coords.items():
                assert xy.shape == (ts.n_tokens, 2)
                np.testing.assert_allclose(xy[5], xy[19], atol=1e-5, err_msg=f"{align} layer {layer}")
    tsne = compute_projection(ts.layer(1), "tsne", perplexity=5)
    # Barnes-Hut t-SNE approximates each point's repulsion through its own tree walk, so two equal inputs
    # need not land on one point (sklearn 1.9 puts them ~1.7 apart): they must be each other's nearest
    # neighbour, close on the map's scale.
    dist = np.linalg.norm(tsne - tsne[5], axis=1)
    assert np.argsort(dist)[1] == 19 and dist[19] < 0.05 * np.ptp(tsne, axis=0).max()


def test_pca_pooled_equals_one_fit_on_concatenation():
    ts = synthetic_set()
    got = compute_layer_projections(ts, "pca", "none", layers=[2])[2]
    x = ts.layer(2) - ts.layer(2).mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    ref = x @ vt[:2].T
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=1e-3)  # same axes up to sign


def test_sign_alignment_makes_axes_agree_with_the_previous_layer():
    ts = synthetic_set()
    coords = compute_layer_projections(ts, "pca", "sign")
    for layer in range(1, ts.n_layers + 1):
        a, b = coords[layer] - coords[layer].mean(0), coords[layer - 1] - coords[layer - 1].mean(0)
        assert ((a * b).sum(0) >= 0).all()
    flipped = align_signs(-coords[1], coords[1])
    np.testing.assert_allclose(flipped, coords[1])


def test_nmi_is_one_for_separated_modalities_and_near_zero_for_mixed():
    sep = synthetic_set(n_examples=10, separated=True)
    mix = synthetic_set(n_examples=10, separated=False)
    score = compute_fusion_nmi(sep.layer(1), sep.tokens["modality"], sep.tokens["kind"])
    assert score.nmi_modality == pytest.approx(1.0) and score.nmi_kind == pytest.approx(1.0)
    assert score.nmi_modality_min == score.nmi_modality_max == score.nmi_modality  # every seed agrees
    mixed = compute_fusion_nmi(mix.layer(1), mix.tokens["modality"])
    assert mixed.nmi_modality < 0.05 and np.isnan(mixed.nmi_kind)
    table = compute_fusion(sep)
    assert table["layer"].tolist() == [0, 1, 2, 3] and np.allclose(table["nmi_modality"], 1.0)
    assert np.allclose(table["nmi_modality_min"], 1.0) and (table["n_seeds"] == 8).all()


def test_fusion_finer_label_separates_special_tokens():
    ts = synthetic_set(n_examples=6)
    special = ts.tokens["token"].isin([0]).to_numpy()  # first text token of each example is special
    kind = token_kind(ts.tokens["modality"].to_numpy(), special)
    score = compute_fusion_nmi(ts.layer(0), ts.tokens["modality"], kind)
    assert score.nmi_modality == pytest.approx(1.0) and 0.5 < score.nmi_kind < 1.0  # two clusters cannot name three


def test_neighbours_match_brute_force_cosine():
    ts = synthetic_set(n_examples=4, separated=False, seed=3)
    x = ts.layer(2).astype(np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for query in (0, 7, 30):
        got = compute_neighbours(ts, 2, query, k=4)
        sims = unit @ unit[query]
        for mod, name in ((0, "text"), (1, "image")):
            pool = np.flatnonzero((ts.tokens["modality"].to_numpy() == mod) & (np.arange(len(x)) != query))
            order = pool[np.argsort(-sims[pool])]
            best = order[:4]
            part = got[got["modality"] == name]
            # float32 (sklearn) against float64 here: the ranks agree where the similarities are apart
            np.testing.assert_allclose(part["similarity"], sims[best], atol=1e-4)
            gaps = -np.diff(sims[order[:5]]) > 1e-4  # gap after each of the first 4
            assert gaps[3] and set(part["row"]) == set(best)
            apart = gaps & np.r_[True, gaps[:3]]
            assert (part["row"].to_numpy()[apart] == best[apart]).all() and apart.sum() >= 2
            assert set(part["example_id"]) <= set(ts.tokens["example_id"])  # across examples


def test_too_few_tokens_and_missing_umap_are_clear_errors():
    with pytest.raises(ProjectionError, match="t-SNE needs at least 31 tokens .*has 12"):
        check_method("tsne", 12)
    with pytest.raises(ProjectionError, match="PCA needs at least 3"):
        compute_projection(np.zeros((2, 4)), "pca")
    with pytest.raises(ProjectionError, match="one of"):
        check_method("isomap", 100)
    if not umap_available():
        with pytest.raises(ProjectionError, match="pip install umap-learn"):
            check_method("umap", 100)


def test_coordinates_frame_and_find_token():
    ts = synthetic_set()
    frame = coordinates_frame(ts, np.zeros((ts.n_tokens, 2), np.float32), layer=2)
    assert frame["uid"].iloc[13] == "e1#1" and set(frame["modality"]) == {"text", "image"}
    assert find_token(ts, "e1", 1) == 13 and find_token(ts, "e9", 0) is None


def test_revisiting_a_layer_does_not_refit():
    from vlcore.ui import embeddings as emb

    ts = synthetic_set()
    emb.FITS.clear()
    first = emb.fit_layer("k", 3, "pca", "sign", 30.0, ts)
    assert emb.FITS["pca"] == 4  # layers 0..3: each aligned to the one before
    emb.fit_layer("k", 1, "pca", "sign", 30.0, ts)
    again = emb.fit_layer("k", 3, "pca", "sign", 30.0, ts)
    assert emb.FITS["pca"] == 4
    np.testing.assert_array_equal(first, again)
    emb.fit_layer("k", 2, "pca", "none", 30.0, ts)
    emb.fit_layer("k", 2, "pca", "none", 30.0, ts)
    assert emb.FITS["pca"] == 5


def test_sweep_vectors_equal_the_trace_and_survive_resume(tiny_adapter, tmp_path):
    """A stopped and resumed sweep keeps exactly the vectors of an uninterrupted one (same path, same batch of
    3), and they match single-example traces (batch 1, another path) to float16 precision: kernels whose
    blocking depends on the batch size (e.g. on AMD EPYC) may change the last bit."""
    from tests.test_extract import examples
    from vlcore.run.extract import extract_trace
    from vlcore.analysis.projection import token_set_from_sweep
    from vlcore.run.sweep import run_sweep
    from vlcore.storage.sweeps import load_sweep, load_sweep_vectors

    exs = examples(7)
    seen = []
    out = tmp_path / "s"
    run_sweep(tiny_adapter, exs, out, batch_size=3, vector_patches=3, progress=seen.append,
              should_stop=lambda: len(seen) >= 1)
    assert len(list(out.glob("part-*.vectors.safetensors"))) == 1
    partial = load_sweep_vectors(out)
    assert partial["example_ids"] == ["t/0", "t/1", "t/2"]
    run_sweep(tiny_adapter, exs, out, batch_size=3, vector_patches=3)
    assert (out / "vectors.safetensors").exists() and not list(out.glob("part-*"))
    vec = load_sweep_vectors(out)
    assert vec["example_ids"] == [e.example_id for e in exs]
    run_sweep(tiny_adapter, exs, tmp_path / "whole", batch_size=3, vector_patches=3)
    whole = load_sweep_vectors(tmp_path / "whole")
    for name in ("vectors", "token", "modality", "patch_rc", "thumbs"):
        np.testing.assert_array_equal(vec[name], whole[name], err_msg=name)  # same path, same batches: exact
    ts = token_set_from_sweep(vec, load_sweep(out)[0])
    for i, ex in enumerate(exs):
        trace = extract_trace(tiny_adapter, ex.load_image(), ex.question, ex.example_id)
        rows = np.flatnonzero(ts.tokens["example_id"].to_numpy() == ex.example_id)
        toks = ts.tokens["token"].to_numpy()[rows]
        n_text = int((trace.modality == 0).sum())
        assert (ts.tokens["kind"].to_numpy()[rows] == "patch").sum() == 3  # K patches, every text token + [IMG]
        assert toks[: n_text + 1].tolist() == list(range(n_text + 1))
        np.testing.assert_allclose(ts.vectors[:, rows].astype(np.float32), trace.hidden[:, toks].astype(np.float32),
                                   rtol=1e-3, atol=1e-5)  # batch 3 against batch 1: float16 tolerance
        assert [trace.tokens[t] for t in toks] == ts.tokens["text"].iloc[rows].tolist()


def test_damaged_vector_part_is_recomputed(tiny_adapter, tmp_path):
    from tests.test_extract import examples
    from vlcore.run.sweep import run_sweep
    from vlcore.storage.sweeps import load_sweep_vectors

    exs = examples(6)
    seen = []
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=3, progress=seen.append, should_stop=lambda: len(seen) >= 1)
    part = next((tmp_path / "s").glob("part-*.vectors.safetensors"))
    part.write_bytes(part.read_bytes()[:50])
    encoded = []
    original = tiny_adapter.encode
    tiny_adapter.encode = lambda imgs, texts: encoded.append(len(texts)) or original(imgs, texts)
    run_sweep(tiny_adapter, exs, tmp_path / "s", batch_size=3)
    assert sum(encoded) == 6  # the damaged batch ran again
    assert load_sweep_vectors(tmp_path / "s")["example_ids"] == [e.example_id for e in exs]


def test_thumbnails_cut_each_token_from_its_own_grid():
    """A layout with two grids of different cell sizes (a base grid and a finer tile grid, as LLaVA-NeXT has): each
    image token's thumbnail is its box on its own grid's image, sampled to the first grid's cell size."""
    from vlcore.analysis.projection import token_set_from_traces
    from vlcore.trace import ROLE_PATCH, ROLE_TEXT, ImageGrid, TokenLayout, Trace

    base = np.zeros((8, 8, 3), np.uint8)
    base[:4, 4:] = 200  # base cell (0, 1)
    tiles = np.zeros((8, 16, 3), np.uint8)
    tiles[4:, 12:] = 90  # tile cell (1, 3)
    images = (ImageGrid.regular(base, (2, 2), 4), ImageGrid.regular(tiles, (2, 4), 4))
    layout = TokenLayout.build(["q", "<b 0,1>", "<t 1,3>", "<t 0,0>"], [ROLE_TEXT, ROLE_PATCH, ROLE_PATCH, ROLE_PATCH],
                               [-1, 0, 1, 1], [(-1, -1), (0, 1), (1, 3), (0, 0)], images)
    trace = Trace.single("ex", "m", layout, None, np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float16))
    thumbs = token_set_from_traces([trace]).thumbs
    assert thumbs.shape == (4, 4, 4, 3)
    assert (thumbs[0] == 0).all() and (thumbs[1] == 200).all() and (thumbs[2] == 90).all() and (thumbs[3] == 0).all()
