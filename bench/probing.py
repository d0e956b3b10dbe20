"""Benchmark: layer-wise representation probes and the attention probe (issue 18), on synthetic data of real sizes.

    python bench/probing.py [--examples 5000] [--width 768] [--layers 12] [--pairs 100000] [--repeats 1]

Rows (all measured in this one run, side by side):

- One probe per layer, 12 layers, 5,000 examples × 768 dims (fp16, as a sweep stores them; 3 classes, the
  label planted in layer 7): `compute_layer_probes` with 5-fold GroupKFold and with one hold-out split, each
  with its control task (so 2 probes per layer and fold), with one BLAS thread (the default) and, for the
  hold-out, with the BLAS library's own thread count. Target: ≤ 10 s.
- The same hold-out job with scikit-learn's ``RidgeClassifier`` fitted per layer, task and control (the same
  predictions: tests/test_probing.py checks it), and one ``LogisticRegression`` fit (lbfgs) for scale.
- The attention probe on 100,000 word–patch pairs × 144 heads (12 layers × 12 heads, one head planted):
  `compute_attention_probe` with 3 folds (3 task fits, 3 control fits and the final fit), one BLAS thread
  against the library's own count.

The machine is shared: the load average before and after is printed with the times.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import time_interleaved  # noqa: E402
from vlcore.analysis.probing import compute_attention_probe, compute_layer_probes, split_by_example  # noqa: E402


def layer_data(n: int, d: int, layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    vectors = rng.standard_normal((layers, n, d), dtype=np.float32)
    vectors[7 % layers] += rng.standard_normal((3, d)).astype(np.float32)[labels] * 0.2
    return vectors.astype(np.float16), labels.astype(str), np.array([f"ex{i}" for i in range(n)])


def sklearn_holdout(vectors, labels, groups) -> list[float]:
    """RidgeClassifier per layer on the same hold-out split, task and shuffled control."""
    from sklearn.linear_model import RidgeClassifier

    fold = split_by_example(groups, 1)
    control = np.random.default_rng(0).permutation(labels)
    accs = []
    for layer in range(vectors.shape[0]):
        x = vectors[layer].astype(np.float32)
        for y in (labels, control):
            model = RidgeClassifier(alpha=1.0).fit(x[fold == 0], y[fold == 0])
            accs.append(model.score(x[fold == 1], y[fold == 1]))
    return accs


def pair_data(n_pairs: int, layers: int, heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    patches = 64
    groups = np.repeat(np.arange(n_pairs // patches + 1), patches)[:n_pairs].astype(str)
    inside = rng.random(n_pairs) < 0.2
    feats = rng.random((n_pairs, layers, heads), dtype=np.float32) / patches
    feats[:, layers // 2, 3] += inside * 0.01
    keys = np.tile(np.arange(patches).astype(str), n_pairs // patches + 1)[:n_pairs]
    return feats.astype(np.float16), inside, groups, keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
    vectors, labels, groups = layer_data(args.examples, args.width, args.layers)
    results = {}

    def ours(folds, threads=1):
        def run():
            results[folds] = compute_layer_probes(vectors, labels, groups, folds=folds, blas_threads=threads)
        return run

    from sklearn.linear_model import LogisticRegression

    fold = split_by_example(groups, 1)
    x7 = vectors[7 % args.layers].astype(np.float32)
    times = time_interleaved({
        "ours, 5-fold": ours(5), "ours, hold-out": ours(1),
        "ours, hold-out, BLAS's own threads": ours(1, None),
        "sklearn RidgeClassifier, hold-out": lambda: sklearn_holdout(vectors, labels, groups),
        "sklearn LogisticRegression, 1 fit": lambda: LogisticRegression(max_iter=200).fit(x7[fold == 0], labels[fold == 0]),
    }, rounds=args.repeats, warmup=0)
    n_probes = {"ours, 5-fold": 2 * 5 * args.layers, "ours, hold-out": 2 * args.layers,
                "ours, hold-out, BLAS's own threads": 2 * args.layers,
                "sklearn RidgeClassifier, hold-out": 2 * args.layers, "sklearn LogisticRegression, 1 fit": 1}
    print(f"\nRepresentation probes: {args.layers} layers, {args.examples:,} examples x {args.width} dims, 3 classes")
    print(f"{'method':42s} {'probes':>7s} {'seconds':>8s}")
    for name, t in times.items():
        print(f"{name:42s} {n_probes[name]:7d} {t:8.2f}")
    best = results[5].loc[results[5]["accuracy"].idxmax()]
    print(f"5-fold: best layer {int(best['layer'])} (planted: {7 % args.layers}), accuracy {best['accuracy']:.3f}, "
          f"control {best['control']:.3f}, majority {best['majority']:.3f}")
    print(f"ratio sklearn RidgeClassifier / ours (hold-out): "
          f"{times['sklearn RidgeClassifier, hold-out'] / times['ours, hold-out']:.1f}x")

    feats, inside, pair_groups, keys = pair_data(args.pairs, 12, 12)
    fits = {}

    def attention(threads):
        def run():
            fits[threads] = compute_attention_probe(feats, inside, pair_groups, keys, folds=3, blas_threads=threads)
        return run

    times = time_interleaved({"1 BLAS thread": attention(1), "BLAS's own threads": attention(None)},
                             rounds=args.repeats, warmup=0)
    s = fits[1].summary.iloc[0]
    top = tuple(int(i) for i in np.unravel_index(np.argmax(fits[1].weights), fits[1].weights.shape))
    print(f"\nAttention probe: {args.pairs:,} pairs x 144 heads, 3 folds + control + final fit (7 fits): "
          + ", ".join(f"{t:.2f} s with {name}" for name, t in times.items())
          + f" (accuracy {s['accuracy']:.3f}, auc {s['auc']:.3f}, control {s['control']:.3f}; top head {top}, "
          "planted (6, 3))")
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
