"""The LLaVA-NeXT and LLaVA-OneVision adapters on tiny checkpoints (`tests/models/tiny_llava_next.py`): planted
pixels on the base grid and on the tiles, newline tokens, the base crop as the vision stream, the generation trace,
rows recomputed from sdpa against eager, gradients through the tower's base crop, per-example tower head masks,
image-token removal, the composed rollout, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_llava_next import write_llava_next, write_llava_onevision
from vlcore.errors import InputError, ModelLoadError
from vlcore.models.attention_capture import extract_eager_generation_attention
from vlcore.models.base import Capture
from vlcore.models.image_tokens import NEWLINE_TOKEN
from vlcore.models.registry import load_adapter
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_GENERATED, ROLE_IMAGE_SUMMARY, ROLE_PATCH, ROLE_SPECIAL

QUESTION = "what is the color of the cat?"
WRITERS = {"llava_next": write_llava_next, "llava_onevision": write_llava_onevision}
_LOADED: dict = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return {name: write(tmp_path_factory.mktemp(name)) for name, write in WRITERS.items()}


def _adapter(folders, name):
    if name not in _LOADED:
        _LOADED[name] = load_adapter(str(folders[name]), device="cpu")
        _LOADED[name].max_new_tokens = 4
    return _LOADED[name]


@pytest.fixture(params=sorted(WRITERS), scope="module")
def adapter(request, folders):
    return _adapter(folders, request.param)


@pytest.fixture(scope="module")
def next_adapter(folders):
    return _adapter(folders, "llava_next")


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def planted(image: np.ndarray, *points: tuple[int, int]) -> Image.Image:
    out = image.copy()
    for y, x in points:
        out[y, x] = 255
    return Image.fromarray(out)


def capture(adapter, batch, **kwargs):
    with torch.no_grad():
        return adapter.capture(batch, Capture(**kwargs))


def test_loaded_by_the_registry_on_sdpa_with_an_eager_tower(adapter):
    cfg = adapter.model.config
    assert cfg.text_config._attn_implementation == "sdpa" and cfg.vision_config._attn_implementation == "eager"
    assert adapter.family == "llava_next" and adapter.image_stream == "lm"
    if adapter.title == "LLaVA-OneVision":  # no torchvision here: the processor without its video part
        assert type(adapter.processor).__name__ == "LlavaOnevisionProcessorImageOnly"
    assert "image_grid_pinpoints" in adapter.fingerprint() and adapter.vision_note()


# (height, width, points) -> per point the (row, col) on the base grid and on the tiles grid. NeXT, 40 x 72:
# base squashed to 32 x 32 (y x 0.8, x x 0.444); tiles: best resolution 64 x 64 (2 x 2 tiles), the image
# resized to 36 x 64 (x 0.889) and padded 14 px above; the model keeps feature rows 2..5, canvas pixels 16..48.
# (24, 49): base (19.6, 22.0) -> (2, 2); tiles (21.8 - 2, 44.0) -> (2, 5), the bottom-right tile.
# (6, 12): base (5.2, 5.6) -> (0, 0); tiles (5.8 - 2, 11.1) -> (0, 1), the top-left tile.
# OneVision, 72 x 40 (the transpose): padded 14 px on the left, feature columns 2..5 kept.
# (49, 16): base (21.8, 13.2) -> (2, 1); tiles (44.0, 14.7 - 2) -> (5, 1), the bottom-left tile.
# (12, 34): base (5.6, 27.6) -> (0, 3); tiles (11.1, 30.7 - 2) -> (1, 3), the top-right tile.
PLANTS = {
    "LLaVA-NeXT": (40, 72, [(24, 49), (6, 12)], {(0, (2, 2)), (1, (2, 5)), (0, (0, 0)), (1, (0, 1))}, (4, 8)),
    "LLaVA-OneVision": (72, 40, [(49, 16), (12, 34)], {(0, (2, 1)), (1, (5, 1)), (0, (0, 3)), (1, (1, 3))}, (8, 4)),
}


def test_planted_pixels_land_on_their_base_and_tile_cells(adapter):
    """Two bright pixels in a non-square image change exactly the decoder's input embeddings of the base-grid and
    tile-grid cells that hold them (known answers above), with the tower's attention heads masked so that each
    token's feature depends on its own patch only; the newline tokens (one per tile row, special) do not change."""
    h, w, points, expected, tile_grid = PLANTS[adapter.title]
    image = random_image(h, w, 4)
    spec = adapter.block_specs()["vision.self"]
    off = torch.zeros(1, spec.n_layers, spec.n_heads)
    hidden = []
    for im in (Image.fromarray(image), planted(image, *points)):
        batch = adapter.encode([im], [QUESTION])
        with adapter.head_mask("vision.self", off):
            hidden.append(capture(adapter, batch).hidden["lm"][0, 0, :int(batch.inputs["prompt_len"])])
    lay = batch.streams["lm"][0]
    assert [g.grid for g in lay.images] == [(4, 4), tile_grid]
    diff = (hidden[0] - hidden[1]).abs().amax(-1).numpy()
    changed = np.flatnonzero(diff > 1e-6 * diff.max())
    assert {(int(lay.image_of[n]), tuple(int(v) for v in lay.cell[n])) for n in changed} == expected
    assert (lay.role[changed] == ROLE_PATCH).all()
    newlines = np.flatnonzero(lay.role == ROLE_SPECIAL)
    newlines = newlines[lay.image_of[newlines] == 1]
    assert len(newlines) == tile_grid[0] and all(lay.tokens[n] == NEWLINE_TOKEN for n in newlines)
    assert [tuple(lay.cell[n - 1]) for n in newlines] == [(r, tile_grid[1] - 1) for r in range(tile_grid[0])]


