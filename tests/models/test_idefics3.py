"""The Idefics3 / SmolVLM adapter on tiny checkpoints (`tests/models/tiny_idefics3.py`): image tokens on the tiles
and global grids through ``encode`` + ``capture``, a non-square image, the generation trace, the rows recomputed
from sdpa against eager, masks, the SmolVLM processor built from its parts, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_idefics3 import write_idefics3, write_smolvlm
from vlcore.errors import InputError, ModelLoadError
from vlcore.models.attention_capture import extract_eager_generation_attention
from vlcore.models.base import Capture
from vlcore.models.idefics3 import Idefics3Adapter
from vlcore.models.registry import load_adapter
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_GENERATED, ROLE_PATCH, ROLE_SPECIAL

QUESTION = "what is the color of the cat?"


def _load(folder) -> Idefics3Adapter:
    adapter = load_adapter(str(folder), device="cpu")
    adapter.max_new_tokens = 5
    return adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """The tiny Idefics3 with a two-layer vision tower (the real structure)."""
    return _load(write_idefics3(tmp_path_factory.mktemp("idefics3")))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Its tower without layers: each decoder image token depends on its own cell's pixels only."""
    return _load(write_idefics3(tmp_path_factory.mktemp("idefics3_local"), vision_layers=0))


def grey(h: int = 64, w: int = 64, block: tuple[int, int] | None = None) -> Image.Image:
    arr = np.full((h, w, 3), 128, np.uint8)
    if block is not None:
        arr[block[0]:block[0] + 4, block[1]:block[1] + 4] = 255
    return Image.fromarray(arr)


def capture(adapter, batch, **kwargs):
    with torch.no_grad():
        return adapter.capture(batch, Capture(**kwargs))


def changed_cells(adapter, planted: list, base: list) -> list[dict[str, set]]:
    """Per example, grid kind -> the (row, col) of the decoder image tokens whose input embedding changes."""
    a, b = adapter.encode(planted, [QUESTION] * len(planted)), adapter.encode(base, [QUESTION] * len(base))
    ha, hb = capture(adapter, a).hidden["lm"][0], capture(adapter, b).hidden["lm"][0]
    out = []
    for row, lay in enumerate(a.streams["lm"]):
        diff = (ha[row] - hb[row]).abs().amax(-1).numpy()
        kinds = ("tiles", "global") if len(lay.images) == 2 else ("image",)
        found = {k: set() for k in kinds}
        for i in np.flatnonzero((diff > 1e-5) & (lay.role == ROLE_PATCH)):
            found[kinds[lay.image_of[i]]].add(tuple(int(v) for v in lay.cell[i]))
        out.append(found)
    return out


def test_loaded_on_sdpa_with_the_decoder_at_text_model(adapter):
    cfg = adapter.model.config
    assert cfg.text_config._attn_implementation == "sdpa" and cfg.vision_config._attn_implementation == "sdpa"
    assert adapter.language_model is adapter.model.model.text_model and len(adapter.language_model.layers) == 2
    assert list(adapter.block_specs()) == ["lm.generated"] and adapter.image_stream == "lm"
    assert "pixel-shuffled 2 x 2" in adapter.info()["vision_note"]


def test_planted_blocks_land_on_their_tile_cell_and_global_cell(local):
    """64 x 64 -> 2 x 2 tiles of 32 px (an 8 x 8 token grid of 8-px cells) and the whole image squashed to 32 px
    (4 x 4 cells of 8 px, 16 px of the input; NEAREST keeps input pixels 2i+1). A 4-px block at (44, 20) lies in
    tile cell (5, 2) and global cell (2, 1); one at (8, 52) in (1, 6) and (0, 3)."""
    found = changed_cells(local, [grey(block=(44, 20)), grey(block=(8, 52))], [grey(), grey()])
    assert found == [{"tiles": {(5, 2)}, "global": {(2, 1)}}, {"tiles": {(1, 6)}, "global": {(0, 3)}}]


def test_non_square_image_gives_one_row_of_two_tiles(local):
    """32 x 64 -> one row of two tiles (a 4 x 8 token grid) and the global image squashed to 32 x 32: a block at
    (20, 44) lies in tile cell (2, 5) and global cell (2, 2) (global x = 44..47 // 2 = 22..23)."""
    batch = local.encode([grey(32, 64)], [QUESTION])
    lay = batch.streams["lm"][0]
    assert [g.grid for g in lay.images] == [(4, 8), (4, 4)]
    assert lay.images[0].image.shape == (32, 64, 3) and lay.images[1].image.shape == (32, 32, 3)
    assert "<row_1_col_2>" in lay.tokens and "<row_2_col_1>" not in lay.tokens
    (found,) = changed_cells(local, [grey(32, 64, (20, 44))], [grey(32, 64)])
    assert found == {"tiles": {(2, 5)}, "global": {(2, 2)}}


