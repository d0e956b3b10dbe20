"""The bundled demo model: a real checkpoint that loads offline and keeps its stated accuracy."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_DIR
from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.run.evaluate import SUBSET_SIZE, evaluate_accuracy, fixed_subset
from vlcore.models.registry import load_adapter


def test_checkpoint_is_a_normal_small_hf_folder():
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.txt", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= 10 * 2**20
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(DEMO_DIR))
    assert len(tok) > 20 and tok.tokenize("what color is the shape?") == ["what", "color", "is", "the", "shape", "?"]


def test_accuracy_on_the_fixed_subset_matches_the_card():
    metrics = json.loads((DEMO_DIR / "training_metrics.json").read_text())
    assert metrics["n_test"] == 9673 and metrics["n_subset"] == SUBSET_SIZE
    assert f"{metrics['test_accuracy']:.4f}" in (DEMO_DIR / "README.md").read_text()
    adapter = load_adapter("demo", device="cpu")
    assert adapter.model_id == metrics["model_id"]
    test = easy_vqa_examples("test")
    subset = [test[i] for i in fixed_subset(len(test))]
    assert len(subset) == SUBSET_SIZE
    assert evaluate_accuracy(adapter, subset) == pytest.approx(metrics["subset_accuracy"], abs=1 / SUBSET_SIZE)


def _training_script():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_colour_blind_patch_filters_see_an_outline_the_same_in_every_colour():
    import torch
    from transformers import ViltConfig, ViltForQuestionAnswering

    train = _training_script()
    model = ViltForQuestionAnswering(ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=8))
    before = model.vilt.embeddings.patch_embeddings.projection.weight.detach().clone()
    train.tie_patch_filters(model, share=0.75, scale=3.0, noise=0.0, gen=torch.Generator().manual_seed(0))
    conv = model.vilt.embeddings.patch_embeddings.projection
    w = conv.weight.detach()
    tied = 24  # 75 % of 32 output channels
    assert torch.equal(w[tied:], before[tied:])  # the colour channels keep the random init
    assert torch.allclose(w[:tied, 0], w[:tied, 1]) and torch.allclose(w[:tied, 0], w[:tied, 2])

    def response(background, colour):  # one 8x8 patch: a 3x5 block of `colour` on `background`
        patch = torch.tensor(background, dtype=torch.float32)[:, None, None].repeat(1, 8, 8)
        patch[:, 2:5, 1:6] = torch.tensor(colour, dtype=torch.float32)[:, None, None]
        return (conv(patch[None]) - conv.bias[:, None, None])[0, :tied, 0, 0]

    flat = conv(torch.full((1, 3, 8, 8), 0.9))[0, :tied, 0, 0] - conv.bias[:tied]
    assert flat.abs().max() < 1e-5  # a flat background patch gives the tied channels nothing
    red, blue = response((0.9, 0.9, 0.9), (0.9, -0.9, -0.9)), response((0.9, 0.9, 0.9), (-0.9, -0.9, 0.9))
    assert torch.allclose(red, blue, atol=1e-5)  # same outline, same contrast: the colour does not matter
    dark = response((0.9, 0.9, 0.9), (-0.9, -0.9, -0.9))
    assert torch.allclose(dark, 1.5 * red, atol=1e-5)  # only the contrast scales it
    assert red.abs().max() > 1e-3


def test_training_script_runs_a_few_steps_and_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    import json as _json

    train = _training_script()
    monkeypatch.setattr(train, "measure", lambda out: {"model_id": "m", "test_accuracy": 0.5, "n_test": 1,
                                                       "subset_accuracy": 0.5, "n_subset": 1})
    monkeypatch.setattr(train, "accuracy", lambda *a, **k: 0.5)
    assert train.main(["--out", str(tmp_path), "--limit-steps", "2", "--epochs", "1", "--hidden", "32",
                       "--layers", "1", "--heads", "2"]) == 0
    metrics = _json.loads((tmp_path / "training_metrics.json").read_text())
    recipe = metrics["recipe"]
    assert recipe["batch_size"] == 32 and recipe["tied_filters"]["share"] == 0.75 and recipe["focus_shapes"] == 3
    card = (tmp_path / "README.md").read_text()
    assert "colour-blind" in card and "questions about shapes drawn 3x" in card
    from transformers import BertTokenizer, ViltForQuestionAnswering

    model = ViltForQuestionAnswering.from_pretrained(str(tmp_path))
    assert model.config.hidden_size == 32 and len(BertTokenizer.from_pretrained(str(tmp_path))) > 20


def test_shape_focus_draws_questions_about_shapes_more_often():
    import torch

    train = _training_script()
    questions = ["what shape is in the image?", "is there not a circle in the image?", "is there a red shape?",
                 "what color is the triangle?", "does the image contain a rectangle?"]
    about = [bool(train.SHAPE_WORD.search(q)) for q in questions]
    assert about == [False, True, False, True, True]  # the first is about a shape by its answer, not its words
    weights = train.focus_weights(about, 3.0)
    draws = torch.multinomial(weights, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = torch.isin(draws, torch.tensor([1, 3, 4])).double().mean().item()
    assert abs(share - 9 / 11) < 0.02
