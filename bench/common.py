"""Shared pieces of the benchmarks: a random-weight ViLT-B/32 and a median timer."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlcore.models.vilt import ViltAdapter

QUESTION = "what is the man on the left holding in his right hand while he looks at the dog near the red car"


def vilt_b32(device: str, dtype=None) -> ViltAdapter:
    """ViLT-B/32 with random weights, a word-piece-free vocabulary, and the real processor settings."""
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessorPil

    tok_dir = Path(tempfile.mkdtemp())
    words = sorted(set(QUESTION.split()))
    (tok_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    tokenizer = BertTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    config = ViltConfig(num_labels=3129, vocab_size=30522, id2label={i: str(i) for i in range(3129)})
    model = ViltForQuestionAnswering(config)
    return ViltAdapter(model, tokenizer, ViltImageProcessorPil(), "vilt-b32-random", device=device, dtype=dtype)


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    return time_interleaved({"fn": fn}, repeats, warmup)["fn"]


def time_interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Median seconds per function, timing them in turn (A, B, C, A, B, C, ...) so that drift in the
    machine's speed affects every function alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
