"""Train VLScope's generative demo: a tiny LLaVA (CLIP-style vision tower, projector, Llama-style decoder) on easy-VQA.

    python scripts/train_demo_lvlm.py [--epochs 6] [--seed 0] [--out sample_data/models/llava-tiny-easyvqa]

Everything is built locally: a word-level tokenizer of the easy-VQA vocabulary (the `tokenizers`
library), a `LlavaProcessor` whose chat template puts the image before the question, and a
`LlavaForConditionalGeneration` trained from scratch to write the answer, then `</s>`, after the
assistant prompt. The folder it writes answers questions with nothing but plain transformers::

    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    answer = processor.decode(model.generate(**inputs)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

Two stages. Stage 1 trains the vision tower and projector alone on a grounding loss: each image
token that shows the shape, read against the decoder's (tied) word embeddings, is asked for the
shape's word and its colour's word (LLaVA's projector-alignment stage, with easy-VQA's facts as the
caption; `grounding_loss`). Trained only through the decoder's answer loss (no grounding loss at all),
the tower left the shapes at chance for 6 epochs (0.35). Stage 2 trains everything on the questions,
the grounding loss kept.
The recipe also borrows the ViLT demo's levers (`train_demo_model.py`): colour-blind patch filters,
questions about shapes drawn 3x as often, flips/rotations, AdamW with warm-up and cosine decay.
Each batch holds a few questions per image, so the vision tower runs once per image, not once
per question. The model card (README.md) and training_metrics.json record the recipe, the seed,
the per-epoch test accuracy and the final exact-match accuracy of greedy `generate` on the full
test split, overall and by question type. A GPU is used when present, but is never needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from easyvqa_training import tie_colour_blind  # noqa: E402
from train_demo_model import SHAPE_WORD, dihedral, focus_text, focus_weights, make_optimizer, tied_text  # noqa: E402
from vlcore.data.easy_vqa import answer_category, easy_vqa_answers, load_easy_vqa  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sample_data" / "models" / "llava-tiny-easyvqa"
PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT = "<pad>", "<unk>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>"
SPECIAL = [PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT]
IMAGE_SIZE = 64
MAX_NEW_TOKENS = 4
# One user turn (image, then the question's text), then the assistant's answer and </s>. Content may also be a string.
# (Putting the question first, so that the image tokens can read it as ViLT's patches do, was tried: after 2 epochs
# colour 0.47 and shape 0.36 against 0.98 and 0.47 with the image first; see the model card.)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def guard_subset(n_questions: int = 9673, size: int = 300) -> list[int]:
    """The fixed, evenly spread test questions of the accuracy guard in `tests/test_demo_lvlm.py`.

    >>> guard_subset(10, 4)
    [0, 2, 5, 7]
    """
    return [i * n_questions // size for i in range(size)]


def build_tokenizer(out_dir: Path):
    """A lower-casing word-level tokenizer of every easy-VQA question and answer, saved and reloaded from disk.

    Returns:
        A `PreTrainedTokenizerFast` with ``<pad> <unk> <s> </s> <image> <|user|> <|assistant|>`` as specials.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set(easy_vqa_answers())
    for split in ("train", "test"):
        for rec in load_easy_vqa(split):
            words.update(re.findall(r"\w+|[^\w\s]", rec.question.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words))}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(SPECIAL)
    # Left padding (saved with it): batched generation appends after each prompt.
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      unk_token=UNK, additional_special_tokens=[IMAGE, USER, ASSISTANT],
                                      model_max_length=128, padding_side="left")
    wrapped.save_pretrained(str(out_dir))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    if len(tokenizer) != len(vocab) or tokenizer.tokenize("What color is the shape?") != [
            "what", "color", "is", "the", "shape", "?"]:
        raise RuntimeError(f"the reloaded tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def n_image_tokens(patch: int) -> int:
    """``<image>`` tokens per 64x64 image: one per patch (the vision tower's CLS output is dropped)."""
    return (IMAGE_SIZE // patch) ** 2


def build_processor(tokenizer, patch: int = 8):
    """A `LlavaProcessor`: 64x64 images (mean/std 0.5 as in the ViLT demo), one ``<image>`` token per patch."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE, chat_template=CHAT_TEMPLATE)


def make_model(tokenizer, args):
    """A `LlavaForConditionalGeneration` with a CLIP vision tower and a Llama decoder of the sizes in ``args``."""
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, IMAGE)}
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=args.heads,
                              image_size=IMAGE_SIZE, patch_size=args.patch)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=128, tie_word_embeddings=True,
                       pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids[IMAGE],
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=n_image_tokens(args.patch), projector_hidden_act="gelu", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
                                               max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return model


def prompt_ids(processor, question: str) -> list[int]:
    """Token ids of the chat prompt for one question, ``<image>`` expanded as `processor(...)` expands it."""
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    text = text.replace(IMAGE, IMAGE * n_image_tokens(processor.patch_size))
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_split(split: str, processor, limit: int | None = None) -> dict:
    """Tensors for one split: prompt + answer + </s> ids (right-padded), prompt lengths, image slots, pixels.

    ``input_ids`` is ``[n_questions, n_tokens]``; the answer token sits at ``prompt_len`` and ``</s>`` right after.
    """
    records = load_easy_vqa(split)[:limit]
    tok = processor.tokenizer
    prompts = {q: prompt_ids(processor, q) for q in sorted({r.question for r in records})}
    rows = [prompts[r.question] + tok(r.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for r in records]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    image_ids = sorted({r.image_id for r in records})
    slot = {img: i for i, img in enumerate(image_ids)}
    paths = {r.image_id: r.image_path for r in records}
    images = [Image.open(paths[i]).convert("RGB") for i in image_ids]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {
        **grounding_targets(split, image_ids, images, processor.patch_size, tok), "tokenizer": tok,
        "input_ids": ids,
        "prompt_len": torch.tensor([len(prompts[r.question]) for r in records]),
        "image": torch.tensor([slot[r.image_id] for r in records]),
        "category": [answer_category(r.answer) for r in records],
        "about_shape": [answer_category(r.answer) == "shape" or bool(SHAPE_WORD.search(r.question)) for r in records],
        "question": [r.question for r in records],
        "answer": [r.answer for r in records],
        "pixels": pixels,
    }


def grounding_targets(split: str, image_ids: list[int], images: list[Image.Image], patch: int,
                      tok: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Per image: the shape's cover of each patch, and the token ids of its shape and colour words.

    The shape and colour come from the answers to the image's questions (`easy_vqa_image_labels`); a shape
    no question reveals is read from the mask (`compute_mask_shape`), a colour none reveals is left out (-1).
    The cover is the share of each patch's pixels in the shape mask (`compute_shape_mask`, the pixels that
    differ from the border's background colour).

    Args:
        split: the easy-VQA split whose answers label the images.
        image_ids: the images' ids in that split (an id no question mentions gets its shape from the mask).
        images: the images, 64 x 64 as the model sees them (others are resized).
        patch: the vision tower's patch size in pixels.
        tok: the tokenizer whose ids the shape and colour words get.

    Returns:
        ``{"cover": float [n_images, rows, cols], "shape_id": long [n_images], "color_id": long [n_images]}``.
    """
    from vlcore.analysis.probe_labels import compute_cover_grid, compute_mask_shape, easy_vqa_image_labels
    from vlcore.data.easy_vqa import compute_shape_mask

    labels = easy_vqa_image_labels(split)
    grid = (IMAGE_SIZE // patch, IMAGE_SIZE // patch)
    covers, shapes, colours = [], [], []
    for image_id, image in zip(image_ids, images):
        mask = compute_shape_mask(np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE))))
        covers.append(compute_cover_grid(mask, grid, patch))
        shape = labels.get(image_id, {}).get("shape") or compute_mask_shape(mask)
        colour = labels.get(image_id, {}).get("color")
        shapes.append(tok.convert_tokens_to_ids(shape) if shape else -1)
        colours.append(tok.convert_tokens_to_ids(colour) if colour else -1)
    return {"cover": torch.from_numpy(np.stack(covers)), "shape_id": torch.tensor(shapes),
            "color_id": torch.tensor(colours)}


