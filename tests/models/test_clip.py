"""The CLIP / SigLIP adapter on tiny checkpoints loaded through `load_adapter`: layouts, planted patches, blocks,
head masks, image-token masking, gradients against independent references, zero-shot scores, tower relevancy and
rollout, the store round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_clip import PATCH_PX, TEXT_LEN, write_tiny_clip, write_tiny_siglip
from vlcore.attribution.relevance import relevancy_matrix, rollout_matrices
from vlcore.attribution.towers import compute_tower_rollout, extract_tower_relevancy
from vlcore.data.example import Example
from vlcore.errors import InputError, ModelLoadError
from vlcore.models.base import Capture
from vlcore.models.clip import FAMILY, ClipAdapter
from vlcore.models.registry import families, load_adapter
from vlcore.run.extract import extract_trace, trace_for_example
from vlcore.storage.store import Store
from vlcore.trace import IMAGE_CLS_TOKEN, ROLE_IMAGE_SUMMARY, ROLE_PAD, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT

TEXT = "a photo of a cat"
WRITERS = {"clip": write_tiny_clip, "siglip": write_tiny_siglip}
LABELS = ["cat", "dog", "red square", "blue circle"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module", params=sorted(WRITERS))
def adapter(request, tmp_path_factory) -> ClipAdapter:
    return load_adapter(str(WRITERS[request.param](tmp_path_factory.mktemp(request.param))), device="cpu")


def load_fresh(kind: str, tmp_path) -> ClipAdapter:
    """An adapter of its own (for tests that change weights)."""
    return load_adapter(str(WRITERS[kind](tmp_path / kind)), device="cpu")


def noise(seed: int = 0, size=(32, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def grey(cell: tuple[int, int] | None = None) -> Image.Image:
    arr = np.full((32, 32, 3), 128, np.uint8)
    if cell is not None:
        r, c = cell
        arr[r * PATCH_PX : (r + 1) * PATCH_PX, c * PATCH_PX : (c + 1) * PATCH_PX] = (255, 0, 0)
    return Image.fromarray(arr)


def run(adapter, batch, **kwargs):
    with torch.no_grad():
        return adapter.capture(batch, Capture(**kwargs))


# -- loading and layouts ----------------------------------------------------------------------------------------------
def test_family_is_registered_with_both_tasks(adapter):
    assert FAMILY in families() and FAMILY.tasks == ("similarity", "zero_shot")
    assert adapter.family == "clip" and adapter.task == "similarity" and "@sha256:" in adapter.model_id
    specs = adapter.block_specs()
    assert adapter.default_block == "vision.self" and adapter.image_stream == adapter.main_stream == "vision"
    assert specs["text.self"].causal is (not adapter.siglip) and not specs["vision.self"].causal
    assert ("vision.pool" in specs) is adapter.siglip
    assert (specs["vision.self"].n_heads, specs["text.self"].n_heads) == (3, 4)


def test_layouts_agree_with_the_ids_and_the_image_geometry(adapter):
    texts = [TEXT, "what is the color of the shape there in the image?"]
    batch = adapter.encode([noise(0, (40, 50)), noise(1)], texts)
    ids = batch.inputs["input_ids"]
    for b, layout in enumerate(batch.streams["text"]):
        assert layout.tokens == tuple(adapter.tokenizer.convert_ids_to_tokens(ids[b].tolist()))
        if adapter.siglip:  # padded to its text positions with </s>, which the model reads: not padding
            assert layout.n_tokens == TEXT_LEN and (layout.role != ROLE_PAD).all() and layout.tokens[-1] == "</s>"
            assert (layout.role[np.asarray(layout.tokens) == "</s>"] == ROLE_SPECIAL).all()
        else:
            mask = batch.inputs["attention_mask"][b].numpy().astype(bool)
            assert ((layout.role == ROLE_PAD) == ~mask).all()
            assert layout.tokens[0] == "<|startoftext|>" and layout.role[0] == ROLE_SPECIAL
            assert layout.tokens[int(mask.sum()) - 1] == "<|endoftext|>"
    if adapter.siglip:  # an unknown word is text, not special (CLIP's byte-level vocabulary has no unknowns)
        unknown = adapter.encode([noise()], ["a zebra"]).streams["text"][0]
        assert unknown.role[unknown.tokens.index("<unk>")] == ROLE_TEXT
    vision = batch.streams["vision"][0]
    first = 0 if adapter.siglip else 1
    assert vision.n_tokens == 16 + first and (vision.role[first:] == ROLE_PATCH).all()
    if not adapter.siglip:
        assert vision.tokens[0] == IMAGE_CLS_TOKEN and vision.role[0] == ROLE_IMAGE_SUMMARY
    idx, rc = vision.patch_positions()
    assert idx.tolist() == list(range(first, first + 16))
    assert rc.tolist() == [[r, c] for r in range(4) for c in range(4)]
    grid = vision.images[0]
    assert grid.grid == (4, 4) and grid.image.shape == (32, 32, 3)
    assert grid.boxes[2, 3].tolist() == [24, 16, 32, 24]
    seen = batch.streams["vision"][1].images[0].image  # a 32-px input is not resampled: it comes back as given
    assert np.abs(seen.astype(int) - np.asarray(noise(1)).astype(int)).max() <= 1


def test_long_text_is_truncated_and_flagged(adapter):
    long = " ".join(["red cat"] * 20)
    batch = adapter.encode([noise()], [long])
    layout = batch.streams["text"][0]
    assert batch.truncated == [True] and batch.n_text_full[0] > TEXT_LEN and layout.n_tokens == TEXT_LEN
    end = "</s>" if adapter.siglip else "<|endoftext|>"
    assert layout.tokens[-1] == end


def test_default_text_query_is_the_token_the_model_pools(adapter):
    batch = adapter.encode([noise(), noise()], [TEXT, "what is the color of the shape there in the image?"])
    with torch.no_grad():
        out = adapter.model.text_model(input_ids=batch.inputs["input_ids"],
                                       attention_mask=batch.inputs.get("attention_mask"))
    for b, layout in enumerate(batch.streams["text"]):
        query = adapter.default_query("text.self", layout.trimmed())
        hidden = out.last_hidden_state[b, query]
        pooled = out.pooler_output[b]
        if adapter.siglip:  # SigLIP pools the last position through its head
            hidden = adapter.model.text_model.head(hidden)
        torch.testing.assert_close(hidden, pooled)
    vision = batch.streams["vision"][0]
    assert adapter.default_query("vision.self", vision) == (None if adapter.siglip else 0)


def test_bad_inputs_get_one_line_messages(adapter):
    with pytest.raises(InputError, match="empty"):
        adapter.encode([noise()], ["  "])
    with pytest.raises(InputError, match="one image per text"):
        adapter.encode([noise()], [TEXT, TEXT])
    with pytest.raises(InputError, match="PIL"):
        adapter.encode([np.zeros((4, 4, 3))], [TEXT])
    for labels, template in ([["cat", "cat"], "{}"], [["cat", ""], "{}"], [["cat"], "no slot"]):
        with pytest.raises(InputError):
            adapter.with_candidates(labels, template)


# -- planted patterns ---------------------------------------------------------------------------------------------------
def plant_red_reader(adapter: ClipAdapter) -> None:
    """Patch embeddings read a patch's mean red value into channel 0 (channel 1 constant); CLIP's layer-0 head 0
    and SigLIP's pooling head 0 have a constant query on channel 0 and keys reading it: they look at red."""
    vision = adapter.model.vision_model
    with torch.no_grad():
        emb = vision.embeddings
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.weight[0, 0] = 1.0 / PATCH_PX**2
        if emb.patch_embedding.bias is not None:
            emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.zero_()
        emb.position_embedding.weight[:, 1] = 1.0
        if adapter.siglip:
            for layer in vision.encoder.layers:  # identity layers: the pooling head reads the embeddings
                for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
            att, dim = adapter.pool.attention, vision.config.hidden_size
            att.in_proj_weight[: 2 * dim].zero_()
            att.in_proj_weight[dim, 0] = 1.0
            att.in_proj_bias.zero_()
            att.in_proj_bias[0] = 20.0
        else:
            emb.class_embedding.zero_()
            att = vision.encoder.layers[0].self_attn
            for lin in (att.q_proj, att.k_proj):
                lin.weight.zero_()
                lin.bias.zero_()
            att.k_proj.weight[0, 0] = 1.0
            att.q_proj.bias[0] = 20.0


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_planted_red_patch_is_found_at_its_row_and_col(kind, tmp_path):
    adapter = load_fresh(kind, tmp_path)
    plant_red_reader(adapter)
    for cell in ((0, 0), (2, 3), (3, 1)):
        trace = extract_trace(adapter, grey(cell), TEXT, "p")
        vision = trace.streams["vision"]
        if adapter.siglip:
            row = trace.blocks["vision.pool"].attentions[0, 0, 0].astype(np.float32)
        else:
            row = trace.blocks["vision.self"].attentions[0, 0, 0].astype(np.float32)
        assert tuple(vision.cell[int(np.argmax(row))]) == cell
        rollout = compute_tower_rollout(trace, "vision.self", adapter.default_query("vision.self", vision))
        patches = vision.index(ROLE_PATCH)
        assert tuple(vision.cell[patches[int(np.argmax(rollout[patches]))]]) == cell


