"""The Gemma 3 adapter on a tiny checkpoint (`tests/models/tiny_gemma3.py`): the chat-template prompt (one
``<bos>``), pooled image tokens between their markers and the vision tower's patch grid under them, image tokens
that see each other both ways, the teacher-forced pass equal to ``generate``, rows recomputed from sdpa (sliding
window, image blocks) against eager, the logit lens, the tower too large to keep, masks and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_gemma3 import write_gemma3
from vlcore.errors import InputError
from vlcore.models.attention_capture import extract_eager_generation_attention
from vlcore.models.base import Capture
from vlcore.models.registry import LoadContext
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_GENERATED, ROLE_PATCH, ROLE_SPECIAL

QUESTION = "what is the color of the cat?"
N_NEW = 5


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from transformers import AutoConfig

    from vlcore.models import gemma3

    folder = write_gemma3(tmp_path_factory.mktemp("gemma3"))
    ctx = LoadContext(str(folder), True, AutoConfig.from_pretrained(folder), "Gemma3ForConditionalGeneration",
                      {"local_files_only": True, "trust_remote_code": False}, str(folder), None, "cpu", None, None)
    a = gemma3.load(ctx)
    a.max_new_tokens = N_NEW
    return a


def noise(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr)


def capture(adapter, batch, **kwargs):
    with torch.no_grad():
        return adapter.capture(batch, Capture(**kwargs))


def prompt_inputs(adapter, images, texts) -> dict:
    return dict(adapter._process(adapter._check_images(images), [adapter.prompt_text(t) for t in texts]))


def test_loaded_on_sdpa_with_an_eager_vision_tower(adapter):
    cfg = adapter.model.config
    assert cfg.text_config._attn_implementation == "sdpa" and cfg.vision_config._attn_implementation == "eager"
    assert adapter.pool == 4 and adapter.n_vision_tokens == 64 and "vision.self" in adapter.block_specs()


def test_the_chat_prompt_has_one_bos_and_the_image_between_its_markers(adapter):
    batch = adapter.encode([image(noise())], [QUESTION])
    lm = batch.streams["lm"][0]
    P = int(batch.inputs["prompt_len"])
    assert lm.tokens[:4] == ("<bos>", "<start_of_turn>", "user", "\n") and lm.tokens.count("<bos>") == 1
    plain = adapter.processor(images=[[image(noise())]], text=[adapter.prompt_text(QUESTION)], return_tensors="pt")
    assert adapter.tokenizer.convert_ids_to_tokens(plain["input_ids"][0, :2].tolist()) == ["<bos>", "<bos>"], \
        "the processor alone adds a second <bos> to the template's"
    idx, rc = lm.patch_positions(0)
    assert lm.tokens[idx[0] - 1] == "<start_of_image>" and lm.tokens[idx[-1] + 1] == "<end_of_image>"
    assert lm.role[idx[0] - 1] == lm.role[idx[-1] + 1] == ROLE_SPECIAL
    assert rc.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] and lm.images[0].grid == (2, 2)
    assert lm.tokens[P - 3:P] == ("<start_of_turn>", "model", "\n")
    types = batch.inputs["token_type_ids"][0].numpy()
    np.testing.assert_array_equal(np.flatnonzero(types == 1), idx)  # the answer is text (0)


def test_teacher_forced_logits_are_generates(adapter):
    """The capture pass over prompt + answer reproduces ``generate``'s logits (a left-padded batch of two, a
    non-square image)."""
    images, texts = [image(noise()), image(noise(20, 40, 1))], [QUESTION, "what"]
    batch = adapter.encode(images, texts)
    out = capture(adapter, batch, hidden=False).output
    prompt = prompt_inputs(adapter, images, texts)
    with torch.no_grad():
        ref = adapter.model.generate(**prompt, max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, suppress_tokens=adapter._placeholder_ids())
    logits = torch.stack(ref.logits, 1)
    P = prompt["input_ids"].shape[1]
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        torch.testing.assert_close(out.logits[b, :n], logits[b, :n], rtol=1e-4, atol=1e-4)
        assert list(out.answer_ids[b]) == ref.sequences[b, P:P + n].tolist()


def test_image_tokens_see_each_other_both_ways(adapter):
    """The last image token's input changed (its projected feature): the first image token's layer-1 state changes
    (it reads the later tokens of its image), no token before the image changes."""
    batch = adapter.encode([image(noise())], [QUESTION])
    base = capture(adapter, batch)
    idx, _ = batch.streams["lm"][0].patch_positions(0)

    def nudge(_module, _args, output):
        output = output.clone()
        output[:, -1] += 1.0
        return output

    handle = adapter.model.model.multi_modal_projector.register_forward_hook(nudge)
    try:
        nudged = capture(adapter, batch)
    finally:
        handle.remove()
    diff = (nudged.hidden["lm"][:, 0] - base.hidden["lm"][:, 0]).abs().amax(-1)  # [L + 1, N]
    assert np.flatnonzero(diff[0].numpy() > 0).tolist() == [idx[-1]]
    assert float(diff[1, idx[0]]) > 1e-4 and float(diff[:, :idx[0]].max()) == 0


@pytest.mark.parametrize("shape, block, vision_cell, lm_cell", [
    ((32, 32), (slice(20, 24), slice(8, 12)), (5, 2), (1, 0)),
    # 20 x 40 squashed to 32 x 32 (bicubic: a source pixel reaches 2 source pixels, 2.5 when shrinking): row 5
    # -> rows 4..12 (patch rows 1..2), cols 8..9 -> 4.4..10 (patch cols 1..2)
    ((20, 40), (slice(5, 6), slice(8, 10)), None, (0, 0)),
])
def test_a_planted_patch_lands_on_its_cells(adapter, shape, block, vision_cell, lm_cell):
    """The vision embedding changes on the planted patch's cells only; each pooled decoder image token is the
    projection of the mean of the ``4 x 4`` block of vision tokens `_lm_positions_of` maps to it."""
    base_arr = noise(*shape, seed=3)
    arr = base_arr.copy()
    arr[block] = 255
    batch, base = adapter.encode([image(arr)], [QUESTION]), adapter.encode([image(base_arr)], [QUESTION])
    cap, ref = capture(adapter, batch), capture(adapter, base)
    lm, vision = batch.streams["lm"][0], batch.streams["vision"][0]
    assert vision.images[0].grid == (8, 8) and vision.images[0].cell_px == 4 and vision.n_tokens == 64
    diff = (cap.hidden["vision"][0, 0] - ref.hidden["vision"][0, 0]).abs().amax(-1).numpy()
    changed = {tuple(vision.cell[i]) for i in np.flatnonzero(diff > 1e-5)}
    moved = np.any(vision.images[0].image != base.streams["vision"][0].images[0].image, axis=-1)
    boxes = vision.images[0].boxes
    assert changed == {(r, c) for r in range(8) for c in range(8)
                       if moved[boxes[r, c, 1]:boxes[r, c, 3], boxes[r, c, 0]:boxes[r, c, 2]].any()}
    if vision_cell is not None:
        assert changed == {vision_cell}
    pooled = {tuple(lm.cell[p]) for i in np.flatnonzero(diff > 1e-5) for p in adapter._lm_positions_of(batch, i)}
    assert pooled == {lm_cell}
    features = adapter.vision_tower.post_layernorm(cap.hidden["vision"][-1, 0])  # [64, D]
    projector = adapter.model.model.multi_modal_projector
    for n in lm.index(ROLE_PATCH):
        block_of = [i for i in range(vision.n_tokens) if adapter._lm_positions_of(batch, i) == [n]]
        assert len(block_of) == 16 and {tuple(vision.cell[i] // 4) for i in block_of} == {tuple(lm.cell[n])}
        mean = features[block_of].mean(0)
        expected = projector.mm_soft_emb_norm(mean) @ projector.mm_input_projection_weight
        torch.testing.assert_close(cap.hidden["lm"][0, 0, n], expected, rtol=1e-4, atol=1e-5)


def test_generation_trace_shapes_and_roles(adapter):
    trace = extract_trace(adapter, image(noise()), QUESTION, "x")
    lm, gen = trace.streams["lm"], trace.streams["generated"]
    prompt = prompt_inputs(adapter, [image(noise())], [QUESTION])
    P = prompt["input_ids"].shape[1]
    with torch.no_grad():
        ref = adapter.model.generate(**prompt, max_new_tokens=N_NEW, do_sample=False,
                                     suppress_tokens=adapter._placeholder_ids())[0, P:].tolist()
    ends = [i for i, t in enumerate(ref) if t in adapter._eos_ids()]
    ref = ref[:ends[0] + 1] if ends else ref
    assert gen.n_tokens == len(ref) and (gen.role == ROLE_GENERATED).all()
    assert lm.n_tokens == P + len(ref) - 1 and (lm.role[P:] == ROLE_GENERATED).all()
    assert lm.tokens[P:] == gen.tokens[:-1] and lm.tokens[P - 1] == "\n"
    assert trace.blocks["lm.generated"].attentions.shape == (2, 4, len(ref), P + len(ref) - 1)
    assert trace.select("lm.generated").n_visible().tolist() == [P + t for t in range(len(ref))]
    assert trace.blocks["vision.self"].attentions.shape == (2, 2, 64, 64)
    assert trace.hiddens["vision"].shape == (3, 64, 16) and trace.hiddens["generated"].shape == (3, len(ref), 32)
    np.testing.assert_array_equal(trace.hiddens["generated"], trace.hiddens["lm"][:, P - 1:])


def test_generated_rows_equal_eager_generation(adapter):
    """Rows recomputed from one sdpa pass (layer 0 in a 6-token sliding window, image blocks both ways) equal
    eager ``generate(output_attentions=True)``, two prompts of different lengths (left padding) in one batch."""
    images, texts = [image(noise()), image(noise(48, 24, 2))], [QUESTION, "what"]
    batch = adapter.encode(images, texts)
    rows = capture(adapter, batch, hidden=False).stacked("lm.generated")  # [L, B, H, T, N]
    prompt = prompt_inputs(adapter, images, texts)
    eager = extract_eager_generation_attention(adapter.model, prompt, max_new_tokens=N_NEW,
                                               suppress_tokens=adapter._placeholder_ids())
    assert adapter.model.config.text_config._attn_implementation == "sdpa", "eager ends with its block"
    N = rows.shape[-1]
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        np.testing.assert_allclose(rows[:, b, :, :n].numpy(), eager.weights[b, :, :, :n, :N], atol=1e-4)
        np.testing.assert_array_equal(eager.sequences[b, eager.prompt_len:eager.prompt_len + n],
                                      batch.inputs["answer_ids"][b, :n].numpy())
        for t in range(n):  # the sliding layer sees its last 6 keys only; the full layer every real key
            query = N - rows.shape[3] + t
            seen0 = np.flatnonzero(rows[0, b, 0, t].numpy() > 0)
            assert seen0.min() >= query - 5 and seen0.max() == query
            assert len(np.flatnonzero(rows[1, b, 0, t].numpy() > 0)) > 6


def test_the_logit_lens_reads_the_head_as_the_model_does(adapter):
    """The lens's last layer is the model's own distribution: ``Gemma3ForConditionalGeneration`` applies no final
    softcap though the text config names one (1.0 here), so the lens applies none (with it, it would differ)."""
    batch = adapter.encode([image(noise())], [QUESTION])
    cap = capture(adapter, batch)
    out = cap.output
    n = len(out.answer_ids[0])
    probs = out.logits[0, :n].float().softmax(-1)
    ids = torch.tensor(out.answer_ids[0])[:, None]
    np.testing.assert_allclose(out.lens["generated_prob"][0, -1, :n], probs.gather(-1, ids)[:, 0].numpy(), rtol=1e-5)
    assert (out.lens["generated_rank"][0, -1, :n] == 0).all()
    hidden = cap.hidden["lm"][-1, 0, int(batch.inputs["prompt_len"]) - 1:][:n]
    with torch.no_grad():
        capped = torch.tanh(adapter.model.lm_head(adapter.language_model.norm(hidden)))  # softcap 1.0
    capped_logp = capped.log_softmax(-1).gather(-1, ids)[:, 0]
    assert float((capped_logp - probs.log().gather(-1, ids)[:, 0]).abs().max()) > 1e-3
    assert out.lens["image_top_ids"].shape == (1, 3, 4, 3)


def test_a_tower_too_large_to_keep_is_named_not_shown(adapter, monkeypatch):
    from vlcore.models import gemma3

    monkeypatch.setattr(gemma3, "MAX_VISION_TOKENS", 63)
    assert list(adapter.block_specs()) == ["lm.generated"] and adapter.image_stream == "lm"
    note = adapter.vision_note()
    assert "64 patches (8 x 8) in 2 layers of 2 heads" in note and "2 x 2 pooled tokens" in note
    assert "4 x 4 block" in note and "\n" not in note
    trace = extract_trace(adapter, image(noise()), QUESTION, "x")
    assert set(trace.blocks) == {"lm.generated"} and "vision" not in trace.streams
    assert adapter.trace_meta(capture(adapter, adapter.encode([image(noise())], [QUESTION])),
                              adapter.encode([image(noise())], [QUESTION]), 0)["vision_note"] == note


def test_head_mask_and_image_token_mask(adapter):
    batch = adapter.encode([image(noise())], [QUESTION])
    base = capture(adapter, batch)
    keep = torch.ones(1, 2, 4)
    keep[0, 0, 1] = 0
    with adapter.head_mask("lm.generated", keep):
        masked = capture(adapter, batch)
    torch.testing.assert_close(masked.stacked("lm.generated")[0], base.stacked("lm.generated")[0])
    assert not torch.allclose(masked.stacked("lm.generated")[1], base.stacked("lm.generated")[1])
    assert torch.equal(masked.hidden["vision"], base.hidden["vision"]), "a decoder head leaves the tower alone"
    lm_image = batch.streams["lm"][0].index(ROLE_PATCH)
    variants = adapter.mask_image_tokens(batch, [np.array([], np.int64), lm_image[:1], lm_image])
    out = capture(adapter, variants, hidden=False)
    rows = out.stacked("lm.generated")  # [L, 3, H, T, N]
    torch.testing.assert_close(rows[:, 0], base.stacked("lm.generated")[:, 0])
    # layer 1 attends to every real key (layer 0's window of 6 does not reach the image)
    assert float(rows[:, 2][..., lm_image].abs().max()) == 0 and float(rows[1, 0][..., lm_image].min()) > 0
    assert float(rows[:, 1][..., lm_image[0]].abs().max()) == 0 and float(rows[1, 1][..., lm_image[1:]].min()) > 0
    np.testing.assert_allclose(rows[:, 2].sum(-1).numpy(), 1.0, atol=1e-5)
    scores = adapter.target_score(out.output)[0]
    assert float((scores[2] - scores[0]).abs()) > 1e-6


def test_bad_inputs_are_one_line_errors(adapter):
    for images, texts, match in [([image(noise())], [" "], "empty"), ([np.zeros((4, 4, 3))], [QUESTION], "PIL"),
                                 ([image(noise())] * 2, [QUESTION], "2 images for 1")]:
        with pytest.raises(InputError, match=match) as err:
            adapter.encode(images, texts)
        assert "\n" not in str(err.value)


def test_the_composed_rollout_keeps_the_images_share_over_pooled_tokens(adapter):
    """A pooled token covers 16 vision tokens: its rollout value is split over them, spread through the tower's
    rollout, and summed back per pooled token (the image's total unchanged; a hand-computed reference)."""
    from vlcore.models.generative import _rollout_matrix

    batch = adapter.encode([image(noise())], [QUESTION])
    with torch.no_grad():
        cap = adapter.capture(batch, Capture(rollout=True))
    meta = adapter.trace_meta(cap, batch, 0)["rollout"]
    lm_rows, composed = np.array(meta["lm"]), np.array(meta["composed"])
    idx, _ = batch.streams["lm"][0].patch_positions(0)
    np.testing.assert_allclose(composed[:, idx].sum(1), lm_rows[:, idx].sum(1), atol=1e-6)
    other = np.setdiff1d(np.arange(lm_rows.shape[1]), idx)
    np.testing.assert_array_equal(composed[:, other], lm_rows[:, other])
    r_vis = _rollout_matrix([a[0] for a in cap.attentions["vision.self"]])
    r_vis = r_vis / r_vis.sum(1, keepdims=True)
    token_of = np.array([adapter._lm_positions_of(batch, j)[0] for j in range(64)])  # vision token -> lm position
    for t in range(len(lm_rows)):
        spread = (lm_rows[t, token_of] / 16) @ r_vis  # [64]
        expected = [spread[token_of == n].sum() for n in idx]
        np.testing.assert_allclose(composed[t, idx], expected, atol=1e-6)
