"""The LLaVA adapter on a tiny checkpoint (`tests/models/tiny_llava.py`): layouts, the generation trace, the rows
recomputed from sdpa against eager, the logit lens, teacher-forced scores, masks and hook hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_utils import AttentionInterface

from tests.models.tiny_llava import write_llava
from vlcore.errors import InputError
from vlcore.models.attention_capture import AttentionCaptureError, extract_eager_generation_attention
from vlcore.models.base import Capture
from vlcore.models.registry import LoadContext
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_GENERATED, ROLE_IMAGE_SUMMARY, ROLE_PATCH

QUESTION = "what is the color of the cat?"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from transformers import AutoConfig

    from vlcore.models import llava

    folder = write_llava(tmp_path_factory.mktemp("llava"))
    ctx = LoadContext(str(folder), True, AutoConfig.from_pretrained(folder), "LlavaForConditionalGeneration",
                      {"local_files_only": True, "trust_remote_code": False}, str(folder), None, "cpu", None, None)
    a = llava.load(ctx)
    a.max_new_tokens = 5
    return a


def grey(cell=None) -> Image.Image:
    arr = np.full((32, 32, 3), 128, np.uint8)
    if cell is not None:
        arr[cell[0] * 8:(cell[0] + 1) * 8, cell[1] * 8:(cell[1] + 1) * 8] = 255
    return Image.fromarray(arr)


def capture(adapter, batch, **kwargs):
    with torch.no_grad():
        return adapter.capture(batch, Capture(**kwargs))


def test_loaded_on_sdpa_with_an_eager_vision_tower(adapter):
    cfg = adapter.model.config
    assert cfg.text_config._attn_implementation == "sdpa" and cfg.vision_config._attn_implementation == "eager"


def test_a_planted_patch_lands_on_its_cell_in_both_streams(adapter):
    """The decoder's image token on cell (r, c) is the projection of the vision token on (r, c) (feature layer
    -2), and a bright patch planted on (3, 1) changes the vision embedding of that cell only."""
    batch = adapter.encode([grey((3, 1))], [QUESTION])
    base = adapter.encode([grey()], [QUESTION])
    cap, ref = capture(adapter, batch), capture(adapter, base)
    lm, vision = batch.streams["lm"][0], batch.streams["vision"][0]
    feature = cap.hidden["vision"][len(adapter.vision_tower.encoder.layers) - 1, 0]  # hidden_states[-2]
    projected = adapter.model.model.multi_modal_projector(feature)
    for n in lm.index(ROLE_PATCH):
        v = [i for i in vision.index(ROLE_PATCH) if tuple(vision.cell[i]) == tuple(lm.cell[n])]
        torch.testing.assert_close(cap.hidden["lm"][0, 0, n], projected[v[0]], rtol=1e-5, atol=1e-5)
    diff = (cap.hidden["vision"][0, 0] - ref.hidden["vision"][0, 0]).abs().amax(-1)
    assert [tuple(vision.cell[i]) for i in np.flatnonzero(diff.numpy() > 1e-4)] == [(3, 1)]
    assert lm.images[0].grid == (4, 4) and len(lm.index(ROLE_PATCH)) == 16 and lm.first(ROLE_IMAGE_SUMMARY) is None


def test_generation_trace_shapes_and_roles(adapter):
    trace = extract_trace(adapter, grey(), QUESTION, "x")
    lm, gen = trace.streams["lm"], trace.streams["generated"]
    prompt = adapter.processor(images=[grey()], text=[adapter.prompt_text(QUESTION)], return_tensors="pt")
    P = prompt["input_ids"].shape[1]
    with torch.no_grad():
        ref = adapter.model.generate(**prompt, max_new_tokens=5, do_sample=False)[0, P:].tolist()
    eos = adapter.tokenizer.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert gen.n_tokens == len(ref) and (gen.role == ROLE_GENERATED).all()
    assert lm.n_tokens == P + len(ref) - 1 and (lm.role[P:] == ROLE_GENERATED).all()
    assert lm.tokens[P:] == gen.tokens[:-1] and lm.tokens[0] == "<bos>" and lm.tokens[P - 1] == "ASSISTANT:"
    att = trace.blocks["lm.generated"].attentions
    assert att.shape == (2, 4, len(ref), P + len(ref) - 1)
    assert trace.select("lm.generated").n_visible().tolist() == [P + t for t in range(len(ref))]
    assert trace.blocks["vision.self"].attentions.shape == (2, 2, 17, 17)
    assert trace.hiddens["generated"].shape == (3, len(ref), 32)
    np.testing.assert_array_equal(trace.hiddens["generated"], trace.hiddens["lm"][:, P - 1:])
    assert trace.predicted == adapter.tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_generated_rows_equal_eager_generation(adapter):
    """Rows recomputed from one sdpa pass equal eager ``generate(output_attentions=True)``, two prompts of
    different lengths (left padding) in one batch."""
    images, texts = [grey(), grey((0, 0))], [QUESTION, "what"]
    batch = adapter.encode(images, texts)
    rows = capture(adapter, batch, hidden=False).stacked("lm.generated")  # [L, B, H, T, N]
    prompt = adapter.processor(images=images, text=[adapter.prompt_text(t) for t in texts], padding=True,
                               padding_side="left", return_tensors="pt")
    eager = extract_eager_generation_attention(adapter.model, dict(prompt), max_new_tokens=adapter.max_new_tokens)
    assert adapter.model.config.text_config._attn_implementation == "sdpa", "eager ends with its block"
    lengths = batch.inputs["answer_len"].tolist()
    for b, n in enumerate(lengths):
        ours = rows[:, b, :, :n].numpy()
        theirs = eager.weights[b, :, :, :n, :rows.shape[-1]]  # [L, H, n, P + T - 1]
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        np.testing.assert_array_equal(eager.sequences[b, eager.prompt_len:eager.prompt_len + n],
                                      batch.inputs["answer_ids"][b, :n].numpy())


def test_grad_rows_equal_sdpa_rows_and_flow(adapter):
    batch = adapter.encode([grey((1, 2))], [QUESTION])
    plain = capture(adapter, batch, blocks=("lm.generated",), hidden=False).stacked("lm.generated")
    grads = adapter.attention_gradients(batch, None, blocks=("lm.generated",))
    torch.testing.assert_close(torch.stack(grads.attentions["lm.generated"]), plain[:, 0], atol=1e-5, rtol=1e-4)
    assert all(float(g.abs().max()) > 0 for g in grads.gradients["lm.generated"])
    assert adapter.model.config.text_config._attn_implementation == "sdpa"


def test_logit_lens_last_layer_is_the_models_own_prediction(adapter):
    batch = adapter.encode([grey()], [QUESTION])
    out = capture(adapter, batch).output
    lens, n = out.lens, len(out.answer_ids[0])
    probs = out.logits[0, :n].float().softmax(-1)
    top = probs.topk(5, -1)
    np.testing.assert_array_equal(lens["generated_top_ids"][0, -1, :n], top.indices.numpy())
    np.testing.assert_allclose(lens["generated_top_probs"][0, -1, :n], top.values.numpy(), rtol=1e-4, atol=1e-6)
    assert (lens["generated_rank"][0, -1, :n] == 0).all(), "greedy: the produced token ranks first at the end"
    chosen = probs.gather(-1, torch.tensor(out.answer_ids[0])[:, None])[:, 0]
    np.testing.assert_allclose(lens["generated_prob"][0, -1, :n], chosen.numpy(), rtol=1e-4)
    assert lens["image_top_ids"].shape == (1, 3, 16, 3)
    assert (lens["image_positions"][0] == batch.streams["lm"][0].index(ROLE_PATCH)).all()


def test_target_score_is_a_teacher_forced_sum(adapter):
    batch = adapter.encode([grey()], [QUESTION])
    out = capture(adapter, batch, hidden=False).output
    score, prob, label = adapter.target_score(out, "red blue")
    ids = adapter.tokenizer("red blue", add_special_tokens=False)["input_ids"] + [adapter.tokenizer.eos_token_id]
    prompt = adapter.processor(images=[grey()], text=[adapter.prompt_text(QUESTION)], return_tensors="pt")
    P = prompt["input_ids"].shape[1]
    full = torch.cat([prompt["input_ids"], torch.tensor([ids[:-1]])], 1)
    with torch.no_grad():
        logits = adapter.model(input_ids=full, pixel_values=prompt["pixel_values"]).logits[0, P - 1:]
    manual = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum()
    torch.testing.assert_close(score[0], manual, rtol=1e-4, atol=1e-5)
    assert label == "red blue" and abs(float(prob[0]) - float(manual.exp())) < 1e-6
    _, own_prob, own_label = adapter.target_score(out)
    assert own_label == out.answers[0]
    assert abs(float(own_prob[0]) - adapter.predict(out)[0][0][1]) < 1e-6
    with pytest.raises(InputError):
        adapter.target_score(out, "  ")


def test_head_mask_and_image_token_mask(adapter):
    batch = adapter.encode([grey((0, 1))], [QUESTION])
    base = capture(adapter, batch)
    keep = torch.ones(1, 2, 4)
    keep[0, 0, 1] = 0
    with adapter.head_mask("lm.generated", keep):
        masked = capture(adapter, batch)
    torch.testing.assert_close(masked.stacked("lm.generated")[0], base.stacked("lm.generated")[0])
    assert not torch.allclose(masked.stacked("lm.generated")[1], base.stacked("lm.generated")[1])
    assert torch.equal(masked.hidden["vision"], base.hidden["vision"]), "a decoder head leaves the tower alone"
    assert adapter.image_stream == "lm"  # removal indexes the decoder's image tokens
    image = batch.streams["lm"][0].index(ROLE_PATCH)
    variants = adapter.mask_image_tokens(batch, [np.array([], np.int64), image])
    rows = capture(adapter, variants, hidden=False).stacked("lm.generated")  # [L, 2, H, T, N]
    torch.testing.assert_close(rows[:, 0], base.stacked("lm.generated")[:, 0])
    assert float(rows[:, 1][..., image].abs().max()) == 0 and float(rows[:, 0][..., image].min()) > 0
    np.testing.assert_allclose(rows[:, 1].sum(-1).numpy(), 1.0, atol=1e-5)
    with pytest.raises(InputError):
        adapter.mask_image_tokens(batch, [np.array([999])])
    with pytest.raises(InputError, match="only image tokens"):
        adapter.mask_image_tokens(batch, [np.array([0])])  # a text token


def _hooks(adapter) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules())


def test_hooks_and_attention_registration_are_gone_after_errors(adapter):
    before, sdpa = _hooks(adapter), AttentionInterface._global_mapping["sdpa"]
    batch = adapter.encode([grey()], [QUESTION])
    with pytest.raises(AttentionCaptureError):
        capture(adapter, batch, layers=(7,))
    with pytest.raises(RuntimeError, match="boom"), adapter.head_mask("vision.self", torch.zeros(1, 2, 2)):
        raise RuntimeError("boom")
    with pytest.raises(InputError):
        adapter.attention_gradients(adapter.encode([grey()] * 2, [QUESTION] * 2))
    assert _hooks(adapter) == before and AttentionInterface._global_mapping["sdpa"] is sdpa
    assert adapter.model.config.text_config._attn_implementation == "sdpa"


def test_bad_inputs_are_one_line_errors(adapter):
    with pytest.raises(InputError, match="empty"):
        adapter.encode([grey()], [" "])
    with pytest.raises(InputError, match="PIL"):
        adapter.encode([np.zeros((4, 4, 3))], [QUESTION])
