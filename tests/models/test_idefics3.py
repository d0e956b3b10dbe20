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
def local_tower(tmp_path_factory):
    """One tower layer whose attention output projection is zero: real ``vision.self`` weights, but each tower
    token (and each decoder image token) depends on its own patch's pixels only."""
    return _load(write_idefics3(tmp_path_factory.mktemp("idefics3_local_tower"), vision_layers=1, local_tower=True))


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


def test_loaded_with_the_tower_on_eager_and_the_global_image_block(adapter):
    """A tower of 64 patches a frame (at most `MAX_VISION_TOKENS`) loads on eager and offers ``vision.self``."""
    cfg = adapter.model.config
    assert cfg.text_config._attn_implementation == "sdpa" and cfg.vision_config._attn_implementation == "eager"
    assert adapter.language_model is adapter.model.model.text_model and len(adapter.language_model.layers) == 2
    assert list(adapter.block_specs()) == ["lm.generated", "vision.self"] and adapter.image_stream == "lm"
    spec = adapter.vision_spec()
    assert (spec.query, spec.key, spec.n_layers, spec.n_heads, spec.causal) == ("vision", "vision", 2, 2, False)
    assert "global image" in adapter.info()["vision_note"] and "pixel-shuffled 2 x 2" in adapter.vision_note()


def test_a_tower_of_1024_patches_keeps_no_vision_stream(tmp_path):
    """SmolVLM-256M's tower reads 1,024 patches a frame (512 px / 16 px): no ``[L, H, 1024, 1024]`` is built. A
    tiny tower with the same count (32 px / 1 px) loads on sdpa, has no ``vision`` stream or block, and says why."""
    big = _load(write_idefics3(tmp_path / "big", vision_layers=1, patch_px=1))
    assert big.n_vision_tokens == 1024 and big.vision_spec() is None
    assert big.model.config.vision_config._attn_implementation == "sdpa"
    assert list(big.block_specs()) == ["lm.generated"]
    assert "1,024 patches (32 x 32)" in big.vision_note() and "not kept" in big.vision_note()
    big.max_new_tokens = 2
    trace = extract_trace(big, grey(), QUESTION, "b")
    assert set(trace.blocks) == {"lm.generated"} and "vision" not in trace.streams
    assert trace.meta["vision_note"] == big.vision_note()


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
    assert set(trace.blocks) == {"lm.generated", "vision.self"}
    vision = trace.streams["vision"]
    assert vision.n_tokens == 64 and (vision.role == ROLE_PATCH).all() and vision.images[0].grid == (8, 8)
    np.testing.assert_array_equal(vision.images[0].image, lm.images[1].image)  # the global image
    assert trace.blocks["vision.self"].attentions.shape == (2, 2, 64, 64)
    assert trace.hiddens["vision"].shape == (3, 64, 16)
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


