"""BLIP adapter: ``BlipForImageTextRetrieval`` (image-text matching) and ``BlipForQuestionAnswering`` (VQA).

BLIP reads two streams: ``vision`` (the ViT's image CLS, then the patches row-major) and ``text`` (the tokenizer's
tokens). The text encoder reads the image only through cross-attention, so the blocks are ``vision.self``,
``text.self`` and ``text.cross`` (text queries over the vision tokens as keys); for VQA the text blocks are the
question encoder's (the answer decoder's attention is not exposed).

BLIP's quirks live here and nowhere else:

- The Hugging Face heads return only the vision tower's attentions, so the adapter runs the towers itself
  (vision model, text encoder with the image, ITM head / answer decoder) with the very modules and inputs the
  heads use: scores equal the heads' own (``tests/models/test_blip.py`` checks).
- In transformers 5.23 the text encoder silently drops ``encoder_attention_mask`` in its cross-attention
  (``BlipTextAttention`` does not pass it on), so image tokens are removed from the text's view by a scoped
  forward hook (`_image_mask_hooks`) that renormalises each cross-attention row over the kept keys and recomputes
  the context: exactly what a ``-inf`` mask before the softmax would give.
- The contrastive similarity is computed from a second, text-only pass of the text encoder (as the head's
  ``use_itm_head=False`` branch does), so masking a ``text.self`` head acts on both passes.
- VQA answers are generated greedily, one group of equally long questions at a time, so the decoder never reads
  a padded question position (the head's own ``generate`` would, with a batch of unequal questions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlcore.errors import InputError, NoAttentionError
from vlcore.models.base import BlockSpec, Capture, Captured, EncodedBatch, Gradients, ModelAdapter
from vlcore.models.registry import Family, LoadContext
from vlcore.trace import (
    IMAGE_CLS_TOKEN,
    ROLE_IMAGE_SUMMARY,
    ROLE_PAD,
    ROLE_PATCH,
    ROLE_SPECIAL,
    ROLE_TEXT,
    ImageGrid,
    TokenLayout,
    patch_token,
)

ARCHITECTURES = {"BlipForImageTextRetrieval": "itm", "BlipForQuestionAnswering": "vqa"}

FAMILY = Family(
    name="blip",
    title="BLIP",
    model_types=("blip",),
    architectures=ARCHITECTURES,
    checkpoints={
        "Salesforce/blip-itm-base-coco": "image-text matching and similarity, ViT-B (COCO)",
        "Salesforce/blip-itm-large-coco": "image-text matching and similarity, ViT-L (COCO)",
        "Salesforce/blip-vqa-base": "VQA: generates a free-form answer, ViT-B",
    },
)

VISION, TEXT_STREAM = "vision", "text"
SPECS_TITLES = {
    "vision.self": "image self-attention (vision tower)",
    "text.self": "text self-attention",
    "text.cross": "text -> image cross-attention",
}


def load(ctx: LoadContext) -> BlipAdapter:
    """Load a BLIP checkpoint (eager attention) with its tokenizer and image processor."""
    import transformers
    from transformers import AutoTokenizer, BlipImageProcessorPil

    model = ctx.from_pretrained(getattr(transformers, ctx.architecture), attn_implementation="eager")
    tokenizer = ctx.processor(AutoTokenizer)
    image_processor = ctx.processor(BlipImageProcessorPil)
    return BlipAdapter(model, tokenizer, image_processor, model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


@dataclass
class BlipResult:
    """One BLIP pass (`Captured.output`), batch ``B``.

    Attributes:
        image_embeds: ``[B, 1 + P, D_vision]`` the vision tower's output (after its final LayerNorm).
        text_embeds: ``[B, T, D]`` the text encoder's output with the image (the VQA question encoding).
        text_mask: int ``[B, T]`` 1 on real text tokens.
        itm_logits: ``[B, 2]`` (no match, match) of the ITM head; None for VQA.
        similarity: ``[B]`` cosine of the projected image and text CLS features; None for VQA.
        answers: the greedy answer per row (VQA), decoded without specials.
        answer_ids: the answer's token ids per row, without the start and end tokens.
        answer_logprob: ``[B]`` log-probability of each generated answer: its tokens, then the end token (also when
            the answer was cut at ``max_answer_tokens``: the probability of that answer as a whole answer).
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    text_mask: torch.Tensor
    itm_logits: torch.Tensor | None = None
    similarity: torch.Tensor | None = None
    answers: tuple[str, ...] | None = None
    answer_ids: tuple[tuple[int, ...], ...] | None = None
    answer_logprob: torch.Tensor | None = None

    def detach(self) -> BlipResult:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


