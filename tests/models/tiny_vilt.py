"""Tiny ViLT checkpoints written to a folder, for the contract suite and page tests (see tests/models/tiny_blip.py,
tiny_clip.py for the other families)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import TINY_LABELS, TINY_WORDS


def _tokenizer(folder: Path):
    from transformers import BertTokenizer

    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 40,
                                                              "tokenizer_class": "BertTokenizer"}))
    return BertTokenizer.from_pretrained(str(folder))  # BertTokenizer(vocab_file=...) builds a 5-token vocab in 5.x


def write_vilt(folder: Path, arch: str = "ViltForQuestionAnswering", seed: int = 0) -> Path:
    """A seeded ViLT (hidden 32, 2 layers, 2 heads, 32-px images, patch 8) saved as a checkpoint folder."""
    import torch
    import transformers
    from transformers import ViltConfig, ViltImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder)
    torch.manual_seed(seed)
    config = ViltConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, max_position_embeddings=40, num_labels=len(TINY_LABELS),
        id2label=dict(enumerate(TINY_LABELS)), label2id={a: i for i, a in enumerate(TINY_LABELS)}, pad_token_id=0,
        problem_type="single_label_classification",
    )
    getattr(transformers, arch)(config).save_pretrained(folder)
    ViltImageProcessorPil(size={"shortest_edge": 32}, size_divisor=8).save_pretrained(folder)
    return folder


TINY_CHECKPOINTS: dict[str, Callable[[Path], Path]] = {
    "vilt-vqa": write_vilt,
    "vilt-itm": lambda folder: write_vilt(folder, "ViltForImageAndTextRetrieval"),
}
