"""The adapter contract (`vlcore/models/base.py`), checked on every family's tiny checkpoint.

Each family's ``tests/models/tiny_<family>.py`` lists ``TINY_CHECKPOINTS`` (name -> a function writing a seeded
random-weight checkpoint folder); every one is loaded through `load_adapter(folder)`, as a user's folder would be,
and must pass every test here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlcore.errors import InputError
from vlcore.models.base import Capture
from vlcore.models.registry import load_adapter
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_PATCH

TEXT = "what is the color of the cat?"


def _checkpoints() -> dict:
    found = {}
    for path in sorted(Path(__file__).parent.glob("tiny_*.py")):
        module = importlib.import_module(f"tests.models.{path.stem}")
        found.update(getattr(module, "TINY_CHECKPOINTS", {}))
    return found


CHECKPOINTS = _checkpoints()
_LOADED: dict = {}


@pytest.fixture(params=sorted(CHECKPOINTS), scope="module")
def adapter(request, tmp_path_factory):
    name = request.param
    if name not in _LOADED:
        folder = CHECKPOINTS[name](tmp_path_factory.mktemp(name))
        _LOADED[name] = load_adapter(str(folder), device="cpu")
    return _LOADED[name]


def seen_size(adapter) -> tuple[int, int]:
    """(height, width) of the image as the adapter's processor shows it to the model, for a square input."""
    batch = adapter.encode([Image.new("RGB", (64, 64), (128, 128, 128))], [TEXT])
    image = batch.streams[adapter.image_stream][0].images[0].image
    return image.shape[0], image.shape[1]


def images_for(adapter, cell: tuple[int, int] | None = None) -> Image.Image:
    """A grey image at the size the model sees (so the processor does not resample it), with one grid cell
    painted red when ``cell`` is given."""
    h, w = seen_size(adapter)
    arr = np.full((h, w, 3), 128, np.uint8)
    if cell is not None:
        probe = adapter.encode([Image.fromarray(arr)], [TEXT]).streams[adapter.image_stream][0].images[0]
        x0, y0, x1, y1 = probe.boxes[cell]
        arr[y0:y1, x0:x1] = (255, 0, 0)
    return Image.fromarray(arr)


def test_two_extractions_are_identical(adapter):
    image = images_for(adapter, (0, 1))
    a, b = (extract_trace(adapter, image, TEXT, "x") for _ in range(2))
    assert a.prediction == b.prediction and set(a.blocks) == set(adapter.block_specs())
    for name in a.blocks:
        assert np.array_equal(a.blocks[name].attentions, b.blocks[name].attentions), name
    for name in a.streams:
        assert a.streams[name].tokens == b.streams[name].tokens
        assert np.array_equal(a.hiddens[name], b.hiddens[name]), name


def test_layouts_blocks_and_hidden_states_agree(adapter):
    trace = extract_trace(adapter, images_for(adapter), TEXT, "x")
    specs = adapter.block_specs()
    for name, block in trace.blocks.items():
        q, k = trace.streams[block.query], trace.streams[block.key]
        att = block.attentions.astype(np.float32)
        assert att.shape == (specs[name].n_layers, specs[name].n_heads, q.n_tokens, k.n_tokens), name
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-2, err_msg=name)
        if specs[name].causal:  # the queries are the last Q of the K positions (Q < K: generated tokens' rows)
            offset = k.n_tokens - q.n_tokens
            assert np.allclose(np.triu(att, 1 + offset), 0), name
            assert trace.select(name).n_visible().tolist() == list(range(1 + offset, k.n_tokens + 1))
    for name, layout in trace.streams.items():
        assert len(layout.tokens) == len(layout.role) == len(layout.cell) == len(layout.image_of)
        assert (layout.role != 5).all(), "padding is trimmed from a trace"
        hidden = trace.hiddens[name]
        assert hidden.ndim == 3 and hidden.shape[1] == layout.n_tokens
        for i, grid in enumerate(layout.images):
            idx, rc = layout.patch_positions(i)
            rows, cols = grid.grid
            assert len(idx) == rows * cols and len({tuple(x) for x in rc.tolist()}) == rows * cols
            h, w = grid.image.shape[:2]
            assert (grid.boxes[..., :2] >= 0).all() and (grid.boxes[..., 2] <= w).all() and (grid.boxes[..., 3] <= h).all()
    assert trace.streams[adapter.image_stream].images, "the image stream holds the image"