# -- blocks -------------------------------------------------------------------------------------------------------------
def test_blocks_rows_causal_zeros_and_visible_keys(adapter):
    trace = extract_trace(adapter, noise(), TEXT, "x")
    for name, block in trace.blocks.items():
        np.testing.assert_allclose(block.attentions.astype(np.float32).sum(-1), 1.0, atol=2e-3, err_msg=name)
    text = trace.select("text.self")
    n = text.n_tokens
    if adapter.siglip:
        assert n == TEXT_LEN and text.n_visible().tolist() == [n] * n
        pool = trace.select("vision.pool")
        assert pool.attentions.shape == (1, 3, 1, 16) and pool.tokens == ("[PROBE]",)
        assert trace.hiddens["probe"].shape == (2, 1, 48)
    else:
        att = text.attentions.astype(np.float32)
        assert np.array_equal(np.triu(att, 1), np.zeros_like(att)), "the causal mask's zeros are in the rows"
        assert text.n_visible().tolist() == list(range(1, n + 1))
        assert text.tokens[-1] == "<|endoftext|>"


def test_two_zero_shot_extractions_are_identical(adapter):
    view = adapter.with_candidates(LABELS, TEMPLATE)
    a, b = (extract_trace(view, noise(3), TEXT, "z") for _ in range(2))
    assert a.prediction == b.prediction and [p[0] for p in a.prediction] != []
    for name in a.blocks:
        assert np.array_equal(a.blocks[name].attentions, b.blocks[name].attentions)


