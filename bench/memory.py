"""Benchmark: resident memory of the app process with a ViLT-B checkpoint and a 1,000-example sweep.

    python bench/memory.py [--examples 1000]

Saves a ViLT-B/32 VQA checkpoint (random weights, real sizes: 3,129 answers, 30,522-token vocab)
to a temporary folder, writes a 1,000-example sweep summary of that model's shape (144 heads) into
a store, then, in a fresh process, drives the Run Model page through Streamlit's AppTest with that
checkpoint on an easy-VQA example (a full trace extracted and stored), opens the sweep, saves an
annotation to the app's SQLite database and opens the Annotations page (the model still loaded), and reads
the process's peak and current resident set size from /proc. Also prints the second-visit page
time (trace loaded from the store) against the first visit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
from streamlit.testing.v1 import AppTest
from vlcore.storage.sweeps import load_sweep

def rss():
    fields = dict(l.split(':', 1) for l in open('/proc/self/status') if l.startswith(('VmRSS', 'VmHWM')))
    return {{k: int(v.split()[0]) / 1024 for k, v in fields.items()}}

def visit():
    at = AppTest.from_file({home!r}, default_timeout=600)
    at.query_params['ex'] = 'easy_vqa/test/0'
    at.switch_page('pages/2_Run_Model.py')
    at.run()
    at.radio(key='model_kind').set_value('Local folder').run()
    start = time.perf_counter()
    at.text_input(key='model_dir').set_value({model!r}).run()
    took = time.perf_counter() - start
    assert not at.exception and not at.error, (at.exception, at.error)
    return at, took

at, first = visit()
cached_before = any('Loaded from the store' in c.value for c in at.caption)
at2, second = visit()
cached_after = any('Loaded from the store' in c.value for c in at2.caption)
preds, heads = load_sweep({sweep!r})
from vlcore.storage.annotations import AnnotationStore, default_url
AnnotationStore(default_url()).add(annotator='bench', page='pages/2_Run_Model.py', label='plausible',
                                   example_id='easy_vqa/test/0', model='vilt-b32', view='ex=easy_vqa/test/0')
at3 = AppTest.from_file({home!r}, default_timeout=600)
at3.switch_page('pages/6_Annotations.py')
at3.run()
assert not at3.exception and not at3.error, (at3.exception, at3.error)
out = {{'first_s': first, 'second_s': second, 'cached_before': cached_before, 'cached_after': cached_after,
        'sweep_rows': len(preds), 'head_rows': len(heads), 'annotations': len(at3.dataframe[0].value), **rss()}}
print(json.dumps(out))
"""


def save_vilt_b(folder: Path) -> None:
    import torch
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessorPil

    from bench.common import QUESTION

    words = sorted(set(QUESTION.split()) | {"what", "is", "the", "shape", "color", "?"})
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(folder)
    torch.manual_seed(0)
    config = ViltConfig(num_labels=3129, id2label={i: f"answer{i}" for i in range(3129)},
                        architectures=["ViltForQuestionAnswering"])
    ViltForQuestionAnswering(config).save_pretrained(folder)
    ViltImageProcessorPil().save_pretrained(folder)


def write_sweep(folder: Path, n: int) -> None:
    import numpy as np
    import pandas as pd

    from vlcore.storage.sweeps import PREDICTION_COLUMNS, _write_parquet
    from vlcore.analysis.stats import BLOCK_METRICS, summaries_to_frame

    ids = [f"easy_vqa/test/{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    preds = pd.DataFrame({c: [None] * n for c in PREDICTION_COLUMNS})
    preds["example_id"], preds["question"], preds["probability"] = ids, "what is the shape?", rng.random(n)
    _write_parquet(folder / "predictions.parquet", preds)
    _write_parquet(folder / "head_stats.parquet",
                   summaries_to_frame(ids, list(BLOCK_METRICS), rng.random((n, 12, 12, len(BLOCK_METRICS)))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlscope-mem-"))
    save_vilt_b(work / "vilt-b32")
    write_sweep(work / "sweep", args.examples)
    code = CHILD.format(root=str(ROOT), home=str(ROOT / "streamlit_app.py"), model=str(work / "vilt-b32"),
                        sweep=str(work / "sweep"))
    env = {**os.environ, "VLSCOPE_CACHE": str(work / "cache"), "VLSCOPE_DATA_ROOTS": str(work), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:])
        return proc.returncode
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in (work / "vilt-b32").iterdir()) / 2**20
    print(f"ViLT-B/32 checkpoint {size:.0f} MiB; sweep of {r['sweep_rows']:,} examples ({r['head_rows']:,} head rows)")
    print(f"| {'measure':<46} | {'value':>10} | {'target':>10} |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|")
    print(f"| {'peak RSS of the app process (VmHWM)':<46} | {r['VmHWM']:>7.0f} MB | {'< 1536 MB':>10} |")
    print(f"| {'RSS at the end (VmRSS)':<46} | {r['VmRSS']:>7.0f} MB | {'':>10} |")
    print(f"| {'first visit: load model + extract + store':<46} | {r['first_s'] * 1e3:>7.0f} ms | {'':>10} |")
    print(f"| {'second visit: trace from the store':<46} | {r['second_s'] * 1e3:>7.0f} ms | {'<= 200 ms*':>10} |")
    said = "second visit said 'loaded from the store'"
    print(f"| {said:<46} | {str(r['cached_after']):>10} | {'True':>10} |")
    print(f"| {'Annotations page rows (same process)':<46} | {r['annotations']:>10} | {'1':>10} |")
    print("* the second visit's time includes Streamlit's script rerun and the model lookup in st.cache_resource")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
