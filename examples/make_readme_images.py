"""Render the README's "Use from Python" pictures with the notebook API (vl-convert, no browser, no network).

    python examples/make_readme_images.py     # writes docs/img/notebook_{heatmap,head_summary,projection}.png
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import vlcore.notebook as vn

OUT = Path(__file__).resolve().parents[1] / "docs" / "img"


def main() -> None:
    trace = vn.run(example="easy_vqa/test/0")
    vn.heatmap(trace, query="shape", method="rollout").save(OUT / "notebook_heatmap.png", scale_factor=2)
    vn.head_summary(trace, metric="cls_to_img").save(OUT / "notebook_head_summary.png", scale_factor=2)
    with tempfile.TemporaryDirectory() as folder:  # a sweep: token vectors of 32 examples, pooled into one fit
        sweep = vn.sweep(dataset="easy_vqa", split="test", limit=32, out=Path(folder) / "sweep")
        vn.projection(sweep, layer=2, width=440, height=360).save(OUT / "notebook_projection.png", scale_factor=2)
    print(f"wrote 3 pictures to {OUT}: {trace.text} -> {trace.predicted}")


if __name__ == "__main__":
    main()