def test_without_the_tower_mask_a_pixel_spreads_over_its_crops(next_adapter):
    """The known answers above need the tower's heads masked: without, one pixel reaches every cell of the crops
    that hold it (the decoder reads the tower's layer -2, after one attention layer), and no other crop: the
    whole base grid, and on the tiles grid the bottom-right tile's cells (rows 2..3 of the un-padded grid, columns
    4..7)."""
    image = random_image(40, 72, 4)
    hidden = [capture(next_adapter, next_adapter.encode([im], [QUESTION])).hidden["lm"][0, 0]
              for im in (Image.fromarray(image), planted(image, (24, 49)))]
    lay = next_adapter.encode([Image.fromarray(image)], [QUESTION]).streams["lm"][0]
    diff = (hidden[0] - hidden[1])[: lay.n_tokens].abs().amax(-1).numpy()
    changed = {(int(lay.image_of[n]), tuple(int(v) for v in lay.cell[n])) for n in np.flatnonzero(diff > 0)}
    assert changed == {(0, (r, c)) for r in range(4) for c in range(4)} | {(1, (r, c)) for r in (2, 3)
                                                                            for c in range(4, 8)}


def test_the_vision_stream_is_each_examples_base_crop(adapter):
    """A batch of two images with different tile counts (5 and 3 crops): the ``vision`` stream's hidden states and
    ``vision.self`` are the tower's own on each example's base crop (crop 0), run alone on eager."""
    images = [Image.fromarray(random_image(40, 72, 1)), Image.fromarray(random_image(32, 32, 2))]
    batch = adapter.encode(images, [QUESTION, "what"])
    crops = adapter.crops_per_image(batch.inputs)
    assert crops == [5, 3]
    got = capture(adapter, batch)
    base = batch.inputs["pixel_values"][:, 0]
    with torch.no_grad():
        ref = adapter.vision_tower(base, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(got.hidden["vision"], torch.stack(ref.hidden_states), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.stacked("vision.self"), torch.stack(ref.attentions), rtol=1e-5, atol=1e-6)
    vision = batch.streams["vision"][0]
    n_cls = 1 if adapter.title == "LLaVA-NeXT" else 0  # CLIP has a CLS, SigLIP none
    assert vision.n_tokens == 16 + n_cls and len(vision.index(ROLE_IMAGE_SUMMARY)) == n_cls
    assert vision.images[0] is batch.streams["lm"][0].images[0]  # the base grid


def test_generation_trace_shapes_and_roles(adapter):
    image = Image.fromarray(random_image(40, 72, 3))
    trace = extract_trace(adapter, image, QUESTION, "x")
    lm, gen = trace.streams["lm"], trace.streams["generated"]
    prompt = adapter.processor(images=[image], text=[adapter.prompt_text(QUESTION)], return_tensors="pt")
    P = prompt["input_ids"].shape[1]
    with torch.no_grad():
        ref = adapter.model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=1,
                                     suppress_tokens=adapter._placeholder_ids())[0, P:].tolist()
    eos = adapter.tokenizer.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    n = len(ref)
    assert gen.n_tokens == n and (gen.role == ROLE_GENERATED).all()
    assert lm.n_tokens == P + n - 1 and (lm.role[P:] == ROLE_GENERATED).all()
    tiles = lm.images[1].grid
    assert len(lm.index(ROLE_PATCH)) == 16 + tiles[0] * tiles[1]
    assert sum(t == NEWLINE_TOKEN for t in lm.tokens) == tiles[0]
    n_vision = 17 if adapter.title == "LLaVA-NeXT" else 16
    assert trace.blocks["lm.generated"].attentions.shape == (2, 4, n, P + n - 1)
    assert trace.blocks["vision.self"].attentions.shape == (2, 2, n_vision, n_vision)
    assert trace.hiddens["vision"].shape == (3, n_vision, 16)
    np.testing.assert_array_equal(trace.hiddens["generated"], trace.hiddens["lm"][:, P - 1:])
    assert trace.predicted == adapter.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert trace.meta["vision_note"] == adapter.vision_note()


