"""Head statistics for 1,000 ViLT-B-sized traces: the batched torch path vs a VL-InterpreT-style numpy loop.

Shapes: 12 layers × 12 heads × 257 tokens (40 text with [CLS]/[SEP], the image CLS, a 12 × 18 patch grid).
Random row-stochastic attention of those shapes; the statistics' cost does not depend on the values, so one
batch of random attention is generated and fed through every batch of the run. The naive loop runs on a
subset (``--naive``) and its time per trace is scaled to 1,000.

    python bench/stats.py [--n 1000] [--batch 8] [--naive 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from vlcore.analysis.stats import BUILTIN_METRICS, compute_layer_summaries  # noqa: E402

L, H, TEXT, GRID = 12, 12, 40, (12, 18)
N = TEXT + 1 + GRID[0] * GRID[1]


def layout(batch: int):
    modality = torch.zeros(batch, N, dtype=torch.long)
    modality[:, TEXT:] = 1
    special = torch.zeros(batch, N, dtype=torch.bool)
    special[:, [0, TEXT - 1, TEXT]] = True
    rc = torch.full((batch, N, 2), -1, dtype=torch.long)
    rc[:, TEXT + 1:] = torch.tensor([(r, c) for r in range(GRID[0]) for c in range(GRID[1])])
    return modality, special, torch.ones(batch, N, dtype=torch.bool), rc


def random_attention(batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, H, N, N, generator=g).softmax(-1) for _ in range(L)]


def naive_trace_stats(att: np.ndarray, modality: np.ndarray, special: np.ndarray, rc: np.ndarray) -> dict:
    """A straightforward per-layer, per-head numpy loop (the way VL-InterpreT computes its table)."""
    txt = [i for i in range(N) if modality[i] == 0 and not special[i]]
    img = [i for i in range(N) if modality[i] == 1 and not special[i]]
    far = np.array([[max(abs(rc[q] - rc[k])) > 1 for k in img] for q in img])  # once per trace
    out = {}
    for layer in range(L):
        for h in range(H):
            a = att[layer, h]
            row = {}
            for s, qs in (("txt", txt), ("img", img)):
                for d, ks in (("txt", txt), ("img", img)):
                    row[f"{s}2{d}"] = a[np.ix_(qs, ks)].mean()
                    row[f"{s}q_to_{d}"] = np.mean([a[q, ks].sum() for q in qs])
            row["img2img_nonlocal"] = a[np.ix_(img, img)][far].mean()
            queries = txt + img
            row["entropy"] = np.mean([-(a[q] * np.log(a[q])).sum() / np.log(N) for q in queries])
            row["max_weight"] = np.mean([a[q].max() for q in queries])
            row["to_cls"] = np.mean([a[q, 0] for q in queries])
            row["spatial_distance"] = np.mean(
                [(a[q, img] * np.linalg.norm(rc[img] - rc[q], axis=1)).sum() / a[q, img].sum() for q in img])
            out[layer, h] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--naive", type=int, default=10, help="traces timed with the naive loop")
    args = parser.parse_args()
    att = random_attention(args.batch)
    modality, special, valid, rc = layout(args.batch)
    compute_layer_summaries(att, modality, special, valid, patch_rc=rc)  # warm-up
    start = time.perf_counter()
    for _ in range(0, args.n, args.batch):
        names, values = compute_layer_summaries(att, modality, special, valid, patch_rc=rc)
    ours = (time.perf_counter() - start) / args.n
    assert values.shape == (args.batch, L, H, len(BUILTIN_METRICS))
    one = np.stack([a[0].numpy() for a in att])
    start = time.perf_counter()
    for _ in range(args.naive):
        naive_trace_stats(one, modality[0].numpy(), special[0].numpy(), rc[0].numpy())
    naive = (time.perf_counter() - start) / args.naive
    print(f"Head statistics, {L} layers x {H} heads x {N} tokens, {torch.get_num_threads()} CPU threads")
    print(f"| Path | Metrics | Per trace | {args.n:,} traces | Ratio vs naive |")
    print("|---|---|---|---|---|")
    print(f"| numpy loop, VL-InterpreT style ({args.naive} traces timed) | 12 | {naive * 1e3:.0f} ms | "
          f"{naive * args.n:.0f} s | 1.00x |")
    print(f"| vlcore batched torch (batch {args.batch}) | {len(BUILTIN_METRICS)} | {ours * 1e3:.1f} ms | "
          f"{ours * args.n:.1f} s | {naive / ours:.1f}x faster |")


if __name__ == "__main__":
    main()
