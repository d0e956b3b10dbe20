"""Benchmark: the dataset browser on a 100k-row VQAv2-style dataset.

    python bench/browser.py [--rows 100000]

Writes a parquet of ``--rows`` questions with small PNG images, then measures, in this one run:

- opening the source (a lazy, column-wise index: no image is decoded);
- one page of 24: search + category filter + paging + 24 thumbnails decoded and encoded;
- the same page again with thumbnails cached (what the page's ``st.cache_data`` gives);
- the naive way: mapping every row to an `Example` before showing the first page.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from vlcore.data.browse import filter_index, make_thumbnail, page_of  # noqa: E402
from vlcore.data.sources import open_source  # noqa: E402


def write_dataset(path: Path, rows: int) -> None:
    import datasets
    from PIL import Image

    pngs = []
    for colour in ((220, 20, 20), (20, 200, 20), (20, 20, 220), (128, 128, 128)):
        buf = io.BytesIO()
        Image.new("RGB", (96, 64), colour).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    data = {
        "question": [f"what color is object {i} in the picture?" for i in range(rows)],
        "multiple_choice_answer": [("red", "green", "blue", "grey")[i % 4] for i in range(rows)],
        "answer_type": [("other", "yes/no", "number")[i % 3] for i in range(rows)],
        "question_id": list(range(rows)),
        "image": [pngs[i % 4] for i in range(rows)],
    }
    features = datasets.Features({
        "question": datasets.Value("string"), "multiple_choice_answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"), "question_id": datasets.Value("int64"), "image": datasets.Image(),
    })
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))


def show_page(source, cache: dict | None) -> int:
    """Filter, page and thumbnail 24 examples; returns the bytes produced."""
    positions, _, _ = page_of(filter_index(source.index, "object 7", ["other"]), 3)
    total = 0
    for pos in positions:
        key = (source.key, int(pos))
        if cache is not None and key in cache:
            total += len(cache[key])
            continue
        buf = io.BytesIO()
        make_thumbnail(source.example(int(pos)).load_image()).save(buf, format="PNG")
        if cache is not None:
            cache[key] = buf.getvalue()
        total += len(buf.getvalue())
    return total


def page_times(path: Path) -> tuple[float, float]:
    """Seconds for the real browser page (Streamlit AppTest): first open, then the next page."""
    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parents[1]
    at = AppTest.from_file(str(root / "streamlit_app.py"), default_timeout=600)
    for key, value in {"ds": "vqa", "loc": str(path), "split": "train"}.items():
        at.query_params[key] = value
    at.switch_page("pages/1_Dataset_Browser.py")
    start = time.perf_counter()
    at.run()
    first = time.perf_counter() - start
    at.number_input(key="page").set_value(2)
    start = time.perf_counter()
    at.run()
    page = time.perf_counter() - start
    assert not at.exception and len(at.get("image")) == 24, (at.exception, at.error)
    return first, page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    import os

    folder = Path(tempfile.mkdtemp(prefix="vlscope-bench-"))
    os.environ["VLSCOPE_DATA_ROOTS"] = str(folder)
    os.environ["HF_DATASETS_CACHE"] = str(folder / "hf")
    path = folder / "vqa.parquet"
    write_dataset(path, args.rows)

    start = time.perf_counter()
    source = open_source("vqa", str(path), "train")
    t_open = time.perf_counter() - start
    cache: dict = {}
    start = time.perf_counter()
    show_page(source, cache)
    t_page = time.perf_counter() - start
    start = time.perf_counter()
    show_page(source, cache)
    t_cached = time.perf_counter() - start

    t_app_first, t_app_page = page_times(path)

    from vlcore.data.catalog import load_examples

    start = time.perf_counter()
    examples = load_examples("vqa", "train", None, location=str(path))
    t_naive = time.perf_counter() - start + t_page
    print(f"{args.rows:,}-row VQAv2-style parquet, page of 24 after a search and a category filter")
    print(f"| {'step':<52} | {'seconds':>8} | {'vs naive':>9} | {'target':>7} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for label, t, target in (
        ("open source (lazy column-wise index, once)", t_open, ""),
        ("page of 24, thumbnails decoded", t_page, "<= 1 s"),
        ("page of 24, thumbnails cached", t_cached, "<= 1 s"),
        ("the browser page (AppTest): first open incl. index", t_app_first, ""),
        ("the browser page (AppTest): next page of 24", t_app_page, "<= 1 s"),
        (f"naive: map all {len(examples):,} rows, then the page", t_naive, ""),
    ):
        print(f"| {label:<52} | {t:>8.3f} | {t / t_naive:>8.3f}x | {target:>7} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
