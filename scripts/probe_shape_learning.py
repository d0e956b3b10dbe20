"""How fast a recipe of the demo model learns shapes: a short run on easy-VQA's shape questions only.

    python scripts/probe_shape_learning.py [--steps 400] [--batch-size 64] [--lr 3e-4] [--tied-share 0.75]

Shape questions ("what shape is in the image?") are what the demo model gets wrong; colour is learnt
within an epoch. A full training run takes over half an hour on 2 CPU cores, this probe about two
minutes, so recipes are compared here first: it trains `train_demo_model.make_model` on the ~5,000
shape questions of the train split (same augmentation, optimiser and schedule as the full run) and
prints the test split's shape accuracy four times along the way. Chance is about 0.36.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_demo_model as demo  # noqa: E402


def shape_questions(data: dict) -> torch.Tensor:
    return torch.tensor([i for i, c in enumerate(data["category"]) if c == "shape"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tied-share", type=float, default=0.0, help="as in train_demo_model.py (0 = random init)")
    parser.add_argument("--tied-scale", type=float, default=3.0)
    parser.add_argument("--tied-noise", type=float, default=0.3)
    args = parser.parse_args(argv)
    if args.steps < 4 or args.batch_size < 1:
        parser.error("--steps must be at least 4 and --batch-size at least 1")

    from transformers import ViltImageProcessorPil

    torch.manual_seed(args.seed)
    answers = demo.easy_vqa_answers()
    tokenizer = demo.build_tokenizer(Path(tempfile.mkdtemp(prefix="vilt-probe-")))
    processor = ViltImageProcessorPil(size={"shortest_edge": 64}, size_divisor=8)
    train = demo.encode_split("train", tokenizer, processor, answers)
    test = demo.encode_split("test", tokenizer, processor, answers)
    train_idx, test_idx = shape_questions(train), shape_questions(test)
    model = demo.make_model(tokenizer, answers, args.hidden, args.layers, args.heads)
    if args.tied_share > 0:
        demo.tie_patch_filters(model, args.tied_share, args.tied_scale, args.tied_noise,
                               torch.Generator().manual_seed(args.seed))
    optim, sched = demo.make_optimizer(model, args.lr, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{len(train_idx)} train / {len(test_idx)} test shape questions; {vars(args)}")
    print("| step | train loss | test shape accuracy | seconds |\n|---|---|---|---|")
    step, start = 0, time.perf_counter()
    while step < args.steps:
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for ids, mask, pix, labels in demo.batches(train, order, args.batch_size, "cpu", gen):
            loss = demo.train_step(model, optim, sched, ids, mask, pix, labels)
            step += 1
            if step % (args.steps // 4) == 0:
                acc = demo.accuracy(model, test, "cpu", index=test_idx)
                print(f"| {step} | {loss:.3f} | {acc:.3f} | {time.perf_counter() - start:.0f} |", flush=True)
            if step >= args.steps:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
