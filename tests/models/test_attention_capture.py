"""Attention recomputed from what sdpa saw equals eager attention, for every generative family.

Each family is a tiny random-weight model built from its config (the real geometry scaled down: grouped-query
heads, M-RoPE, sliding windows, bidirectional image/prefix blocks) fed a left-padded batch of two with images.
The reference is the same model on eager attention with ``output_attentions=True``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from vlcore.errors import VLScopeError
from vlcore.models import attention_capture as ac
from vlcore.models import attention_rows
from vlcore.models.attention_capture import (
    AttentionCall,
    AttentionCaptureError,
    HeadSums,
    accumulate_head_sums,
    capture_attention_calls,
    compute_attention_rows,
    eager_attention,
    extract_attention,
    extract_eager_attention,
    extract_eager_generation_attention,
    extract_generation_attention,
)

IMG = 120  # the image placeholder token in every tiny vocabulary
TOL = 1e-4
SMALL = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "patch_size": 14}


def _ids(n: int, image: slice, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two prompts of ``n`` tokens with image tokens at ``image``; the second is left-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, n), generator=g)
    ids[:, image] = IMG
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    return ids, mask


def build_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(text_config=LlamaConfig(**SMALL, num_hidden_layers=2, head_dim=8),
                      vision_config=CLIPVisionConfig(**VISION, image_size=28), image_token_id=IMG)
    ids, mask = _ids(12, slice(3, 7), 1)
    return LlavaForConditionalGeneration(cfg), {"input_ids": ids, "attention_mask": mask,
                                                    "pixel_values": torch.randn(2, 3, 28, 28)}


def build_qwen2_vl():
    """M-RoPE from a 4 x 4 patch grid merged 2 x 2; Qwen2's sliding window (8 keys) on layer 1."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(SMALL, num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=121,
                        vision_start_token_id=122)
    ids, mask = _ids(20, slice(6, 10), 2)
    ids[:, 5] = 122
    return Qwen2VLForConditionalGeneration(cfg), {
        "input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(32, 1176),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]), "mm_token_type_ids": (ids == IMG).int()}


def build_gemma3():
    """Sliding window 6 on layers 0 and 2; the 4 tokens of each image attend to each other both ways."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(SMALL, num_hidden_layers=3, head_dim=8, sliding_window=6,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cfg = Gemma3Config(text_config=text, vision_config=dict(VISION, image_size=56), mm_tokens_per_image=4,
                       image_token_id=IMG, boi_token_index=121, eoi_token_index=122)
    ids, mask = _ids(16, slice(5, 9), 3)
    ids[:, 4], ids[:, 9] = 121, 122
    return Gemma3ForConditionalGeneration(cfg), {"input_ids": ids, "attention_mask": mask,
                                                     "pixel_values": torch.randn(2, 3, 56, 56),
                                                     "token_type_ids": (ids == IMG).long()}


def build_paligemma():
    """Image and prompt prefix (positions < 10) attend bidirectionally; the suffix is causal."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = dict(SMALL, model_type="gemma", num_hidden_layers=2, num_key_value_heads=1, head_dim=8)
    cfg = PaliGemmaConfig(text_config=text, vision_config=dict(VISION, image_size=28), image_token_id=IMG,
                          projection_dim=32)
    ids, mask = _ids(14, slice(2, 6), 4)
    token_type = torch.zeros_like(ids)
    token_type[:, 10:] = 1
    return PaliGemmaForConditionalGeneration(cfg), {"input_ids": ids, "attention_mask": mask,
                                                    "token_type_ids": token_type,
                                                    "pixel_values": torch.randn(2, 3, 28, 28)}


def build_idefics3():
    """SmolVLM's layout: a Llama text model, pixel-shuffled image tokens (one image of 4 tokens)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    text = dict(SMALL, model_type="llama", num_hidden_layers=2, head_dim=8)
    cfg = Idefics3Config(text_config=text, vision_config=dict(VISION, image_size=56), scale_factor=2,
                         image_token_id=IMG)
    ids, mask = _ids(12, slice(3, 7), 5)
    return Idefics3ForConditionalGeneration(cfg), {"input_ids": ids, "attention_mask": mask,
                                                       "pixel_values": torch.randn(2, 1, 3, 56, 56)}


FAMILIES = {"llava": build_llava, "qwen2_vl": build_qwen2_vl, "gemma3": build_gemma3,
            "paligemma": build_paligemma, "idefics3": build_idefics3}
_BUILT: dict = {}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """(name, model on sdpa in eval mode, inputs, full eager attention [batch, layer, head, N, N])."""
    name = request.param
    if name not in _BUILT:
        torch.manual_seed(0)
        model, inputs = FAMILIES[name]()
        model.eval()
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        _, eager = extract_eager_attention(model, inputs)
        _BUILT[name] = (name, model, inputs, torch.stack(eager, 1).float())
    return _BUILT[name]


def real_rows(inputs) -> torch.Tensor:
    return inputs["attention_mask"].bool()


def summaries_from_full(weights: torch.Tensor, query_set: torch.Tensor, key_set: torch.Tensor):
    """The reference: entropy / log(visible keys) and the key-set share, averaged from the full tensor; a key
    is visible where eager gave it any weight (random weights never underflow to exactly 0 otherwise)."""
    n_visible = (weights > 0).sum(-1).double()
    entropy = -torch.special.xlogy(weights.double(), weights.double()).sum(-1)
    q = query_set[:, None, None, :].double()
    ent_rows = q * (n_visible > 1)
    ratio = torch.where(n_visible > 1, entropy / n_visible.clamp_min(2).log(), 0.0)
    mass = (weights.double() * key_set[:, None, None, None, :]).sum(-1)
    return (ratio * ent_rows).sum(-1) / ent_rows.sum(-1), (mass * q).sum(-1) / q.sum(-1)


def test_rows_equal_eager_and_outputs_equal_plain_sdpa(family):
    name, model, inputs, eager = family
    positions = list(range(2, inputs["input_ids"].shape[1]))
    cap = extract_attention(model, inputs, rows=positions, summaries=False)
    with torch.no_grad():
        plain = model(**inputs).logits
    assert torch.equal(cap.output.logits, plain), "capture changed the model's output"
    rows = torch.from_numpy(cap.rows)  # [batch, layer, head, rows, keys]
    expected = eager[:, :, :, positions]
    assert rows.shape == expected.shape
    # every real query row matches (the padded example's first two positions are padding, rows 2.. are real)
    assert (rows - expected).abs().max() < TOL, f"{name}: {(rows - expected).abs().max():.2e}"
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)


def test_rows_of_queries_that_see_nothing_are_zero_not_uniform(family):
    """A left-padding query sees no key under a causal mask: eager spreads it evenly over every key, the
    capture reports zeros. (Under PaliGemma's bidirectional prefix a padding query does see the prefix.)"""
    name, model, inputs, eager = family
    cap = extract_attention(model, inputs, rows=[0, 1], summaries=False)
    rows, expected = torch.from_numpy(cap.rows), eager[:, :, :, :2]
    blind = rows.sum(-1) == 0
    assert blind[1].all() == (name != "paligemma") and not blind[0].any()
    torch.testing.assert_close(expected[blind], torch.full_like(expected[blind], 1 / expected.shape[-1]))
    assert (rows[~blind] - expected[~blind]).abs().max() < TOL


@pytest.fixture(params=["fused-column", "fused-explicit", "chunked"])
def route(request, monkeypatch):
    """Every route to the statistics: one flash call with log-sum-exp per layer (CPU) with the key-set share
    from an extra value column or from explicit scores over the key set, or row chunks of scores."""
    fraction = {"fused-column": 0.0, "fused-explicit": 1.0}.get(request.param)
    if fraction is None:
        monkeypatch.setattr(attention_rows, "_can_fuse", lambda call: False)
    else:
        monkeypatch.setattr(attention_rows, "EXPLICIT_SHARE_FRACTION", fraction)
    return request.param


def test_summaries_in_row_chunks_equal_the_full_eager_tensor(family, route):
    _name, model, inputs, eager = family
    query_set = real_rows(inputs).clone()
    query_set[0, -3:] = False  # a query set that is not every row
    key_set = inputs["input_ids"] == IMG
    cap = extract_attention(model, inputs, query_set=query_set, key_set=key_set, chunk_rows=3)
    entropy, mass = summaries_from_full(eager, query_set, key_set)
    s = cap.summaries
    assert s.entropy.shape == (2, eager.shape[1], eager.shape[2]) and s.layers == tuple(range(eager.shape[1]))
    np.testing.assert_allclose(s.entropy, entropy.numpy(), atol=TOL)
    np.testing.assert_allclose(s.key_mass, mass.numpy(), atol=TOL)
    assert s.n_rows.tolist() == query_set.sum(1).tolist()
    assert 0 < s.key_mass.min() and s.entropy.max() <= 1 + 1e-6


def test_generated_rows_equal_eager_generate(family):
    name, model, inputs, _ = family
    P = inputs["input_ids"].shape[1]
    key_set = inputs["input_ids"] == IMG
    real = real_rows(inputs)  # padding rows can differ: generate gives padding other positions than forward
    got = extract_generation_attention(model, inputs, max_new_tokens=4, query_set=real, key_set=key_set,
                                       chunk_rows=5)
    ref = extract_eager_generation_attention(model, inputs, max_new_tokens=4)
    np.testing.assert_array_equal(got.sequences, ref.sequences)
    n_new = got.sequences.shape[1] - P
    assert got.weights.shape == (2, len(got.layers), 4, n_new, P + n_new - 1) and n_new == 4
    assert np.abs(got.weights - ref.weights).max() < TOL, f"{name}: {np.abs(got.weights - ref.weights).max():.2e}"
    np.testing.assert_allclose(got.weights.sum(-1), 1.0, atol=1e-5)
    for t in range(n_new):  # the query of step t sees nothing after position P - 1 + t
        assert np.all(got.weights[..., t, P + t:] == 0)
    # the prompt's summaries taken during generate are those of a plain forward pass
    one = extract_attention(model, inputs, query_set=real, key_set=key_set).summaries
    np.testing.assert_allclose(got.summaries.entropy, one.entropy, atol=1e-5)
    np.testing.assert_allclose(got.summaries.key_mass, one.key_mass, atol=1e-5)


def test_masks_are_the_models_own():
    """Planted structure: the patterns each family's mask must show (eager agreeing is not enough)."""
    for name, layer, row, seen, unseen in [
        ("paligemma", 0, 3, [9], [10]),            # the prefix (< 10) is bidirectional, the suffix causal
        ("gemma3", 1, 5, [8], [9]),                # an image token sees the later tokens of its own image
        ("gemma3", 0, 15, [10], [9]),              # sliding layer: window 6 -> keys 10..15
        ("qwen2_vl", 1, 19, [12], [11]),           # Qwen2 sliding window 8 on the second layer
        ("llava", 0, 4, [4], [5]),                 # causal, even among image tokens
    ]:
        torch.manual_seed(0)
        model, inputs = FAMILIES[name]()
        model.eval()
        rows = extract_attention(model, inputs, rows=[row], layers=[layer], summaries=False).rows[0, 0, :, 0]
        assert np.all(rows[:, seen] > 0) and np.all(rows[:, unseen] == 0), (name, row)


def test_long_sequence_summaries_never_hold_n_by_n(monkeypatch):
    """N = 1,100 tokens: the summaries equal the full eager tensor's, whichever route; the chunked route
    scores blocks of at most ``chunk_rows`` rows over the causal triangle, the fused route none at all (the
    key-set share of an image-heavy prompt comes from the 40 text keys only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, num_hidden_layers=1, head_dim=8,
                                         attn_implementation="sdpa")).eval()
    ids = torch.randint(3, 100, (1, 1100))
    middle, image_heavy = torch.zeros(1, 1100, dtype=torch.bool), torch.ones(1, 1100, dtype=torch.bool)
    middle[0, 100:700] = True
    image_heavy[0, :20] = image_heavy[0, -20:] = False
    shapes, explicit = [], []
    scores, share = attention_rows._masked_scores, attention_rows._explicit_share
    monkeypatch.setattr(attention_rows, "_masked_scores", lambda c, r, lo, hi: shapes.append((len(r), hi - lo))
                        or scores(c, r, lo, hi))
    monkeypatch.setattr(attention_rows, "_explicit_share", lambda c, r, q, k, lse, keys, n: explicit.append(
        int(keys.sum())) or share(c, r, q, k, lse, keys, n))
    got = {name: extract_attention(model, {"input_ids": ids}, key_set=keys, chunk_rows=256).summaries
           for name, keys in [("fused-middle", middle), ("fused-image", image_heavy)]}
    assert shapes == [] and explicit == [1060]
    monkeypatch.setattr(attention_rows, "_can_fuse", lambda call: False)
    got["chunked"] = extract_attention(model, {"input_ids": ids}, key_set=middle, chunk_rows=256).summaries
    assert [k for r, k in shapes] == [256, 512, 768, 1024, 1100] and max(r for r, _ in shapes) == 256
    _, eager = extract_eager_attention(model, {"input_ids": ids})
    everything = torch.ones(1, 1100, dtype=torch.bool)
    for name, keys in [("fused-middle", middle), ("fused-image", image_heavy), ("chunked", middle)]:
        entropy, mass = summaries_from_full(torch.stack(eager, 1), everything, keys)
        np.testing.assert_allclose(got[name].entropy, entropy.numpy(), atol=TOL)
        np.testing.assert_allclose(got[name].key_mass, mass.numpy(), atol=TOL)


def test_uniform_attention_known_answers(route):
    """Zero queries: every row is uniform over the keys it sees, so its normalised entropy is 1 and the share
    of key 0 is 1 / (i + 1) for query i."""
    q, k = torch.zeros(1, 2, 6, 4), torch.randn(1, 1, 6, 4)
    call = AttentionCall(0, q, k, None, True, 0.5, None, 0, 0)
    rows = compute_attention_rows(call, [0, 5])
    torch.testing.assert_close(rows[0, :, 1], torch.full((2, 6), 1 / 6))
    assert rows[0, 0, 0, 0] == 1 and rows[0, 0, 0, 1:].sum() == 0
    sums = HeadSums.zeros(1, 2)
    key_set = torch.tensor([[True, False, False, False, False, False]])
    accumulate_head_sums(call, sums, None, key_set, chunk_rows=4)
    summary = attention_rows.HeadSummaries.from_sums({0: sums}, True)
    np.testing.assert_allclose(summary.entropy, 1.0, atol=1e-6)  # row 0 (one key) is left out
    np.testing.assert_allclose(summary.key_mass, np.mean([1 / (i + 1) for i in range(6)]), atol=1e-6)


def test_softcapping_matches_gemma2_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 8) * 3, torch.randn(2, 2, 5, 8) * 3, torch.randn(2, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    _, expected = eager_attention_forward(module.eval(), q, k, v, additive, scaling=0.3, softcap=2.0)
    for m in (mask, additive):
        call = AttentionCall(0, q, k, m, False, 0.3, 2.0, 0, 0)
        torch.testing.assert_close(compute_attention_rows(call, range(5)), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(compute_attention_rows(AttentionCall(0, q, k, mask, False, 0.3, None, 0, 0), range(5)),
                              expected, atol=1e-3)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_hidden_layers=2, head_dim=8, attn_implementation="sdpa")).eval()


def test_registration_and_implementation_restored_after_errors():
    model = _tiny_llama()
    inputs = {"input_ids": torch.randint(3, 100, (1, 8))}
    with torch.no_grad():
        before = model(**inputs).logits

    def fail(call):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), capture_attention_calls(model, on_call=fail):
        model(**inputs)
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    assert ac._SCOPES.get() == () and not ac._INSTALLED
    with pytest.raises(ValueError), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise ValueError
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError), capture_attention_calls(model):
        raise ValueError  # an error in the block, before any pass
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_nested_captures_keep_the_wrapper_until_the_last_closes():
    model = _tiny_llama()
    inputs = {"input_ids": torch.randint(3, 100, (1, 8))}
    with capture_attention_calls(model, layers=[0]) as outer:
        with capture_attention_calls(model, layers=[1]) as inner:
            model(**inputs)
        model(**inputs)
        assert AttentionInterface._global_mapping["sdpa"] is not sdpa_attention_forward
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    assert [c.layer for c in outer] == [0, 0] and [c.layer for c in inner] == [1]


def test_another_threads_pass_is_neither_seen_nor_changed():
    model = _tiny_llama()
    inputs = {"input_ids": torch.randint(3, 100, (1, 8))}
    with torch.no_grad():
        plain = model(**inputs).logits
    other: dict = {}
    with torch.no_grad(), capture_attention_calls(model) as calls:
        worker = threading.Thread(target=lambda: other.update(logits=model(**inputs).logits))
        worker.start()
        worker.join()
        assert calls == [] and torch.equal(other["logits"], plain)
        model(**inputs)
    assert [c.layer for c in calls] == [0, 1]


def test_errors_are_vlscope_errors_never_empty_results():
    model = _tiny_llama()
    inputs = {"input_ids": torch.randint(3, 100, (1, 8))}
    with pytest.raises(AttentionCaptureError, match=r"Layers \[0, 1\] never called"), capture_attention_calls(model):
        pass  # nothing ran: no attention to return
    with pytest.raises(AttentionCaptureError, match="0..1"):
        extract_attention(model, inputs, layers=[2])
    with pytest.raises(AttentionCaptureError, match="at most 4"):
        extract_attention(model, inputs, rows=range(5), max_rows=4)
    with pytest.raises(AttentionCaptureError, match="must lie in 0..7"):
        extract_attention(model, inputs, rows=[8])
    with pytest.raises(AttentionCaptureError, match="num_beams"):
        extract_generation_attention(model, inputs, max_new_tokens=2, num_beams=2)
    model.train()
    with pytest.raises(AttentionCaptureError, match="eval"):
        model.config.attention_dropout = 0.1
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        extract_attention(model, inputs)
    model.eval()
    with eager_attention(model), pytest.raises(AttentionCaptureError, match="it runs 'eager'") as err:
        extract_attention(model, inputs)
    assert isinstance(err.value, VLScopeError)
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
