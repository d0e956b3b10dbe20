"""The BLIP adapter (`vlcore.models.blip`) and the bi-modal relevancy rules (`vlcore.attribution.bimodal`), on the
tiny checkpoints of ``tests/models/tiny_blip.py`` loaded through `load_adapter` as a user's folder would be.

References are independent of the adapter: the Hugging Face heads' own forward and ``generate``, the towers called
directly with ``retain_grad`` on their attention tensors, keys removed from the encoder states instead of masked,
and a loop implementation of the paper's equations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_blip import IMAGE_PX, PATCH_PX, blip_itm, blip_vqa
from vlcore.attribution.bimodal import compute_bimodal_relevance, extract_bimodal_relevancy
from vlcore.data.example import Example
from vlcore.errors import InputError
from vlcore.models.base import Capture
from vlcore.models.blip import BlipAdapter
from vlcore.models.registry import families, known_checkpoints, load_adapter
from vlcore.run.extract import extract_trace, trace_for_example
from vlcore.storage.store import Store
from vlcore.trace import ROLE_IMAGE_SUMMARY, ROLE_PAD, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT

CAPTION = "a photo of a red cat"
QUESTION = "what is the color of the cat?"
GRID = IMAGE_PX // PATCH_PX


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"itm": blip_itm(tmp_path_factory.mktemp("blip-itm")), "vqa": blip_vqa(tmp_path_factory.mktemp("blip-vqa"))}


@pytest.fixture(scope="module")
def itm(folders) -> BlipAdapter:
    return load_adapter(str(folders["itm"]), device="cpu")


@pytest.fixture(scope="module")
def vqa(folders) -> BlipAdapter:
    adapter = load_adapter(str(folders["vqa"]), device="cpu")
    adapter.max_answer_tokens = 6  # random weights never say [SEP]: keep the answers short
    return adapter


def noise(width: int = IMAGE_PX, height: int = IMAGE_PX, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def red_cell_image(cell: tuple[int, int]) -> Image.Image:
    """A grey image at the model's size with one patch painted red."""
    arr = np.full((IMAGE_PX, IMAGE_PX, 3), 128, np.uint8)
    r, c = cell
    arr[r * PATCH_PX:(r + 1) * PATCH_PX, c * PATCH_PX:(c + 1) * PATCH_PX] = (255, 0, 0)
    return Image.fromarray(arr)


def hook_count(adapter) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules())


# -- loading and layouts ---------------------------------------------------------------------------------
def test_the_family_is_registered_and_loads_from_a_folder(itm, vqa, folders):
    fam = next(f for f in families() if f.name == "blip")
    assert fam.title == "BLIP" and fam.model_types == ("blip",) and set(fam.tasks) == {"itm", "vqa"}
    assert {"Salesforce/blip-itm-base-coco", "Salesforce/blip-itm-large-coco", "Salesforce/blip-vqa-base"} <= \
        set(known_checkpoints())
    assert (itm.task, vqa.task) == ("itm", "vqa") and isinstance(itm, BlipAdapter)
    assert itm.model_id.startswith(f"{folders['itm'].name}@sha256:")
    assert itm.default_block == "text.cross" and itm.main_stream == "text" and itm.image_stream == "vision"
    assert itm.targets() == ["match", "similarity"] and vqa.targets() == []


def test_layouts_agree_with_input_ids_and_the_processor_geometry(itm):
    image = noise(56, 40)
    batch = itm.encode([image, noise()], [CAPTION + " zebra", "a cat"])  # zebra: [UNK], a word all the same
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    for b, layout in enumerate(batch.streams["text"]):
        assert layout.tokens == tuple(itm.tokenizer.convert_ids_to_tokens(ids[b].tolist()))
        expect = [ROLE_PAD if not m else ROLE_SPECIAL if t in ("[CLS]", "[SEP]") else ROLE_TEXT
                  for t, m in zip(layout.tokens, mask[b].tolist())]
        assert layout.role.tolist() == expect
    assert batch.streams["text"][1].role.tolist().count(ROLE_PAD) == ids.shape[1] - 4  # [CLS] a cat [SEP]
    assert batch.streams["text"][0].tokens[-2] == "[UNK]"
    vision = batch.streams["vision"][0]
    assert batch.inputs["pixel_values"].shape[-2:] == (IMAGE_PX, IMAGE_PX)
    assert vision.n_tokens == 1 + GRID * GRID and vision.role[0] == ROLE_IMAGE_SUMMARY
    idx, rc = vision.patch_positions()
    assert idx.tolist() == list(range(1, 1 + GRID * GRID))
    assert rc.tolist() == [[r, c] for r in range(GRID) for c in range(GRID)]  # the convolution's row-major order
    grid = vision.images[0]
    assert grid.grid == (GRID, GRID) and grid.boxes[1, 3].tolist() == [24, 8, 32, 16]
    resized = np.asarray(image.resize((IMAGE_PX, IMAGE_PX), Image.BICUBIC)).astype(int)
    assert grid.image.shape == (IMAGE_PX, IMAGE_PX, 3) and np.abs(grid.image.astype(int) - resized).max() <= 1


