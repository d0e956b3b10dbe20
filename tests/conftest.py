"""Shared fixtures: a seeded tiny ViLT built from a config, tiny PIL images, isolated caches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "sample_data" / "models" / "vilt-tiny-easyvqa"
TINY_WORDS = ["what", "is", "the", "color", "shape", "of", "red", "blue", "a", "cat", "dog", "?", "there", "in", "image"]
TINY_LABELS = ["red", "blue", "circle", "yes", "no"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own store root and clean Streamlit caches."""
    monkeypatch.setenv("VLSCOPE_CACHE", str(tmp_path / "vlscope-cache"))
    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path))  # files a test writes may be read
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level BERT vocabulary saved as a folder (loaded with from_pretrained)."""
    import json

    d = tmp_path_factory.mktemp("tiny-tok")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 40}))
    return d


def make_tiny_adapter(tokenizer_dir: Path, arch: str = "ViltForQuestionAnswering", seed: int = 0, **config):
    """A seeded tiny ViLT (hidden 32, 2 layers, 2 heads, 32-px images, patch 8) behind the adapter."""
    import transformers
    from transformers import BertTokenizer, ViltConfig, ViltImageProcessorPil

    from vlcore.models.vilt import ViltAdapter

    tok = BertTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = dict(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, max_position_embeddings=40, num_labels=len(TINY_LABELS),
        id2label=dict(enumerate(TINY_LABELS)), label2id={a: i for i, a in enumerate(TINY_LABELS)},
        pad_token_id=0, problem_type="single_label_classification",
    )
    cfg.update(config)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(ViltConfig(**cfg))
    processor = ViltImageProcessorPil(size={"shortest_edge": 32}, size_divisor=8)
    return ViltAdapter(model, tok, processor, model_id=f"tiny-{arch}@seed{seed}", device="cpu")


@pytest.fixture
def tiny_adapter(tiny_tokenizer_dir):
    return make_tiny_adapter(tiny_tokenizer_dir)


def grey_image(width: int = 48, height: int = 32, red_cell: tuple[int, int] | None = None, patch: int = 8) -> Image.Image:
    """A grey RGB image; optionally one patch-sized cell painted pure red."""
    arr = np.full((height, width, 3), 128, dtype=np.uint8)
    if red_cell is not None:
        r, c = red_cell
        arr[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.fixture
def noise_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