def test_generated_rows_equal_eager_generation(adapter):
    """Rows recomputed from one sdpa pass equal eager ``generate(output_attentions=True)`` to 1e-4: two prompts of
    different lengths and images with different tile counts (left padding) in one batch."""
    images = [Image.fromarray(random_image(40, 72, 5)), Image.fromarray(random_image(30, 90, 6))]
    texts = [QUESTION, "what"]
    batch = adapter.encode(images, texts)
    rows = capture(adapter, batch, hidden=False).stacked("lm.generated")  # [L, B, H, T, N]
    prompt = adapter.processor(images=images, text=[adapter.prompt_text(t) for t in texts], padding=True,
                               padding_side="left", return_tensors="pt")
    eager = extract_eager_generation_attention(adapter.model, dict(prompt), max_new_tokens=adapter.max_new_tokens,
                                               suppress_tokens=adapter._placeholder_ids())
    assert adapter.model.config.text_config._attn_implementation == "sdpa", "eager ends with its block"
    for b, n in enumerate(batch.inputs["answer_len"].tolist()):
        np.testing.assert_allclose(rows[:, b, :, :n].numpy(), eager.weights[b, :, :, :n, :rows.shape[-1]], atol=1e-4)
        np.testing.assert_array_equal(eager.sequences[b, eager.prompt_len:eager.prompt_len + n],
                                      batch.inputs["answer_ids"][b, :n].numpy())


def test_gradients_reach_the_base_crops_attention(adapter):
    """With grad, the kept base-crop weights are tensors of the tower's forward graph: the gradient pass scores
    what the plain pass scores, its weights equal the plain ones, and the gradients equal a retain_grad reference
    and are not zero."""
    batch = adapter.encode([Image.fromarray(random_image(40, 72, 7))], [QUESTION])
    plain = capture(adapter, batch, hidden=False)
    grads = adapter.attention_gradients(batch, None, blocks=("vision.self",))
    assert abs(grads.score - float(adapter.target_score(plain.output)[0][0])) < 1e-5
    torch.testing.assert_close(torch.stack(grads.attentions["vision.self"]), plain.stacked("vision.self")[:, 0])
    with torch.enable_grad():
        captured = adapter.capture(batch, Capture(blocks=("vision.self",), hidden=False))
        layers = captured.layers("vision.self")
        for att in layers:
            att.retain_grad()
        adapter.target_score(captured.output)[0][0].backward()
    feature_layer = adapter.config.vision_feature_layer % (len(layers) + 1)  # hidden_states index the decoder reads
    for layer, (g, att) in enumerate(zip(grads.gradients["vision.self"], layers, strict=True)):
        if layer < feature_layer:
            torch.testing.assert_close(g, att.grad[0].float(), rtol=1e-4, atol=1e-9)
            assert float(g.abs().max()) > 0
        else:  # a layer after the one the decoder reads (NeXT reads layer -2): no gradient reaches it
            assert att.grad is None and float(g.abs().max()) == 0


def test_another_answer_is_scored_with_each_rows_own_crops(next_adapter):
    """Scoring an answer that was not generated, in a batch of two images with 5 and 3 crops, equals scoring it
    for each example alone (each row's teacher-forced pass takes its own crops and image size)."""
    a = next_adapter
    images = [Image.fromarray(random_image(40, 72, 1)), Image.fromarray(random_image(32, 32, 2))]
    pair = a.target_score(capture(a, a.encode(images, [QUESTION, "what"]), hidden=False).output, "red blue")[0]
    alone = [a.target_score(capture(a, a.encode([im], [t]), hidden=False).output, "red blue")[0][0]
             for im, t in zip(images, [QUESTION, "what"])]
    torch.testing.assert_close(pair, torch.stack(alone), rtol=1e-3, atol=1e-5)
    assert abs(float(alone[0] - alone[1])) > 1e-4  # the two rows really differ