def planted(folder) -> BlipAdapter:
    """The tiny ITM model rewired so that the patch embedding's channel 0 is a patch's red value, the vision layers
    pass their input on unchanged, and the keys of vision.self and text.cross in layer 0 read that channel under a
    constant query: every query must look at the red patch."""
    adapter = load_adapter(str(folder), device="cpu")
    model = adapter.model
    with torch.no_grad():
        emb = model.vision_model.embeddings
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.weight[0, 0] = 1.0 / PATCH_PX**2  # mean of the normalised red channel
        emb.patch_embedding.bias.zero_()
        emb.patch_embedding.bias[1] = 1.0  # a constant channel, so that LayerNorm keeps channel 0 informative
        emb.class_embedding.zero_()
        emb.position_embedding.zero_()
        for layer in model.vision_model.encoder.layers:
            for lin in (layer.self_attn.projection, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        att = model.vision_model.encoder.layers[0].self_attn
        d = att.embed_dim
        att.qkv.weight.zero_()
        att.qkv.bias.zero_()
        for h in range(att.num_heads):
            att.qkv.bias[h * att.head_dim] = 8.0  # query
            att.qkv.weight[d + h * att.head_dim, 0] = 1.0  # key reads channel 0
        cross = model.text_encoder.encoder.layer[0].crossattention.self
        for lin in (cross.query, cross.key):
            lin.weight.zero_()
            lin.bias.zero_()
        for h in range(cross.num_attention_heads):
            cross.query.bias[h * cross.attention_head_size] = 8.0
            cross.key.weight[h * cross.attention_head_size, 0] = 1.0
    return adapter


@pytest.mark.parametrize("cell", [(1, 3), (3, 0)])
def test_a_planted_red_patch_is_attended_at_its_row_and_col(folders, cell):
    trace = extract_trace(planted(folders["itm"]), red_cell_image(cell), CAPTION, "planted")
    vision = trace.streams["vision"]
    for name in ("vision.self", "text.cross"):
        view = trace.select(name)
        assert view.key_layout is vision
        rows = view.attentions[0].astype(np.float32)  # [H, Q, K]
        for head in range(rows.shape[0]):
            for query in (0, rows.shape[1] - 1):
                assert tuple(vision.cell[int(rows[head, query].argmax())]) == cell, (name, head, query)
        heat = vision.to_grid(rows[:, 0].mean(0))
        assert np.unravel_index(np.nanargmax(heat), heat.shape) == cell


# -- blocks and passes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["itm", "vqa"])
def test_two_extractions_are_identical_and_every_block_is_a_distribution(which, itm, vqa):
    adapter = {"itm": itm, "vqa": vqa}[which]
    a, b = (extract_trace(adapter, noise(), QUESTION, "x") for _ in range(2))
    assert a.prediction == b.prediction and a.view == "text.cross"
    n = {name: lay.n_tokens for name, lay in a.streams.items()}
    assert n["vision"] == 1 + GRID * GRID and a.streams["text"].tokens[0] == "[CLS]"
    for name, spec in adapter.block_specs().items():
        block = a.blocks[name]
        assert (block.query, block.key) == (spec.query, spec.key)
        assert block.attentions.shape == (spec.n_layers, spec.n_heads, n[spec.query], n[spec.key])
        np.testing.assert_allclose(block.attentions.astype(np.float32).sum(-1), 1.0, atol=2e-3)
        assert np.array_equal(block.attentions, b.blocks[name].attentions)
    assert (a.blocks["text.cross"].query, a.blocks["text.cross"].key) == ("text", "vision")
    for name in a.streams:
        assert np.array_equal(a.hiddens[name], b.hiddens[name])
    assert a.hiddens["vision"].shape == (3, n["vision"], adapter.config.vision_config.hidden_size)


def test_itm_scores_equal_the_heads_own_forward(itm):
    batch = itm.encode([noise(), noise(seed=1)], [CAPTION, "a dog"])
    inputs = {k: batch.inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        out = itm.capture(batch, Capture(blocks=(), hidden=False)).output
        ref = itm.model(**inputs).itm_score
        ref_sim = itm.model(**inputs, use_itm_head=False).itm_score
    torch.testing.assert_close(out.itm_logits, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.similarity, ref_sim.diagonal(), rtol=1e-5, atol=1e-6)
    score, prob, label = itm.target_score(out)
    assert label == "match"
    torch.testing.assert_close(prob, ref.softmax(-1)[:, 1])
    torch.testing.assert_close(torch.sigmoid(score), prob)
    assert [p for ((_, p),) in itm.predict(out)] == pytest.approx(prob.tolist())
    with pytest.raises(InputError, match="'match'"):
        itm.target_score(out, "cat")


def hf_greedy(vqa, batch):
    """The head's own ``generate``: the greedy answer ids (without start and end tokens) and the log-probability of
    its tokens and then the end token, from the raw logits of every step (one step more than the adapter allows, for
    the end token's log-probability after an answer cut at the limit)."""
    m, sep, limit = vqa.model, vqa.config.text_config.sep_token_id, vqa.max_answer_tokens
    with torch.no_grad():
        gen = m.generate(input_ids=batch.inputs["input_ids"], pixel_values=batch.inputs["pixel_values"],
                         attention_mask=batch.inputs["attention_mask"], max_new_tokens=limit + 1,
                         do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(gen.logits, 1).float().log_softmax(-1)[0]  # [steps, V], one example
    new = gen.sequences[0, 1:].tolist()
    n = new.index(sep) if sep in new[:limit] else limit
    logprob = sum(float(steps[i, new[i]]) for i in range(n)) + float(steps[n, sep])
    return (tuple(new[:n]),), torch.tensor([logprob])


def test_vqa_answer_and_its_score_equal_generate_and_its_logits(vqa):
    batch = vqa.encode([noise()], [QUESTION])
    with torch.no_grad():
        out = vqa.capture(batch, Capture(blocks=(), hidden=False)).output
    ids, logprob = hf_greedy(vqa, batch)
    assert out.answer_ids == tuple(ids) and out.answers[0] == vqa.tokenizer.decode(list(ids[0]), skip_special_tokens=True)
    score, prob, label = vqa.target_score(out)
    assert label == out.answers[0] and score.requires_grad  # differentiable
    torch.testing.assert_close(score.detach(), logprob, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.answer_logprob, logprob, rtol=1e-4, atol=1e-4)
    assert vqa.predict(out)[0][0] == (out.answers[0], pytest.approx(float(prob[0]), rel=1e-5))
    with pytest.raises(InputError, match="empty"):
        vqa.target_score(out, "  ")


def test_vqa_stops_at_the_end_token(folders):
    adapter = load_adapter(str(folders["vqa"]), device="cpu")
    sep = adapter.config.text_config.sep_token_id
    with torch.no_grad():
        adapter.model.text_decoder.cls.predictions.bias[sep] += 100.0  # [SEP] at once: an empty answer
    batch = adapter.encode([noise()], [QUESTION])
    with torch.no_grad():
        out = adapter.capture(batch, Capture(blocks=(), hidden=False)).output
    ids, logprob = hf_greedy(adapter, batch)
    assert out.answer_ids == ((),) == tuple(ids) and out.answers == ("",)
    torch.testing.assert_close(adapter.target_score(out)[0].detach(), logprob, rtol=1e-4, atol=1e-5)


def test_vqa_rows_of_a_batch_equal_the_rows_alone(folders):
    """The decoder of a batched pass never reads a padded question position (the head's generate would). The
    decoder's cross-attention is amplified so that what it reads of the question shows in the scores."""
    vqa = load_adapter(str(folders["vqa"]), device="cpu")
    vqa.max_answer_tokens = 6
    with torch.no_grad():
        for layer in vqa.model.text_decoder.bert.encoder.layer:
            cross = layer.crossattention
            for lin in (cross.self.query, cross.self.key, cross.self.value, cross.output.dense):
                lin.weight.mul_(10.0)
    texts = ["what is it?", QUESTION]
    batch = vqa.encode([noise(), noise(seed=3)], texts)
    with torch.no_grad():
        both = vqa.capture(batch, Capture(blocks=(), hidden=False)).output
        alone = [vqa.capture(vqa.encode([im], [t]), Capture(blocks=(), hidden=False)).output
                 for im, t in zip([noise(), noise(seed=3)], texts)]
    assert both.answer_ids == alone[0].answer_ids + alone[1].answer_ids
    torch.testing.assert_close(both.answer_logprob, torch.cat([a.answer_logprob for a in alone]), rtol=1e-3, atol=1e-4)
    scores = vqa.target_score(both, "red cat")[0].detach()
    torch.testing.assert_close(scores, torch.cat([vqa.target_score(a, "red cat")[0].detach() for a in alone]),
                               rtol=1e-3, atol=1e-4)


# -- interventions -----------------------------------------------------------------------------------------
def _record(module, store: list):
    return module.register_forward_hook(lambda m, args, out: store.append((args[0].detach(), out.detach())))


@pytest.mark.parametrize("block", ["vision.self", "text.self", "text.cross"])
def test_masking_one_head_removes_exactly_that_heads_contribution(itm, block):
    spec = itm.block_specs()[block]
    layer, head = spec.n_layers - 1, 1
    module = itm.head_output_modules(block)[layer]
    batch = itm.encode([noise()] * 2, [CAPTION] * 2)
    base, masked = [], []
    handle = _record(module, base)
    try:
        with torch.no_grad():
            itm.capture(batch, Capture(hidden=False))
    finally:
        handle.remove()
    keep = torch.ones(2, spec.n_layers, spec.n_heads)
    keep[0, layer, head] = 0  # row 0 only
    with itm.head_mask(block, keep):
        handle = _record(module, masked)
        try:
            with torch.no_grad():
                itm.capture(batch, Capture(hidden=False))
        finally:
            handle.remove()
    (ctx, out), (ctx_m, out_m) = base[0], masked[0]  # the multimodal pass (text.self also runs text-only)
    torch.testing.assert_close(ctx_m, ctx, rtol=0, atol=0)  # the heads' contexts themselves are untouched
    d = ctx.shape[-1] // spec.n_heads
    part = ctx[0, :, head * d:(head + 1) * d] @ module.weight[:, head * d:(head + 1) * d].T.detach()
    torch.testing.assert_close(out_m[0], out[0] - part, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_m[1], out[1], rtol=0, atol=0)  # row 1 kept every head
    with pytest.raises(ValueError, match="keep"), itm.head_mask(block, torch.ones(1, spec.n_layers, spec.n_heads + 1)):
        pass


def test_masking_image_tokens_equals_removing_them_from_the_keys(itm):
    batch = itm.encode([noise()], [CAPTION])
    vision = batch.streams["vision"][0]
    patches = vision.index(ROLE_PATCH)
    drop = patches[::3]
    variants = itm.mask_image_tokens(batch, [np.array([], np.int64), drop])
    with torch.no_grad():
        cap = itm.capture(variants, Capture(blocks=("text.cross",), hidden=False))
        kept = np.setdiff1d(np.arange(vision.n_tokens), drop)
        image_embeds = itm.model.vision_model(pixel_values=batch.inputs["pixel_values"]).last_hidden_state
        text = itm.model.text_encoder(input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
                                      encoder_hidden_states=image_embeds[:, kept])
        ref = itm.model.itm_head(text.last_hidden_state[:, 0])
    logits = cap.output.itm_logits
    torch.testing.assert_close(logits[1:], ref, rtol=1e-4, atol=1e-5)
    assert float((logits[1] - logits[0]).abs().max()) > 1e-5
    cross = cap.stacked("text.cross")  # [L, 2, H, T, K]
    assert float(cross[:, 1][..., torch.as_tensor(drop)].abs().max()) == 0.0
    torch.testing.assert_close(cross.sum(-1), torch.ones_like(cross.sum(-1)))
    with pytest.raises(InputError, match="one example"):
        itm.mask_image_tokens(itm.encode([noise()] * 2, [CAPTION] * 2), [drop])


def test_transformers_drops_the_cross_attention_mask_which_is_why_the_adapter_hooks(itm):
    """A canary: in transformers 5.23 ``encoder_attention_mask`` never reaches BLIP's cross-attention. When this
    fails, transformers honours it and `mask_image_tokens` could pass the mask instead of hooking."""
    batch = itm.encode([noise()], [CAPTION])
    with torch.no_grad():
        image_embeds = itm.model.vision_model(pixel_values=batch.inputs["pixel_values"]).last_hidden_state
        mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
        mask[:, 1:] = 0
        runs = [itm.model.text_encoder(input_ids=batch.inputs["input_ids"], encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=m).last_hidden_state for m in (None, mask)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_hooks_are_gone_after_errors(itm, monkeypatch):
    batch = itm.encode([noise()], [CAPTION])
    with torch.no_grad():
        itm.capture(batch)  # transformers installs its own recording hooks once
    before = hook_count(itm)
    with pytest.raises(InputError, match="'match'"):
        itm.attention_gradients(batch, "bogus")
    assert hook_count(itm) == before

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom")

    variants = itm.mask_image_tokens(batch, [np.array([1, 2])])
    monkeypatch.setattr(itm.model.itm_head, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"), itm.head_mask("vision.self", torch.ones(1, 2, 3)):
        itm.capture(variants)
    assert hook_count(itm) == before


@pytest.mark.parametrize("bad", [([], ["a cat"]), (["not an image"], ["a cat"]), ([None], ["  "])])
def test_bad_inputs_get_one_line_errors(itm, bad):
    images, texts = bad
    with pytest.raises(InputError):
        itm.encode(images, texts)


# -- gradients and relevancy ---------------------------------------------------------------------------
def reference_gradients(adapter, batch, target: str | None):
    """Probabilities and their gradients from the towers called directly, with ``retain_grad``."""
    m, inputs = adapter.model, batch.inputs
    with torch.enable_grad():
        vision = m.vision_model(pixel_values=inputs["pixel_values"], output_attentions=True)
        text = m.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              encoder_hidden_states=vision.last_hidden_state, output_attentions=True)
        blocks = {"vision.self": list(vision.attentions), "text.self": list(text.attentions),
                  "text.cross": list(text.cross_attentions)}
        if adapter.task == "itm" and target == "similarity":
            alone = m.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   output_attentions=True)
            blocks["text.self"] = list(alone.attentions)
            img = torch.nn.functional.normalize(m.vision_proj(vision.last_hidden_state[:, 0]), dim=-1)
            txt = torch.nn.functional.normalize(m.text_proj(alone.last_hidden_state[:, 0]), dim=-1)
            score = (img * txt).sum()
        elif adapter.task == "itm":
            logits = m.itm_head(text.last_hidden_state[:, 0])
            score = (logits[:, 1] - logits[:, 0]).sum()
        else:
            cfg = adapter.config.text_config
            ids = torch.tensor([[cfg.bos_token_id, *target, cfg.sep_token_id]])
            logp = m.text_decoder(input_ids=ids, encoder_hidden_states=text.last_hidden_state).logits.log_softmax(-1)
            score = logp[0, :-1].gather(1, ids[0, 1:, None]).sum()
        for layers in blocks.values():
            for att in layers:
                att.retain_grad()
        score.backward()
    return ({k: [a[0].detach() for a in v] for k, v in blocks.items()},
            {k: [torch.zeros_like(a[0]) if a.grad is None else a.grad[0] for a in v] for k, v in blocks.items()},
            float(score.detach()))


@pytest.mark.parametrize("which,target", [("itm", None), ("itm", "similarity"), ("vqa", None)])
def test_gradients_of_every_block_equal_a_retain_grad_reference(which, target, itm, vqa):
    adapter = {"itm": itm, "vqa": vqa}[which]
    batch = adapter.encode([noise()], [CAPTION])
    grads = adapter.attention_gradients(batch, target)
    ref_target = target if which == "itm" else grads.output.answer_ids[0]
    attentions, gradients, score = reference_gradients(adapter, batch, ref_target)
    assert grads.score == pytest.approx(score, rel=1e-4, abs=1e-5)
    assert set(grads.gradients) == set(adapter.block_specs())
    for name in adapter.block_specs():
        for a, g, ra, rg in zip(grads.attentions[name], grads.gradients[name], attentions[name], gradients[name],
                                strict=True):
            torch.testing.assert_close(a, ra.float(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g, rg.float(), rtol=1e-4, atol=1e-8)
    moving = {name for name, gs in grads.gradients.items() if any(float(g.abs().max()) > 0 for g in gs)}
    assert moving == ({"vision.self", "text.self"} if target == "similarity" else set(adapter.block_specs()))


def loop_reference(blocks: list[tuple[str, np.ndarray, np.ndarray]], n_t: int, n_i: int):
    """The paper's rules for two modalities (t, i) written out as loops over indices.

    ``blocks`` lists the layers in order as ``(kind, A [H, Q, K], grad [H, Q, K])`` with kind "tt", "ii" (self),
    "ti" (text queries over image keys) or "it"."""
    R = {"tt": np.eye(n_t), "ii": np.eye(n_i), "ti": np.zeros((n_t, n_i)), "it": np.zeros((n_i, n_t))}

    def matmul(x, y):
        out = np.zeros((x.shape[0], y.shape[1]))
        for r in range(x.shape[0]):
            for c in range(y.shape[1]):
                out[r, c] = sum(x[r, m] * y[m, c] for m in range(x.shape[1]))
        return out

    def a_bar(att, grad):  # eq. 5
        out = np.zeros(att.shape[1:])
        for r in range(att.shape[1]):
            for c in range(att.shape[2]):
                out[r, c] = sum(max(grad[h, r, c] * att[h, r, c], 0.0) for h in range(att.shape[0])) / att.shape[0]
        return out

    def hat(rel):  # eq. 8-9
        n = rel.shape[0]
        out = np.array(rel, dtype=float)
        for r in range(n):
            out[r, r] -= 1.0
            total = sum(out[r])
            for c in range(n):
                out[r, c] = out[r, c] / total if total != 0 else 0.0
            out[r, r] += 1.0
        return out

    for kind, att, grad in blocks:
        ab = a_bar(att, grad)
        s, q = kind[0], kind[1]
        if s == q:  # eq. 6-7
            other = "i" if s == "t" else "t"
            R[s + s], R[s + other] = R[s + s] + matmul(ab, R[s + s]), R[s + other] + matmul(ab, R[s + other])
        else:  # eq. 10-11
            add_sq = matmul(matmul(hat(R[s + s]).T, ab), hat(R[q + q]))
            add_ss = matmul(ab, R[q + s])
            R[s + q], R[s + s] = R[s + q] + add_sq, R[s + s] + add_ss
    return R


def test_bimodal_rules_equal_a_loop_implementation_of_the_paper():
    rng = np.random.default_rng(7)
    n_t, n_i, heads = 3, 4, 2
    shapes = {"tt": (n_t, n_t), "ii": (n_i, n_i), "ti": (n_t, n_i), "it": (n_i, n_t)}
    kinds = ["ti", "tt", "ii", "it", "ti", "tt", "it", "ii", "ti"]  # a cross layer first: R - I has empty rows
    layers = []
    for kind in kinds:
        att = rng.random((heads, *shapes[kind]))
        layers.append((kind, att / att.sum(-1, keepdims=True), rng.normal(size=(heads, *shapes[kind]))))
    attentions, gradients, order = {}, {}, []
    for kind, att, grad in layers:
        attentions.setdefault(kind, []).append(att)
        gradients.setdefault(kind, []).append(grad)
        order.append((kind, len(attentions[kind]) - 1))
    streams = {"tt": ("t", "t"), "ii": ("i", "i"), "ti": ("t", "i"), "it": ("i", "t")}
    ours = compute_bimodal_relevance(attentions, gradients, streams, order)
    ref = loop_reference(layers, n_t, n_i)
    for key in ("tt", "ii", "ti", "it"):
        np.testing.assert_allclose(ours[key[0], key[1]], ref[key], rtol=1e-10, atol=1e-12, err_msg=key)
    assert np.abs(ours["t", "i"]).sum() > 0 and np.abs(ours["i", "t"]).sum() > 0


def applied_order(adapter, batch) -> list[tuple[str, int]]:
    """The order in which a forward pass runs the attention modules, recorded by hooks (the ITM pass's text-only
    second run of the text encoder left out)."""
    seen, handles = [], []
    try:
        for name in adapter.block_specs():
            for layer, module in enumerate(adapter.attention_modules(name)):
                handles.append(module.register_forward_hook(lambda *_, key=(name, layer): seen.append(key)))
        with torch.no_grad():
            adapter.capture(batch, Capture(blocks=(), hidden=False))
    finally:
        for handle in handles:
            handle.remove()
    return seen[: len(adapter.block_order())]


def test_block_order_is_the_order_the_model_runs_its_layers(itm, vqa):
    for adapter in (itm, vqa):
        batch = adapter.encode([noise()], [CAPTION])
        assert adapter.block_order() == applied_order(adapter, batch)
    assert ("text.cross", 0) not in itm.block_order("similarity")


def test_bimodal_relevancy_of_the_tiny_model_equals_the_loop_reference(itm):
    image = noise(seed=4)
    rel = extract_bimodal_relevancy(itm, image, CAPTION, keep_matrices=True)
    batch = itm.encode([image], [CAPTION])
    attentions, gradients, score = reference_gradients(itm, batch, None)
    kind = {"vision.self": "ii", "text.self": "tt", "text.cross": "ti"}
    layers = [(kind[b], attentions[b][layer].double().numpy(), gradients[b][layer].double().numpy())
              for b, layer in applied_order(itm, batch)]
    n_t, n_i = rel.layouts["text"].n_tokens, rel.layouts["vision"].n_tokens
    ref = loop_reference(layers, n_t, n_i)
    np.testing.assert_allclose(rel.matrices["text", "vision"], ref["ti"], rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(rel.matrices["text", "text"], ref["tt"], rtol=1e-4, atol=1e-10)
    assert rel.label == "match" and rel.score == pytest.approx(score, rel=1e-4)
    assert rel.query_stream == "text" and rel.query == 0 and rel.values["text"][0] == 0
    np.testing.assert_allclose(rel.values["vision"], ref["ti"][0], rtol=1e-4, atol=1e-10)
    grid = rel.to_grid()
    assert grid.shape == (GRID, GRID) and np.isfinite(grid).all() and grid.max() > 0
    assert grid[1, 2] == pytest.approx(rel.values["vision"][1 + 1 * GRID + 2])


def test_bimodal_rules_on_one_block_are_the_single_stream_rules(tiny_tokenizer_dir):
    from tests.conftest import make_tiny_adapter
    from vlcore.attribution.relevance import relevancy_matrix

    vilt = make_tiny_adapter(tiny_tokenizer_dir)
    rel = extract_bimodal_relevancy(vilt, noise(48, 32), "what is the color?", keep_matrices=True)
    grads = vilt.attention_gradients(vilt.encode([noise(48, 32)], ["what is the color?"]))
    np.testing.assert_allclose(rel.matrices["main", "main"], relevancy_matrix(grads.attentions["self"],
                                                                             grads.gradients["self"]), rtol=1e-6)


def test_similarity_is_explained_from_the_image_cls(itm):
    rel = extract_bimodal_relevancy(itm, noise(), CAPTION, target="similarity", query_stream="vision")
    assert rel.label == "similarity" and rel.query == 0
    assert np.all(rel.values["text"] == 0)  # the image tower never reads the text
    assert rel.values["vision"][1:].max() > 0 and rel.values["vision"][0] == 0


# -- extraction and the store --------------------------------------------------------------------------
def test_extract_and_store_round_trip(vqa, tmp_path):
    example = Example("demo/test/1", QUESTION, image=noise(seed=5), answers=("red",))
    store = Store(tmp_path / "store")
    first, cached = trace_for_example(vqa, example, store)
    again, cached_again = trace_for_example(vqa, example, store)
    assert (cached, cached_again) == (False, True)
    assert again.prediction == first.prediction and again.meta["family"] == "blip" and again.view == "text.cross"
    assert again.gold == ("red",) and again.correct == (first.predicted == "red")
    for name, block in first.blocks.items():
        assert np.array_equal(again.blocks[name].attentions, block.attentions)
        assert (again.blocks[name].query, again.blocks[name].key) == (block.query, block.key)
    for name, layout in first.streams.items():
        assert again.streams[name].tokens == layout.tokens
        assert np.array_equal(again.streams[name].role, layout.role)
        assert np.array_equal(again.hiddens[name], first.hiddens[name])
    assert np.array_equal(again.image, first.image) and again.grid == (GRID, GRID)
