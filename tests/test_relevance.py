"""Raw attention, attention rollout and gradient relevancy: loop references and planted models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_LABELS, grey_image, make_tiny_adapter
from vlcore.errors import InputError, NoAttentionError
from vlcore.run.extract import extract_trace
from vlcore.attribution.relevance import (
    Relevancy,
    compute_raw_map,
    compute_rollout,
    compute_rollout_map,
    extract_relevancy,
    relevancy_matrix,
)
from vlcore.trace import Trace

QUESTION = "what is the color of the shape?"


# -- a tiny ViLT built by hand so that its answer depends on one red patch -----------------------------


def make_planted_adapter(tokenizer_dir, arch: str = "ViltForQuestionAnswering"):
    """A tiny ViLT (hidden 32, 2 layers, 2 heads, patch 8) whose answer "red" reads one red patch.

    Construction (every other weight is zero, every LayerNorm is weight 1, bias 0):

    - Patch embedding: feature 0 of a patch is ``mean(R) - mean(G)`` of its normalised pixels: 2 for a
      pure red patch, exactly 0 for grey ones (R = G). Image position, image CLS and modality embeddings
      are 0, so grey patches and the image CLS are the zero vector.
    - Text embeddings: the text LayerNorm has weight 0 and bias ``e_1``: every text token is ``e_1``.
    - Layer 0, both heads: query reads feature 1 (text), key reads feature 0 (red), scaled so the text
      [CLS] puts almost all its attention on the red patch; the value copies feature 0 into head
      feature 2, and the output projection writes it to hidden feature 2. The grey patches' values are
      exactly 0, so their attention has zero gradient. The MLP writes 0 (residual only).
    - Layer 1 is the identity (zero attention output and MLP).
    - Pooler: ``tanh(0.3 · LN(h_CLS)_2)``. VQA head: ``Linear → (p, 1, 0, …) → LayerNorm → GELU``, and
      only the "red" logit reads unit 0, so it rises with the red feature. ITM head: ``4 · p``.

    So the [CLS] attends to the red patch, and the "red" logit rises with what that patch carries:
    removing it drops the answer's probability from ~0.97 to ~0.2 (5 labels).
    """
    adapter = make_tiny_adapter(tokenizer_dir, arch=arch)
    model = adapter.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        emb = adapter.vilt.embeddings
        proj = emb.patch_embeddings.projection.weight  # [D, 3, 8, 8]
        proj[0, 0] = 1 / 64
        proj[0, 1] = -1 / 64
        text_ln = emb.text_embeddings.LayerNorm
        text_ln.weight.zero_()
        text_ln.bias[1] = 1.0
        att = adapter.vilt.encoder.layer[0].attention
        for head in (0, 1):
            att.attention.query.weight[16 * head, 1] = 1.5
            att.attention.key.weight[16 * head, 0] = 1.5
            att.attention.value.weight[16 * head + 2, 0] = 1.0
            att.output.dense.weight[2, 16 * head + 2] = 0.5
        adapter.vilt.pooler.dense.weight[0, 2] = 0.3
        if arch == "ViltForQuestionAnswering":
            first, last = model.classifier[0], model.classifier[3]
            first.weight[0, 0] = 1.0
            first.bias[1] = 1.0
            last.weight[TINY_LABELS.index("red"), 0] = 1.0
        else:
            model.rank_output.weight[0, 0] = 4.0
    return adapter


@pytest.fixture(scope="module")
def planted(tiny_tokenizer_dir):
    return make_planted_adapter(tiny_tokenizer_dir)


# -- raw attention and rollout on hand-built traces -------------------------------------------------


def random_trace(n_layers: int = 3, n_heads: int = 2, seed: int = 0, identity: bool = False) -> Trace:
    # [CLS] a [SEP] | [IMG] 2x3 patches
    tokens = ("[CLS]", "a", "[SEP]", "[IMG]") + tuple(f"p{i}" for i in range(6))
    n = len(tokens)
    modality = np.array([0, 0, 0] + [1] * 7, dtype=np.int8)
    special = np.array([1, 0, 1, 1] + [0] * 6, dtype=bool)
    rc = np.full((n, 2), -1, dtype=np.int16)
    rc[4:] = [(r, c) for r in range(2) for c in range(3)]
    if identity:
        att = np.broadcast_to(np.eye(n), (n_layers, n_heads, n, n)).copy()
    else:
        att = np.random.default_rng(seed).random((n_layers, n_heads, n, n))
        att /= att.sum(-1, keepdims=True)
    return Trace.from_arrays("ex", "m", tokens, modality, special, rc, (2, 3), np.zeros((16, 24, 3), np.uint8), 8,
                 att.astype(np.float16), None)


def rollout_reference(att: np.ndarray, start: int = 0) -> np.ndarray:
    """Abnar & Zuidema written out with explicit loops."""
    n_layers, n_heads, n, _ = att.shape
    result = np.eye(n)
    for layer in range(start, n_layers):
        mean = np.zeros((n, n))
        for h in range(n_heads):
            mean += att[layer, h].astype(np.float64) / n_heads
        aug = mean + np.eye(n)
        for i in range(n):
            aug[i] /= aug[i].sum()
        new = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                new[i, j] = sum(aug[i, k] * result[k, j] for k in range(n))
        result = new
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollout_equals_a_loop_reference(seed):
    t = random_trace(seed=seed)
    got = compute_rollout(t)
    assert got.dtype == np.float32 and got.shape == (t.n_tokens, t.n_tokens)
    assert np.allclose(got, rollout_reference(t.attentions), atol=1e-6)
    assert np.allclose(got.sum(-1), 1.0, atol=1e-5)  # a product of row-stochastic matrices


def test_identity_attention_gives_identity_rollout():
    t = random_trace(identity=True)
    assert np.allclose(compute_rollout(t), np.eye(t.n_tokens))
    assert np.allclose(compute_rollout_map(t, query=4), np.eye(t.n_tokens)[4])


def test_start_layer_folds_in_only_the_later_layers():
    t = random_trace(n_layers=4)
    for start in (1, 3, -1):
        assert np.allclose(compute_rollout(t, start_layer=start), rollout_reference(t.attentions, start % 4), atol=1e-6)
    last = t.attentions[3].astype(np.float64).mean(0) + np.eye(t.n_tokens)
    assert np.allclose(compute_rollout(t, start_layer=3), last / last.sum(-1, keepdims=True), atol=1e-6)
    assert np.allclose(compute_rollout_map(t, start_layer=2, query=1), rollout_reference(t.attentions, 2)[1], atol=1e-6)
    with pytest.raises(InputError, match="start_layer"):
        compute_rollout(t, start_layer=4)


def test_raw_map_is_the_query_row_of_one_head_or_the_mean():
    t = random_trace()
    assert np.array_equal(compute_raw_map(t, layer=1, head=0, query=2), t.attentions[1, 0, 2].astype(np.float32))
    assert np.allclose(compute_raw_map(t), t.attentions[-1].astype(np.float32).mean(0)[0])
    for bad in ({"head": 2}, {"layer": 3}, {"query": 10}):
        with pytest.raises(InputError):
            compute_raw_map(t, **bad)
    no_att = Trace.from_arrays("ex", "m", t.tokens, t.modality, t.special, t.patch_rc, t.grid, t.image, 8, None, None)
    with pytest.raises(NoAttentionError):
        compute_rollout(no_att)


def test_relevancy_matrix_follows_the_update_rule():
    rng = np.random.default_rng(0)
    att = [rng.random((2, 4, 4)) for _ in range(2)]
    grads = [rng.normal(size=(2, 4, 4)) for _ in range(2)]
    ref = np.eye(4)
    for a, g in zip(att, grads):
        ref = ref + np.maximum(a * g, 0).mean(0) @ ref
    assert np.allclose(relevancy_matrix(att, grads), ref)


# -- gradient relevancy on tiny models --------------------------------------------------------------


def test_relevancy_shapes_order_and_sign(tiny_adapter, noise_image):
    rel = extract_relevancy(tiny_adapter, noise_image, QUESTION, keep_matrix=True)
    trace = extract_trace(tiny_adapter, noise_image, QUESTION, "x")
    assert isinstance(rel, Relevancy)
    assert rel.tokens == trace.tokens and np.array_equal(rel.patch_rc, trace.patch_rc)
    n = trace.n_tokens
    assert rel.values.shape == (n,) and rel.values.dtype == np.float32
    assert rel.text.shape == (len(trace.text_index()),) and rel.image.shape == (24,)
    assert rel.to_grid().shape == (4, 6) and rel.R.shape == (n, n)
    assert rel.values[0] == 0.0 and (rel.values >= 0).all() and (rel.R >= 0).all()
    assert np.allclose(rel.values[1:], rel.R[0, 1:])
    assert rel.answer == trace.predicted
    with pytest.raises(ValueError):
        rel.values[1] = 1.0  # read-only


def test_relevancy_equals_a_plain_retain_grad_reference(tiny_adapter, noise_image):
    """The hooked pass gives what retain_grad on the HF model's own attention outputs gives."""
    rel = extract_relevancy(tiny_adapter, noise_image, QUESTION, answer="blue")
    batch = tiny_adapter.encode([noise_image], [QUESTION])
    with torch.enable_grad():
        out = tiny_adapter.model(**batch.inputs, output_attentions=True, return_dict=True)
        for a in out.attentions:
            a.retain_grad()
        out.logits[0, TINY_LABELS.index("blue")].backward()
    ref = np.eye(len(rel.tokens))
    for a in out.attentions:
        cam = (a.grad[0] * a[0]).clamp(min=0).mean(0).detach().numpy().astype(np.float64)
        ref = ref + cam @ ref
    tiny_adapter.model.zero_grad(set_to_none=True)
    assert rel.answer == "blue"
    assert np.allclose(rel.values[1:], ref[0, 1:], atol=1e-6)