def test_a_planted_patch_is_found_at_its_row_and_col(adapter):
    grey = extract_trace(adapter, images_for(adapter), TEXT, "g")
    layout = grey.streams[adapter.image_stream]
    rows, cols = layout.images[0].grid
    cell = (rows - 1, cols // 2)
    planted = extract_trace(adapter, images_for(adapter, cell), TEXT, "p")
    stream = adapter.image_stream
    diff = np.abs(planted.hiddens[stream][0].astype(np.float32) - grey.hiddens[stream][0].astype(np.float32)).max(-1)
    # on the planted grid only: another grid may show the same pixels (Idefics3's global image beside its tiles)
    changed = [i for i in np.flatnonzero(diff > 1e-3) if layout.role[i] == ROLE_PATCH and layout.image_of[i] == 0]
    assert [tuple(layout.cell[i]) for i in changed] == [cell]


def _capture(adapter, batch, **kwargs):
    with torch.no_grad():
        return adapter.capture(batch, Capture(**kwargs))


def test_masking_one_head_changes_only_what_follows_it(adapter):
    batch = adapter.encode([images_for(adapter, (0, 0))], [TEXT])
    block = adapter.default_block
    spec = adapter.block_specs()[block]
    base = _capture(adapter, batch)
    keep = torch.ones(1, spec.n_layers, spec.n_heads)
    with adapter.head_mask(block, keep):
        same = _capture(adapter, batch)
    for name in base.attentions:
        assert torch.equal(base.stacked(name), same.stacked(name)), "an all-ones mask changes nothing"
    last = spec.n_layers - 1
    keep[0, last, 0] = 0
    with adapter.head_mask(block, keep):
        masked = _capture(adapter, batch)
    stream = spec.query
    assert torch.equal(masked.stacked(block)[: last + 1], base.stacked(block)[: last + 1]), \
        "the mask acts after the softmax: no attention up to the masked layer changes"
    assert torch.equal(masked.hidden[stream][: last + 1], base.hidden[stream][: last + 1])
    assert not torch.allclose(masked.hidden[stream][last + 1], base.hidden[stream][last + 1])
    after = _capture(adapter, batch)
    assert torch.equal(after.hidden[stream], base.hidden[stream]), "the mask ends with its block"


def test_gradients_equal_a_retain_grad_reference(adapter):
    batch = adapter.encode([images_for(adapter, (0, 1))], [TEXT])
    block = adapter.default_block
    grads = adapter.attention_gradients(batch, None, blocks=(block,))
    with torch.enable_grad():
        captured = adapter.capture(batch, Capture(blocks=(block,), hidden=False))
        layers = captured.layers(block)  # the tensors of the forward graph
        for att in layers:
            att.retain_grad()
        score = adapter.target_score(captured.output, grads.label)[0][0]
        score.backward()
    assert abs(float(score.detach()) - grads.score) < 1e-4
    for a, g, att in zip(grads.attentions[block], grads.gradients[block], layers, strict=True):
        torch.testing.assert_close(a, att[0].detach().float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, att.grad[0].float(), rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in grads.gradients[block])


def test_masking_image_tokens_changes_the_score(adapter):
    batch = adapter.encode([images_for(adapter, (0, 1))], [TEXT])
    layout = batch.streams[adapter.image_stream][0]
    patches = layout.index(ROLE_PATCH)
    base_score, _, label = adapter.target_score(_capture(adapter, batch, hidden=False).output)
    variants = adapter.mask_image_tokens(batch, [np.array([], dtype=np.int64), patches[: len(patches) // 2], patches])
    scores = adapter.target_score(_capture(adapter, variants, hidden=False).output, label)[0]
    assert len(variants) == 3
    torch.testing.assert_close(scores[0], base_score[0], rtol=1e-4, atol=1e-5)
    assert float((scores[1] - scores[0]).abs()) > 1e-6 and float((scores[2] - scores[0]).abs()) > 1e-6


def _hook_count(adapter) -> int:
    model = getattr(adapter, "model")
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_gone_after_an_exception(adapter):
    before = _hook_count(adapter)
    block = adapter.default_block
    spec = adapter.block_specs()[block]
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.head_mask(block, torch.zeros(1, spec.n_layers, spec.n_heads)):
            assert _hook_count(adapter) > before
            raise RuntimeError("boom")
    assert _hook_count(adapter) == before
    two = adapter.encode([images_for(adapter)] * 2, [TEXT] * 2)
    with pytest.raises(InputError):  # a gradient pass explains one example at a time
        adapter.attention_gradients(two, None, blocks=(block,))
    assert _hook_count(adapter) == before


def test_default_queries_are_tokens_of_their_blocks(adapter):
    trace = extract_trace(adapter, images_for(adapter), TEXT, "x")
    for name in adapter.block_specs():
        layout = trace.select(name).layout
        query = adapter.default_query(name, layout)
        assert query is None or 0 <= query < layout.n_tokens
    assert adapter.default_query(adapter.default_block, trace.layout) is not None or adapter.image_stream
