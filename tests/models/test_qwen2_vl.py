"""The Qwen2-VL / Qwen2.5-VL adapter on tiny checkpoints (`tests/models/tiny_qwen2_vl.py`): planted patches on the
28 px merged cells (Qwen2.5-VL's windowed tower included), the generation trace, M-RoPE positions in teacher-forced
passes (left padding, image-token masks, scoring another answer), rows against eager, the processor built without
torchvision (folder and offline hub cache), one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_qwen2_vl import write_qwen
from vlcore.errors import InputError, ModelLoadError
from vlcore.models.attention_capture import extract_eager_generation_attention
from vlcore.models.base import Capture
from vlcore.models.registry import load_adapter
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_GENERATED, ROLE_PATCH, ROLE_SPECIAL

QUESTION = "what is the color of the cat?"
TYPES = ("qwen2_vl", "qwen2_5_vl")
_FOLDERS: dict = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny checkpoints whose answers may end (end tokens kept in the LM head), one per model type."""
    if not _FOLDERS:
        for mt in TYPES:
            _FOLDERS[mt] = write_qwen(tmp_path_factory.mktemp(mt), mt, ends=True)
    return _FOLDERS


@pytest.fixture(scope="module", params=TYPES)
def adapter(request, folders):
    a = load_adapter(str(folders[request.param]), device="cpu")
    a.max_new_tokens = 6
    return a


@pytest.fixture(scope="module")
def qwen2(folders):
    a = load_adapter(str(folders["qwen2_vl"]), device="cpu")
    a.max_new_tokens = 6
    return a


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def with_cell(arr: np.ndarray, cell: tuple[int, int], px: int = 28) -> np.ndarray:
    """A bright square inside merged cell ``cell`` (28 x 28 px), away from its border."""
    out = arr.copy()
    r, c = cell
    out[r * px + 9:r * px + 19, c * px + 9:c * px + 19] = 255
    return out


def capture(adapter, batch, **kwargs):
    with torch.no_grad():
        return adapter.capture(batch, Capture(**kwargs))


def test_loaded_on_sdpa_without_a_vision_block(adapter):
    assert adapter.model.config.text_config._attn_implementation == "sdpa"
    assert set(adapter.block_specs()) == {"lm.generated"} and adapter.image_stream == "lm"
    note = adapter.vision_note()
    assert "no attention weights" in note and note.count(". ") == 0 and note.endswith(".")
    assert adapter.patch_px == 28
    assert adapter.title == {"Qwen2VLForConditionalGeneration": "Qwen2-VL",
                             "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL"}[adapter.architecture]


def test_a_planted_patch_lands_on_its_merged_cell(adapter):
    """84 x 140 px (no resize): 6 x 10 patches of 14 px, merged 2 x 2: a 3 x 5 grid of 28 px tokens. A square
    planted in cell (2, 3) changes the decoder's input embedding of that image token only (the tiny tower is
    local); on Qwen2.5-VL the tower runs 56 px windows in window order, and the token still lands row-major."""
    base = noise(84, 140)
    cell = (2, 3)
    batch = adapter.encode([Image.fromarray(with_cell(base, cell))], [QUESTION])
    ref = adapter.encode([Image.fromarray(base)], [QUESTION])
    lm = batch.streams["lm"][0]
    grid = lm.images[0]
    assert grid.grid == (3, 5) and grid.image.shape[:2] == (84, 140)
    assert tuple(grid.boxes[cell]) == (84, 56, 112, 84)  # x0, y0, x1, y1
    patches = lm.index(ROLE_PATCH)
    assert len(patches) == 15 and [tuple(lm.cell[i]) for i in patches[:6]] == [(0, 0), (0, 1), (0, 2), (0, 3),
                                                                              (0, 4), (1, 0)]
    assert lm.tokens[patches[0] - 1] == "<|vision_start|>" and lm.role[patches[0] - 1] == ROLE_SPECIAL
    a = capture(adapter, batch).hidden["lm"][0, 0]
    b = capture(adapter, ref).hidden["lm"][0, 0]
    P = int(batch.inputs["prompt_len"])
    diff = (a[:P] - b[:P]).abs().amax(-1).numpy()
    assert [tuple(lm.cell[i]) for i in np.flatnonzero(diff > 1e-5)] == [cell]