def test_gradient_pass_leaves_no_parameter_gradients(tiny_adapter, noise_image):
    extract_relevancy(tiny_adapter, noise_image, QUESTION)
    assert all(p.grad is None for p in tiny_adapter.model.parameters())
    with torch.no_grad():
        extract_relevancy(tiny_adapter, noise_image, QUESTION)  # works inside no_grad too
        assert not torch.is_grad_enabled()


def _hook_count(adapter) -> int:
    return sum(len(m._forward_hooks) for m in adapter.model.modules())


def test_no_hook_survives_an_error(tiny_adapter, noise_image, monkeypatch):
    before = _hook_count(tiny_adapter)
    with pytest.raises(InputError, match="not one of"):
        extract_relevancy(tiny_adapter, noise_image, QUESTION, answer="giraffe")
    assert _hook_count(tiny_adapter) == before

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(tiny_adapter, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        extract_relevancy(tiny_adapter, noise_image, QUESTION)
    assert _hook_count(tiny_adapter) == before == 0


def test_relevancy_needs_one_example(tiny_adapter, noise_image):
    batch = tiny_adapter.encode([noise_image, noise_image], [QUESTION, QUESTION])
    with pytest.raises(InputError, match="one example"):
        tiny_adapter.attention_gradients(batch)


@pytest.mark.parametrize("cell", [(2, 4), (0, 1), (3, 0)])
def test_the_planted_patch_ranks_first(planted, cell):
    image = grey_image(48, 32, red_cell=cell)
    rel = extract_relevancy(planted, image, QUESTION)
    trace = extract_trace(planted, image, QUESTION, "x")
    assert rel.answer == "red" == trace.predicted
    grid = rel.to_grid()
    assert grid.shape == (4, 6)  # non-square: a row/column swap would misplace the cell
    assert np.unravel_index(np.nanargmax(grid), grid.shape) == cell
    assert grid[cell] > 0 and np.nansum(grid) == pytest.approx(grid[cell])  # grey patches get exactly 0
    for values in (compute_raw_map(trace, layer=0), compute_rollout_map(trace)):  # layer 1 is uniform
        g = trace.to_grid(values)
        assert np.unravel_index(np.nanargmax(g), g.shape) == cell


def test_planted_itm_model_points_at_the_patch_too(tiny_tokenizer_dir):
    adapter = make_planted_adapter(tiny_tokenizer_dir, arch="ViltForImageAndTextRetrieval")
    rel = extract_relevancy(adapter, grey_image(48, 32, red_cell=(1, 2)), "a red shape")
    assert rel.answer == "match"
    grid = rel.to_grid()
    assert np.unravel_index(np.nanargmax(grid), grid.shape) == (1, 2)


def test_nlvr2_relevancy_per_image_pass_drops_padding(tiny_tokenizer_dir):
    from tests.models.test_nlvr2_and_equivalence import NLVR2

    adapter = make_tiny_adapter(tiny_tokenizer_dir, **NLVR2)
    pair = (grey_image(48, 32, red_cell=(1, 1)), grey_image(32, 32))  # 24 and 16 patches: the second is padded
    for image_pass, n_patches in ((0, 24), (1, 16)):
        rel = extract_relevancy(adapter, pair, "is there a red cat?", image_pass=image_pass)
        trace = extract_trace(adapter, pair, "is there a red cat?", "x", image_pass=image_pass)
        assert rel.tokens == trace.tokens and rel.image.shape == (n_patches,) and (rel.values >= 0).all()
