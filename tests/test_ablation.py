"""Causal head importance on a tiny ViLT built so that one head carries the answer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import grey_image, make_tiny_adapter
from vlcore.attribution.ablation import extract_head_importance, extract_sweep_importance, head_mask_hooks
from vlcore.data.example import Example

CARRIER = (1, 0)  # (layer, head)
QUESTION = "what is the color of the shape?"


def silence_head(model, layer: int, head: int) -> None:
    """Zero a head's value projection: its context vector is then 0, whatever it attends to."""
    att = model.vilt.encoder.layer[layer].attention.attention
    d = att.attention_head_size
    with torch.no_grad():
        att.value.weight[head * d : (head + 1) * d] = 0
        att.value.bias[head * d : (head + 1) * d] = 0


def classifier_input(model, batch) -> torch.Tensor:
    seen = []
    handle = model.classifier[3].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(**batch.inputs)
    finally:
        handle.remove()
    return seen[0][0]


@pytest.fixture
def carrier_adapter(tiny_tokenizer_dir):
    """Every head but CARRIER is silenced; the classifier is set so answer 0 ("red") rides on CARRIER."""
    adapter = make_tiny_adapter(tiny_tokenizer_dir, seed=3)
    model = adapter.model
    for layer in range(2):
        for head in range(2):
            if (layer, head) != CARRIER:
                silence_head(model, layer, head)
    batch = adapter.encode([grey_image(red_cell=(1, 2))], [QUESTION])
    without = copy.deepcopy(model)
    silence_head(without, *CARRIER)
    z_with, z_without = classifier_input(model, batch), classifier_input(without, batch)
    dz = z_with - z_without
    assert dz.norm() > 1e-3  # the carrier head changes what the classifier reads
    with torch.no_grad():
        lin = model.classifier[3]
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0] = 4.0 * dz / dz.pow(2).sum()  # logit_red(with) - logit_red(without) = 4
        lin.bias[0] = 3.0 - lin.weight[0] @ z_with  # logit_red(with) = 3, the other logits 0
    return adapter


def test_masking_the_carrier_head_lowers_the_answer_and_idle_heads_do_nothing(carrier_adapter):
    drop, label, base = extract_head_importance(carrier_adapter, grey_image(red_cell=(1, 2)), QUESTION, batch_size=3)
    assert label == "red"
    assert base == pytest.approx(np.exp(3) / (np.exp(3) + 4), abs=1e-4)
    without = np.exp(-1) / (np.exp(-1) + 4)
    assert drop[CARRIER] == pytest.approx(base - without, abs=1e-4)
    idle = [drop[layer, head] for layer in range(2) for head in range(2) if (layer, head) != CARRIER]
    assert np.abs(idle).max() < 1e-4  # float noise of batched vs single forward passes only


def test_hook_masking_equals_zeroing_the_heads_values(tiny_adapter):
    image = grey_image(red_cell=(0, 1))
    drop, label, base = extract_head_importance(tiny_adapter, image, QUESTION)
    index = tiny_adapter.config.label2id[label]
    batch = tiny_adapter.encode([image], [QUESTION])
    for layer in range(2):
        for head in range(2):
            model = copy.deepcopy(tiny_adapter.model)
            silence_head(model, layer, head)
            with torch.no_grad():
                p = model(**batch.inputs).logits.softmax(-1)[0, index].item()
            assert drop[layer, head] == pytest.approx(base - p, abs=1e-5)


def test_hooks_are_removed_even_after_an_error(tiny_adapter):
    modules = tiny_adapter.self_attention_modules()
    with pytest.raises(RuntimeError):
        with head_mask_hooks(tiny_adapter, torch.ones(1, 2, 2)):
            assert all(len(m._forward_hooks) == 1 for m in modules)
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in modules)


def test_sweep_importance_is_one_tidy_row_per_head_and_example(tiny_adapter):
    exs = [Example(f"e/{i}", QUESTION, image=grey_image(red_cell=(i % 4, i % 6))) for i in range(3)]
    seen = []
    frame = extract_sweep_importance(tiny_adapter, exs, progress=lambda d, t: seen.append((d, t)))
    assert len(frame) == 3 * 4 and seen[-1] == (3, 3)
    one, _, _ = extract_head_importance(tiny_adapter, exs[1].load_image(), QUESTION)
    got = frame[frame.example_id == "e/1"].sort_values(["layer", "head"])["value"].to_numpy()
    np.testing.assert_allclose(got, one.ravel(), atol=1e-6)


def test_sweep_importance_file_round_trips_merges_and_drops_damage(tmp_path):
    import numpy as np

    from vlcore.attribution.ablation import IMPORTANCE_FILE, importance_frame, load_sweep_importance, save_sweep_importance

    assert load_sweep_importance(tmp_path) is None
    save_sweep_importance(tmp_path, importance_frame("a", np.ones((2, 2), np.float32)))
    save_sweep_importance(tmp_path, importance_frame("b", np.zeros((2, 2), np.float32)))
    save_sweep_importance(tmp_path, importance_frame("a", np.full((2, 2), 2.0, np.float32)))  # replaces a's rows
    rows = load_sweep_importance(tmp_path)
    assert len(rows) == 8 and rows[rows.example_id == "a"]["value"].eq(2.0).all()
    (tmp_path / IMPORTANCE_FILE).write_bytes(b"PAR1 cut")
    assert load_sweep_importance(tmp_path) is None and not (tmp_path / IMPORTANCE_FILE).exists()
