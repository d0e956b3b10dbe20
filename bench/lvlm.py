"""Benchmark: what each generated token looked at, without eager mode, at a real prompt length.

    python bench/lvlm.py [--images 4] [--new-tokens 8] [--rounds 2] [--repeats 3] [--threads 1]
                         [--hidden 256] [--heads 2] [--layers 4] [--device cpu|cuda]

A LLaVA-like model with random weights and a tiny width: a one-layer CLIP-like tower (336 px, patch 14) and
a Llama decoder of ``--layers`` layers, ``--heads`` heads and width ``--hidden`` (default 2 heads of 128,
LLaVA-1.5's head size; LLaVA-7B has 32 of them), fed a NeXT-like prompt: ``--images`` tiles of 576 image
tokens plus a 48-token prompt (2,352 tokens for 4 tiles), then greedy generation of ``--new-tokens``.

- (a) plain: ``model.generate`` on sdpa;
- (b) eager: ``generate`` on eager attention with ``output_attentions=True`` (the fallback);
- (c) capture: `extract_generation_attention` on sdpa: every generated token's attention row for every
  layer and head, plus per-head normalised entropy and image share over every prompt row.

Every figure comes from a fresh process, variants interleaved (a, b, c, a, b, c, ...) over ``--rounds``:

- time: a warm-up call, then ``--repeats`` timed calls; the lowest over all rounds is kept, as wall time and
  (CPU) as the process's CPU time, which a loaded machine disturbs less;
- CPU memory: in a process whose allocator returns every block over 64 kB to the system on free
  (``MALLOC_MMAP_THRESHOLD_=65536``), so that the resident size follows the live tensors rather than
  glibc's caching: after a warm-up call, the peak resident set size (VmHWM, reset before the call) and its
  rise over the resident size before the call;
- CUDA memory: ``torch.cuda.max_memory_allocated`` and its rise over the allocated memory before the call.

Each figure is the lowest over the rounds; ratios are to (a). The parent also checks that (a) and (c)
generate the same tokens and that (c)'s rows equal (b)'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

IMAGE_TOKENS, IMG, PROMPT = 576, 1000, 48
VARIANTS = ("plain", "eager", "capture")
SIZES = ("images", "new_tokens", "threads", "hidden", "heads", "layers", "repeats")


def build(n_images: int, device: str, hidden: int = 256, heads: int = 2, layers: int = 4):
    """The seeded tiny-width LLaVA-like model and its inputs (``n_images`` tiles of 576 tokens + prompt)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=8192,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMG,
                                                      attn_implementation="sdpa")).eval().to(device)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 900, (PROMPT,), generator=g)
    ids = torch.cat([prompt[:8], torch.full((n_images * IMAGE_TOKENS,), IMG), prompt[8:]])[None]
    pixels = torch.randn(n_images, 3, 336, 336, generator=g)
    return model, {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                   "pixel_values": pixels.to(device)}


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def _variant(variant: str, args):
    """The model, its inputs and a function running the variant once -> (sequences, GenerationAttention)."""
    import torch

    from vlcore.models.attention_capture import extract_eager_generation_attention, extract_generation_attention

    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs = build(args.images, args.device, args.hidden, args.heads, args.layers)
    image, n_new = inputs["input_ids"] == IMG, args.new_tokens

    def run():
        with torch.no_grad():
            if variant == "plain":
                return model.generate(**inputs, max_new_tokens=n_new, do_sample=False), None
            if variant == "eager":
                got = extract_eager_generation_attention(model, inputs, max_new_tokens=n_new)
            else:
                got = extract_generation_attention(model, inputs, max_new_tokens=n_new, key_set=image)
            return got.sequences, got

    return inputs, run


def child_memory(variant: str, args) -> dict:
    """Peak resident memory of one call (after a warm-up call) and its rise over the resident size before."""
    inputs, run = _variant(variant, args)
    run()
    _reset_peak_rss()
    before, _ = _rss_mb()
    run()
    _, peak = _rss_mb()
    return {"rss_peak_mb": peak, "rss_rise_mb": peak - before, "tokens": int(inputs["input_ids"].shape[1])}