def test_a_resized_non_square_image_keeps_28_px_cells(adapter):
    """100 x 150 px is more than 16 tokens' worth: resized to 84 x 112 (3 x 4 tokens of 28 px)."""
    batch = adapter.encode([Image.fromarray(noise(100, 150))], [QUESTION])
    grid = batch.streams["lm"][0].images[0]
    assert grid.grid == (3, 4) and grid.image.shape[:2] == (84, 112)
    assert int(batch.inputs["image_grid_thw"][0].prod()) == 3 * 4 * 4


def test_generation_trace_shapes_and_roles(qwen2):
    image = Image.fromarray(noise(56, 84, 3))
    trace = extract_trace(qwen2, image, QUESTION, "x")
    lm, gen = trace.streams["lm"], trace.streams["generated"]
    prompt = qwen2.processor(images=[image], text=[qwen2.prompt_text(QUESTION)], return_tensors="pt")
    P = prompt["input_ids"].shape[1]
    with torch.no_grad():
        ref = qwen2.model.generate(**prompt, max_new_tokens=6, do_sample=False,
                                   suppress_tokens=qwen2._placeholder_ids())[0, P:].tolist()
    ends = [i for i, t in enumerate(ref) if t in qwen2._eos_ids()]
    ref = ref[:ends[0] + 1] if ends else ref
    assert set(trace.streams) == {"lm", "generated"} and set(trace.blocks) == {"lm.generated"}
    assert gen.n_tokens == len(ref) and (gen.role == ROLE_GENERATED).all()
    assert lm.n_tokens == P + len(ref) - 1 and (lm.role[P:] == ROLE_GENERATED).all()
    assert lm.tokens[0] == "<|im_start|>" and lm.tokens[P - 1] == "\n" and lm.tokens[P - 2] == "assistant"
    assert len(lm.index(ROLE_PATCH)) == 2 * 3 and lm.images[0].grid == (2, 3)
    att = trace.blocks["lm.generated"].attentions
    assert att.shape == (2, 4, len(ref), P + len(ref) - 1)
    assert trace.hiddens["generated"].shape == (3, len(ref), 32)
    np.testing.assert_array_equal(trace.hiddens["generated"], trace.hiddens["lm"][:, P - 1:])
    batch = qwen2.encode([image], [QUESTION])
    assert qwen2.trace_meta(capture(qwen2, batch), batch, 0)["vision_note"] == qwen2.vision_note()


def _left_padded_pair():
    images = [Image.fromarray(noise(60, 90, 1)), Image.fromarray(noise(120, 60, 2))]  # 2 x 3 and 4 x 2 tokens
    texts = [QUESTION, "what"]
    return images, texts


def test_teacher_forced_logits_equal_generate_scores_left_padded(adapter):
    """Two prompts of different lengths (the shorter left-padded, its image 8 tokens against 6): the capture
    pass over prompt + answer gives, at every generating step, the logits ``generate`` gave (M-RoPE positions
    continue after each row's own prompt)."""
    images, texts = _left_padded_pair()
    batch = adapter.encode(images, texts)
    assert (batch.inputs["attention_mask"][1, :2] == 0).all() and (batch.inputs["attention_mask"][0] == 1)[:4].all()
    out = capture(adapter, batch, hidden=False).output
    prompt = adapter._process(images, [adapter.prompt_text(t) for t in texts])
    with torch.no_grad():
        gen = adapter.model.generate(**prompt, max_new_tokens=adapter.max_new_tokens, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=1,
                                     suppress_tokens=adapter._placeholder_ids())
    scores = torch.stack(gen.logits, 1)
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        torch.testing.assert_close(out.logits[b, :n], scores[b, :n], rtol=0, atol=1e-4)
        assert out.answer_ids[b] == tuple(gen.sequences[b, prompt["input_ids"].shape[1]:][:n].tolist())