def tower_alone(adapter, frame: torch.Tensor):
    """The vision tower run by itself on one frame ``[3, S, S]``: per layer ``[H, N, N]`` and ``[L + 1, N, D]``."""
    with torch.no_grad():
        out = adapter.vision_tower(pixel_values=frame[None], output_attentions=True, output_hidden_states=True)
    return torch.stack([a[0] for a in out.attentions]), torch.stack([h[0] for h in out.hidden_states])


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_the_kept_block_is_the_tower_alone_on_each_examples_global_frame(adapter):
    """A batch of a wide image (1 x 2 tiles + global: 3 frames, then 2 padding frames the model drops) and a
    square one (2 x 2 tiles + global: 5 frames): each example keeps its own global frame, the last of its real
    frames (tower batch indices 2 and 3 + 4 = 7), equal to the tower run alone on that frame and unlike its run on
    any tile."""
    batch = adapter.encode([noise(32, 64, 1), noise(64, 64, 0)], ["what", QUESTION])
    pixels = batch.inputs["pixel_values"]
    assert pixels.shape[:2] == (2, 5) and adapter._global_frames(batch) == ([3, 5], [2, 7])
    got = capture(adapter, batch)
    for b, n_frames in enumerate((3, 5)):
        kept, hidden = got.stacked("vision.self")[:, b], got.hidden["vision"][:, b]
        alone = [tower_alone(adapter, pixels[b, f]) for f in range(n_frames)]
        torch.testing.assert_close(kept, alone[-1][0], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(hidden, alone[-1][1], rtol=1e-3, atol=1e-5)
        for tile_attention, tile_hidden in alone[:-1]:  # each tile's run differs far beyond that tolerance
            assert float((kept - tile_attention).abs().max()) > 2e-4 and float((hidden - tile_hidden).abs().max()) > 0.1
        lm, vision = batch.streams["lm"][b], batch.streams["vision"][b]
        np.testing.assert_array_equal(vision.images[0].image, lm.images[1].image)


def test_an_image_that_is_not_split_keeps_its_only_frame(adapter):
    """With ``do_image_splitting`` off the image is one frame (one ``image`` grid of 4 x 4 tokens): it is kept."""
    image_processor = adapter.processor.image_processor
    image_processor.do_image_splitting = False
    try:
        batch = adapter.encode([grey(32, 64, (4, 4))], [QUESTION])
    finally:
        image_processor.do_image_splitting = True
    lm = batch.streams["lm"][0]
    assert [g.grid for g in lm.images] == [(4, 4)] and batch.inputs["pixel_values"].shape[1] == 1
    got = capture(adapter, batch)
    attention, hidden = tower_alone(adapter, batch.inputs["pixel_values"][0, 0])
    torch.testing.assert_close(got.stacked("vision.self")[:, 0], attention, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got.hidden["vision"][:, 0], hidden, rtol=1e-3, atol=1e-5)
    vision = batch.streams["vision"][0]
    assert adapter._lm_positions_of(batch, vision.tokens.index("<patch 7,7>"), 0) == \
        [int(np.flatnonzero((lm.role == ROLE_PATCH) & (lm.cell == (3, 3)).all(1))[0])]


def test_a_planted_patch_on_the_global_image_changes_its_vision_token_and_global_token(local_tower):
    """A 4-px block at (44, 20) of the 64-px image lies, on the 32-px global image (NEAREST keeps input pixels
    2i + 1), at rows 22-23, cols 10-11: tower patch (5, 2) of 4-px patches, inside the 2 x 2 block of patches
    (4..5, 2..3) that the pixel shuffle makes decoder global token (2, 1). Only that vision token changes (the
    tower's attention adds nothing here), and `_lm_positions_of` maps all four patches of that block, and no
    other, to the one global token whose input embedding changes."""
    adapter = local_tower
    planted, base = (adapter.encode([im], [QUESTION]) for im in (grey(block=(44, 20)), grey()))
    a, b = capture(adapter, planted), capture(adapter, base)
    vision, lm = planted.streams["vision"][0], planted.streams["lm"][0]
    for layer in range(a.hidden["vision"].shape[0]):
        diff = (a.hidden["vision"][layer, 0] - b.hidden["vision"][layer, 0]).abs().amax(-1).numpy()
        assert [tuple(vision.cell[i]) for i in np.flatnonzero(diff > 1e-5)] == [(5, 2)], layer
    diff = (a.hidden["lm"][0, 0] - b.hidden["lm"][0, 0]).abs().amax(-1).numpy()
    changed_global = [int(i) for i in np.flatnonzero((diff > 1e-5) & (lm.role == ROLE_PATCH) & (lm.image_of == 1))]
    assert len(changed_global) == 1 and tuple(lm.cell[changed_global[0]]) == (2, 1)
    mapped = {tuple(vision.cell[i]): adapter._lm_positions_of(planted, i, 0) for i in range(vision.n_tokens)}
    assert all(len(p) == 1 and lm.image_of[p[0]] == 1 for p in mapped.values())
    assert sorted(c for c, p in mapped.items() if p == changed_global) == [(4, 2), (4, 3), (5, 2), (5, 3)]


def test_gradients_reach_the_kept_tower_weights(adapter):
    """With grad the kept global-frame weights are tensors of the forward graph: the answer's gradient reaches
    them (it did not when the weights were only read off the layer), equal to a retain_grad reference."""
    batch = adapter.encode([grey(block=(0, 4))], [QUESTION])
    grads = adapter.attention_gradients(batch, None, blocks=("vision.self",))
    with torch.enable_grad():
        captured = adapter.capture(batch, Capture(blocks=("vision.self",), hidden=False))
        layers = captured.layers("vision.self")
        for att in layers:
            att.retain_grad()
        adapter.target_score(captured.output, grads.label)[0][0].backward()
    plain = capture(adapter, batch, hidden=False).stacked("vision.self")[:, 0]
    for layer, (w, g, att) in enumerate(zip(grads.attentions["vision.self"], grads.gradients["vision.self"], layers)):
        assert w.shape == (2, 64, 64) and float(g.abs().max()) > 0, layer
        torch.testing.assert_close(w, plain[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, att.grad[0], rtol=1e-4, atol=1e-7)


def test_the_composed_rollout_spreads_the_global_tokens_share_over_the_tower(adapter):
    """``composed``: each decoder global token's rollout value, split evenly over its 2 x 2 tower patches, goes
    through the global image's tower rollout and back to the tokens covering the patches; the tile tokens and
    the text keep theirs, so the image's total is unchanged (checked against the same composition written with
    the grid's reshape)."""
    batch = adapter.encode([grey(block=(44, 20))], [QUESTION])
    with torch.no_grad():
        captured = adapter.capture(batch, Capture(rollout=True))
    meta = adapter.trace_meta(captured, batch, 0)["rollout"]
    lm_rows, composed = np.array(meta["lm"]), np.array(meta["composed"])
    lay = batch.streams["lm"][0]
    keep = np.flatnonzero(lay.valid)
    role, image_of, cell = lay.role[keep], lay.image_of[keep], lay.cell[keep]
    image = role == ROLE_PATCH
    glob = np.flatnonzero(image & (image_of == 1))
    np.testing.assert_allclose(composed[:, image].sum(1), lm_rows[:, image].sum(1), rtol=1e-5)
    np.testing.assert_array_equal(composed[:, ~(image & (image_of == 1))], lm_rows[:, ~(image & (image_of == 1))])
    rollout = np.eye(64)
    for a in captured.stacked("vision.self")[:, 0].double().numpy():
        a_hat = a.mean(0) + np.eye(64)
        rollout = (a_hat / a_hat.sum(1, keepdims=True)) @ rollout
    for t in range(len(lm_rows)):
        tokens = np.zeros((4, 4))
        tokens[cell[glob, 0], cell[glob, 1]] = lm_rows[t, glob]
        patches = np.kron(tokens, np.ones((2, 2))) / 4  # [8, 8]: each token's value split over its 2 x 2 patches
        spread = (patches.reshape(-1) @ rollout).reshape(4, 2, 4, 2).sum((1, 3))  # back to the tokens
        np.testing.assert_allclose(composed[t, glob], spread[cell[glob, 0], cell[glob, 1]], rtol=1e-4, atol=1e-7)
    assert not np.allclose(composed[:, glob], lm_rows[:, glob])


def test_a_vision_head_mask_acts_on_each_examples_own_frames(adapter):
    """``keep [B, L, H]`` on ``vision.self``: row ``b`` masks every frame of example ``b`` (5 and 3 real frames
    here); masking a head of layer 0 of the second example changes its layer-1 weights only."""
    batch = adapter.encode([grey(block=(44, 20)), grey(32, 64, (4, 4))], [QUESTION, "what"])
    base = capture(adapter, batch).stacked("vision.self")
    keep = torch.ones(2, 2, 2)
    keep[1, 0, 0] = 0
    with adapter.head_mask("vision.self", keep):
        masked = capture(adapter, batch).stacked("vision.self")
    torch.testing.assert_close(masked[:, 0], base[:, 0])
    torch.testing.assert_close(masked[0], base[0])
    assert not torch.allclose(masked[1, 1], base[1, 1])


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