def child_time(variant: str, args, out: Path) -> dict:
    """Best seconds of ``--repeats`` calls after a warm-up call (CUDA: and their peak memory); saves the
    outputs beside ``out``."""
    import numpy as np
    import torch

    inputs, run = _variant(variant, args)
    cuda = args.device == "cuda"
    run()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        sequences, got = run()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    result = {"seconds": min(seconds), "cpu_seconds": min(cpu_seconds), "tokens": int(inputs["input_ids"].shape[1])}
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(cuda_peak_mb=peak, cuda_rise_mb=peak - before)
    arrays = {"sequences": np.asarray(sequences.cpu() if hasattr(sequences, "cpu") else sequences)}
    if got is not None:
        arrays["weights"] = got.weights
        if got.summaries is not None:
            arrays["image_share"] = got.summaries.key_mass
    np.savez(out.with_suffix(".npz"), **arrays)
    return result


def _run_child(variant: str, measure: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--measure", measure, "--out", str(out),
           "--device", args.device] + [x for n in SIZES for x in (f"--{n.replace('_', '-')}", str(getattr(args, n)))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if measure == "memory" else None
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def _table(best: dict, device: str, args) -> None:
    base = best["plain"]
    cols = [("time s", "seconds", 3)] + ([("CPU s", "cpu_seconds", 3)] if device == "cpu" else [])
    mem = ("cuda_peak_mb", "cuda_rise_mb") if device == "cuda" else ("rss_peak_mb", "rss_rise_mb")
    cols += [("peak MB", mem[0], 0), ("rise MB", mem[1], 1)]
    print(f"\n{device.upper()}: {base['tokens']} prompt tokens + {args.new_tokens} new; decoder {args.layers} "
          f"layers x {args.heads} heads, width {args.hidden}; {args.threads or 'default'} thread(s)")
    print(f"{'variant':<10}" + "".join(f"{title:>10}{'x (a)':>7}" for title, _, _ in cols))
    for name in VARIANTS:
        r = best[name]
        print(f"{name:<10}" + "".join(f"{r[key]:>10.{digits}f}{r[key] / max(base[key], 1e-9):>7.2f}"
                                      for _, key, digits in cols))


def _check(folder: Path) -> None:
    import numpy as np

    last = {v: np.load(folder / f"{v}-time.npz") for v in VARIANTS}
    same = np.array_equal(last["plain"]["sequences"], last["capture"]["sequences"])
    diff = np.abs(last["capture"]["weights"] - last["eager"]["weights"]).max()
    share = last["capture"]["image_share"]
    print(f"(a) and (c) generate the same tokens: {same}; (c) rows vs (b) eager: max abs diff {diff:.2e}; "
          f"image share of the prompt rows per layer (mean over heads): {np.round(share.mean(-1)[0], 3)}")


def _compare(device: str, args) -> None:
    args.device = device
    runs: dict = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for _ in range(args.rounds):
            for variant in VARIANTS:
                r = _run_child(variant, "time", args, folder / f"{variant}-time.json")
                if device == "cpu":
                    r.update(_run_child(variant, "memory", args, folder / f"{variant}-memory.json"))
                runs[variant].append(r)
        best = {v: {key: min(r[key] for r in rs) for key in rs[0] if key != "tokens"} | {"tokens": rs[0]["tokens"]}
                for v, rs in runs.items()}
        _table(best, device, args)
        _check(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="tiles of 576 image tokens")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process (the best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    parser.add_argument("--hidden", type=int, default=256, help="decoder width (LLaVA-7B: 4,096)")
    parser.add_argument("--heads", type=int, default=2, help="decoder heads (head size = hidden / heads)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, then cpu)")
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--measure", choices=("time", "memory"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        result = (child_time(args.child, args, args.out) if args.measure == "time"
                  else child_memory(args.child, args))
        args.out.write_text(json.dumps(result))
        return 0
    import torch

    for device in [args.device] if args.device else (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]):
        _compare(device, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