def test_lanczos_resampling_keeps_the_block_on_its_cells(tmp_path):
    """With the real processor's LANCZOS the global image is blurred: the planted tile cell is still the only
    tile token that changes, and the global token that changes most is the block's cell."""
    adapter = _load(write_idefics3(tmp_path / "lanczos", vision_layers=0, resample=Image.LANCZOS))
    a, b = adapter.encode([grey(block=(44, 20))], [QUESTION]), adapter.encode([grey()], [QUESTION])
    diff = (capture(adapter, a).hidden["lm"][0, 0] - capture(adapter, b).hidden["lm"][0, 0]).abs().amax(-1).numpy()
    lay = a.streams["lm"][0]
    tiles = [tuple(lay.cell[i]) for i in np.flatnonzero((diff > 1e-5) & (lay.image_of == 0))]
    assert tiles == [(5, 2)]
    global_ = np.flatnonzero(lay.image_of == 1)
    global_ = global_[lay.role[global_] == ROLE_PATCH]
    assert tuple(lay.cell[global_[np.argmax(diff[global_])]]) == (2, 1)


def test_generation_trace_shapes_and_roles(adapter):
    trace = extract_trace(adapter, grey(), QUESTION, "x")
    lm, gen = trace.streams["lm"], trace.streams["generated"]
    prompt = adapter._process([grey()], [adapter.prompt_text(QUESTION)])
    P = prompt["input_ids"].shape[1]
    with torch.no_grad():
        ref = adapter.model.generate(**prompt, max_new_tokens=5, do_sample=False,
                                     suppress_tokens=adapter._placeholder_ids())[0, P:].tolist()
    eos = adapter.tokenizer.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert gen.n_tokens == len(ref) and (gen.role == ROLE_GENERATED).all()
    assert lm.n_tokens == P + len(ref) - 1 and (lm.role[P:] == ROLE_GENERATED).all()
    assert lm.tokens[0] == "<|im_start|>" and lm.tokens[1] == "User:" and lm.tokens[P - 1] == "Assistant:"
    assert lm.tokens[P:] == gen.tokens[:-1]
    assert [g.grid for g in lm.images] == [(8, 8), (4, 4)] and len(lm.index(ROLE_PATCH)) == 64 + 16
    markers = {lm.tokens[i] for i in lm.index(ROLE_SPECIAL)}
    assert {"<fake_token_around_image>", "<global-img>", "<row_2_col_2>", "\n"} <= markers
    assert set(trace.blocks) == {"lm.generated"}
    assert trace.blocks["lm.generated"].attentions.shape == (2, 4, len(ref), P + len(ref) - 1)
    assert trace.select("lm.generated").n_visible().tolist() == [P + t for t in range(len(ref))]
    assert trace.hiddens["lm"].shape == (3, P + len(ref) - 1, 32)
    np.testing.assert_array_equal(trace.hiddens["generated"], trace.hiddens["lm"][:, P - 1:])
    assert trace.predicted == adapter.tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_image_markers_are_never_generated(adapter):
    """A random decoder writes ``<row_i_col_j>`` markers unless they are suppressed (it did, before
    `Idefics3Adapter._placeholder_ids`); an answer holds none of the image's tokens."""
    tok = adapter.tokenizer
    markers = {tok.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>", "<global-img>")}
    markers |= {tok.convert_tokens_to_ids(f"<row_{i}_col_{j}>") for i in range(1, 7) for j in range(1, 7)}
    assert markers <= set(adapter._placeholder_ids())
    adapter.max_new_tokens = 12
    try:
        batch = adapter.encode([grey(), grey(32, 64), grey(block=(0, 0))], [QUESTION, "what", "is the cat red?"])
    finally:
        adapter.max_new_tokens = 5
    assert not markers & set(batch.inputs["answer_ids"].flatten().tolist())


def test_generated_rows_equal_eager_generation(adapter):
    """Rows recomputed from one sdpa pass equal eager ``generate(output_attentions=True)``: two prompts of
    different lengths and images of different shapes (left padding, padded frames) in one batch."""
    images, texts = [grey(), grey(32, 64, (4, 4))], [QUESTION, "what"]
    batch = adapter.encode(images, texts)
    assert batch.inputs["pixel_values"].shape[:2] == (2, 5)  # 2 x 2 tiles + global; 1 x 2 + global, one padded
    rows = capture(adapter, batch, hidden=False).stacked("lm.generated")  # [L, B, H, T, N]
    prompt = adapter._process(images, [adapter.prompt_text(t) for t in texts])
    eager = extract_eager_generation_attention(adapter.model, dict(prompt), max_new_tokens=adapter.max_new_tokens,
                                               suppress_tokens=adapter._placeholder_ids())
    assert adapter.model.config.text_config._attn_implementation == "sdpa", "eager ends with its block"
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        np.testing.assert_array_equal(eager.sequences[b, eager.prompt_len:eager.prompt_len + n],
                                      batch.inputs["answer_ids"][b, :n].numpy())
        np.testing.assert_allclose(rows[:, b, :, :n].numpy(), eager.weights[b, :, :, :n, :rows.shape[-1]], atol=1e-4)


def test_head_mask_and_image_token_mask(adapter):
    batch = adapter.encode([grey(block=(0, 4))], [QUESTION])
    base = capture(adapter, batch)
    keep = torch.ones(1, 2, 4)
    keep[0, 0, 1] = 0
    with adapter.head_mask("lm.generated", keep):
        masked = capture(adapter, batch)
    torch.testing.assert_close(masked.stacked("lm.generated")[0], base.stacked("lm.generated")[0])
    assert not torch.allclose(masked.stacked("lm.generated")[1], base.stacked("lm.generated")[1])
    lay = batch.streams["lm"][0]
    tiles = np.flatnonzero((lay.role == ROLE_PATCH) & (lay.image_of == 0))
    variants = adapter.mask_image_tokens(batch, [np.array([], np.int64), tiles])
    out = capture(adapter, variants, hidden=False)
    rows = out.stacked("lm.generated")  # [L, 2, H, T, N]
    torch.testing.assert_close(rows[:, 0], base.stacked("lm.generated")[:, 0])
    assert float(rows[:, 1][..., tiles].abs().max()) == 0 and float(rows[:, 0][..., tiles].min()) > 0
    scores = adapter.target_score(out.output, out.output.answers[0])[0]
    assert float((scores[1] - scores[0]).abs()) > 1e-6
    with pytest.raises(InputError, match="only image tokens"):
        adapter.mask_image_tokens(batch, [np.array([lay.tokens.index("<global-img>")])])  # a marker


def test_smolvlm_checkpoint_loads_with_a_processor_built_from_its_parts(tmp_path, adapter):
    """SmolVLM2's ``SmolVLMProcessor`` needs num2words and a torchvision video processor; without them the
    adapter's ``Idefics3Processor`` from the folder's parts expands the prompt into the very same tokens."""
    from transformers import Idefics3Processor

    from vlcore.models.idefics3 import smolvlm_processor_loads

    smol = _load(write_smolvlm(tmp_path / "smolvlm"))
    assert type(smol.model).__name__ == "SmolVLMForConditionalGeneration"
    if not smolvlm_processor_loads():
        assert type(smol.processor) is Idefics3Processor
    assert smol.language_model is smol.model.model.text_model
    images, texts = [grey(), grey(32, 64)], [QUESTION, "what"]
    ours = smol._process(images, [smol.prompt_text(t) for t in texts])
    ref = adapter._process(images, [adapter.prompt_text(t) for t in texts])
    assert smol.prompt_text(QUESTION) == adapter.prompt_text(QUESTION)
    assert torch.equal(ours["input_ids"], ref["input_ids"]) and torch.equal(ours["pixel_values"], ref["pixel_values"])
    trace = extract_trace(smol, grey(), QUESTION, "s")
    assert [g.grid for g in trace.streams["lm"].images] == [(8, 8), (4, 4)] and trace.blocks["lm.generated"]


def test_bad_inputs_and_files_are_one_line_errors(tmp_path, adapter):
    with pytest.raises(InputError, match="empty"):
        adapter.encode([grey()], [" "])
    with pytest.raises(InputError, match="PIL"):
        adapter.encode([np.zeros((4, 4, 3))], [QUESTION])
    with pytest.raises(InputError, match="2 images for 1 texts"):
        adapter.encode([grey(), grey()], [QUESTION])
    folder = write_smolvlm(tmp_path / "broken")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="damaged processor or chat template") as err:
        load_adapter(str(folder), device="cpu")
    assert "\n" not in str(err.value)
    (folder / "processor_config.json").write_text("{not json")  # read by the image processor first
    with pytest.raises(ModelLoadError, match="processor") as err:
        load_adapter(str(folder), device="cpu")
    assert "\n" not in str(err.value)