def test_a_tower_head_mask_acts_on_every_crop_of_its_own_example(next_adapter):
    """``keep`` row ``b`` masks the tower heads of example ``b``'s crops (5 and 3 crops here): example 0 with every
    head off changes, example 1 with every head on equals its unmasked pass."""
    a = next_adapter
    images = [Image.fromarray(random_image(40, 72, 1)), Image.fromarray(random_image(32, 32, 2))]
    batch = a.encode(images, [QUESTION, QUESTION])
    base = capture(a, batch)
    keep = torch.ones(2, 2, 2)
    keep[0] = 0
    with a.head_mask("vision.self", keep):
        masked = capture(a, batch)
    P = int(batch.inputs["prompt_len"])
    torch.testing.assert_close(masked.hidden["vision"][:, 1], base.hidden["vision"][:, 1])
    torch.testing.assert_close(masked.hidden["lm"][:, 1, :P], base.hidden["lm"][:, 1, :P])
    assert not torch.allclose(masked.hidden["vision"][2, 0], base.hidden["vision"][2, 0])
    tiles = np.flatnonzero(batch.streams["lm"][0].image_of == 1)  # example 0's tile tokens: from crops 1..4
    assert not torch.allclose(masked.hidden["lm"][0, 0, tiles], base.hidden["lm"][0, 0, tiles])
    with pytest.raises(ValueError, match="keep"), a.head_mask("vision.self", torch.ones(1, 3, 2)):
        pass


def test_removing_base_or_tile_tokens(adapter):
    """Every image token can be removed (base grid and tiles); the newline tokens are not image tokens."""
    batch = adapter.encode([Image.fromarray(random_image(40, 72, 8))], [QUESTION])
    lay = batch.streams["lm"][0]
    base_cells = np.flatnonzero((lay.role == ROLE_PATCH) & (lay.image_of == 0))
    tiles = np.flatnonzero((lay.role == ROLE_PATCH) & (lay.image_of == 1))
    score, _, label = adapter.target_score(capture(adapter, batch, hidden=False).output)
    variants = adapter.mask_image_tokens(batch, [np.array([], np.int64), tiles, np.concatenate([base_cells, tiles])])
    out = capture(adapter, variants, hidden=False)
    scores = adapter.target_score(out.output, label)[0]
    torch.testing.assert_close(scores[0], score[0], rtol=1e-4, atol=1e-5)
    assert abs(float(scores[1] - scores[0])) > 1e-6
    rows = out.stacked("lm.generated")
    assert float(rows[:, 2][..., np.concatenate([base_cells, tiles])].abs().max()) == 0
    newline = np.flatnonzero(np.asarray(lay.tokens, dtype=object) == NEWLINE_TOKEN)[:1]
    with pytest.raises(InputError, match="only image tokens"):
        adapter.mask_image_tokens(batch, [newline])


def test_composed_rollout_moves_base_tokens_only(next_adapter):
    """The decoder's rollout composed with the tower's: the base-grid tokens' share is spread over them by the
    base crop's rollout (its total unchanged); the tiles' tokens, from other tower sequences, keep their values."""
    trace = extract_trace(next_adapter, Image.fromarray(random_image(40, 72, 9)), QUESTION, "x")
    roll = trace.meta["rollout"]
    lm, composed = np.asarray(roll["lm"]), np.asarray(roll["composed"])
    lay = trace.streams["lm"]
    base = np.flatnonzero((lay.role == ROLE_PATCH) & (lay.image_of == 0))
    rest = np.setdiff1d(np.arange(lay.n_tokens), base)
    np.testing.assert_allclose(composed[:, rest], lm[:, rest])
    np.testing.assert_allclose(composed[:, base].sum(1), lm[:, base].sum(1), rtol=1e-5)
    assert not np.allclose(composed[:, base], lm[:, base])


def test_onevision_processor_of_a_hub_id_is_built_from_its_snapshot(folders, monkeypatch):
    """Without torchvision a hub id's OneVision processor is built from the processor files of its snapshot."""
    import huggingface_hub

    from vlcore.models.llava_next import _OnevisionProcessor

    asked = {}

    def snapshot(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(folders["llava_onevision"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    processor = _OnevisionProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", revision="main",
                                                    local_files_only=True)
    assert asked["repo_id"] == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" and asked["local_files_only"]
    assert "*.json" in asked["allow_patterns"] and processor.num_image_tokens == 16


def test_bad_inputs_are_one_line_errors(next_adapter, folders, tmp_path):
    with pytest.raises(InputError, match="empty"):
        next_adapter.encode([Image.new("RGB", (32, 32))], [" "])
    with pytest.raises(InputError, match="PIL"):
        next_adapter.encode([np.zeros((4, 4, 3))], [QUESTION])
    with pytest.raises(InputError, match="one example"):
        next_adapter.attention_gradients(next_adapter.encode([Image.new("RGB", (32, 32))] * 2, [QUESTION] * 2))
    broken = tmp_path / "no_processor"
    broken.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (broken / name).write_bytes((folders["llava_onevision"] / name).read_bytes())
    with pytest.raises(ModelLoadError) as err:
        load_adapter(str(broken), device="cpu")
    assert "\n" not in str(err.value) and "processor" in str(err.value)
