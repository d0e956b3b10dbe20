"""Benchmark: trace capture, summary sweeps and trace loading against the plain forward pass.

    python bench/extract.py [--device auto|cpu|cuda] [--repeats 5] [--no-families | --families-only]

Uses a full-size ViLT-B/32 config (12 layers, 12 heads, hidden 768, patch 32) with random
weights, the real processor settings, a 384x640 image (resized to 352x608: 11x19 patches) and a
24-token question: 24 + 1 + 209 = 234 tokens, the size of a real VQA trace. Every row is measured
in this one run, interleaved; ratios compare like with like (both sides include the image
processor and tokenizer).

One row per further family (BLIP ITM base, CLIP ViT-B/32, SigLIP base/16; `bench/families.py`: base sizes,
random weights, loaded from a folder through `load_adapter`): full trace capture (every block and stream) plus
store at batch 1, against the adapter's plain forward (the same encoding, no attentions, no hidden states).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import QUESTION, time_interleaved, timeit, vilt_b32  # noqa: E402
from bench.families import FAMILY_CHECKPOINTS, load_family  # noqa: E402
from vlcore.models.base import Capture  # noqa: E402
from vlcore.data.example import Example  # noqa: E402
from vlcore.run.extract import extract_trace  # noqa: E402
from vlcore.run.sweep import summarize_batch
from vlcore.storage.store import Store  # noqa: E402

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="sweep batch (default 8 on CPU, 64 on GPU)")
    parser.add_argument("--no-families", action="store_true", help="skip the BLIP / CLIP / SigLIP rows")
    parser.add_argument("--families-only", action="store_true", help="only the BLIP / CLIP / SigLIP rows")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch_size = args.batch_size or (64 if device == "cuda" else 8)
    dtype = torch.bfloat16 if device == "cuda" else None
    if args.families_only:
        return print_rows(family_rows(device, Store(tempfile.mkdtemp(prefix="vlscope-bench-")), args.repeats))
    adapter = vilt_b32(device)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 640, 3), dtype=np.uint8))
    store = Store(tempfile.mkdtemp(prefix="vlscope-bench-"))
    model, proc, tok = adapter.model, adapter.image_processor, adapter.tokenizer

    def plain(n: int):
        inputs = {**tok([QUESTION] * n, return_tensors="pt"), **proc([image] * n, return_tensors="pt")}
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in inputs.items()}).logits.cpu()

    counter = iter(range(10**9))

    def capture_and_store():
        trace = extract_trace(adapter, image, QUESTION, "bench")
        store.put_trace(f"{next(counter):064d}", trace)

    def naive_capture_and_save():
        inputs = {**tok([QUESTION], return_tensors="pt"), **proc([image], return_tensors="pt")}
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in inputs.items()}, output_attentions=True, output_hidden_states=True)
        arrays = {f"att{i}": a.float().cpu().numpy() for i, a in enumerate(out.attentions)}
        arrays.update({f"hid{i}": h.float().cpu().numpy() for i, h in enumerate(out.hidden_states)})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (Path(store.root) / "naive.npz").write_bytes(buf.getvalue())

    examples = [Example(f"e{i}", QUESTION, image=image) for i in range(batch_size)]

    def sweep_batch():
        batch = adapter.encode([image] * batch_size, [QUESTION] * batch_size)
        summarize_batch(adapter, batch, examples)

    def naive_sweep_batch():
        inputs = {**tok([QUESTION] * batch_size, return_tensors="pt"), **proc([image] * batch_size, return_tensors="pt")}
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in inputs.items()}, output_attentions=True, output_hidden_states=True)
        [a.float().cpu().numpy() for a in out.attentions]
        [h.float().cpu().numpy() for h in out.hidden_states]

    r = args.repeats
    t = time_interleaved({"plain": lambda: plain(1), "capture": capture_and_store, "naive": naive_capture_and_save}, r)
    t_plain1, t_capture, t_naive1 = t["plain"], t["capture"], t["naive"]
    if dtype is not None:  # sweeps on a GPU run in bf16, like the plain pass they are compared with
        adapter.model.to(dtype)
    t = time_interleaved({"plain": lambda: plain(batch_size), "sweep": sweep_batch, "naive": naive_sweep_batch}, r)
    t_plainb, t_sweep, t_naiveb = t["plain"], t["sweep"], t["naive"]
    adapter.model.float()

    trace = extract_trace(adapter, image, QUESTION, "bench")
    key = "f" * 64
    path = store.put_trace(key, trace)
    raw_fp32 = (trace.attentions.size + trace.hidden.size) * 4
    on_disk = path.stat().st_size
    t_load = timeit(lambda: store.get_trace(key), max(r, 10))

    n = trace.n_tokens
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViLT-B/32 random weights, {n} tokens, {trace.n_layers} layers x {trace.n_heads} heads, on {name}")
    print(f"sweep batch {batch_size}{' bf16' if dtype is not None else ' fp32'}; medians of {r} runs\n")
    rows = [
        ("plain forward, batch 1", f"{t_plain1 * 1e3:.0f} ms", "1.00x", ""),
        ("full trace capture + store, batch 1", f"{t_capture * 1e3:.0f} ms", f"{t_capture / t_plain1:.2f}x time", "<= 1.5x"),
        ("naive: all to host fp32 + save, batch 1", f"{t_naive1 * 1e3:.0f} ms", f"{t_naive1 / t_plain1:.2f}x time", "contrast"),
        (f"plain forward, batch {batch_size}", f"{batch_size / t_plainb:.1f} ex/s", "1.00x", ""),
        (f"summary sweep, batch {batch_size}", f"{batch_size / t_sweep:.1f} ex/s", f"{t_plainb / t_sweep:.2f}x throughput", ">= 0.9x"),
        (f"naive sweep (all to host), batch {batch_size}", f"{batch_size / t_naiveb:.1f} ex/s", f"{t_plainb / t_naiveb:.2f}x throughput", "contrast"),
        ("trace on disk vs raw fp32", f"{on_disk / 2**20:.1f} MiB", f"{on_disk / raw_fp32:.2f}x bytes", "<= 0.55x"),
        ("load one trace", f"{t_load * 1e3:.1f} ms", "", "<= 50 ms"),
    ]
    if not args.no_families:
        rows += family_rows(device, store, r)
    return print_rows(rows)


def print_rows(rows: list[tuple[str, str, str, str]]) -> int:
    print(f"| {'measure':<52} | {'value':>12} | {'ratio':>20} | {'target':>9} |")
    print(f"|{'-' * 54}|{'-' * 14}|{'-' * 22}|{'-' * 11}|")
    for row in rows:
        print(f"| {row[0]:<52} | {row[1]:>12} | {row[2]:>20} | {row[3]:>9} |")
    return 0


def family_rows(device: str, store: Store, repeats: int) -> list[tuple[str, str, str, str]]:
    """Per family: the plain forward and the full trace capture + store, at batch 1, timed in turn."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    text = "a photo of the cat on the left"
    rows = []
    for name in FAMILY_CHECKPOINTS:
        adapter = load_family(name, device)
        counter = iter(range(10**9))

        def plain(adapter=adapter):
            with torch.no_grad():
                adapter.capture(adapter.encode([image], [text]), Capture(blocks=(), hidden=False))

        def capture_and_store(adapter=adapter, counter=counter):
            store.put_trace(f"{next(counter):063d}{len(rows)}", extract_trace(adapter, image, text, "bench"))

        t = time_interleaved({"plain": plain, "capture": capture_and_store}, repeats)
        trace = extract_trace(adapter, image, text, "bench")
        n = sum(layout.n_tokens for layout in trace.streams.values())
        rows += [(f"{name}: plain forward ({n} tokens)", f"{t['plain'] * 1e3:.0f} ms", "1.00x", ""),
                 (f"{name}: trace capture + store ({len(trace.blocks)} blocks)", f"{t['capture'] * 1e3:.0f} ms",
                  f"{t['capture'] / t['plain']:.2f}x time", "<= 1.5x")]
        del adapter
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