def test_scoring_another_answer_per_row_matches_a_single_row_pass(adapter):
    """``target_score`` of an answer that was not generated, in a batch of two: row ``b`` is scored on its own
    image and prompt with the model computing its own M-RoPE positions (one example, no padding)."""
    images, texts = _left_padded_pair()
    out = capture(adapter, adapter.encode(images, texts), hidden=False).output
    score, _, label = adapter.target_score(out, "red blue")
    ids = adapter.tokenizer("red blue", add_special_tokens=False)["input_ids"] + list(adapter._end_token())
    for b in range(2):
        one = adapter.processor(images=[images[b]], text=[adapter.prompt_text(texts[b])], return_tensors="pt")
        P = one["input_ids"].shape[1]
        extra = torch.tensor([ids[:-1]])
        full = dict(one, input_ids=torch.cat([one["input_ids"], extra], 1),
                    attention_mask=torch.cat([one["attention_mask"], torch.ones_like(extra)], 1),
                    mm_token_type_ids=torch.cat([one["mm_token_type_ids"], torch.zeros_like(extra)], 1))
        with torch.no_grad():
            logits = adapter.model(**full, use_cache=False).logits[0, P - 1:]
        manual = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum()
        torch.testing.assert_close(score[b], manual, rtol=1e-4, atol=1e-5)
    assert label == "red blue"


def test_image_token_mask_hides_tokens_without_moving_positions(adapter):
    """Removing image tokens masks their keys and moves no position: in the first layer (whose queries and keys
    do not depend on the mask) the masked row is the unmasked row with those keys zeroed and renormalised; some
    or all of the image's tokens."""
    image = Image.fromarray(noise(84, 84, 4))
    batch = adapter.encode([image], [QUESTION])
    patches = batch.streams["lm"][0].index(ROLE_PATCH)
    drops = [np.array([], np.int64), patches[:4], patches]
    variants = adapter.mask_image_tokens(batch, drops)
    cap = capture(adapter, variants, hidden=False)
    rows = cap.stacked("lm.generated")[0]  # layer 0: [3, H, T, N]
    torch.testing.assert_close(cap.output.prompt["position_ids"][:, 1:], cap.output.prompt["position_ids"][:, :1]
                               .expand(-1, 2, -1))
    for v, drop in enumerate(drops):
        expect = rows[0].clone()
        expect[..., drop] = 0
        expect = expect / expect.sum(-1, keepdim=True)
        torch.testing.assert_close(rows[v], expect, rtol=1e-4, atol=1e-6)
    scores = adapter.target_score(cap.output, "red blue")[0]
    assert float((scores[2] - scores[0]).detach().abs()) > 1e-6


def test_generated_rows_equal_eager_generation_with_a_sliding_window(qwen2):
    """Rows recomputed from one sdpa pass equal eager ``generate(output_attentions=True)`` (left-padded batch of
    two); the second layer's sliding window (8 keys) holds: nothing before the window gets attention."""
    images, texts = _left_padded_pair()
    batch = qwen2.encode(images, texts)
    rows = capture(qwen2, batch, hidden=False).stacked("lm.generated")  # [L, B, H, T, N]
    prompt = qwen2._process(images, [qwen2.prompt_text(t) for t in texts])
    eager = extract_eager_generation_attention(qwen2.model, dict(prompt), max_new_tokens=qwen2.max_new_tokens,
                                               suppress_tokens=qwen2._placeholder_ids(), pad_token_id=1)
    assert qwen2.model.config.text_config._attn_implementation == "sdpa"
    P = int(batch.inputs["prompt_len"])
    assert batch.inputs["answer_len"].tolist() == [6, 3], "the left-padded row ends early (masked tail)"
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        np.testing.assert_allclose(rows[:, b, :, :n].numpy(), eager.weights[b, :, :, :n, :rows.shape[-1]], atol=1e-4)
        valid = batch.inputs["attention_mask"][b].bool()
        for t in range(n):
            q = P - 1 + t
            assert float(rows[1, b, :, t, :q - 7].abs().max()) == 0 and float(rows[1, b, :, t, q - 7:q + 1].min()) > 0
            assert float(rows[0, b, :, t, :q - 7][..., valid[:q - 7]].min()) > 0  # the full-attention layer sees them


