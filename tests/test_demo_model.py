"""The bundled demo model: a real checkpoint that loads offline and keeps its stated accuracy."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_DIR
from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.evaluate import SUBSET_SIZE, evaluate_accuracy, fixed_subset
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