def grounding_loss(feats: torch.Tensor, embedding: torch.Tensor, cover: torch.Tensor, shape_id: torch.Tensor,
                   color_id: torch.Tensor, min_cover: float = 0.5) -> torch.Tensor:
    """Cross-entropy of the image tokens that show the shape against the words for its shape and colour.

    Each image token's projected feature is read as the decoder reads a word: scored against every word
    embedding (the tied input/output embeddings). Tokens whose patch the shape covers by ``min_cover`` or
    more (the most covered one when none does) are asked for the shape's word and its colour's word, half
    each. This is LLaVA's first stage (aligning the projector's output with the decoder's word embeddings)
    with easy-VQA's facts as the caption, done alongside the answer loss.

    Args:
        feats: ``[n_images, n_tokens, d_model]`` projected image features, patches in row-major order.
        embedding: ``[vocab, d_model]`` the decoder's word embeddings.
        cover: ``[n_images, rows, cols]`` share of each patch covered by the shape.
        shape_id, color_id: ``[n_images]`` word ids, -1 where unknown.

    >>> emb = torch.eye(4); f = torch.zeros(1, 4, 4); f[0, 1, 2] = f[0, 1, 3] = 50.0
    >>> cov = torch.tensor([[[0.0, 0.9], [0.1, 0.0]]])
    >>> round(grounding_loss(f, emb, cov, torch.tensor([2]), torch.tensor([3])).item(), 4)
    0.6931
    """
    cover = cover.flatten(1).to(feats.device)
    chosen = (cover >= min_cover) | ((cover == cover.amax(1, keepdim=True)) & (cover > 0))
    target = torch.zeros(*cover.shape[:1], embedding.shape[0], device=feats.device)
    for ids in (shape_id, color_id):
        known = ids >= 0
        target[known.nonzero().squeeze(1).to(feats.device), ids[known].to(feats.device)] += 1.0
    has = target.sum(1) > 0
    target = target / target.sum(1, keepdim=True).clamp_min(1.0)
    logp = torch.log_softmax(feats @ embedding.T, dim=-1)  # [n_images, n_tokens, vocab]
    per_token = -(logp * target[:, None, :]).sum(-1)
    weights = (chosen & has[:, None]).float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def yes_no_balance(questions: list[str], answers: list[str], minority: float = 0.5) -> torch.Tensor:
    """Sampling weights under which each yes/no question's rarer answer makes at least ``minority`` of its draws.

    "is there a red shape?" is "no" for 7 images in 8, so answering from the words alone scores about 0.83
    on easy-VQA's yes/no questions, and a model stays there for epochs before it learns to compare the
    question's colour or shape with the image. For a text whose rarer answer has share ``r < minority``, the
    rarer answer's pairs are weighted ``minority / r`` and the other's ``(1 - minority) / (1 - r)``: the text
    keeps its share of the draws. ``minority=0.5`` answers every text "yes" and "no" equally often. Other
    questions, texts already at or above ``minority``, and texts seen with one answer only keep weight 1.

    >>> [round(w, 4) for w in yes_no_balance(["is it?"] * 3 + ["what?"], ["no", "no", "yes", "red"]).tolist()]
    [0.75, 0.75, 1.5, 1.0]
    >>> [round(w, 4) for w in yes_no_balance(["is it?"] * 8, ["no"] * 7 + ["yes"], 1 / 3).tolist()][-2:]
    [0.7619, 2.6667]
    """
    if not 0 < minority <= 0.5:
        raise ValueError(f"the rarer answer's share must be in (0, 0.5]; got {minority}")
    pairs = Counter(zip(questions, answers))
    texts = Counter(questions)
    weights = []
    for q, a in zip(questions, answers):
        n_yes, n_no = pairs[(q, "yes")], pairs[(q, "no")]
        if answer_category(a) != "yes/no" or not (n_yes and n_no):
            weights.append(1.0)
            continue
        rare = min(n_yes, n_no) / texts[q]
        if rare >= minority:  # also every text answered "yes" and "no" equally often
            weights.append(1.0)
        elif pairs[(q, a)] == min(n_yes, n_no):
            weights.append(minority / rare)
        else:
            weights.append((1 - minority) / (1 - rare))
    return torch.tensor(weights, dtype=torch.double)


