"""Which layer of the bundled demo model knows the shape, and which heads ground shape words (issue 18).

    python scripts/measure_probing.py [--examples 2000] [--stride 5] [--out /tmp/vlscope-probe-sweep] [--folds 5]

Makes (or resumes) a probe sweep of the demo model over N easy-VQA test questions, every ``stride``-th one (the
test split asks about 10 questions per image in image order, so a stride of 5 reaches about 1,000 images where
the first 2,000 questions reach 204), keeping every patch's vector (the demo model's 8 × 8 grid: 64 patches),
then prints, in Markdown:

- representation probes, target = the image's shape (from its questions' answers), for the text [CLS] (of every
  question, and of the shape questions only), the mean of the question's words, the image CLS and the patches;
  the patches' ``in_region`` target (patch inside the shape mask); the [CLS] for the colour; each cell is
  accuracy / control / majority of one layer (0 = embeddings);
- the attention probe for shape words and for colour words: accuracy, AUC, control, majority, the top heads
  by weight with their ranks by txt→img share, and the Spearman agreement of the rankings.

- a word-specificity check on 80 traces of questions naming the image's shape: each head's share of its patch
  attention that lands inside the shape, from the shape word, from the question's other words and from [CLS]
  (a head that looks at the shape from every token is a saliency head, not a word-grounding one).

Folds keep the questions of one image on one side (about 10 questions per image).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlcore.analysis.probing import (
    attention_inputs,
    compute_attention_probe,
    compute_layer_probes,
    rank_heads,
    representation_inputs,
    word_patch_share,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--stride", type=int, default=5)
    parser.add_argument("--out", default="/tmp/vlscope-probe-sweep")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cover", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    from vlcore.data.easy_vqa import easy_vqa_examples
    from vlcore.models.registry import load_adapter
    from vlcore.run.probe_sweep import example_label_table, patch_cover_table
    from vlcore.storage.sweeps import load_sweep_probe
    from vlcore.analysis.projection import token_set_from_sweep
    from vlcore.run.sweep import run_sweep
    from vlcore.storage.sweeps import load_sweep, load_sweep_vectors

    adapter = load_adapter("demo")
    examples = easy_vqa_examples("test")[:: args.stride][: args.examples]
    start = time.perf_counter()
    run_sweep(adapter, examples, args.out, dataset="easy_vqa/test", batch_size=args.batch_size, probe=True,
              vector_patches=64)
    print(f"sweep: {len(examples)} questions (every {args.stride}th), {time.perf_counter() - start:.0f} s (resumed if "
          "the folder held one)\n")
    preds, heads = load_sweep(args.out)
    probe = load_sweep_probe(args.out)
    tokens = token_set_from_sweep(load_sweep_vectors(args.out), preds)
    labels, cover = example_label_table(probe, preds), patch_cover_table(probe)

    print("| tokens | target | " + " | ".join(f"layer {i}" for i in range(adapter.n_layers + 1)) + " |")
    print("|---|---|" + "---|" * (adapter.n_layers + 1))
    asked = labels.assign(shape=labels["shape"].where(labels["category"] == "shape"))  # shape questions only
    for kind, target, table, note in (
        ("cls", "shape", labels, ""), ("cls", "shape", asked, " (shape questions)"), ("text_mean", "shape", labels, ""),
        ("image_cls", "shape", labels, ""), ("patch", "shape", labels, ""), ("patch", "in_region", labels, ""),
        ("cls", "color", labels, ""),
    ):
        t = time.perf_counter()
        v, y, g, keys = representation_inputs(tokens, kind, target, table, cover, args.cover)
        res = compute_layer_probes(v, y, g, keys, folds=args.folds)
        cells = [f"{r.accuracy:.3f} / {r.control:.3f} / {r.majority:.3f}" for r in res.itertuples()]
        print(f"| {kind} | {target}{note} | " + " | ".join(cells) + f" |  <!-- {len(y)} tokens, {res['n_units'][0]} images, "
              f"{time.perf_counter() - t:.1f} s -->")

    mean = heads[heads["metric"].astype(str) == "txtq_to_img"].groupby(["layer", "head"])["value"].mean()
    sweep_share = mean.unstack("head").sort_index().to_numpy(np.float64)
    for role in ("shape", "color"):
        feats, inside, groups, keys, words = attention_inputs(probe, role, args.cover)
        t = time.perf_counter()
        fit = compute_attention_probe(feats, inside, groups, keys, folds=3)
        table, agreement = rank_heads(fit.weights, {"txtq_to_img": sweep_share,
                                                    "word_to_patches": word_patch_share(feats, words)})
        s = fit.summary.iloc[0]
        print(f"\n**{role} words**: {len(np.unique(words))} words, {len(inside):,} pairs, {s['positive_rate']:.1%} inside; "
              f"accuracy {s['accuracy']:.3f}, balanced {s['balanced_accuracy']:.3f}, AUC {s['auc']:.3f}; control "
              f"{s['control']:.3f} (AUC {s['control_auc']:.3f}), majority {s['majority']:.3f} "
              f"({time.perf_counter() - t:.1f} s)")
        print("\n| rank | layer | head | weight | rank by txtq_to_img | rank by word→patch share |")
        print("|---|---|---|---|---|---|")
        for r in table.head(5).itertuples():
            print(f"| {r.weight_rank} | {r.layer} | {r.head} | {r.weight:+.2f} | {r.txtq_to_img_rank} | "
                  f"{r.word_to_patches_rank} |")
        for a in agreement.itertuples():
            print(f"Spearman(weight, {a.share}) = {a.spearman:+.3f} (p = {a.p_value:.3g})")
    specificity(adapter, examples)
    return 0


def specificity(adapter, examples, n: int = 80, heads=((0, 3), (0, 1), (2, 3), (2, 1), (2, 2))) -> None:
    """Share of each head's patch attention inside the shape, by query: the shape word, other words, [CLS]."""
    from vlcore.run.extract import extract_trace
    from vlcore.data.easy_vqa import compute_shape_mask
    from vlcore.analysis.probe_labels import compute_cover_grid, easy_vqa_image_labels, token_words

    facts = easy_vqa_image_labels("test")
    shares: dict[str, list] = {"shape word": [], "other words": [], "[CLS]": []}
    chance, done = [], 0
    for ex in examples:
        shape = facts.get(ex.meta["image_id"], {}).get("shape")
        if done >= n or shape is None or shape not in ex.question:
            continue
        trace = extract_trace(adapter, ex.load_image(), ex.question, ex.example_id)
        idx, rc = trace.patch_positions()
        inside = compute_cover_grid(compute_shape_mask(trace.image), trace.grid, trace.patch_px)[rc[:, 0], rc[:, 1]] >= 0.5
        if not inside.any():
            continue
        done += 1
        chance.append(inside.mean())
        for word, positions in [("[CLS]", [0]), *token_words(trace.tokens, trace.text_index())]:
            att = trace.attentions[:, :, positions[0], idx].astype(np.float32)
            key = "[CLS]" if word == "[CLS]" else "shape word" if word == shape else "other words"
            shares[key].append(att[..., inside].sum(-1) / np.maximum(att.sum(-1), 1e-9))
    print(f"\nShare of a head's patch attention inside the shape ({done} questions naming the image's shape; "
          f"{np.mean(chance):.3f} of the patches are inside):\n")
    print("| query | " + " | ".join(f"L{layer} H{head}" for layer, head in heads) + " |")
    print("|---|" + "---|" * len(heads))
    for key, values in shares.items():
        mean = np.mean(values, axis=0)
        print(f"| {key} ({len(values)}) | " + " | ".join(f"{mean[layer, head]:.3f}" for layer, head in heads) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
