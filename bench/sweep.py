"""Benchmark: sweep throughput against the plain forward pass, and the naive all-to-host path.

    python bench/sweep.py [--device auto|cpu|cuda] [--batches 3]

ViLT-B/32 config with random weights, a 384x640 image (11x19 patches after the processor) and a
24-token question: 234 tokens.
All three rows are measured in this run on the same inputs, pre-encoded, so the table compares
the model-side work only: the plain forward pass (no attentions), our sweep step (`summarize_batch`:
each layer's attention reduced to the 19 per-head statistics inside the forward pass, top-k
predictions; only [B, L, H, 19] numbers and the top-k leave the device), and the naive path (every
attention and hidden state copied to the host as fp32, no statistics). CPU runs fp32 at batch 8;
a GPU runs bf16 at batch 64. Target: the sweep at >= 0.9x the plain pass's throughput.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import QUESTION, time_interleaved, vilt_b32  # noqa: E402
from vlcore.data.example import Example  # noqa: E402
from vlcore.models.base import Capture  # noqa: E402
from vlcore.run.sweep import summarize_batch
from vlcore.trace import TEXT  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=5, help="timed batches per row (median, interleaved)")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch_size, dtype = (64, torch.bfloat16) if device == "cuda" else (8, torch.float32)
    adapter = vilt_b32(device, dtype=dtype)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 640, 3), dtype=np.uint8))
    batch = adapter.encode([image] * batch_size, [QUESTION] * batch_size)
    examples = [Example(f"e{i}", QUESTION, image=image) for i in range(batch_size)]

    def plain():
        with torch.no_grad():
            adapter.capture(batch, Capture(blocks=(), hidden=False)).output.logits.float().cpu()

    def sweep():
        summarize_batch(adapter, batch, examples)

    def naive():
        with torch.no_grad():
            out = adapter.capture(batch, Capture())
            [a.float().cpu().numpy() for layers in out.attentions.values() for a in layers]
            [h.float().cpu().numpy() for h in out.hidden.values()]
            out.output.logits.float().cpu()

    t = time_interleaved({"plain": plain, "sweep": sweep, "naive": naive}, args.batches)
    t_plain, t_sweep, t_naive = t["plain"], t["sweep"], t["naive"]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16" if device == "cuda" else "fp32"
    n_text = int((batch.modality[0] == TEXT).sum())
    print(f"ViLT-B/32 random weights, {batch.modality.shape[1]} tokens ({n_text} text + image CLS + "
          f"{batch.grids[0][0]}x{batch.grids[0][1]} patches), batch {batch_size} {precision}, on {name}")
    print(f"| {'path':<40} | {'examples/s':>10} | {'vs plain':>9} | {'target':>7} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 11}|{'-' * 9}|")
    for label, t, target in (
        ("plain forward (no attentions)", t_plain, ""),
        ("summary sweep (19 statistics on device)", t_sweep, ">= 0.9"),
        ("naive (everything to host, fp32)", t_naive, "contrast"),
    ):
        print(f"| {label:<40} | {batch_size / t:>10.1f} | {t_plain / t:>8.2f}x | {target:>7} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
