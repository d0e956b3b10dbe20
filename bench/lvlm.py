"""Benchmark: what each generated token looked at, without eager mode, at a real prompt length.

    python bench/lvlm.py [--images 4] [--new-tokens 8] [--rounds 2] [--repeats 3] [--threads 1]
                         [--hidden 256] [--heads 2] [--layers 4] [--device cpu|cuda]

A LLaVA-like model with random weights and a tiny width: a one-layer CLIP-like tower (336 px, patch 14) and
a Llama decoder of ``--layers`` layers, ``--heads`` heads and width ``--hidden`` (default 2 heads of 128,
LLaVA-1.5's head size; LLaVA-7B has 32 of them), fed a NeXT-like prompt: ``--images`` tiles of 576 image
tokens plus a 48-token prompt (2,352 tokens for 4 tiles), then greedy generation of ``--new-tokens``.

- (a) plain: ``model.generate`` on sdpa, then one sdpa forward over the prompt and the answer (what any tool
  runs to score or inspect an answer), no attention weights;
- (b) eager: the same on eager attention with ``output_attentions=True`` (the usual fallback): every decoding
  step's weights from ``generate``, and every row of every layer from the forward;
- (c) VLScope: the generative adapter's own path (`GenerativeAdapter.encode_processed` then ``capture`` of
  ``lm.generated``), on sdpa: greedy generation, then one teacher-forced pass whose sdpa calls hand their
  queries and keys over: every generated token's attention row for every layer and head is recomputed, and
  per-head normalised entropy and image share are reduced over every prompt row in row chunks on the device.

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

    from vlcore.models.attention_capture import eager_attention, extract_eager_generation_attention
    from vlcore.models.base import Capture

    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs = build(args.images, args.device, args.hidden, args.heads, args.layers)
    n_new = args.new_tokens
    adapter = bench_adapter(model, n_new)
    layouts = [prompt_layout(inputs["input_ids"][0])]

    def forward(sequences, **kwargs):
        return model(input_ids=sequences, attention_mask=torch.ones_like(sequences),
                     pixel_values=inputs["pixel_values"], use_cache=False, **kwargs)

    def run():
        with torch.no_grad():
            if variant == "plain":
                sequences = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, suppress_tokens=[IMG])
                forward(sequences[:, :-1])
                return sequences, None
            if variant == "eager":
                got = extract_eager_generation_attention(model, inputs, max_new_tokens=n_new, suppress_tokens=[IMG])
                with eager_attention(model):
                    forward(torch.as_tensor(got.sequences[:, :-1], device=model.device), output_attentions=True)
                return got.sequences, got.weights
            batch = adapter.encode_processed(inputs, layouts)
            captured = adapter.capture(batch, Capture(blocks=("lm.generated",), hidden=False))
            sequences = torch.cat([inputs["input_ids"], batch.inputs["answer_ids"]], 1)
            weights = captured.stacked("lm.generated").transpose(0, 1).cpu().numpy()  # [B, L, H, T, K]
            return sequences, (weights, captured.output.summaries)

    return inputs, run


def bench_adapter(model, max_new_tokens: int):
    """The bench model behind VLScope's generative adapter (a word-free stand-in tokenizer: ids only)."""
    from types import SimpleNamespace

    from vlcore.models.llava import LlavaAdapter

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, decode=lambda ids, **_: " ".join(map(str, ids)),
                                convert_ids_to_tokens=lambda ids: [str(i) for i in ids])
    processor = SimpleNamespace(tokenizer=tokenizer, chat_template=None, image_processor=None)
    adapter = LlavaAdapter(model, processor, "bench-llava", device=str(model.device))
    adapter.max_new_tokens = max_new_tokens
    return adapter


def prompt_layout(ids):
    """The prompt's `TokenLayout`: text tokens, and image tokens as patches of 24 x 24 grids (one per tile)."""
    import numpy as np

    from vlcore.trace import ROLE_PATCH, ROLE_TEXT, TokenLayout

    image = (ids == IMG).cpu().numpy()
    k = np.cumsum(image) - 1
    side = int(IMAGE_TOKENS ** 0.5)
    cells = [((i % IMAGE_TOKENS) // side, i % side) if m else (-1, -1) for i, m in zip(k, image)]
    return TokenLayout.build([str(int(t)) for t in ids.tolist()], [ROLE_PATCH if m else ROLE_TEXT for m in image],
                             [int(i // IMAGE_TOKENS) if m else -1 for i, m in zip(k, image)], cells)


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
    if isinstance(got, tuple):  # (c): rows [B, L, H, T, K] and the prompt-row summaries
        arrays["weights"] = got[0]
        arrays["image_share"] = got[1].key_mass
    elif got is not None:  # (b): eager generate's rows
        arrays["weights"] = got
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
