"""The PaliGemma adapter on a tiny checkpoint (`tests/models/tiny_paligemma.py`): the prefix layout, the causal
suffix (the teacher-forced pass is ``generate``'s), planted patches on square and non-square images, the generation
trace, rows recomputed from sdpa against eager, masks and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_paligemma import write_paligemma
from vlcore.errors import InputError
from vlcore.models.attention_capture import extract_eager_generation_attention
from vlcore.models.base import Capture
from vlcore.models.registry import LoadContext
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_GENERATED, ROLE_PATCH, ROLE_SPECIAL, ROLE_TEXT

QUESTION = "what is the color of the cat?"
N_NEW = 5


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from transformers import AutoConfig

    from vlcore.models import paligemma

    folder = write_paligemma(tmp_path_factory.mktemp("paligemma"))
    ctx = LoadContext(str(folder), True, AutoConfig.from_pretrained(folder), "PaliGemmaForConditionalGeneration",
                      {"local_files_only": True, "trust_remote_code": False}, str(folder), None, "cpu", None, None)
    a = paligemma.load(ctx)
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
    """The processor's prompt batch as the adapter builds it (left-padded, no training labels)."""
    return dict(adapter._process(adapter._check_images(images), [adapter.prompt_text(t) for t in texts]))


def test_loaded_on_sdpa_with_an_eager_vision_tower(adapter):
    cfg = adapter.model.config
    assert cfg.text_config._attn_implementation == "sdpa" and cfg.vision_config._attn_implementation == "eager"


