"""``python -m vlcore``: extract sweeps, write single traces, evaluate the demo model.

    python -m vlcore extract --model demo --dataset easy_vqa --split test --limit 100 --out runs/sweep
    python -m vlcore extract --model <hub id or folder> --limit 100 --out runs/other   # any supported family
    python -m vlcore extract --model <two-tower hub id> --zero-shot --limit 100 --out runs/zero-shot
    python -m vlcore extract ... --engine ray [--address auto] [--workers 4] [--gpus-per-worker 1] --out s3://b/sweep
    python -m vlcore trace --model demo --image cat.png --text "what is it?" --out cat.safetensors
    python -m vlcore trace --model <two-tower hub id> --image cat.png --text "a cat" --labels cat,dog --out t.safetensors
    python -m vlcore evaluate [--model demo] [--subset 500]
    python -m vlcore faithfulness --model demo --limit 1000 [--out table.csv]
    python -m vlcore faithfulness --model demo-generative --limit 100 [--lens-layer -1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlcore.errors import InputError, VLScopeError


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"vlcore: error: {message} (see python -m vlcore {self.prog.split()[-1]} --help)\n")
        raise SystemExit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


MODEL_HELP = ('"demo", a checkpoint folder, or a hub id of any supported family (the error for an unsupported one '
              "lists them); a folder is recognised from its config.json")
LABELS_HELP = "comma-separated candidate labels: zero-shot classification over them (a family that offers it)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vlcore", description="VLScope core command line.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ext = sub.add_parser("extract", help="run a model over a dataset and write sweep summaries as parquet")
    ext.add_argument("--model", default="demo", help=MODEL_HELP)
    ext.add_argument("--dataset", default="easy_vqa")
    ext.add_argument("--split", default="test")
    ext.add_argument("--limit", type=_positive, default=None, help="first N examples")
    ext.add_argument("--location", default=None, help="hub id or local path of the dataset (all but easy_vqa)")
    ext.add_argument("--config", default=None, help="hub configuration (subset) name")
    ext.add_argument("--out", required=True,
                     help="output folder (resumes if it holds a partial sweep); with --engine ray also a URL: s3://, gs://")
    ext.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ext.add_argument("--batch-size", type=_positive, default=8)
    ext.add_argument("--probe", action="store_true",
                     help="also store what the probing page needs (word-patch attention, patch labels)")
    ext.add_argument("--engine", default="local", choices=["local", "ray"],
                     help="local: this process; ray: Ray Data actors on a Ray cluster (pip install 'ray[data]')")
    ext.add_argument("--address", default=None,
                     help='Ray cluster: "auto" (the one this machine joined) or ray://host:port; default: a local Ray')
    ext.add_argument("--workers", type=_positive, default=None, help="Ray: model-holding workers (default 1)")
    ext.add_argument("--gpus-per-worker", type=_gpus, default=None,
                     help="Ray: GPUs each worker reserves, fractions share one (default 0: CPU)")
    ext.add_argument("--labels", default=None, help=LABELS_HELP)
    ext.add_argument("--zero-shot", action="store_true",
                     help="classify each image over the dataset's answers (a family that offers zero-shot "
                          "classification); --labels gives other labels")

    tr = sub.add_parser("trace", help="write the full trace of one image and text")
    tr.add_argument("--model", default="demo", help=MODEL_HELP)
    tr.add_argument("--labels", default=None, help=LABELS_HELP)
    tr.add_argument("--image", type=Path, required=True)
    tr.add_argument("--text", required=True)
    tr.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    ev = sub.add_parser("evaluate", help="accuracy of a VQA model on easy-VQA")
    ev.add_argument("--model", default="demo")
    ev.add_argument("--split", default="test")
    ev.add_argument("--subset", type=_positive, default=None, help="the fixed seeded subset of this size")
    ev.add_argument("--batch-size", type=_positive, default=64)
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    fa = sub.add_parser("faithfulness", help="pointing game and perturbation AUC of raw attention, rollout, relevancy "
                                             "(a generative model: also the logit lens, and the random baseline as a row)")
    fa.add_argument("--model", default="demo")
    fa.add_argument("--split", default="test", choices=["train", "test"], help="easy-VQA split")
    fa.add_argument("--limit", type=_positive, default=1000, help="first N examples of the split")
    fa.add_argument("--n-random", type=_positive, default=3, help="seeds averaged for the random-order baseline")
    fa.add_argument("--min-overlap", type=_share, default=0.0,
                    help="pointing: share of the top patch's pixels that must be shape (0: any pixel)")
    fa.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    fa.add_argument("--details", type=Path, default=None, help="write the per-example rows as CSV")
    fa.add_argument("--lens-layer", type=int, default=None,
                    help="generative models: the logit-lens map reads this residual-stream state (0: embeddings, "
                         "-1: the last layer); default: the mean over every state")
    fa.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def _gpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 0, got {text!r}") from None
    if not 0.0 <= value < 1024:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 0, got {value}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def cmd_faithfulness(args) -> int:
    from vlcore.attribution.faithfulness import evaluate_faithfulness
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter

    for path in (args.out, args.details):
        if path is not None and not path.parent.is_dir():
            raise InputError(f"the folder of {path} does not exist; create it or pick another --out/--details path")
    examples = easy_vqa_examples(args.split, args.limit)
    adapter = load_adapter(args.model, device=args.device)
    if args.lens_layer is not None and not adapter.generates:
        raise InputError(f"--lens-layer picks the logit-lens map of a generative model; {adapter.model_id} "
                         f"({adapter.family}) has none: drop --lens-layer")

    def progress(done: int, total: int, seconds: float) -> None:
        rate = done / max(seconds, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        sys.stderr.write(f"\rfaithfulness {done}/{total} ({rate:.1f} ex/s, ETA {eta:.0f} s)")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    details: list = []
    table = evaluate_faithfulness(adapter, examples, n_random=args.n_random, min_overlap=args.min_overlap,
                                  progress=progress, details=details, lens_layer=args.lens_layer)
    print(f"model {adapter.model_id}, easy-VQA {args.split}, first {len(examples)} examples")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out is not None:
        table.to_csv(args.out, index=False)
    if args.details is not None:
        details[0].to_csv(args.details, index=False)
    return 0


def cmd_extract(args) -> int:
    from tqdm import tqdm

    from vlcore.data.catalog import load_examples
    from vlcore.models.registry import load_adapter
    from vlcore.run.sweep import run_sweep
    from vlcore.storage.sweeps import load_sweep

    if args.engine == "ray":
        if args.probe:
            raise InputError("--probe runs in-process only; drop --engine ray for a probe sweep")
        if args.labels or args.zero_shot:
            raise InputError("--labels and --zero-shot run in-process only; drop --engine ray for a zero-shot sweep")
        return _extract_on_ray(args)
    ray_only = [f"--{k.replace('_', '-')}" for k in ("address", "workers", "gpus_per_worker")
                if getattr(args, k) is not None]
    if ray_only:
        raise InputError(f"{', '.join(ray_only)} apply to --engine ray; add --engine ray or drop them")
    if "://" in args.out:
        raise InputError(f"the in-process sweep writes to a local folder, got {args.out}; use --engine ray for URLs")
    examples = load_examples(args.dataset, args.split, args.limit, location=args.location, config=args.config)
    adapter = load_adapter(args.model, device=args.device)
    labels = _labels(args.labels) if args.labels else _vocabulary(examples) if args.zero_shot else None
    adapter = _with_labels(adapter, labels)
    print(describe_model(adapter))
    print(describe_blocks(adapter))
    bar = tqdm(total=len(examples), unit="ex", desc="extract")

    def progress(p):
        bar.n = p.done
        bar.set_postfix(rate=f"{p.rate:.1f}/s")
        bar.refresh()

    run_sweep(adapter, examples, args.out, dataset=f"{args.dataset}/{args.split}", batch_size=args.batch_size, progress=progress,
              probe=args.probe)
    bar.close()
    preds, heads = load_sweep(args.out)
    known = preds["correct"].dropna() if adapter.answers_compare and len(preds) else preds["correct"].iloc[:0]
    accuracy = (f"accuracy {known.astype(float).mean():.4f}" if len(known) else
                "accuracy n/a: " + ("no gold answers" if adapter.answers_compare else
                                    f"{adapter.task} scores each image-text pair, there is no answer to compare"))
    print(f"wrote {len(preds)} examples, {len(heads)} head-stat rows to {args.out} ({accuracy})")
    return 0


def _extract_on_ray(args) -> int:
    """``extract --engine ray``: the same sweep folder, written by Ray Data workers (`vlcore.run.ray_sweep`)."""
    from vlcore.run.ray_examples import ray_input
    from vlcore.run.ray_sweep import import_ray, run_ray_sweep

    import_ray()  # without ray: one line saying how to install it, before anything loads
    if args.device == "cuda" and not args.gpus_per_worker:
        raise InputError("with --engine ray the workers' device follows --gpus-per-worker; give --gpus-per-worker 1 "
                         "to run on GPUs")
    source = ray_input(args.dataset, args.split, args.limit, location=args.location, config=args.config)
    last = [0.0]

    def progress(p) -> None:  # a line every 5 s at most, and the last one
        if p.done == p.total or time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            sys.stderr.write(f"ray sweep {p.done}/{p.total} ({p.rate:.1f} ex/s, ETA {p.eta_s:.0f} s)\n")

    report = run_ray_sweep(args.model, source, args.out, dataset=f"{args.dataset}/{args.split}",
                           workers=args.workers or 1, gpus_per_worker=args.gpus_per_worker or 0.0,
                           batch_size=args.batch_size, address=args.address, progress=progress)
    print(report.summary())
    return 0


def cmd_trace(args) -> int:
    from vlcore.data.example import content_hash, open_image_bytes
    from vlcore.run.extract import extract_trace
    from vlcore.models.registry import load_adapter
    from vlcore.storage.store import atomic_write_bytes, trace_to_bytes

    if not args.image.is_file():  # a path typed on the command line is the user's own: no data-root check
        raise InputError(f"image file not found: {args.image}")
    image = open_image_bytes(args.image.read_bytes(), args.image.name)
    adapter = _with_labels(load_adapter(args.model, device=args.device), _labels(args.labels) if args.labels else None)
    trace = extract_trace(adapter, image, args.text, f"upload/{content_hash(image, args.text)[:16]}")
    atomic_write_bytes(args.out, trace_to_bytes(trace))
    note = " (text truncated)" if trace.text_truncated else ""
    print(f"wrote {args.out}: {trace.n_tokens} tokens, {trace.n_layers} layers, prediction {trace.prediction[:1]}{note}")
    print(describe_model(adapter))
    print(describe_trace(trace))
    return 0


def describe_model(adapter) -> str:
    """One line: the model, its family and task."""
    from vlcore.models.base import TASK_NAMES
    from vlcore.models.registry import families

    title = next((f.title for f in families() if f.name == adapter.family), adapter.family)
    return f"model {adapter.model_id}: {title}, task {adapter.task} ({TASK_NAMES.get(adapter.task, adapter.task)})"


def describe_blocks(adapter) -> str:
    """One line per attention block the model exposes (query and key streams, layers x heads), the default marked."""
    return "\n".join(
        f"block {name}: {spec.query} -> {spec.key}, {spec.n_layers} layers x {spec.n_heads} heads"
        + (" (causal)" if spec.causal else "") + (" (default block)"
                                                  if name == adapter.default_block else "")
        for name, spec in adapter.block_specs().items())


def describe_trace(trace) -> str:
    """The trace's streams (tokens by role, image grids) and attention blocks (layers x heads, queries x keys),
    one per line."""
    from collections import Counter

    from vlcore.trace import ROLE_PATCH, ROLES

    lines = []
    for name, layout in trace.streams.items():
        roles = Counter(ROLES[r] for r in layout.role)
        grids = ", ".join(f"{g.grid[0]}x{g.grid[1]} grid" for g in layout.images if layout.index(ROLE_PATCH).size)
        hidden = trace.hiddens.get(name)
        width = f", hidden {hidden.shape[0] - 1} layers x d={hidden.shape[-1]}" if hidden is not None else ""
        lines.append(f"stream {name}: {layout.n_tokens} tokens ("
                     + ", ".join(f"{n} {role}" for role, n in roles.items()) + (f"; {grids}" if grids else "")
                     + f"){width}")
    for name, block in trace.blocks.items():
        shape = block.attentions.shape if block.attentions is not None else None
        size = f"{shape[0]} layers x {shape[1]} heads, {shape[2]} x {shape[3]}" if shape else "not captured"
        kind = "self-attention" if block.is_self else "cross-attention"
        view = " (default view)" if name == trace.view else ""
        lines.append(f"block {name}: {block.query} -> {block.key} {kind}, {size}{view}")
    return "\n".join(lines)


def _labels(text: str) -> list[str]:
    """Comma-separated labels, trimmed, empty ones dropped; InputError when none is left."""
    labels = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not labels:
        raise InputError(f"--labels needs comma-separated labels, e.g. --labels cat,dog; got {text!r}")
    return labels


def _vocabulary(examples) -> list[str]:
    """The examples' gold answers, most frequent first (ties alphabetical); InputError when there are none."""
    from collections import Counter

    counts = Counter(a.strip() for e in examples for a in e.answers if a.strip())
    if not counts:
        raise InputError("--zero-shot classifies over the dataset's answers, and these examples have none; give "
                         "--labels a,b,c")
    return [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _with_labels(adapter, labels: list[str] | None):
    """The adapter classifying over ``labels`` (zero-shot), or as it is when None.

    Raises:
        InputError: the model cannot classify over candidate labels.
    """
    if labels is None:
        return adapter
    from vlcore.models.registry import families

    if not adapter.takes_candidates:
        able = ", ".join(f.title for f in families() if "zero_shot" in f.tasks) or "none"
        raise InputError(f"{adapter.model_id} ({adapter.family}, task {adapter.task}) cannot classify over candidate "
                         f"labels; drop --labels/--zero-shot, or use a model of a family that can ({able})")
    return adapter.with_candidates(labels)


def cmd_evaluate(args) -> int:
    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.run.evaluate import evaluate_accuracy, fixed_subset
    from vlcore.models.registry import load_adapter

    examples = easy_vqa_examples(args.split)
    if args.subset:
        examples = [examples[i] for i in fixed_subset(len(examples), args.subset)]
    adapter = load_adapter(args.model, device=args.device)
    acc = evaluate_accuracy(adapter, examples, batch_size=args.batch_size)
    print(json.dumps({"model_id": adapter.model_id, "split": args.split, "n": len(examples), "accuracy": round(acc, 6)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return {
            "extract": cmd_extract, "trace": cmd_trace, "evaluate": cmd_evaluate, "faithfulness": cmd_faithfulness,
        }[args.command](args)
    except VLScopeError as exc:
        sys.stderr.write(f"vlcore: error: {exc}\n")
        return 2
    except (RuntimeError, MemoryError) as exc:
        from vlcore.run.extract import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        sys.stderr.write("vlcore: error: the model ran out of memory; lower --batch-size, use smaller images, or "
                         "run on a device with more memory\n")
        return 2
    except OSError as exc:  # a path given on the command line cannot be read or written
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"vlcore: error: {exc.strerror or exc}{where}; check the path and its permissions\n")
        return 2