def sampling_weights(data: dict, focus_shapes: float, balance_yes_no: float) -> torch.Tensor | None:
    """The product of the shape-focus and yes/no-balance weights; None when both are off (uniform draws)."""
    if focus_shapes == 1 and not balance_yes_no:
        return None
    weights = focus_weights(data["about_shape"], focus_shapes)
    return weights * yes_no_balance(data["question"], data["answer"], balance_yes_no) if balance_yes_no else weights


def grouped_order(data: dict, weights: torch.Tensor | None, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """One epoch's question order, drawn as the ViLT demo draws it, then grouped ``per_image`` at a time by image.

    The questions are drawn (uniformly without replacement, or by ``weights`` with replacement), sorted by
    image (random order within an image), cut into runs of ``per_image`` and the runs shuffled: a batch of
    B questions then shows about B / per_image images, and the vision tower runs once per image.
    """
    n = len(data["image"])
    if weights is None:
        drawn = torch.randperm(n, generator=gen)
    else:
        drawn = torch.multinomial(weights, n, replacement=True, generator=gen)
    tiebreak = torch.rand(n, generator=gen)
    drawn = drawn[torch.argsort(data["image"][drawn].double() + tiebreak.double() * 0.5)]
    runs = list(torch.split(drawn, per_image))
    return torch.cat([runs[i] for i in torch.randperm(len(runs), generator=gen)])


def answer_logits(model, data: dict, idx: torch.Tensor, device: str, gen: torch.Generator | None = None,
                  grounding: float = 0.0):
    """Logits predicting the answer token and the token after it for questions ``idx``: ``[len(idx), 2, vocab]``,
    their targets, and the batch's `grounding_loss` (0 unless ``grounding`` > 0).

    Each distinct image of the batch goes through the vision tower once (flipped/rotated when ``gen`` is given);
    its projected features fill the ``<image>`` slots of every question about it. Rows are right-padded, so no
    attention mask is needed: causal attention never lets a real token see the padding after it.
    """
    images, slot = torch.unique(data["image"][idx], return_inverse=True)
    pixels, cover = data["pixels"][images], data["cover"][images]
    if gen is not None:
        pixels, cover = dihedral(pixels, gen, cover)
    ids = data["input_ids"][idx].to(device)
    width = int(data["prompt_len"][idx].max()) + 2
    ids = ids[:, :width]
    feats = image_features(model, pixels.to(device))  # [images, image tokens, d_model]
    aux = torch.zeros((), device=device)
    if grounding > 0:
        aux = grounding_loss(feats, model.get_input_embeddings().weight, cover, data["shape_id"][images],
                             data["color_id"][images])
    feats = feats[slot.to(device)]  # [batch, image tokens, d_model]
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    at = (data["prompt_len"][idx].to(device) - 1).unsqueeze(1) + torch.arange(2, device=device)
    picked = hidden.gather(1, at.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return model.lm_head(picked), ids.gather(1, at + 1), aux


def train_step(model, optim, sched, data: dict, idx: torch.Tensor, device: str, gen: torch.Generator | None,
               grounding: float = 0.0) -> float:
    """One update: cross-entropy on the answer token and its </s>, plus ``grounding`` times the image tokens'
    `grounding_loss`; gradients clipped to norm 1. Returns the answer loss."""
    logits, targets, aux = answer_logits(model, data, idx, device, gen, grounding)
    answer_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss = answer_loss + grounding * aux
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    sched.step()
    return answer_loss.item()


@torch.no_grad()
def exact_match(model, data: dict, device: str, batch_size: int = 256) -> torch.Tensor:
    """Teacher-forced exact match per question: greedy decoding would write the answer token, then </s>.

    That is the condition for greedy `generate` to return exactly the answer (the answer is one token);
    `measure` checks the two agree question by question on the full test split.

    Returns:
        A bool tensor ``[n_questions]``.
    """
    model.eval()
    out = []
    order = torch.argsort(data["image"])  # questions about one image share its vision pass
    for idx in torch.split(order, batch_size):
        logits, targets, _ = answer_logits(model, data, idx, device)
        out.append((logits.argmax(-1) == targets).all(-1).cpu())
    model.train()
    hits = torch.empty(len(order), dtype=torch.bool)
    hits[order] = torch.cat(out)
    return hits


def generate_answers(model, processor, records, batch_size: int = 128) -> list[str]:
    """Greedy answers with plain transformers: chat template, processor (left padding), `generate`, decode."""
    answers = []
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{q}"}]}]
    template = processor.apply_chat_template(chat, add_generation_prompt=True)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        images = [Image.open(r.image_path).convert("RGB") for r in batch]
        texts = [template.replace("{q}", r.question) for r in batch]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def per_category(records, hits) -> dict:
    """Accuracy by question type (`answer_category`): ``{"color": acc, "shape": acc, "yes/no": acc}``."""
    table: dict[str, list] = {}
    for rec, hit in zip(records, hits):
        table.setdefault(answer_category(rec.answer), []).append(bool(hit))
    return {cat: round(float(np.mean(v)), 4) for cat, v in sorted(table.items())}


def measure(out: Path, test_hits: torch.Tensor, test_data: dict, limit: int | None = None) -> dict:
    """Exact-match accuracy of the saved folder with greedy `generate`, on the test split and the guard subset.

    ``test_hits`` is the training loop's teacher-forced exact match of the final model; the number of
    questions where it disagrees with `generate` is recorded (0 means the per-epoch figures are generate's).
    ``test_data`` (`encode_split` of the test split) gives the saved model's `grounded_shape_accuracy`.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    processor = AutoProcessor.from_pretrained(str(out))
    model = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    records = load_easy_vqa("test")[:limit]
    generated = generate_answers(model, processor, records)
    hits = [g == r.answer for g, r in zip(generated, records)]
    subset = [i for i in guard_subset(len(records), min(300, len(records)))]
    grounded = grounded_shape_accuracy(model, test_data, "cpu")
    return {
        "test_accuracy": round(float(np.mean(hits)), 4), "n_test": len(records),
        "by_type": per_category(records, hits),
        "subset_accuracy": round(float(np.mean([hits[i] for i in subset])), 4), "n_subset": len(subset),
        "teacher_forced_disagreements": int(sum(h != bool(t) for h, t in zip(hits, test_hits))),
        "grounded_shape_accuracy": round(grounded, 4), "n_images": len({r.image_id for r in records}),
        "size_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 2),
    }


def recipe_text(recipe: dict) -> str:
    """The model card's paragraph on the architecture and the training recipe."""
    v, t = recipe["vision"], recipe["text"]
    stage_two = "Stage 2, the questions" if recipe.get("pretrain_steps") else "Training"
    return (
        f"- Architecture: `LlavaForConditionalGeneration`; CLIP vision tower hidden {v['hidden']}, {v['layers']} "
        f"layers, {recipe['heads']} heads, 64x64 images in {recipe['patch']}x{recipe['patch']} patches "
        f"({(IMAGE_SIZE // recipe['patch']) ** 2} image tokens, CLS dropped, last layer); "
        f"the LLaVA projector (linear, GELU, linear); Llama decoder hidden {t['hidden']}, {t['layers']} layers, "
        f"{recipe['heads']} heads, SwiGLU {4 * t['hidden']}, tied input/output embeddings; "
        f"{recipe['parameters']:,} parameters.\n"
        f"- Tokenizer: word level (`tokenizers`), the {recipe['vocab_size'] - len(SPECIAL)} words of every easy-VQA "
        f"question and answer plus `{' '.join(SPECIAL)}`. Chat template: `<s><|user|><image>QUESTION<|assistant|>`, "
        "then the answer (one word) and `</s>`.\n"
        f"{pretrain_text(recipe)}"
        f"- {stage_two} (`scripts/train_demo_lvlm.py`, recipe `{recipe['name']}`): {recipe['epochs']} epochs of 38,575 "
        f"question draws, batch {recipe['batch_size']} ({recipe['per_image']} questions per image, so the vision "
        f"tower runs once per image), loss on the answer token and `</s>` only, AdamW lr {recipe['lr']} with "
        f"linear warm-up and cosine decay, weight decay 0.01, seed {recipe['seed']}, "
        f"{'random flips and 90-degree rotations of the images, ' if recipe['augment'] else ''}"
        f"{tied_text(recipe.get('tied_filters'))}"
        f"{focus_text(recipe.get('focus_shapes', 1))}"
        f"{yes_no_text(recipe['balance_yes_no'])}"
        f"{grounding_text(recipe.get('grounding', 0))}"
        f"{recipe['minutes']:.1f} min on {recipe['device']} ({recipe['threads']} threads; load average "
        f"{recipe['load_average']} at the end)."
    )


def yes_no_text(share: float) -> str:
    """The card's words on yes/no rebalancing (nothing when off)."""
    if not share:
        return ""
    return f"each yes/no question text's rarer answer drawn at least {share:.0%} of the time, "


def pretrain_text(recipe: dict) -> str:
    """The card's line on stage 1 (the tower on the grounding loss), with its test-image shape accuracy."""
    steps = recipe.get("pretrain_steps", 0)
    if not steps:
        return ""
    hist = recipe.get("pretrain_history") or [{}]
    reached = (f"; the image tokens then name the shape of {hist[-1]['shape_acc']:.1%} of the test images"
               if "shape_acc" in hist[-1] else "")
    return (f"- Stage 1, the vision tower: {steps:,} updates of {recipe['pretrain_batch']} images (flipped/rotated) "
            f"on the grounding loss alone (below), AdamW lr {recipe['pretrain_lr']} with warm-up and cosine decay; "
            f"the decoder's layers are not trained (its tied word embeddings are){reached}. "
            "LLaVA aligns its projector with the decoder's words on captions "
            "first; here the caption is the shape's own shape and colour words.\n")


def grounding_text(weight: float) -> str:
    """The card's words on the grounding loss in stage 2."""
    if not weight:
        return ""
    return (f"plus {weight:g}x the grounding loss (each image token the shape covers by half or more, read against the "
            "tied word embeddings, is asked for the shape's word and its colour's word, half each; the shape and "
            "colour come from the answers to the image's questions, a shape no question names from the mask), ")


def write_card(out: Path, recipe: dict, history: list, m: dict) -> dict:
    """Write README.md (the model card) and training_metrics.json from the recipe, history and measurement."""
    by_type = ", ".join(f"{k} {v:.4f}" for k, v in m["by_type"].items())
    lines = [
        "---", "license: mit", "library_name: transformers", "pipeline_tag: image-text-to-text",
        "tags: [llava, easy-vqa, vlscope-demo]", "---", "# llava-tiny-easyvqa", "",
        "VLScope's bundled generative demo: a tiny LLaVA-architecture model trained from scratch on",
        "[easy-VQA](https://github.com/vzhou842/easy-VQA) (MIT). It answers with plain transformers:", "",
        "```python", "from transformers import AutoProcessor, LlavaForConditionalGeneration", "",
        "processor = AutoProcessor.from_pretrained(path)", "model = LlavaForConditionalGeneration.from_pretrained(path)",
        'chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]',
        "prompt = processor.apply_chat_template(chat, add_generation_prompt=True)",
        'inputs = processor(images=image, text=prompt, return_tensors="pt")',
        'answer = processor.decode(model.generate(**inputs)[0, inputs["input_ids"].shape[1]:], '
        "skip_special_tokens=True)", "```", "",
        recipe_text(recipe), "",
        f"**Exact-match accuracy of greedy `generate` on the full easy-VQA test split ({m['n_test']:,} questions): "
        f"{m['test_accuracy']:.4f}** (by question type: {by_type}).", "",
        f"On the fixed {m['n_subset']}-question subset of the accuracy guard in `tests/test_demo_lvlm.py` "
        f"(test questions `i * {m['n_test']} // {m['n_subset']}`): {m['subset_accuracy']:.4f}. "
        f"Size {m['size_mb']:.1f} MB.", "",
        *([(f"After training, the image tokens that show the shape name it (read against the word embeddings, "
            f"`grounded_shape_accuracy`) for {m['grounded_shape_accuracy']:.1%} of the {m['n_images']:,} test "
            "images."), ""] if "grounded_shape_accuracy" in m else []),
        "Per-epoch test accuracy below is the training loop's teacher-forced exact match (the answer token, then "
        "`</s>`, are the greedy choices); on the final model it disagrees with `generate` on "
        f"{m['teacher_forced_disagreements']} of {m['n_test']:,} questions.", "",
        "| epoch | train loss | test accuracy | color | shape | yes/no | minutes | load average (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {e['epoch']} | {e['loss']:.4f} | {e['test_acc']:.4f} | {e['by_type'].get('color', 0):.4f} | "
              f"{e['by_type'].get('shape', 0):.4f} | {e['by_type'].get('yes/no', 0):.4f} | {e['minutes']:.1f} | "
              f"{e.get('load_average_1min', '')} |"
              for e in history]
    if recipe.get("pretrain_history"):
        lines += ["", ("The train loss above is the answer loss (answer token and `</s>`), without the grounding "
                       "loss. Stage 1, the vision tower on the grounding loss alone (shape named = the share of test "
                       "images whose shape tokens, read as words, name the right shape; `grounded_shape_accuracy`):"),
                  "",
                  "| update | grounding loss | shape named | minutes |", "|---|---|---|---|"]
        lines += [f"| {h['step']:,} | {h['loss']:.4f} | {h['shape_acc']:.4f} | {h['minutes']:.1f} |"
                  for h in recipe["pretrain_history"]]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    metrics = {**m, "recipe": recipe, "history": history}
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-image", type=int, default=4, help="questions per image in a batch (1 = no grouping)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128, help="decoder width")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=8, help="vision patch size (64x64 images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random flips/rotations of the training images")
    parser.add_argument("--focus-shapes", type=float, default=3.0,
                        help="draw questions about shapes this many times as often (1 = uniform)")
    parser.add_argument("--balance-yes-no", type=float, default=0.0, metavar="SHARE",
                        help="draw each yes/no question's rarer answer at least SHARE of the time (0 = as in the data; "
                             "0.5 = 'yes' and 'no' equally often)")
    parser.add_argument("--tied-share", type=float, default=0.75,
                        help="share of patch filters started colour-blind (0 = the plain random init)")
    parser.add_argument("--tied-scale", type=float, default=3.0, help="scale of the colour-blind spatial filters")
    parser.add_argument("--tied-noise", type=float, default=0.3, help="random init added to the colour-blind filters")
    parser.add_argument("--grounding", type=float, default=1.0,
                        help="weight of the grounding loss in stage 2 (stage 1 trains on it alone): image tokens "
                             "on the shape scored as its shape and colour words")
    parser.add_argument("--pretrain-steps", type=int, default=4000,
                        help="updates of the tower/projector on the grounding loss alone, before the questions")
    parser.add_argument("--pretrain-batch", type=int, default=32, help="images per pre-training update")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each stage after N updates (probes and smoke runs)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N questions of each split")
    return parser.parse_args(argv)