def test_the_prompt_is_the_processors_prefix(adapter):
    """16 image tokens, ``<bos>``, ``answer en`` + the question, ``"\\n"``; no chat template, no labels."""
    assert adapter.prompt_text(QUESTION) == f"<image>answer en {QUESTION}"
    assert adapter.prompt_text("caption en") == "<image>caption en"
    batch = adapter.encode([image(noise())], [QUESTION])
    lm = batch.streams["lm"][0]
    P = int(batch.inputs["prompt_len"])
    assert (lm.role[:16] == ROLE_PATCH).all() and lm.tokens[16] == "<bos>" and lm.role[16] == ROLE_SPECIAL
    assert lm.tokens[17:P] == ("answer", "en", "what", "is", "the", "color", "of", "the", "cat?", "\n")
    assert (lm.role[17:P] == ROLE_TEXT).all() and "labels" not in batch.inputs
    assert lm.images[0].grid == (4, 4) and [tuple(c) for c in lm.cell[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    # the answer is the causal suffix: token type 1 from the first fed-back token on; positions count from 1
    types = batch.inputs["token_type_ids"][0]
    assert (types[:P] == 0).all() and (types[P:] == 1).all()
    assert batch.inputs["position_ids"][0, 0] == 1 and batch.inputs["position_ids"][0, -1] == lm.n_tokens


@pytest.mark.parametrize("hooks", ["paligemma", "generic"])
def test_teacher_forced_logits_are_generates(adapter, hooks, monkeypatch):
    """The capture pass over prompt + answer reproduces ``generate``'s logits at every step (a left-padded batch of
    two). Without PaliGemma's suffix token types and 1-based positions (the generic defaults) it does not."""
    if hooks == "generic":
        monkeypatch.setattr(adapter, "answer_token_values", {})
        monkeypatch.setattr(adapter, "position_offset", 0)
    images, texts = [image(noise()), image(noise(20, 40, 1))], [QUESTION, "what"]
    batch = adapter.encode(images, texts)
    out = capture(adapter, batch, hidden=False).output
    prompt = prompt_inputs(adapter, images, texts)
    with torch.no_grad():
        ref = adapter.model.generate(**prompt, max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, suppress_tokens=adapter._placeholder_ids())
    logits = torch.stack(ref.logits, 1)
    err = max(float((out.logits[b, :n] - logits[b, :n]).abs().max())
              for b, n in enumerate(batch.inputs["answer_len"].tolist()))
    if hooks == "paligemma":
        assert err < 1e-4, err
        P = prompt["input_ids"].shape[1]
        assert [list(a) for a in out.answer_ids] == [r[:n].tolist() for r, n in
                                                     zip(ref.sequences[:, P:], batch.inputs["answer_len"])]
    else:
        assert err > 1e-3, err


def test_the_prefix_is_bidirectional_and_never_sees_the_answer(adapter, monkeypatch):
    """Image tokens read the later prompt tokens (another question changes their layer-1 states), and no prompt
    position reads the answer: its hidden states equal a prompt-only forward's (with the answer in the prefix's
    token type, as the generic default would put it, they do not)."""
    arr = noise()
    batch = adapter.encode([image(arr)], [QUESTION])
    other = adapter.encode([image(arr)], ["what is in the image?"])
    cap, cap_other = capture(adapter, batch), capture(adapter, other)
    lm = batch.streams["lm"][0]
    img = lm.index(ROLE_PATCH)
    assert float((cap.hidden["lm"][1, 0, img] - cap_other.hidden["lm"][1, 0, img]).abs().max()) > 1e-4
    P = int(batch.inputs["prompt_len"])
    prompt = prompt_inputs(adapter, [image(arr)], [QUESTION])
    with torch.no_grad():
        alone = adapter.model(**prompt, output_hidden_states=True).hidden_states
    for layer in range(len(alone) - 1):
        torch.testing.assert_close(cap.hidden["lm"][layer, 0, :P], alone[layer][0], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(adapter, "answer_token_values", {})
    leaky = capture(adapter, adapter.encode([image(arr)], [QUESTION]))
    assert float((leaky.hidden["lm"][1, 0, :P] - alone[1][0]).abs().max()) > 1e-3


def cells_with_new_pixels(grid_a, grid_b) -> set:
    moved = np.any(grid_a.image != grid_b.image, axis=-1)
    return {(r, c) for r in range(grid_a.grid[0]) for c in range(grid_a.grid[1])
            if moved[grid_a.boxes[r, c, 1]:grid_a.boxes[r, c, 3], grid_a.boxes[r, c, 0]:grid_a.boxes[r, c, 2]].any()}


@pytest.mark.parametrize("shape, block, cell", [
    ((32, 32), (slice(24, 32), slice(8, 16)), (3, 1)),
    # 20 x 40 squashed to 32 x 32 (bicubic: a source pixel reaches 2 source pixels, 2.5 when shrinking): row 12
    # -> rows 16..24 (cell row 2), cols 33..37 -> 24.4..32 (cell col 3)
    ((20, 40), (slice(12, 13), slice(33, 38)), (2, 3)),
])
def test_a_planted_patch_lands_on_its_cell(adapter, shape, block, cell):
    """The vision embedding changes on the planted cell only (non-square images are squashed), and each decoder
    image token is the projection of the vision token on its cell after the tower's last layer."""
    base_arr = noise(*shape, seed=3)
    arr = base_arr.copy()
    arr[block] = 255
    batch, base = adapter.encode([image(arr)], [QUESTION]), adapter.encode([image(base_arr)], [QUESTION])
    cap, ref = capture(adapter, batch), capture(adapter, base)
    lm, vision = batch.streams["lm"][0], batch.streams["vision"][0]
    assert vision.images[0].image.shape == (32, 32, 3) and len(vision.index(ROLE_PATCH)) == vision.n_tokens == 16
    diff = (cap.hidden["vision"][0, 0] - ref.hidden["vision"][0, 0]).abs().amax(-1).numpy()
    changed = {tuple(vision.cell[i]) for i in np.flatnonzero(diff > 1e-5)}
    assert changed == {cell} == cells_with_new_pixels(vision.images[0], base.streams["vision"][0].images[0])
    tower = adapter.vision_tower
    projected = adapter.model.model.multi_modal_projector(tower.post_layernorm(cap.hidden["vision"][-1, 0]))
    for n in lm.index(ROLE_PATCH):
        v = [i for i in range(vision.n_tokens) if tuple(vision.cell[i]) == tuple(lm.cell[n])]
        torch.testing.assert_close(cap.hidden["lm"][0, 0, n], projected[v[0]], rtol=1e-5, atol=1e-5)


def test_generation_trace_shapes_and_roles(adapter):
    trace = extract_trace(adapter, image(noise()), QUESTION, "x")
    lm, gen = trace.streams["lm"], trace.streams["generated"]
    prompt = prompt_inputs(adapter, [image(noise())], [QUESTION])
    P = prompt["input_ids"].shape[1]
    with torch.no_grad():
        ref = adapter.model.generate(**prompt, max_new_tokens=N_NEW, do_sample=False,
                                     suppress_tokens=adapter._placeholder_ids())[0, P:].tolist()
    eos = adapter.tokenizer.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert gen.n_tokens == len(ref) and (gen.role == ROLE_GENERATED).all()
    assert lm.n_tokens == P + len(ref) - 1 and (lm.role[P:] == ROLE_GENERATED).all()
    assert lm.tokens[P:] == gen.tokens[:-1] and lm.tokens[P - 1] == "\n"
    att = trace.blocks["lm.generated"].attentions
    assert att.shape == (2, 4, len(ref), P + len(ref) - 1)
    assert trace.select("lm.generated").n_visible().tolist() == [P + t for t in range(len(ref))]
    assert trace.blocks["vision.self"].attentions.shape == (2, 2, 16, 16)
    assert trace.hiddens["vision"].shape == (3, 16, 16) and trace.hiddens["generated"].shape == (3, len(ref), 32)
    np.testing.assert_array_equal(trace.hiddens["generated"], trace.hiddens["lm"][:, P - 1:])
    assert trace.predicted == adapter.tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_generated_rows_equal_eager_generation(adapter):
    """Rows recomputed from one sdpa pass (the prefix bidirectional, the answer causal) equal eager
    ``generate(output_attentions=True)``, two prompts of different lengths (left padding) in one batch."""
    images, texts = [image(noise()), image(noise(48, 24, 2))], [QUESTION, "what"]
    batch = adapter.encode(images, texts)
    rows = capture(adapter, batch, hidden=False).stacked("lm.generated")  # [L, B, H, T, N]
    prompt = prompt_inputs(adapter, images, texts)
    eager = extract_eager_generation_attention(adapter.model, prompt, max_new_tokens=N_NEW,
                                               suppress_tokens=adapter._placeholder_ids())
    assert adapter.model.config.text_config._attn_implementation == "sdpa", "eager ends with its block"
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        np.testing.assert_allclose(rows[:, b, :, :n].numpy(), eager.weights[b, :, :, :n, :rows.shape[-1]], atol=1e-4)
        np.testing.assert_array_equal(eager.sequences[b, eager.prompt_len:eager.prompt_len + n],
                                      batch.inputs["answer_ids"][b, :n].numpy())


def test_vision_attention_equals_the_towers_own(adapter):
    """``vision.self`` is the SigLIP tower's eager attention (``output_attentions`` on the tower alone)."""
    batch = adapter.encode([image(noise())], [QUESTION])
    got = capture(adapter, batch, blocks=("vision.self",), hidden=False).stacked("vision.self")
    with torch.no_grad():
        ref = adapter.vision_tower(batch.inputs["pixel_values"], output_attentions=True).attentions
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-6, atol=1e-7)


def test_target_score_is_a_teacher_forced_sum_over_the_suffix(adapter):
    batch = adapter.encode([image(noise())], [QUESTION])
    out = capture(adapter, batch, hidden=False).output
    score, prob, label = adapter.target_score(out, "red blue")
    ids = adapter.tokenizer("red blue", add_special_tokens=False)["input_ids"] + [adapter.tokenizer.eos_token_id]
    prompt = prompt_inputs(adapter, [image(noise())], [QUESTION])
    P = prompt["input_ids"].shape[1]
    # the processor's own suffix encoding: token type 1 over "red blue<eos>"
    full = adapter.processor(images=[image(noise())], text=[adapter.prompt_text(QUESTION)], suffix=["red blue"],
                             return_tensors="pt")
    assert full["input_ids"][0, P:].tolist() == ids and (full["token_type_ids"][0, P:] == 1).all()
    with torch.no_grad():
        logits = adapter.model(input_ids=full["input_ids"][:, :-1], token_type_ids=full["token_type_ids"][:, :-1],
                               pixel_values=full["pixel_values"]).logits[0, P - 1:]
    manual = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum()
    torch.testing.assert_close(score[0], manual, rtol=1e-4, atol=1e-5)
    assert label == "red blue" and abs(float(prob[0]) - float(manual.exp())) < 1e-6
    with pytest.raises(InputError):
        adapter.target_score(out, "  ")


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
    keep = torch.ones(1, 2, 2)
    keep[0, 1, 0] = 0
    with adapter.head_mask("vision.self", keep):
        masked = capture(adapter, batch)
    assert torch.equal(masked.hidden["vision"][:2], base.hidden["vision"][:2])
    assert not torch.allclose(masked.hidden["vision"][2], base.hidden["vision"][2])
    stream = batch.streams[adapter.image_stream][0]
    image_tokens = stream.index(ROLE_PATCH)
    variants = adapter.mask_image_tokens(batch, [np.array([], np.int64), image_tokens])
    out = capture(adapter, variants, hidden=False)
    rows = out.stacked("lm.generated")  # [L, 2, H, T, N]
    lm_image = batch.streams["lm"][0].index(ROLE_PATCH)
    torch.testing.assert_close(rows[:, 0], base.stacked("lm.generated")[:, 0])
    assert float(rows[:, 1][..., lm_image].abs().max()) == 0 and float(rows[:, 0][..., lm_image].min()) > 0
    np.testing.assert_allclose(rows[:, 1].sum(-1).numpy(), 1.0, atol=1e-5)
    scores = adapter.target_score(out.output, out.output.answers[0])[0]
    assert float((scores[1] - scores[0]).abs()) > 1e-6


def test_bad_inputs_are_one_line_errors(adapter):
    for images, texts, match in [([image(noise())], [" "], "empty"), ([np.zeros((4, 4, 3))], [QUESTION], "PIL"),
                                 ([image(noise())] * 2, [QUESTION], "2 images for 1")]:
        with pytest.raises(InputError, match=match) as err:
            adapter.encode(images, texts)
        assert "\n" not in str(err.value)


def test_a_large_tower_is_loaded_on_sdpa_and_not_kept():
    """No [layer, head, N, N] for N >= 1,024: a 224 px tower (256 tokens) loads on eager and keeps vision.self,
    448 px (1,024) and 896 px (4,096) load on sdpa (PaliGemma and Gemma 3 alike)."""
    from types import SimpleNamespace

    from vlcore.models.generative import tower_implementation

    sizes = {224: "eager", 434: "eager", 448: "sdpa", 896: "sdpa"}  # 434 / 14 = 31: 961 tokens
    assert {px: tower_implementation(SimpleNamespace(image_size=px, patch_size=14)) for px in sizes} == sizes