@pytest.mark.parametrize("block", ["vision.self", "text.self"])
def test_masking_one_head_changes_only_that_heads_output(adapter, block):
    """The layer's attention output moves by exactly minus the masked head's share of the output projection."""
    batch = adapter.encode([noise()], [TEXT])
    spec = adapter.block_specs()[block]
    layer, head = spec.n_layers - 1, 1
    module = adapter.tower_layers(block)[layer].self_attn
    seen: dict = {}

    def record(key):
        def hook(_m, args, output):
            seen[key] = (args[0] if key.endswith("in") else output[0]).detach().clone()
        return hook

    hooks = [(module.out_proj, record("in")), (module, record("out"))]
    with adapter.hooked(hooks):
        base = run(adapter, batch)
    base_in, base_out = seen["in"], seen["out"]
    keep = torch.ones(1, spec.n_layers, spec.n_heads)
    keep[0, layer, head] = 0
    with adapter.head_mask(block, keep), adapter.hooked([(module, record("masked"))]):
        masked = run(adapter, batch)
    width = base_in.shape[-1] // spec.n_heads
    share = base_in[..., head * width : (head + 1) * width] @ module.out_proj.weight[:, head * width : (head + 1) * width].T
    torch.testing.assert_close(seen["masked"], base_out - share, rtol=1e-5, atol=1e-5)
    for a, b in zip(base.layers(block), masked.layers(block)):
        assert torch.equal(a, b), "the mask acts after the softmax"
    stream = spec.query
    assert not torch.allclose(masked.hidden[stream][-1], base.hidden[stream][-1])
    other = "text" if stream == "vision" else "vision"
    assert torch.equal(masked.hidden[other], base.hidden[other]), "the other tower is untouched"