class BlipAdapter(ModelAdapter):
    """A BLIP model with its tokenizer and image processor: streams ``vision`` and ``text``, blocks
    ``vision.self``, ``text.self`` and ``text.cross``.

    Args:
        model: a ``BlipForImageTextRetrieval`` or ``BlipForQuestionAnswering``.
        tokenizer: its tokenizer.
        image_processor: a ``BlipImageProcessorPil`` (or compatible) instance.
        model_id: name plus revision or weights hash.
        device: "cpu", "cuda", or "auto".
        dtype: torch dtype for the weights; float32 unless asked.
    """

    family = "blip"
    tasks = FAMILY.tasks
    max_answer_tokens = 20  # greedy VQA answers stop at the end token or after this many tokens

    def __init__(self, model, tokenizer, image_processor, model_id: str, device: str = "auto", dtype=None):
        arch = type(model).__name__
        if arch not in ARCHITECTURES:
            raise ValueError(f"not a supported BLIP class: {arch}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device=device, dtype=dtype or torch.float32).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.architecture = arch
        self.task = ARCHITECTURES[arch]
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        patch = vcfg.patch_size
        self.patch_px = int(patch if isinstance(patch, int) else patch[0])
        self.max_text_len = int(min(tcfg.max_position_embeddings, getattr(tokenizer, "model_max_length", 10**9)))
        self._device = device

    # -- description -------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def block_specs(self) -> dict[str, BlockSpec]:
        vcfg, tcfg = self.config.vision_config, self.config.text_config
        return {
            "vision.self": BlockSpec(VISION, VISION, int(vcfg.num_hidden_layers), int(vcfg.num_attention_heads),
                                     False, SPECS_TITLES["vision.self"]),
            "text.self": BlockSpec(TEXT_STREAM, TEXT_STREAM, int(tcfg.num_hidden_layers),
                                   int(tcfg.num_attention_heads), False, SPECS_TITLES["text.self"]),
            "text.cross": BlockSpec(TEXT_STREAM, VISION, int(tcfg.num_hidden_layers), int(tcfg.num_attention_heads),
                                    False, SPECS_TITLES["text.cross"]),
        }

    @property
    def default_block(self) -> str:
        return "text.cross"

    @property
    def image_stream(self) -> str:
        return VISION

    @property
    def d_model(self) -> int:
        """Width of the text stream (the vision tower's is ``config.vision_config.hidden_size``)."""
        return int(self.config.text_config.hidden_size)

    @property
    def device(self) -> str:
        return self._device

    def block_order(self, target: str | None = None) -> list[tuple[str, int]]:
        """The attention layers in the order the model applies them: ``[(block, layer), ...]``.

        The vision tower runs first; each text layer applies its self-attention, then its cross-attention. The
        contrastive ``"similarity"`` target reads a text-only pass: no cross-attention.
        """
        specs = self.block_specs()
        order = [("vision.self", layer) for layer in range(specs["vision.self"].n_layers)]
        cross = not (self.task == "itm" and target == "similarity")
        for layer in range(specs["text.self"].n_layers):
            order.append(("text.self", layer))
            if cross:
                order.append(("text.cross", layer))
        return order

    def fingerprint(self) -> dict:
        ip = self.image_processor
        size = getattr(ip, "size", None)
        return {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "dtype": str(next(self.model.parameters()).dtype),
            "size": dict(size) if hasattr(size, "keys") else str(size),
            "resample": str(getattr(ip, "resample", None)),
            "image_mean": list(getattr(ip, "image_mean", []) or []),
            "image_std": list(getattr(ip, "image_std", []) or []),
            "max_text_len": self.max_text_len,
            "max_answer_tokens": self.max_answer_tokens,
        }

    def info(self) -> dict:
        vcfg = self.config.vision_config
        return {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "family": self.family,
            "task": self.task,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "layers": self.n_layers,
            "heads": self.n_heads,
            "d_model": self.d_model,
            "vision_layers": int(vcfg.num_hidden_layers),
            "vision_heads": int(vcfg.num_attention_heads),
            "vision_d_model": int(vcfg.hidden_size),
            "patch_px": self.patch_px,
            "max_text_len": self.max_text_len,
            "device": self.device,
        }

    # -- modules (hook points) -----------------------------------------------------------
    def attention_modules(self, block: str) -> list:
        """Each layer's module returning ``(output, probabilities)`` for ``block``."""
        if block == "vision.self":
            return [layer.self_attn for layer in self.model.vision_model.encoder.layers]
        layers = self.model.text_encoder.encoder.layer
        if block == "text.self":
            return [layer.attention.self for layer in layers]
        if block == "text.cross":
            return [layer.crossattention.self for layer in layers]
        raise KeyError(f"BLIP has no block {block!r}; blocks: {list(self.block_specs())}")

    def head_output_modules(self, block: str) -> list:
        """Each layer's linear map reading the heads' concatenated contexts ``[B, N, H * d]``."""
        if block == "vision.self":
            return [m.projection for m in self.attention_modules(block)]
        layers = self.model.text_encoder.encoder.layer
        if block == "text.self":
            return [layer.attention.output.dense for layer in layers]
        if block == "text.cross":
            return [layer.crossattention.output.dense for layer in layers]
        raise KeyError(f"BLIP has no block {block!r}; blocks: {list(self.block_specs())}")

    # -- inputs --------------------------------------------------------------------------
    def encode(self, images: list, texts: list[str]) -> EncodedBatch:
        """Encode PIL images and texts: text ``[CLS] ... [SEP]`` (padded, truncated to ``max_text_len``), images
        resized by the processor to its square size, ``(size / patch)^2`` patches after the image CLS.

        Raises:
            InputError: empty text, a mismatch between images and texts, or something that is not an image.
        """
        if len(images) != len(texts):
            raise InputError(f"got {len(images)} images for {len(texts)} texts; pass one image per text")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InputError("the text is empty: type a question or caption for the image")
        for im in images:
            if not isinstance(im, Image.Image):
                raise InputError(f"BLIP reads one PIL image per text; got {type(im).__name__}. Open the file as an "
                                 "image first (an NLVR2 image pair is not supported)")
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        full = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        enc = self.tokenizer(list(texts), padding=True, padding_side="right", truncation=True,
                             max_length=self.max_text_len, return_tensors="pt", return_token_type_ids=False)
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        rows, cols = (int(s) // self.patch_px for s in pixel_values.shape[-2:])
        seen = self._images_seen(pixel_values, rows, cols)
        vision = [self._vision_layout(seen[b], rows, cols) for b in range(len(texts))]
        text = [self._text_layout(ids, mask) for ids, mask in zip(enc["input_ids"].tolist(),
                                                                    enc["attention_mask"].tolist())]
        dev = self.device
        inputs = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev),
                  "pixel_values": pixel_values.to(dev, dtype=next(self.model.parameters()).dtype)}
        return EncodedBatch(inputs, {TEXT_STREAM: text, VISION: vision}, TEXT_STREAM,
                            [len(f) > self.max_text_len for f in full], [len(f) for f in full])

    def _text_layout(self, ids: list[int], mask: list[int]) -> TokenLayout:
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}  # an unknown word is text
        roles = [ROLE_PAD if not m else ROLE_SPECIAL if i in special else ROLE_TEXT for i, m in zip(ids, mask)]
        return TokenLayout.build(self.tokenizer.convert_ids_to_tokens(ids), roles)

    def _vision_layout(self, image: np.ndarray, rows: int, cols: int) -> TokenLayout:
        cells = [(r, c) for r in range(rows) for c in range(cols)]  # the patch convolution's flatten order
        tokens = [IMAGE_CLS_TOKEN] + [patch_token(r, c) for r, c in cells]
        roles = [ROLE_IMAGE_SUMMARY] + [ROLE_PATCH] * len(cells)
        return TokenLayout.build(tokens, roles, [0] * len(tokens), [(-1, -1)] + cells,
                                 (ImageGrid.regular(image, (rows, cols), self.patch_px),))

    def _images_seen(self, pixel_values: torch.Tensor, rows: int, cols: int) -> list[np.ndarray]:
        """Undo normalisation and rescaling: uint8 ``[h, w, 3]`` per image, cropped to the patch grid."""
        ip = self.image_processor
        x = pixel_values.float().cpu().numpy()
        if getattr(ip, "do_normalize", True):
            x = x * np.asarray(ip.image_std, np.float32)[None, :, None, None] + \
                np.asarray(ip.image_mean, np.float32)[None, :, None, None]
        if getattr(ip, "do_rescale", True):
            x = x / float(ip.rescale_factor)
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        p = self.patch_px
        return [np.ascontiguousarray(im[: rows * p, : cols * p]) for im in x]

    # -- running -------------------------------------------------------------------------
    def _forward(self, batch: EncodedBatch, attentions: bool = False, hidden: bool = False, generate: bool = True,
                 extra_hooks: Sequence = (), pixel_values: torch.Tensor | None = None):
        """Run the towers: returns ``(BlipResult, vision output, text output, masked cross probabilities)``.

        ``batch.inputs["image_keep"]`` (from `mask_image_tokens`) removes image tokens from the text's view;
        ``extra_hooks`` are attached in the same scope, after the masking hooks (they see masked probabilities).
        """
        inputs = batch.inputs
        pixels = inputs["pixel_values"] if pixel_values is None else pixel_values
        keep = inputs.get("image_keep")
        masked: dict[int, torch.Tensor] = {}
        hooks = self._image_mask_hooks(keep, masked) if keep is not None else []
        with self.hooked([*hooks, *extra_hooks]):
            vision = self.model.vision_model(
                pixel_values=pixels, interpolate_pos_encoding=tuple(pixels.shape[-2:]) != self._native_size,
                output_attentions=attentions, output_hidden_states=hidden)
            image_embeds = vision.last_hidden_state
            text = self.model.text_encoder(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                encoder_hidden_states=image_embeds, output_attentions=attentions, output_hidden_states=hidden)
            result = BlipResult(image_embeds, text.last_hidden_state, inputs["attention_mask"])
            if self.task == "itm":
                result.itm_logits = self.model.itm_head(text.last_hidden_state[:, 0, :])
                result.similarity = self._similarity(inputs, image_embeds)
        if self.task == "vqa" and generate:
            result.answer_ids = self._generate(result.text_embeds, result.text_mask)
            with torch.no_grad():
                result.answer_logprob = self.answer_logprob(result, result.answer_ids)
            result.answers = tuple(self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
                                   for ids in result.answer_ids)
        return result, vision, text, [masked[k] for k in sorted(masked)]

    @property
    def _native_size(self) -> tuple[int, int]:
        size = self.config.vision_config.image_size
        return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)

    def _similarity(self, inputs: dict, image_embeds: torch.Tensor) -> torch.Tensor:
        """``[B]`` cosine of the projected image CLS and the text CLS of a text-only pass (the contrastive head)."""
        text_only = self.model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image_feat = torch.nn.functional.normalize(self.model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_feat = torch.nn.functional.normalize(self.model.text_proj(text_only.last_hidden_state[:, 0, :]), dim=-1)
        return (image_feat * text_feat).sum(-1)

    def _image_mask_hooks(self, keep: torch.Tensor, store: dict[int, torch.Tensor]) -> list:
        """Hooks removing image tokens from every cross-attention layer: each row renormalised over the kept keys
        (``p * keep / sum(p * keep)``, zero when nothing is kept) and the context recomputed from the values."""
        values: dict[int, torch.Tensor] = {}
        hooks = []
        for layer, module in enumerate(self.attention_modules("text.cross")):
            def keep_values(_m, _args, output, layer=layer):
                values[layer] = output

            def mask(m, _args, output, layer=layer):
                probs = output[1] * keep[:, None, None, :].to(output[1].dtype)
                probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
                v = values.pop(layer)
                v = v.view(*v.shape[:2], m.num_attention_heads, m.attention_head_size).transpose(1, 2)
                context = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(output[0].shape)
                store[layer] = probs
                return (context, probs, *output[2:])

            hooks += [(module.value, keep_values), (module, mask)]
        return hooks

    def capture(self, batch: EncodedBatch, capture: Capture = Capture()) -> Captured:
        """One pass keeping the asked blocks (per layer ``[B, H', Q, K]``: the tensors of the forward graph) and
        both streams' hidden states (``[L + 1, B, N, D]``; the vision stream's last layer before the tower's final
        LayerNorm). A VQA pass also generates the answer (without gradients)."""
        wanted = set(self.block_specs()) if capture.blocks is None else set(capture.blocks)
        out, vision, text, masked = self._forward(batch, attentions=bool(wanted), hidden=capture.hidden)
        stacks = {"vision.self": vision.attentions, "text.self": text.attentions,
                  "text.cross": masked or text.cross_attentions}
        attentions = {}
        for name in self.block_specs():
            if name not in wanted:
                continue
            if not stacks[name]:
                raise NoAttentionError(f"{self.model_id} returned no attention weights for {name!r}. Load it with "
                                       "attn_implementation='eager' (VLScope does this for you).")
            layers = list(stacks[name])
            if capture.layers is not None:
                layers = [layers[i] for i in capture.layers]
            if capture.heads is not None:
                layers = [a[:, list(capture.heads)] for a in layers]
            attentions[name] = layers
        hidden = {}
        if capture.hidden:
            hidden = {VISION: torch.stack(tuple(vision.hidden_states)),
                      TEXT_STREAM: torch.stack(tuple(text.hidden_states))}
        return Captured(out, attentions, hidden)

    # -- VQA decoding -----------------------------------------------------------------------
    def _generate(self, question: torch.Tensor, mask: torch.Tensor) -> tuple[tuple[int, ...], ...]:
        """Greedy answers per row, without the start and end tokens (at most ``max_answer_tokens``)."""
        tcfg = self.config.text_config
        bos, eos = int(tcfg.bos_token_id), int(tcfg.sep_token_id)
        answers: list[tuple[int, ...]] = [()] * question.shape[0]
        with torch.no_grad():
            for rows, n in _rows_by_length(mask):
                q = question[rows, :n]
                ids = torch.full((len(rows), 1), bos, dtype=torch.long, device=q.device)
                done = torch.zeros(len(rows), dtype=torch.bool, device=q.device)
                for _ in range(self.max_answer_tokens):
                    nxt = self._decoder_logits(ids, q)[:, -1].argmax(-1)
                    ids = torch.cat([ids, torch.where(done, eos, nxt)[:, None]], 1)
                    done |= nxt == eos
                    if bool(done.all()):
                        break
                for k, row in enumerate(rows):
                    seq = ids[k, 1:].tolist()
                    answers[row] = tuple(seq[: seq.index(eos)] if eos in seq else seq)
        return tuple(answers)

    def _decoder_logits(self, ids: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return self.model.text_decoder(input_ids=ids, encoder_hidden_states=question, use_cache=False).logits

    def answer_logprob(self, output: BlipResult, answers: Sequence[Sequence[int]]) -> torch.Tensor:
        """Differentiable ``[B]``: the summed log-probability of each row's answer tokens and the end token under
        the decoder, reading that row's question encoding (no padded position)."""
        tcfg = self.config.text_config
        bos, eos = int(tcfg.bos_token_id), int(tcfg.sep_token_id)
        scores: list[torch.Tensor | None] = [None] * len(answers)
        for rows, n in _rows_by_length(output.text_mask):
            groups: dict[tuple[int, ...], list[int]] = {}
            for row in rows:
                groups.setdefault(tuple(answers[row]), []).append(row)
            for ids, members in groups.items():
                dec = torch.tensor([[bos, *ids, eos]] * len(members), device=output.text_embeds.device)
                logp = self._decoder_logits(dec, output.text_embeds[members, :n]).float().log_softmax(-1)
                total = logp[:, :-1].gather(2, dec[:, 1:, None])[..., 0].sum(-1)
                for k, row in enumerate(members):
                    scores[row] = total[k]
        return torch.stack(scores)

    # -- outputs ---------------------------------------------------------------------------
    def predict(self, output: BlipResult, top_k: int = 5, batch: EncodedBatch | None = None) -> list[list[tuple[str, float]]]:
        """ITM: ``[("match", ITM probability)]``; VQA: ``[(generated answer, its probability)]``."""
        if self.task == "itm":
            probs = output.itm_logits.detach().float().softmax(-1)[:, 1]
            return [[("match", float(p))] for p in probs]
        if output.answers is None:
            return [[] for _ in range(output.text_embeds.shape[0])]
        probs = output.answer_logprob.detach().float().exp()
        return [[(answer, float(p))] for answer, p in zip(output.answers, probs)]

    def target_score(self, output: BlipResult, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """ITM ``"match"`` (default): the ITM head's log-odds ``l_match - l_no`` and its probability;
        ``"similarity"``: the contrastive cosine (also returned as its "probability": a single pair has none).
        VQA: the summed log-probability of the target answer's tokens and the end token (default: row 0's
        generated answer), and its probability; a target equal to an answer generated in ``output`` is scored with
        that answer's own tokens, any other with the tokenizer's.

        Raises:
            InputError: an unknown ITM target, or an empty answer.
        """
        if self.task == "itm":
            if target in (None, "match"):
                logits = output.itm_logits.float()
                return logits[:, 1] - logits[:, 0], logits.softmax(-1)[:, 1], "match"
            if target == "similarity":
                return output.similarity, output.similarity.detach(), "similarity"
            raise InputError(f"BLIP image-text matching explains 'match' (the ITM head) or 'similarity' (the "
                             f"contrastive cosine); got {target!r}")
        if target is None:
            if output.answer_ids is None:
                raise InputError("this BLIP output has no generated answer; give the answer to explain")
            ids, label = output.answer_ids[0], output.answers[0]
        else:
            if not isinstance(target, str) or not target.strip():
                raise InputError("the answer to explain is empty: type an answer")
            label = target.strip()
            ids = next((ids for answer, ids in zip(output.answers or (), output.answer_ids or ()) if answer == label),
                       None)  # a generated answer: its own tokens (decoding and tokenizing need not round-trip)
            if ids is None:
                ids = tuple(self.tokenizer(label, add_special_tokens=False)["input_ids"])
        score = self.answer_logprob(output, [ids] * output.text_embeds.shape[0])
        return score, score.detach().exp(), label

    def targets(self) -> list[str]:
        return ["match", "similarity"] if self.task == "itm" else []

    def default_query(self, block: str, layout: TokenLayout) -> int | None:
        """Text blocks: the first text token ([CLS], which the ITM head reads); ``vision.self``: the image CLS."""
        if block == "vision.self":
            return layout.first(ROLE_IMAGE_SUMMARY)
        return layout.first(ROLE_SPECIAL, ROLE_TEXT)

    # -- interventions -----------------------------------------------------------------------
    @contextmanager
    def head_mask(self, block: str, keep: torch.Tensor):
        """Multiply each head's context by ``keep [B, L, H]`` where the block's output projection reads it
        (``self_attn.projection`` in the vision tower, ``output.dense`` in the text layers)."""
        spec = self.block_specs().get(block)
        if spec is None or tuple(keep.shape[1:]) != (spec.n_layers, spec.n_heads):
            shape = f"[B, {spec.n_layers}, {spec.n_heads}]" if spec else "(no such block)"
            raise ValueError(f"BLIP masks heads of {list(self.block_specs())} with keep [B, L, H]; got block {block!r} "
                             f"keep {tuple(keep.shape)} (expected {shape})")

        def make_hook(layer: int):
            def hook(module, args, _output):
                context = args[0]  # [B, N, H * d]
                width = context.shape[-1] // spec.n_heads
                scale = keep[:, layer].to(context.device, context.dtype).repeat_interleave(width, dim=1)
                return torch.nn.functional.linear(context * scale[:, None, :], module.weight, module.bias)
            return hook

        with self.hooked([(m, make_hook(layer)) for layer, m in enumerate(self.head_output_modules(block))]):
            yield

    def mask_image_tokens(self, batch: EncodedBatch, drops: Sequence[np.ndarray]) -> EncodedBatch:
        """Variants with image tokens removed from the text's view: their cross-attention keys are masked in every
        text layer (the vision tower still sees the whole image). ``drops`` index the ``vision`` stream."""
        if len(batch) != 1:
            raise InputError(f"image-token removal runs on one example; got {len(batch)}")
        n_vision = batch.streams[VISION][0].n_tokens
        base = batch.inputs.get("image_keep")
        base = torch.ones(n_vision, device=batch.inputs["pixel_values"].device) if base is None else base[0]
        keeps = []
        for drop in drops:
            drop = np.asarray(drop, dtype=np.int64)
            if drop.size and (drop.min() < 0 or drop.max() >= n_vision):
                raise InputError(f"image tokens to remove must index the {n_vision} vision tokens; got {drop.tolist()}")
            k = base.clone()
            k[torch.as_tensor(drop, device=k.device)] = 0
            keeps.append(k)
        inputs = {**batch.repeated_inputs(len(keeps), exclude=("image_keep",)), "image_keep": torch.stack(keeps)}
        return EncodedBatch(inputs, {k: v * len(keeps) for k, v in batch.streams.items()}, batch.main,
                            batch.truncated * len(keeps), batch.n_text_full * len(keeps))

    def attention_gradients(self, batch: EncodedBatch, target: str | None = None,
                            blocks: Sequence[str] | None = None, image_pass: int = 0) -> Gradients:
        """Every block's probabilities and the gradient of the target score (`target_score`) with respect to them.

        Forward hooks on each attention module collect the probabilities it returns (the tensors multiplied with
        the values, dropout being off); ``torch.autograd.grad`` differentiates the score without touching the
        parameters' ``.grad``; the pixels are made a leaf that requires grad so frozen weights work too. For
        ``"similarity"`` ``text.self`` is the text-only pass's and ``text.cross`` gets zero gradients.

        Raises:
            InputError: more than one example, an unknown target, or an image pass other than 0.
        """
        if len(batch) != 1:
            raise InputError(f"gradient relevancy explains one example at a time; got a batch of {len(batch)}")
        if image_pass != 0:
            raise InputError(f"{self.model_id} runs one image pass per example; got pass {image_pass}")
        names = list(self.block_specs()) if blocks is None else list(blocks)
        kept: dict[str, list[torch.Tensor]] = {name: [] for name in self.block_specs()}

        def keeper(name):
            return lambda _m, _a, output: kept[name].append(output[1])

        hooks = [(m, keeper(name)) for name in kept for m in self.attention_modules(name)]
        with torch.enable_grad():
            pixels = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
            out, *_ = self._forward(batch, extra_hooks=hooks, pixel_values=pixels)
            score, _, label = self.target_score(out, target)
            n_text = self.block_specs()["text.self"].n_layers
            if self.task == "itm":  # text.self ran twice: with the image, then text-only (similarity)
                kept["text.self"] = kept["text.self"][n_text:] if label == "similarity" else kept["text.self"][:n_text]
            layers = [a for name in names for a in kept[name]]
            grads = iter(torch.autograd.grad(score[0], layers, allow_unused=True))
        attentions, gradients = {}, {}
        for name in names:
            attentions[name] = [a[0].detach().float() for a in kept[name]]
            gradients[name] = [torch.zeros_like(a) if g is None else g[0].detach().float()
                               for a, g in zip(attentions[name], grads)]
        return Gradients(attentions, gradients, out.detach(), label, float(score[0].detach()))


def _rows_by_length(mask: torch.Tensor) -> list[tuple[list[int], int]]:
    """Rows of a ``[B, T]`` text mask grouped by their number of real tokens: ``[(rows, length), ...]``."""
    lengths = mask.sum(-1).tolist()
    groups: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(row)
    return [(rows, n) for n, rows in groups.items()]
