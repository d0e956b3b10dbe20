"""Benchmark: pooled projections, t-SNE, the embeddings page rerun, and the cost of keeping vectors in sweeps.

    python bench/projection.py [--repeats 3] [--tsne-tokens 5000] [--sweep-examples 200]

Rows (all measured in this one run):

- PCA on 50,000 tokens x 768 dims (fp16 vectors, as stored): our one pooled fit (randomised subspace
  iteration) against sklearn's exact PCA (full SVD), and against VL-InterpreT's way, one fit per
  example (214 examples of 234 tokens; the points of different fits share no space).
- t-SNE (scikit-learn, Barnes-Hut, PCA init) on 5,000 tokens x 768: time reported.
- The embeddings page rerun after a layer change (AppTest, demo model, a sweep of 200 easy-VQA
  questions: 200 x (text + [IMG] + 16 patches) tokens): fits cached against the cache cleared
  before every rerun (refit).
- A ViLT-B/32 sweep batch of 8 (random weights, 384x640 image, 24-token question) with and without
  the sampled token vectors (every text token, the image CLS and 16 patches, 13 layers, fp16).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import time_interleaved  # noqa: E402
from vlcore.analysis.projection import apply_pca, compute_projection, pca_components  # noqa: E402


def pca_rows(repeats: int) -> list[tuple]:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    d = 768
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = ((rng.normal(size=(50_000, d)) * (1.0 / np.arange(1, d + 1) ** 0.5)) @ basis.T).astype(np.float16)
    per_example = np.array_split(np.arange(len(x)), len(x) // 234)

    def ours():
        apply_pca(x, *pca_components(x))

    def sklearn_full():
        xf = np.asarray(x, dtype=np.float32)
        PCA(n_components=2, svd_solver="full").fit_transform(xf)

    def one_fit_per_example():
        for idx in per_example:
            compute_projection(x[idx], "pca")

    t = time_interleaved({"ours": ours, "one_per_example": one_fit_per_example}, repeats)
    t_full = time_interleaved({"full": sklearn_full}, 1, warmup=0)["full"]
    m, c = pca_components(x)
    ref = PCA(n_components=2, svd_solver="full").fit(np.asarray(x, dtype=np.float32)).components_
    agree = float(np.abs((c * ref).sum(1)).min())
    return [
        ("PCA, 50,000 tokens x 768, one pooled fit", f"{t['ours']:.2f} s", "1.00x", "<= 2 s"),
        ("  naive: sklearn exact PCA (full SVD)", f"{t_full:.2f} s", f"{t_full / t['ours']:.1f}x time",
         f"same axes: min abs cosine {agree:.6f}"),
        (f"  naive: one fit per example ({len(per_example)} fits, VL-InterpreT)", f"{t['one_per_example']:.2f} s",
         f"{t['one_per_example'] / t['ours']:.1f}x time", "no shared space"),
    ]


def tsne_row(n: int) -> tuple:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(n, 768)) + np.repeat(rng.normal(size=(10, 768)) * 3, n // 10 + 1, 0)[:n]).astype(np.float16)
    start = time.perf_counter()
    compute_projection(x, "tsne")
    return (f"t-SNE, {n:,} tokens x 768 (sklearn Barnes-Hut)", f"{time.perf_counter() - start:.1f} s", "", "reported")


def page_rows(n_examples: int, repeats: int) -> list[tuple]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLSCOPE_CACHE"] = tempfile.mkdtemp(prefix="vlscope-bench-")
    from streamlit.testing.v1 import AppTest

    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.run.sweep import run_sweep, sweep_key
    from vlcore.models.registry import load_adapter
    from vlcore.storage.store import Store
    from vlcore.ui import embeddings as emb

    adapter = load_adapter("demo")
    examples = easy_vqa_examples("test", limit=n_examples)
    out = Store().sweep_dir(sweep_key(adapter, "easy_vqa/test", [e.example_id for e in examples]))
    run_sweep(adapter, examples, out, dataset="easy_vqa/test", batch_size=32)
    root = Path(__file__).resolve().parents[1]
    at = AppTest.from_file(str(root / "streamlit_app.py"), default_timeout=300)
    at.query_params.update({"scope": "sweep", "proj": "pca"})
    at.switch_page("pages/5_Embeddings.py")
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    for layer in range(5):  # visit every layer once: every fit is cached
        at.select_slider(key="emb_layer").set_value(layer).run()
    state = {"layer": 0}

    def rerun(clear: bool):
        def go():
            if clear:  # drop the fits and the frames built from them
                emb.fit_layer.clear()
                emb.projection_frame.clear()
            state["layer"] = 3 if state["layer"] != 3 else 4
            at.select_slider(key="emb_layer").set_value(state["layer"]).run()
        return go

    fits_before = sum(emb.FITS.values())
    cached = time_interleaved({"cached": rerun(False)}, repeats * 3)["cached"]
    assert sum(emb.FITS.values()) == fits_before, "a cached rerun refitted"
    refit = time_interleaved({"refit": rerun(True)}, repeats)["refit"]
    tokens = emb.sweep_token_set(out)[0].n_tokens
    return [
        (f"page rerun after a layer change, cached fits ({n_examples} examples, {tokens:,} tokens)",
         f"{cached * 1000:.0f} ms", "1.00x", "<= 150 ms"),
        ("  naive: refit on every rerun (PCA, signs aligned: layers 0..l)", f"{refit * 1000:.0f} ms",
         f"{refit / cached:.1f}x time", ""),
    ]


def sweep_rows(repeats: int) -> list[tuple]:
    import torch
    from PIL import Image

    from bench.common import QUESTION, vilt_b32
    from vlcore.run.sweep import VECTOR_PATCHES, summarize_batch

    adapter = vilt_b32("cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 640, 3), dtype=np.uint8))
    batch = adapter.encode([image] * 8, [QUESTION] * 8)
    from vlcore.data.example import Example

    exs = [Example(f"b/{i}", QUESTION, image=image) for i in range(8)]
    with torch.no_grad():
        t = time_interleaved({
            "plain": lambda: summarize_batch(adapter, batch, exs),
            "vectors": lambda: summarize_batch(adapter, batch, exs, vector_patches=VECTOR_PATCHES),
        }, repeats)
    v = summarize_batch(adapter, batch, exs, vector_patches=VECTOR_PATCHES).vectors
    per_ex = v["vectors"].nbytes / 8
    return [
        ("ViLT-B/32 sweep batch of 8, summaries only", f"{8 / t['plain']:.2f} ex/s", "1.00x", ""),
        (f"  + token vectors ({v['vectors'].shape[1] // 8} tokens x 13 layers per example, "
         f"{per_ex / 2**20:.2f} MiB)", f"{8 / t['vectors']:.2f} ex/s", f"{t['plain'] / t['vectors']:.2f}x throughput",
         "small overhead"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tsne-tokens", type=int, default=5000)
    parser.add_argument("--sweep-examples", type=int, default=200)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: pca,tsne,page,sweep")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    rows = []
    if "pca" not in skip:
        rows += pca_rows(args.repeats)
    if "tsne" not in skip:
        rows.append(tsne_row(args.tsne_tokens))
    if "page" not in skip:
        rows += page_rows(args.sweep_examples, args.repeats)
    if "sweep" not in skip:
        rows += sweep_rows(args.repeats)
    print("| measure | value | ratio | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