def test_masking_every_pooling_head_leaves_only_the_projection_bias(tmp_path):
    adapter = load_fresh("siglip", tmp_path)
    batch = adapter.encode([noise()], [TEXT])
    base = run(adapter, batch)
    with adapter.head_mask("vision.pool", torch.ones(1, 1, 3)):
        same = run(adapter, batch)
    assert torch.equal(same.output.image_embeds, base.output.image_embeds)
    with adapter.head_mask("vision.pool", torch.zeros(1, 1, 3)):
        masked = run(adapter, batch)
    head = adapter.pool
    with torch.no_grad():
        x = head.attention.out_proj.bias[None]
        pooled = x + head.mlp(head.layernorm(x))
    torch.testing.assert_close(masked.output.image_embeds, pooled / pooled.norm(dim=-1, keepdim=True))
    assert torch.equal(run(adapter, batch).output.image_embeds, base.output.image_embeds), "the mask ended"


def test_streamed_attentions_are_the_captured_ones_and_not_kept(adapter):
    batch = adapter.encode([noise(2), noise(3)], [TEXT, "what is the color of the shape?"])
    for block, spec in adapter.block_specs().items():
        full = run(adapter, batch, blocks=(block,), hidden=False).layers(block)
        got: list = []
        with adapter.stream_attentions(block, got.append):
            streamed = run(adapter, batch, blocks=(block,), hidden=False)
        assert len(got) == spec.n_layers and all(torch.equal(a, b) for a, b in zip(got, full)), block
        assert all(a.numel() == 0 for a in streamed.layers(block)), block
        got.clear()
        run(adapter, batch, blocks=(block,), hidden=False)
        assert got == [], "the hand-over ends with its block"
    with pytest.raises(ValueError):
        with adapter.stream_attentions("text.cross", list.append):
            pass


