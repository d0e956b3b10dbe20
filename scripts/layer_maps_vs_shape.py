"""Which layer's map shows the shape? The demo model's per-layer maps of a shape word against the shape's patches.

    python scripts/layer_maps_vs_shape.py [--word circle] [--examples 30]

For easy-VQA test questions that contain the word (e.g. "is there a circle?") and whose image draws that shape,
the word's raw attention map (mean over heads, as the heatmaps page's layer strip draws it) is correlated, in each
layer, with the share of each patch covered by the shape (Pearson, over the patches). Prints the mean correlation
per layer and the share of examples where it is negative. The heatmaps page's default is the last layer; the strip
of every layer shows the others beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--word", default="circle", choices=["circle", "rectangle", "triangle"])
    parser.add_argument("--examples", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("VLSCOPE_CACHE", tempfile.mkdtemp(prefix="vlscope-layer-maps-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vlcore.analysis import query_maps as hm
    from vlcore.data.sources import resolve_example
    from vlcore.errors import VLScopeError
    from vlcore.run.extract import extract_trace
    from vlcore.data.easy_vqa import compute_shape_mask
    from vlcore.models.registry import load_adapter
    from vlcore.analysis.probe_labels import compute_cover_grid, compute_mask_shape
    from vlcore.storage.store import Store

    adapter, store, rows, index = load_adapter("demo", device="cpu"), Store(), [], 0
    while len(rows) < args.examples:
        try:
            example = resolve_example(f"easy_vqa/test/{index}", store, None)
        except VLScopeError:
            break  # past the end of the split
        index += 1
        if args.word not in example.question.split():
            continue
        trace = extract_trace(adapter, example.load_image(), example.question, example.example_id)
        mask = compute_shape_mask(trace.image)
        if compute_mask_shape(mask) != args.word:
            continue
        cover = compute_cover_grid(mask, trace.grid, trace.patch_px).ravel()
        query = [i for i, token in enumerate(trace.tokens) if token == args.word]
        maps = hm.compute_layer_maps(trace, None, query)
        rows.append([np.corrcoef(hm.patch_values(trace, m), cover)[0, 1] for m in maps])
    corr = np.array(rows)
    print(f"{len(corr)} examples (of the first {index} test questions) asking about a {args.word} that the image has")
    print("layer                 " + " ".join(f"{layer:>6}" for layer in range(corr.shape[1])))
    print("mean correlation      " + " ".join(f"{v:>6.3f}" for v in np.nanmean(corr, 0)))
    print("share negative        " + " ".join(f"{v:>6.2f}" for v in (corr < 0).mean(0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
