"""Per-head statistics: every metric against a plain loop reference, known answers, custom metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlcore.analysis.stats import (
    BUILTIN_METRICS,
    compute_trace_summaries,
    metric_names,
    register_metric,
    unregister_metric,
)
from vlcore.trace import Trace


def make_trace(att: np.ndarray, n_text: int, grid: tuple[int, int], example_id: str = "ex") -> Trace:
    """Tokens: [CLS] t1..t(n_text) [SEP] | [IMG] patches (row-major on ``grid``)."""
    n_patches = grid[0] * grid[1]
    tokens = ("[CLS]",) + tuple(f"t{i}" for i in range(n_text)) + ("[SEP]", "[IMG]") + tuple(
        f"p{r},{c}" for r in range(grid[0]) for c in range(grid[1]))
    n = len(tokens)
    modality = np.array([0] * (n_text + 2) + [1] * (n_patches + 1), dtype=np.int8)
    special = np.zeros(n, bool)
    special[[0, n_text + 1, n_text + 2]] = True
    rc = np.full((n, 2), -1, np.int16)
    rc[n_text + 3:] = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    assert att.shape[-1] == n
    image = np.zeros((grid[0] * 4, grid[1] * 4, 3), np.uint8)
    return Trace.from_arrays(example_id, "m", tokens, modality, special, rc, grid, image, 4, att.astype(np.float16), None)


def random_attention(n_layers, n_heads, n, seed=0, sharp=1.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_layers, n_heads, n, n)) * sharp
    att = np.exp(logits)
    return att / att.sum(-1, keepdims=True)


def reference(trace: Trace) -> dict[str, np.ndarray]:
    """Loop-based reference of every built-in metric: ``name -> [L, H]``. Written from docs/statistics.md."""
    att = trace.attentions.astype(np.float64)
    n_layers, n_heads, n, _ = att.shape
    txt = [i for i in range(n) if trace.modality[i] == 0 and not trace.special[i]]
    img = [i for i in range(n) if trace.modality[i] == 1 and not trace.special[i]]
    alltxt = [i for i in range(n) if trace.modality[i] == 0]
    allimg = [i for i in range(n) if trace.modality[i] == 1]
    cls, sep = 0, [i for i in alltxt if trace.special[i] and i != 0]
    imgcls = [i for i in allimg if trace.special[i]]
    rc = trace.patch_rc
    out = {m: np.zeros((n_layers, n_heads)) for m in BUILTIN_METRICS}
    for layer in range(n_layers):
        for h in range(n_heads):
            a = att[layer, h]
            block = {}
            for s, qs in (("txt", txt), ("img", img)):
                for d, ks in (("txt", txt), ("img", img)):
                    total = sum(a[q, k] for q in qs for k in ks)
                    block[s, d] = (total, len(qs) * len(ks))
                    out[f"{s}2{d}"][layer, h] = total / (len(qs) * len(ks))
            out["cross_modal"][layer, h] = (block["txt", "img"][0] + block["img", "txt"][0]) / (
                block["txt", "img"][1] + block["img", "txt"][1])
            out["intra_modal"][layer, h] = (block["txt", "txt"][0] + block["img", "img"][0]) / (
                block["txt", "txt"][1] + block["img", "img"][1])
            far = [(q, k) for q in img for k in img
                   if max(abs(int(rc[q, 0]) - int(rc[k, 0])), abs(int(rc[q, 1]) - int(rc[k, 1]))) > 1]
            out["img2img_nonlocal"][layer, h] = sum(a[q, k] for q, k in far) / len(far)
            out["cls_to_txt"][layer, h] = sum(a[0, k] for k in alltxt)
            out["cls_to_img"][layer, h] = sum(a[0, k] for k in allimg)
            for s, qs in (("txt", txt), ("img", img)):
                for d, ks in (("txt", txt), ("img", img)):
                    out[f"{s}q_to_{d}"][layer, h] = np.mean([sum(a[q, k] for k in ks) for q in qs])
            queries = txt + img
            out["entropy"][layer, h] = np.mean(
                [-sum(p * math.log(p) for p in a[q] if p > 0) / math.log(n) for q in queries])
            out["max_weight"][layer, h] = np.mean([a[q].max() for q in queries])
            out["to_cls"][layer, h] = np.mean([a[q, cls] for q in queries])
            out["to_sep"][layer, h] = np.mean([sum(a[q, k] for k in sep) for q in queries])
            out["to_imgcls"][layer, h] = np.mean([sum(a[q, k] for k in imgcls) for q in queries])
            dists = []
            for q in img:
                mass = sum(a[q, k] for k in img)
                if mass > 0:  # a patch query with no patch mass has no distance: left out
                    dists.append(sum(a[q, k] * math.dist(rc[q], rc[k]) for k in img) / mass)
            out["spatial_distance"][layer, h] = np.mean(dists) if dists else np.nan
    return out


def as_arrays(frame) -> dict[str, np.ndarray]:
    n_layers, n_heads = frame["layer"].max() + 1, frame["head"].max() + 1
    return {m: g.sort_values(["layer", "head"])["value"].to_numpy().reshape(n_layers, n_heads)
            for m, g in frame.groupby("metric", observed=True)}


@pytest.mark.parametrize("n_text,grid,seed", [(3, (3, 4), 0), (6, (2, 5), 1), (1, (4, 3), 2)])
def test_every_metric_matches_the_loop_reference(n_text, grid, seed):
    n = n_text + 3 + grid[0] * grid[1]
    trace = make_trace(random_attention(2, 3, n, seed, sharp=2.0), n_text, grid)
    got, ref = as_arrays(compute_trace_summaries(trace)), reference(trace)
    assert set(got) == set(BUILTIN_METRICS)
    for name in BUILTIN_METRICS:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-6, err_msg=name)


def test_uniform_rows_have_entropy_one_and_one_hot_rows_zero():
    n = 4 + 3 + 9  # 16 tokens: 1/16 is exact in float16
    uniform = np.full((1, 1, n, n), 1.0 / n)
    assert as_arrays(compute_trace_summaries(make_trace(uniform, 4, (3, 3))))["entropy"][0, 0] == pytest.approx(1.0, abs=1e-6)
    one_hot = np.zeros((1, 1, n, n))
    one_hot[0, 0, np.arange(n), (np.arange(n) + 1) % n] = 1.0
    got = as_arrays(compute_trace_summaries(make_trace(one_hot, 4, (3, 3))))
    assert got["entropy"][0, 0] == pytest.approx(0.0, abs=1e-7)
    assert got["max_weight"][0, 0] == pytest.approx(1.0)


def test_a_head_looking_only_at_image_keys_gives_text_queries_a_cross_modal_share_of_one():
    n_text, grid = 4, (2, 4)
    n = n_text + 3 + 8
    att = np.zeros((1, 1, n, n))
    patches = np.arange(n_text + 3, n)
    att[0, 0][:, patches] = 1.0 / len(patches)
    got = as_arrays(compute_trace_summaries(make_trace(att, n_text, grid)))
    assert got["txtq_to_img"][0, 0] == pytest.approx(1.0)
    assert got["txtq_to_txt"][0, 0] == 0.0
    assert got["cls_to_img"][0, 0] == pytest.approx(1.0)
    assert got["txt2txt"][0, 0] == 0.0 and got["txt2img"][0, 0] == pytest.approx(1.0 / 8)


def test_nonlocal_image_block_drops_exactly_the_8_neighbourhood_on_a_3x4_grid():
    n_text, grid = 2, (3, 4)
    n = n_text + 3 + 12
    first_patch = n_text + 3
    # query patch (1,1) attends only to its 8 neighbours and itself: nothing is left non-locally
    att = np.full((1, 1, n, n), 1.0 / n)
    q = first_patch + 1 * 4 + 1
    att[0, 0, q] = 0
    neighbours = [first_patch + r * 4 + c for r in range(3) for c in range(3)]  # rows 0-2, cols 0-2
    att[0, 0, q, neighbours] = 1.0 / 9
    trace = make_trace(att, n_text, grid)
    ref = reference(trace)["img2img_nonlocal"][0, 0]
    got = as_arrays(compute_trace_summaries(trace))["img2img_nonlocal"][0, 0]
    assert got == pytest.approx(ref, abs=1e-7)
    # the metric averages over 144 patch pairs minus the 70 (query, key) pairs within one cell of each
    # other: per row 2, 3, 2 rows x per column 2, 3, 3, 2 columns = 7 * 10
    cells = sum(1 for a in range(12) for b in range(12) if max(abs(a // 4 - b // 4), abs(a % 4 - b % 4)) > 1)
    assert cells == 144 - 70
    # every far cell holds 1/n except the 3 far cells of q (column 3), which are 0
    stored = float(np.float16(1.0 / n))  # traces keep float16
    assert got == pytest.approx((cells - 3) * stored / cells, abs=1e-7)


def test_special_tokens_excluded_unless_asked():
    n_text, grid = 2, (2, 2)
    n = n_text + 3 + 4
    att = np.zeros((1, 1, n, n))
    att[0, 0, :, 0] = 1.0  # everything attends to [CLS]
    trace = make_trace(att, n_text, grid)
    got = as_arrays(compute_trace_summaries(trace))
    assert got["to_cls"][0, 0] == pytest.approx(1.0) and got["txt2txt"][0, 0] == 0.0
    with_special = as_arrays(compute_trace_summaries(trace, include_special=True))
    assert with_special["txt2txt"][0, 0] == pytest.approx(1.0 / (n_text + 2))


def test_custom_metric_shows_up_next_to_the_built_ins():
    register_metric("self_attention", lambda t: np.stack(
        [np.diagonal(a, axis1=-2, axis2=-1).mean(-1) for a in t.attentions.astype(np.float32)]), "mean diagonal")
    try:
        n = 2 + 3 + 4
        att = random_attention(2, 2, n, 3)
        trace = make_trace(att, 2, (2, 2))
        frame = compute_trace_summaries(trace)
        assert "self_attention" in metric_names()
        got = as_arrays(frame)["self_attention"]
        np.testing.assert_allclose(got, np.diagonal(att.astype(np.float16).astype(np.float32), axis1=-2,
                                                    axis2=-1).mean(-1), atol=1e-6)
    finally:
        unregister_metric("self_attention")
    assert "self_attention" not in metric_names()


def test_device_path_of_a_sweep_batch_equals_the_trace_path_with_custom_metrics(tiny_adapter):
    from tests.test_extract import examples
    from vlcore.run.extract import extract_trace
    from vlcore.run.sweep import summarize_batch

    register_metric("diag", lambda t: np.stack(
        [np.diagonal(a, axis1=-2, axis2=-1).mean(-1) for a in t.attentions.astype(np.float32)]))
    try:
        exs = examples(5)  # mixed image sizes: padded patches inside the batch
        batch = tiny_adapter.encode([e.load_image() for e in exs], [e.question for e in exs])
        heads = summarize_batch(tiny_adapter, batch, exs).heads
        assert set(heads["metric"].astype(str)) == set(BUILTIN_METRICS) | {"diag"}
        for ex in exs:
            trace = extract_trace(tiny_adapter, ex.load_image(), ex.question, ex.example_id)
            ref = compute_trace_summaries(trace).set_index(["layer", "head", "metric"])["value"].sort_index()
            got = heads[heads.example_id == ex.example_id].set_index(["layer", "head", "metric"])["value"].sort_index()
            np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), atol=1e-5)
    finally:
        unregister_metric("diag")


def test_spatial_distance_leaves_out_rows_without_patch_mass_and_is_nan_only_when_none_is_left():
    n_text, grid = 2, (2, 2)  # tokens: [CLS] t0 t1 [SEP] [IMG] p00 p01 p10 p11
    n, p00, p01, p11 = n_text + 3 + 4, 5, 6, 8  # p10 (7) is left attending to [CLS]
    att = np.zeros((1, 2, n, n))
    att[0, :, :, 0] = 1.0  # head 1: every query (patches included) looks at [CLS] only: no patch mass anywhere
    head = att[0, 0]  # head 0: the text queries and [CLS] keep zero patch mass, the patches differ
    head[p00] = 0
    head[p00, p11] = 1.0  # distance sqrt(2)
    head[p01] = 0
    head[p01, [p00, p01]] = 0.5  # 0.5 * 1 + 0.5 * 0
    head[p11] = 0
    head[p11, p11] = 1.0  # distance 0
    # p10 still attends to [CLS] only: no patch mass, so it has no distance and is left out
    got = as_arrays(compute_trace_summaries(make_trace(att, n_text, grid)))["spatial_distance"]
    assert got[0, 0] == pytest.approx((math.sqrt(2) + 0.5 + 0.0) / 3, abs=1e-6)
    assert np.isnan(got[0, 1])
    np.testing.assert_allclose(got, _spatial_reference(make_trace(att, n_text, grid)), atol=1e-6)


def _demo_examples(n: int = 5):
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter

    return load_adapter("demo", device="cpu"), easy_vqa_examples("test", n)


def _spatial_reference(trace: Trace) -> np.ndarray:
    """``[L, H]`` spatial distance in numpy, written from docs/statistics.md (float64)."""
    att = trace.attentions.astype(np.float64)
    img = np.flatnonzero((trace.modality == 1) & ~trace.special)
    rc = trace.patch_rc[img].astype(np.float64)
    dist = np.sqrt(((rc[:, None] - rc[None]) ** 2).sum(-1))  # [P, P]
    block = att[:, :, img][:, :, :, img]  # [L, H, P, P]
    mass = block.sum(-1)
    defined = mass > 0  # a patch query with no patch mass has no distance: left out
    per_row = np.where(defined, (block * dist).sum(-1), 0.0) / np.where(defined, mass, 1.0)
    with np.errstate(invalid="ignore"):
        return per_row.sum(-1) / defined.sum(-1)  # NaN when no row is defined


def test_spatial_distance_of_the_demo_model_has_no_nan_on_the_trace_and_the_sweep_path():
    from vlcore.run.extract import extract_trace, model_image_input
    from vlcore.run.sweep import summarize_batch

    adapter, exs = _demo_examples(5)
    images = [model_image_input(adapter, e) for e in exs]
    traces = [extract_trace(adapter, im, e.question, e.example_id) for im, e in zip(images, exs)]
    # the case that made it NaN: a query outside the patch set ([CLS], a word) with no mass on patches
    no_patch_mass = [(t.attentions[..., t.patch_rc[:, 0] >= 0].astype(np.float32).sum(-1) == 0)[..., t.patch_rc[:, 0] < 0].any()
                     for t in traces]
    assert any(no_patch_mass)
    heads = summarize_batch(adapter, adapter.encode(images, [e.question for e in exs]), exs).heads
    for trace in traces:
        got = as_arrays(compute_trace_summaries(trace))["spatial_distance"]
        ref = _spatial_reference(trace)
        assert not np.isnan(ref).any()  # every head has a patch query with patch mass
        assert not np.isnan(got).any(), trace.example_id
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        swept = as_arrays(heads[heads.example_id == trace.example_id])["spatial_distance"]
        assert not np.isnan(swept).any(), trace.example_id
        np.testing.assert_allclose(swept, got, rtol=1e-3, atol=1e-5)  # another batch size: float16 tolerance


# -- per block: causal entropy, metrics that do not apply --------------------------------------------------------


def causal_trace(n: int = 8, n_visible: bool = True) -> Trace:
    """One causal text block over ``[BOS] w1 .. w(n-1)``: row q uniform over the q + 1 keys it sees."""
    from vlcore.trace import ROLE_SPECIAL, ROLE_TEXT, AttentionBlock, TokenLayout

    layout = TokenLayout.build(["<s>"] + [f"w{i}" for i in range(1, n)], [ROLE_SPECIAL] + [ROLE_TEXT] * (n - 1))
    att = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    block = AttentionBlock(att[None, None].astype(np.float16), "lm", "lm",
                           np.arange(1, n + 1, dtype=np.int32) if n_visible else None)
    return Trace("c", "m", {"lm": layout}, {"lm.self": block}, {"lm": None}, "lm.self")


def test_a_uniform_causal_row_over_its_visible_keys_has_entropy_one():
    n = 8  # rows 1/k for k = 2..8: the float16 rounding of 1/3, 1/5, 1/6, 1/7 keeps the entropy within 1e-3
    got = as_arrays(compute_trace_summaries(causal_trace(n)))["entropy"][0, 0]
    assert got == pytest.approx(1.0, abs=1e-3)
    # normalised by every key instead (the old rule), the same rows would give the mean of log k / log N
    assert np.mean([math.log(k) / math.log(n) for k in range(2, n + 1)]) < 0.8
    # the trace's own n_visible is the rule: without it every query sees all N keys
    every_key = as_arrays(compute_trace_summaries(causal_trace(n, n_visible=False)))["entropy"][0, 0]
    assert every_key == pytest.approx(np.mean([math.log(k) / math.log(n) for k in range(2, n + 1)]), abs=1e-3)


def test_a_metric_that_does_not_apply_is_nan_with_a_reason_never_zero():
    from vlcore.analysis.stats import not_applicable

    trace = causal_trace()  # text only: nothing about images applies
    got = as_arrays(compute_trace_summaries(trace))
    reasons = not_applicable(trace)
    for name in ("txt2img", "img2txt", "img2img", "txtq_to_img", "cls_to_img", "cross_modal", "to_imgcls",
                 "spatial_distance", "img2img_nonlocal"):
        assert np.isnan(got[name][0, 0]) and reasons[name], name
    assert reasons["txt2img"] == "no image keys in this block"
    assert reasons["img2txt"] == "no image queries in this block"
    assert "one modality" in reasons["txtq_to_txt"] and np.isnan(got["txtq_to_txt"][0, 0])  # trivially 1
    for name in ("txt2txt", "intra_modal", "entropy", "max_weight", "to_cls"):
        assert name not in reasons and not np.isnan(got[name][0, 0]), name
    assert set(reasons) == {name for name in BUILTIN_METRICS if np.isnan(got[name][0, 0])}
    # a joint text-and-image block: everything applies (the 3 x 4 grid has far patch pairs)
    n = 3 + 3 + 12
    assert not_applicable(make_trace(random_attention(1, 1, n), 3, (3, 4))) == {}


def test_the_cls_row_is_found_by_its_role_not_its_position():
    n_text, grid = 3, (2, 3)
    n = n_text + 3 + 6
    att = random_attention(1, 2, n, seed=5)
    trace = make_trace(att, n_text, grid)
    order = np.r_[n_text + 2 : n, 0 : n_text + 2]  # the image part first, then [CLS] text [SEP]
    moved = Trace.from_arrays("ex", "m", tuple(np.array(trace.tokens)[order]), trace.modality[order],
                              trace.special[order], trace.patch_rc[order], grid, trace.image, 4,
                              att[:, :, order][:, :, :, order].astype(np.float16), None)
    before, after = as_arrays(compute_trace_summaries(trace)), as_arrays(compute_trace_summaries(moved))
    for name in BUILTIN_METRICS:  # the same tokens in another order: the same statistics
        np.testing.assert_allclose(after[name], before[name], atol=1e-6, err_msg=name)


def test_z_scores_keep_a_metric_that_does_not_apply_as_nan_never_zero():
    import pandas as pd

    from vlcore.analysis.head_table import aggregate_heads, zscore_across_heads

    frame = pd.DataFrame({"example_id": "e", "layer": [0, 0, 1, 1] * 2, "head": [0, 1, 0, 1] * 2,
                          "metric": ["entropy"] * 4 + ["txt2img"] * 4,
                          "value": [1.0, 2.0, 3.0, 4.0] + [np.nan] * 4})
    z = zscore_across_heads(frame)
    assert z[z.metric == "txt2img"]["value"].isna().all()
    np.testing.assert_allclose(z[z.metric == "entropy"]["value"], [-1.342, -0.447, 0.447, 1.342], atol=1e-3)
    agg = aggregate_heads(frame, norm="z")
    assert agg[agg.metric == "txt2img"]["mean"].isna().all() and (agg[agg.metric == "txt2img"]["n"] == 0).all()