# -- image-token masking --------------------------------------------------------------------------------------------
def test_removed_image_tokens_are_invisible_and_equal_removing_them(adapter):
    batch = adapter.encode([noise(4)], [TEXT])
    vision = batch.streams["vision"][0]
    patches = vision.index(ROLE_PATCH)
    drop = patches[[0, 5, 6, 15]]
    variants = adapter.mask_image_tokens(batch, [np.array([], np.int64), drop, patches])
    out = run(adapter, variants, hidden=False)
    for a in out.layers("vision.self"):
        assert float(a[1][..., drop].abs().max()) == 0.0, "no query sees a removed token"
    if adapter.siglip:
        pool = out.layers("vision.pool")[0]
        assert float(pool[1][..., drop].abs().max()) == 0.0 and float(pool[2].abs().max()) == 0.0
    base = run(adapter, batch, hidden=False).output
    torch.testing.assert_close(out.output.pair_logits[0], base.pair_logits[0], rtol=1e-4, atol=1e-5)
    assert abs(float(out.output.pair_logits[1] - base.pair_logits[0])) > 1e-5
    kept = torch.as_tensor(np.setdiff1d(np.arange(vision.n_tokens), drop))

    def remove(_module, _args, output):  # the reference: the tokens taken out of the sequence
        return output[:, kept]

    with adapter.hooked([(adapter.model.vision_model.embeddings, remove)]):
        removed = run(adapter, batch, hidden=False).output
    torch.testing.assert_close(out.output.image_embeds[1], removed.image_embeds[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError):
        adapter.mask_image_tokens(batch, [np.array([vision.n_tokens])])


# -- gradients ----------------------------------------------------------------------------------------------------------
def hf_reference(adapter, batch):
    """The HF model's own forward with its own attention outputs kept for gradients: (score, vision, text)."""
    inputs = {k: v for k, v in batch.inputs.items() if k in ("pixel_values", "input_ids", "attention_mask")}
    out = adapter.model(**inputs, output_attentions=True)
    vision, text = out.vision_model_output.attentions, out.text_model_output.attentions
    for att in (*vision, *text):
        att.retain_grad()
    return out.logits_per_image[0, 0], vision, text


def test_gradients_equal_the_hf_models_own_retain_grad(adapter):
    batch = adapter.encode([noise(5)], [TEXT])
    grads = adapter.attention_gradients(batch, "match")
    with torch.enable_grad():
        score, vision, text = hf_reference(adapter, batch)
        score.backward()
    assert grads.label == "match" and abs(float(score.detach()) - grads.score) < 1e-4
    for name, ref in (("vision.self", vision), ("text.self", text)):
        for a, g, r in zip(grads.attentions[name], grads.gradients[name], ref, strict=True):
            torch.testing.assert_close(a, r[0].detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g, r.grad[0], rtol=1e-3, atol=1e-6)
        assert any(float(g.abs().max()) > 0 for g in grads.gradients[name]), name


def test_zero_shot_gradients_equal_retain_grad_on_every_block(adapter):
    view = adapter.with_candidates(LABELS, TEMPLATE)
    batch = view.encode([noise(6)], [view.prompt("dog")])
    grads = view.attention_gradients(batch, "dog")
    with torch.enable_grad():
        captured = view.capture(batch, Capture(hidden=False))
        layers = {name: captured.layers(name) for name in view.block_specs()}
        for att in (a for group in layers.values() for a in group):
            att.retain_grad()
        score = view.target_score(captured.output, "dog")[0][0]
        score.backward()
    assert grads.label == "dog" and abs(float(score.detach()) - grads.score) < 1e-4
    for name, group in layers.items():
        for g, att in zip(grads.gradients[name], group, strict=True):
            torch.testing.assert_close(g, att.grad[0], rtol=1e-4, atol=1e-7)
        assert any(float(g.abs().max()) > 0 for g in grads.gradients[name]), f"{name}: the label reaches it"
    other = view.attention_gradients(view.encode([noise(6)], [TEXT]), "dog")  # a text that is no label's prompt
    assert all(float(g.abs().max()) == 0 for g in other.gradients["text.self"])


# -- scores -------------------------------------------------------------------------------------------------------------
def features(adapter, pixel_values, texts):
    """Unit image and text features from the model's own get_image_features / get_text_features."""
    model, tok = adapter.model, adapter.tokenizer
    enc = tok(texts, padding="max_length" if adapter.siglip else True, max_length=TEXT_LEN, truncation=True,
              return_tensors="pt")
    kwargs = {} if adapter.siglip else {"attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
        text = model.get_text_features(input_ids=enc["input_ids"], **kwargs).pooler_output
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def test_zero_shot_probabilities_equal_an_independent_computation(adapter):
    view = adapter.with_candidates(LABELS, TEMPLATE)
    assert adapter.task == "similarity" and adapter.targets() == [], "the shared adapter is left as it was"
    assert view.task == "zero_shot" and view.targets() == LABELS
    batch = view.encode([noise(7), noise(8)], [TEXT, ""])
    out = run(view, batch).output
    image, text = features(view, batch.inputs["pixel_values"], [view.prompt(lab) for lab in LABELS])
    with torch.no_grad():
        logits = image @ text.T * view.model.logit_scale.exp()
        probs = torch.sigmoid(logits + view.model.logit_bias) if view.siglip else logits.softmax(-1)
    top = view.predict(out, top_k=len(LABELS))
    for b in range(2):
        order = probs[b].argsort(descending=True).tolist()
        assert [lab for lab, _ in top[b]] == [LABELS[i] for i in order]
        np.testing.assert_allclose([p for _, p in top[b]], probs[b, order].numpy(), rtol=1e-4, atol=1e-6)
    for k, label in enumerate(LABELS):
        _, prob, chosen = view.target_score(out, label)
        assert chosen == label
        torch.testing.assert_close(prob, probs[:, k], rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="candidate"):
        view.target_score(out, "a label nobody set")
    np.testing.assert_allclose(view.joint_embeddings(out)[0], image.numpy(), rtol=1e-4, atol=1e-6)


def test_candidate_embeddings_are_shared_by_views_and_follow_the_weights(tmp_path):
    adapter = load_fresh("clip", tmp_path)
    first = adapter.with_candidates(LABELS, TEMPLATE).candidate_embeddings()
    assert adapter.with_candidates(LABELS, TEMPLATE).candidate_embeddings() is first, "computed once per label set"
    with torch.no_grad():
        adapter.model.text_model.embeddings.token_embedding.weight.add_(
            torch.randn_like(adapter.model.text_model.embeddings.token_embedding.weight))
    changed = adapter.with_candidates(LABELS, TEMPLATE).candidate_embeddings()
    assert not torch.allclose(changed, first)
    _, expected = features(adapter, torch.zeros(1, 3, 32, 32), [TEMPLATE.replace("{}", lab) for lab in LABELS])
    torch.testing.assert_close(changed, expected, rtol=1e-4, atol=1e-6)


def test_similarity_prediction_is_sigmoid_or_cosine(adapter):
    batch = adapter.encode([noise(9)], [TEXT])
    out = run(adapter, batch).output
    image, text = features(adapter, batch.inputs["pixel_values"], [TEXT])
    cosine = float((image * text).sum())
    logit = cosine * float(adapter.model.logit_scale.detach().exp()) + (float(adapter.model.logit_bias.detach()) if adapter.siglip else 0)
    [[(label, prob)]] = adapter.predict(out)
    assert label == TEXT
    expected = 1 / (1 + np.exp(-logit)) if adapter.siglip else cosine
    assert prob == pytest.approx(expected, rel=1e-4, abs=1e-6)
    score, _, target = adapter.target_score(out, None)
    assert target == "match" and float(score[0]) == pytest.approx(logit, rel=1e-4, abs=1e-5)
    assert adapter.target_score(out, TEXT)[2] == "match"
    with pytest.raises(InputError, match="match"):
        adapter.target_score(out, "dog")
    emb_image, emb_text = adapter.joint_embeddings(out)
    np.testing.assert_allclose(emb_text, text.numpy(), rtol=1e-4, atol=1e-6)
    assert emb_image.shape == (1, adapter.model.config.projection_dim if not adapter.siglip else 48)


# -- hooks ----------------------------------------------------------------------------------------------------------------
def hook_count(adapter) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules())


def test_hooks_and_masks_are_gone_after_an_exception(adapter):
    before = hook_count(adapter)
    batch = adapter.encode([noise()], [TEXT])
    base = run(adapter, batch).output.image_embeds
    for block, spec in adapter.block_specs().items():
        with pytest.raises(RuntimeError, match="boom"):
            with adapter.head_mask(block, torch.zeros(1, spec.n_layers, spec.n_heads)):
                raise RuntimeError("boom")
        assert hook_count(adapter) == before, block
    assert torch.equal(run(adapter, batch).output.image_embeds, base)
    view = adapter.with_candidates(LABELS)
    with pytest.raises(InputError):
        view.attention_gradients(view.encode([noise()], [TEXT]), "not a label")
    assert hook_count(adapter) == before
    with pytest.raises(ValueError):
        with adapter.head_mask("vision.self", torch.ones(1, 9, 9)):
            pass


# -- relevancy per tower ----------------------------------------------------------------------------------------------
def test_tower_relevancy_reads_each_towers_query_or_its_pooling_head(adapter):
    rel = extract_tower_relevancy(adapter, noise(10), TEXT)
    grads = adapter.attention_gradients(adapter.encode([noise(10)], [TEXT]))
    assert rel.label == "match" and set(rel.maps) == {"vision", "text"}
    vision_r = relevancy_matrix(grads.attentions["vision.self"], grads.gradients["vision.self"])
    if adapter.siglip:
        assert rel.maps["vision"].pooled_by == "vision.pool" and rel.maps["vision"].query is None
        weights = np.clip(grads.gradients["vision.pool"][0].numpy() * grads.attentions["vision.pool"][0].numpy(), 0, None)
        expected = weights.mean(0)[0] @ vision_r
    else:
        expected = vision_r[0].copy()
        expected[0] = 0.0
    np.testing.assert_allclose(rel.maps["vision"].values, expected, rtol=1e-5, atol=1e-7)
    text = rel.maps["text"]
    assert text.query == adapter.default_query("text.self", text.layout) and text.values[text.query] == 0
    assert rel.maps["vision"].to_grid().shape == (4, 4) and np.isfinite(rel.maps["vision"].to_grid()).all()


def test_pooled_rollout_is_the_heads_mean_row_times_the_towers_rollout(adapter):
    trace = extract_trace(adapter, noise(11), TEXT, "r")
    query = adapter.default_query("vision.self", trace.streams["vision"])
    rollout = rollout_matrices(trace.blocks["vision.self"].attentions)
    values = compute_tower_rollout(trace, "vision.self", query)
    if adapter.siglip:
        expected = trace.blocks["vision.pool"].attentions[0, :, 0].astype(np.float64).mean(0) @ rollout
    else:
        expected = rollout[0]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
    assert values.sum() == pytest.approx(1.0, abs=1e-3)


# -- storage and loading --------------------------------------------------------------------------------------------
def test_extract_and_trace_for_example_round_trip_through_the_store(adapter, tmp_path):
    store = Store(tmp_path / "store")
    example = Example("t/clip/0", TEXT, image=noise(12))
    first, cached = trace_for_example(adapter, example, store)
    again, cached_again = trace_for_example(adapter, example, store)
    assert (cached, cached_again) == (False, True)
    assert again.prediction == first.prediction and set(again.blocks) == set(adapter.block_specs())
    for name in first.blocks:
        assert np.array_equal(again.blocks[name].attentions, first.blocks[name].attentions), name
    for name in first.streams:
        assert again.streams[name].tokens == first.streams[name].tokens
        assert np.array_equal(again.streams[name].role, first.streams[name].role)
    assert again.select("text.self").n_visible().tolist() == first.select("text.self").n_visible().tolist()
    zero = adapter.with_candidates(LABELS)
    other, cached_zero = trace_for_example(zero, example, store)
    assert not cached_zero and {p[0] for p in other.prediction} <= set(LABELS), "candidates are in the key"


def test_siglip_without_sentencepiece_names_the_package(tmp_path, monkeypatch):
    import vlcore.models.clip as clip_mod

    monkeypatch.setattr(clip_mod, "_has_sentencepiece", lambda: False)  # a host without the package
    folder = write_tiny_siglip(tmp_path / "sp")
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "SiglipTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="pip install sentencepiece"):
        load_adapter(str(folder), device="cpu")