def test_processor_is_built_without_torchvision(folders, monkeypatch):
    """Without torchvision the processor is the family's class minus its video part, from the folder's tokenizer,
    PIL image processor and chat template; it expands ``<|image_pad|>`` by the merged grid."""
    import vlcore.models.image_only_processors as iop

    monkeypatch.setattr(iop, "torchvision_available", lambda: False)
    for mt, cls in (("qwen2_vl", "Qwen2VLProcessorImageOnly"), ("qwen2_5_vl", "Qwen2_5_VLProcessorImageOnly")):
        adapter = load_adapter(str(folders[mt]), device="cpu")
        assert type(adapter.processor).__name__ == cls
        assert type(adapter.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
        enc = adapter.processor(images=[Image.fromarray(noise(56, 112))], text=[adapter.prompt_text("what")])
        assert enc["input_ids"][0].count(adapter.config.image_token_id) == 2 * 4
        assert adapter.prompt_text("what").endswith("<|im_start|>assistant\n")


def test_processor_from_an_offline_hub_cache(folders, tmp_path, monkeypatch):
    """A hub id found only in the local hub cache (offline): tokenizer, image processor and the chat template
    file come from the cached snapshot."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--tiny--qwen2-vl" / "snapshots" / ("a" * 40)
    shutil.copytree(folders["qwen2_vl"], snapshot)
    (tmp_path / "hub" / "models--tiny--qwen2-vl" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--qwen2-vl" / "refs" / "main").write_text("a" * 40)
    template = (snapshot / "chat_template.jinja").read_text()
    (snapshot / "chat_template.jinja").unlink()
    (snapshot / "chat_template.json").write_text(json.dumps({"chat_template": template.replace("user", "user ")}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("VLSCOPE_OFFLINE", "1")
    adapter = load_adapter("tiny/qwen2-vl", device="cpu")
    assert adapter.processor.chat_template == template.replace("user", "user ")
    assert adapter.model_id == "tiny/qwen2-vl@" + "a" * 40


def test_a_checkpoint_without_a_chat_template_is_a_one_line_error(folders, tmp_path):
    folder = tmp_path / "no_template"
    shutil.copytree(folders["qwen2_vl"], folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="chat template") as err:
        load_adapter(str(folder), device="cpu")
    assert "\n" not in str(err.value)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError) as err:
        load_adapter(str(folder), device="cpu")
    assert "\n" not in str(err.value)


def test_bad_inputs_are_one_line_errors(qwen2):
    with pytest.raises(InputError, match="empty"):
        qwen2.encode([Image.fromarray(noise(56, 56))], [" "])
    with pytest.raises(InputError, match="PIL"):
        qwen2.encode([noise(56, 56)], [QUESTION])
    with pytest.raises(InputError, match="one image per text"):
        qwen2.encode([Image.fromarray(noise(56, 56))] * 2, [QUESTION])


def test_the_eager_fallback_gives_the_sdpa_rows(adapter):
    """The user-picked eager view (decoder weights instead of recomputed rows) gives the same rows and logits on a
    left-padded pair, M-RoPE positions included; the shared model is back on sdpa afterwards."""
    images, texts = _left_padded_pair()
    batch = adapter.encode(images, texts)
    plain = capture(adapter, batch, hidden=False)
    eager = capture(adapter.with_attention("eager"), batch, hidden=False)
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        torch.testing.assert_close(eager.stacked("lm.generated")[:, b, :, :n], plain.stacked("lm.generated")[:, b, :, :n],
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(eager.output.logits[b, :n], plain.output.logits[b, :n], rtol=0, atol=1e-4)
    assert adapter.model.config.text_config._attn_implementation == "sdpa"