def recipe_of(args, model, tokenizer, minutes: float) -> dict:
    name = "llava-tiny-easyvqa-v2" if args.pretrain_steps or args.grounding else "llava-tiny-easyvqa-v1"
    return {
        "name": name, "vision": {"hidden": args.vision_hidden, "layers": args.vision_layers},
        "text": {"hidden": args.hidden, "layers": args.layers}, "heads": args.heads, "patch": args.patch,
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "epochs": args.epochs, "batch_size": args.batch_size, "per_image": args.per_image, "lr": args.lr,
        "seed": args.seed, "augment": args.augment, "focus_shapes": args.focus_shapes,
        "balance_yes_no": args.balance_yes_no, "grounding": args.grounding,
        "pretrain_steps": args.pretrain_steps, "pretrain_batch": args.pretrain_batch, "pretrain_lr": args.pretrain_lr,
        "pretrain_history": args.pretrain_history,
        "tied_filters": {"share": args.tied_share, "scale": args.tied_scale, "noise": args.tied_noise},
        "max_steps": args.max_steps, "limit": args.limit, "minutes": round(minutes, 1), "device": args.device_used,
        "threads": args.threads, "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projector's output for a batch of images: ``[n_images, image tokens, d_model]`` (CLS dropped)."""
    feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output
    return torch.stack(list(feats))


@torch.no_grad()
def grounded_shape_accuracy(model: LlavaForConditionalGeneration, data: dict, device: str,
                            batch_size: int = 250) -> float:
    """Share of images whose shape tokens, read as words, name the right shape.

    Each image token's log-probabilities over the three shape words are averaged with the patch's cover as
    weight; the best-scoring word is the image's shape. This is what the grounding loss teaches.

    Args:
        model: the model; its vision tower, projector and word embeddings are read.
        data: an `encode_split` result. The reference is its ``shape_id``: the shape the image's questions
            name, else the one read from the mask (on the test split, 56 of the 1,000 images; the mask's
            reading disagrees with the answers on 10 of the other 944, small triangles read as circles).
        device: where the tower runs.
        batch_size: images per tower pass.

    Raises:
        ValueError: no image has a shape to compare with.
    """
    model.eval()
    tok = data["tokenizer"]
    shape_ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in ("circle", "rectangle", "triangle")])
    embedding = model.get_input_embeddings().weight
    hits = []
    for start in range(0, len(data["pixels"]), batch_size):
        feats = image_features(model, data["pixels"][start : start + batch_size].to(device)).cpu()
        cover = data["cover"][start : start + batch_size].flatten(1)
        logp = torch.log_softmax((feats @ embedding.cpu().T)[..., shape_ids], dim=-1)
        picked = shape_ids[(logp * cover[..., None]).sum(1).argmax(-1)]
        known = data["shape_id"][start : start + batch_size] >= 0
        hits += (picked[known] == data["shape_id"][start : start + batch_size][known]).tolist()
    model.train()
    if not hits:
        raise ValueError("no image of this split has a known shape")
    return float(np.mean(hits))


def pretrain_tower(model: LlavaForConditionalGeneration, train_data: dict, test_data: dict,
                   args: argparse.Namespace, start: float) -> list[dict]:
    """Stage 1: the vision tower, projector and word embeddings on `grounding_loss` alone (no questions).

    LLaVA first aligns its projector with the decoder's word space on captions before it trains on
    instructions; here the caption is the shape's own words, asked of the tokens that show it, and the
    tower learns too (it starts from scratch). ``args.pretrain_steps`` updates of ``args.pretrain_batch``
    images (flipped/rotated unless ``--no-augment``), AdamW with warm-up and cosine decay at ``args.pretrain_lr``.

    Args:
        model: the model, trained in place (the decoder's layers get no gradient).
        train_data, test_data: `encode_split` results; the test images measure the progress.
        args: the parsed command line. ``args.pretrain_steps`` is capped at ``args.max_steps`` when that is set,
            so that the recipe records the updates made.
        start: `time.perf_counter()` at the start of the run.

    Returns:
        One record per ``args.pretrain_steps // 4`` steps: step, loss, grounded shape accuracy on the test images.
    """
    if args.max_steps:  # probes and smoke runs stop both stages after ``max_steps``
        args.pretrain_steps = min(args.pretrain_steps, args.max_steps)
    if args.pretrain_steps <= 0:
        return []
    optim, sched = make_optimizer(model, args.pretrain_lr, args.pretrain_steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    embedding = model.get_input_embeddings().weight
    n, history, losses = len(train_data["pixels"]), [], []
    for step in range(1, args.pretrain_steps + 1):
        idx = torch.randint(0, n, (args.pretrain_batch,), generator=gen)
        pixels, cover = train_data["pixels"][idx], train_data["cover"][idx]
        if args.augment:
            pixels, cover = dihedral(pixels, gen, cover)
        loss = grounding_loss(image_features(model, pixels.to(args.device)), embedding, cover,
                              train_data["shape_id"][idx], train_data["color_id"][idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.pretrain_steps // 4) == 0 or step == args.pretrain_steps:
            history.append({"step": step, "loss": round(float(np.mean(losses[-100:])), 4),
                            "shape_acc": round(grounded_shape_accuracy(model, test_data, args.device), 4),
                            "minutes": round((time.perf_counter() - start) / 60, 1)})
            print(f"pretrain {json.dumps(history[-1])}", flush=True)
    return history


def train(model, train_data: dict, test_data: dict, test_records, args, start: float) -> tuple[list, torch.Tensor]:
    """The training loop; returns the per-epoch history and the final teacher-forced hits on the test split."""
    steps_per_epoch = math.ceil(len(train_data["image"]) / args.batch_size)
    total = steps_per_epoch * args.epochs
    optim, sched = make_optimizer(model, args.lr, total)
    gen = torch.Generator().manual_seed(args.seed)
    weights = sampling_weights(train_data, args.focus_shapes, args.balance_yes_no)
    history, step, hits = [], 0, None
    for epoch in range(1, args.epochs + 1):
        order, losses = grouped_order(train_data, weights, args.per_image, gen), []
        for idx in torch.split(order, args.batch_size):
            losses.append(train_step(model, optim, sched, train_data, idx, args.device, gen if args.augment else None,
                                     args.grounding))
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{total} loss {np.mean(losses[-100:]):.4f} "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        hits = exact_match(model, test_data, args.device)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "test_acc": round(hits.float().mean().item(), 4),
                        "by_type": per_category(test_records, hits.tolist()),
                        "minutes": round((time.perf_counter() - start) / 60, 1),
                        "load_average_1min": round(os.getloadavg()[0], 2)})
        print(f"epoch {epoch}: {json.dumps(history[-1])}", flush=True)
        if args.max_steps and step >= args.max_steps:
            break
    return history, hits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device_used = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llava-demo-") as work:
        processor = build_processor(build_tokenizer(Path(work)), args.patch)
    tokenizer = processor.tokenizer
    train_data = encode_split("train", processor, args.limit)
    test_data = encode_split("test", processor, args.limit)
    test_records = load_easy_vqa("test")[: args.limit]
    model = make_model(tokenizer, args)
    if args.tied_share > 0:
        tie_colour_blind(model.model.vision_tower.embeddings.patch_embedding.weight, args.tied_share,
                         args.tied_scale, args.tied_noise, torch.Generator().manual_seed(args.seed))
    model = model.to(args.device)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_data['image'])} train / "
          f"{len(test_data['image'])} test questions on {args.device}", flush=True)
    args.pretrain_history = pretrain_tower(model, train_data, test_data, args, start)
    history, hits = train(model, train_data, test_data, test_records, args, start)
    args.out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(str(args.out))
    processor.save_pretrained(str(args.out))
    minutes = (time.perf_counter() - start) / 60
    measured = measure(args.out, hits, test_data, args.limit)
    metrics = write_card(args.out, recipe_of(args, model, tokenizer, minutes), history, measured)
    print(f"saved to {args.out} in {minutes:.1f} min (+{(time.perf_counter() - start) / 60 - minutes:.1f} min "
          f"measuring); generate accuracy {metrics['test_accuracy']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
