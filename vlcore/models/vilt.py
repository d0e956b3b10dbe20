"""ViLT adapter: ``ViltForQuestionAnswering``, ``ViltForMaskedLM``, ``ViltModel``,
``ViltForImageAndTextRetrieval``.

ViLT's quirks live here and nowhere else:

- ``ViltEmbeddings.visual_embed`` samples the image patches in a random order on every
  call (``max_image_length=-1`` still permutes them). We call it once, keep its
  ``patch_index``, sort the patches row-major, and pass ``image_embeds``; two runs of
  one example are then bit-identical and token ``k`` of the image part is a known cell.
- The text has ``max_position_embeddings`` (40) positions: longer text is truncated and
  flagged.
- ``hidden_states[-1]`` is before the final LayerNorm (see `vlcore.trace`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from vlcore.errors import InputError, NoAttentionError
from vlcore.models.base import BlockSpec, Capture, Captured, EncodedBatch, Gradients, ModelAdapter
from vlcore.models.registry import Family, LoadContext
from vlcore.trace import IMAGE, IMAGE_CLS_TOKEN, ROLE_SPECIAL, TEXT, ImageGrid, TokenLayout, patch_token

ARCHITECTURES = {
    "ViltForQuestionAnswering": "vqa",
    "ViltForImageAndTextRetrieval": "itm",
    "ViltForMaskedLM": "mlm",
    "ViltModel": "base",
    "ViltForImagesAndTextClassification": "nlvr2",
}

FAMILY = Family(
    name="vilt",
    title="ViLT",
    model_types=("vilt",),
    architectures=ARCHITECTURES,
    checkpoints={
        "dandelin/vilt-b32-finetuned-vqa": "VQA (3,129 answers)",
        "dandelin/vilt-b32-mlm": "masked LM (pre-trained)",
        "dandelin/vilt-b32-finetuned-coco": "image-text matching (COCO)",
        "dandelin/vilt-b32-finetuned-flickr30k": "image-text matching (Flickr30k)",
        "dandelin/vilt-b32-finetuned-nlvr2": "NLVR2: is the sentence true of two images?",
    },
)


def load(ctx: LoadContext) -> ViltAdapter:
    """Load a ViLT checkpoint (eager attention) with its tokenizer and image processor."""
    import transformers
    from transformers import AutoTokenizer, ViltImageProcessorPil

    model = ctx.from_pretrained(getattr(transformers, ctx.architecture), attn_implementation="eager")
    tokenizer = ctx.processor(AutoTokenizer)
    image_processor = ctx.processor(ViltImageProcessorPil)
    return ViltAdapter(model, tokenizer, image_processor, model_id=ctx.model_id, device=ctx.device, dtype=ctx.dtype)


class ViltAdapter(ModelAdapter):
    """A ViLT model with its tokenizer and image processor: one joint stream ``main`` (text, image CLS, patches)
    and one block ``self``.

    Args:
        model: a ``Vilt*`` model (any of ``ARCHITECTURES``).
        tokenizer: its tokenizer.
        image_processor: a ``ViltImageProcessorPil`` (or compatible) instance.
        model_id: name plus revision or weights hash.
        device: "cpu", "cuda", or "auto".
        dtype: torch dtype for the weights; float32 unless asked.
    """

    family = "vilt"
    tasks = FAMILY.tasks

    def __init__(self, model, tokenizer, image_processor, model_id: str, device: str = "auto", dtype=None):
        arch = type(model).__name__
        if arch not in ARCHITECTURES:
            raise ValueError(f"not a supported ViLT class: {arch}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device=device, dtype=dtype or torch.float32).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.task = ARCHITECTURES[arch]
        self.architecture = arch
        cfg = model.config
        patch = cfg.patch_size
        self.patch_px = int(patch if isinstance(patch, int) else patch[0])
        self.max_text_len = int(cfg.max_position_embeddings)
        self.n_passes = int(cfg.num_images) if self.task == "nlvr2" else 1
        self._device = device

    # -- description -------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def block_specs(self) -> dict[str, BlockSpec]:
        return {"self": BlockSpec("main", "main", self.n_layers, self.n_heads, False,
                                  "joint self-attention (text and image)")}

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> str:
        return self._device

    @property
    def vilt(self):
        """The ``ViltModel`` inside any head."""
        return getattr(self.model, "vilt", self.model)

    def layer_modules(self) -> list:
        """The encoder's layer modules, in order (for hooks)."""
        return list(self.vilt.encoder.layer)

    def self_attention_modules(self) -> list:
        """Each layer's ``ViltSelfAttention`` (for hooks on attention probabilities)."""
        return [layer.attention.attention for layer in self.vilt.encoder.layer]

    def fingerprint(self) -> dict:
        ip = self.image_processor
        return {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "dtype": str(next(self.model.parameters()).dtype),
            "image_processor": {
                k: (dict(v) if isinstance(v, dict) else v)
                for k, v in ip.to_dict().items()
                if k in ("size", "size_divisor", "image_mean", "image_std", "do_resize", "do_normalize", "resample",
                         "do_rescale", "rescale_factor", "do_pad")
            },
            "max_text_len": self.max_text_len,
        }

    def info(self) -> dict:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "family": self.family,
            "task": self.task,
            "parameters": n_params,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "d_model": self.d_model,
            "patch_px": self.patch_px,
            "max_text_len": self.max_text_len,
            "device": self.device,
        }

    # -- inputs --------------------------------------------------------------------------
    def encode(self, images: list, texts: list[str]) -> EncodedBatch:
        """Encode PIL images and texts. See `EncodedBatch` for the layout.

        For an NLVR2 head each image is a pair ``(left, right)``: both are encoded, padded to the same
        number of image tokens, and stacked as ``image_embeds [B, 2, 1 + P, D]``; the right image's
        layout is ``batch.pair``.

        Raises:
            InputError: on empty text, a mismatch between images and texts, or a missing NLVR2 pair.
        """
        if self.task == "nlvr2":
            return self._encode_pairs(images, texts)
        return self._encode_single(images, texts)

    def _encode_pairs(self, pairs: list, texts: list[str]) -> EncodedBatch:
        n = self.n_passes
        if any(not isinstance(p, (tuple, list)) or len(p) != n for p in pairs):
            raise InputError(f"{self.model_id} reads {n} images per text (NLVR2); give an image pair for each text")
        passes = [self._encode_single([p[k] for p in pairs], texts) for k in range(n)]
        width = max(b.inputs["image_embeds"].shape[1] for b in passes)
        passes = [_pad_image_tokens(b, width) for b in passes]
        first = passes[0]
        first.inputs = {
            "input_ids": first.inputs["input_ids"],
            "attention_mask": first.inputs["attention_mask"],
            "image_embeds": torch.stack([b.inputs["image_embeds"] for b in passes], dim=1),
            "pixel_mask": torch.stack([b.inputs["pixel_mask"] for b in passes], dim=1)[..., None],
        }
        first.pair = passes[1]
        return first

    def pass_outputs(self, out, image_pass: int = 0) -> tuple:
        if self.task != "nlvr2":
            if image_pass != 0:
                raise ValueError(f"{self.model_id} runs one image pass per example; got pass {image_pass}")
            return out.attentions, getattr(out, "hidden_states", None)
        hidden = out.hidden_states[image_pass] if out.hidden_states is not None else None
        return out.attentions[image_pass], hidden

    def _encode_single(self, images: list, texts: list[str]) -> EncodedBatch:
        if len(images) != len(texts):
            raise InputError(f"got {len(images)} images for {len(texts)} texts; pass one image per text")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InputError("the text is empty: type a question or caption for the image")
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        full = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        pix = self.image_processor(images, return_tensors="pt", do_pad=True)
        dev = self.device
        input_ids = enc["input_ids"].to(dev)
        attn = enc["attention_mask"].to(dev)
        with torch.no_grad():
            image_embeds, image_mask, rc = self.embed_images(pix["pixel_values"].to(dev), pix["pixel_mask"].to(dev))
        layout = self._layout(enc, image_mask.cpu().numpy().astype(bool), rc.cpu().numpy())
        images_seen = self._images_seen(pix["pixel_values"], layout["grids"])
        layouts = [
            TokenLayout.from_modality(layout["tokens"][b], layout["modality"][b], layout["special"][b],
                                      layout["patch_rc"][b], (ImageGrid.regular(images_seen[b], layout["grids"][b],
                                                                                self.patch_px),), layout["valid"][b])
            for b in range(len(texts))
        ]
        return EncodedBatch(
            inputs={
                "input_ids": input_ids,
                "attention_mask": attn,
                "image_embeds": image_embeds,
                "pixel_mask": image_mask,
            },
            streams={"main": layouts},
            main="main",
            truncated=[len(f) > self.max_text_len for f in full],
            n_text_full=[len(f) for f in full],
        )

    def embed_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        """Patch-embed images once, in row-major patch order.

        Args:
            pixel_values: float ``[B, 3, H, W]``.
            pixel_mask: int ``[B, H, W]``; 1 on the valid (unpadded) area.

        Returns:
            ``(image_embeds [B, 1 + P, D], image_mask [B, 1 + P], patch_rc [B, P, 2])``; the
            first image token is the image CLS. Padding patches (images of different sizes
            in one batch) come last, are zeroed, masked out, and have ``patch_rc`` -1.
        """
        emb = self.vilt.embeddings
        x, x_mask, (patch_index, (_, width)) = emb.visual_embed(pixel_values, pixel_mask, max_image_length=-1)
        patches, pmask = x[:, 1:], x_mask[:, 1:].bool()
        rows, cols = patch_index[..., 0], patch_index[..., 1]
        n = patches.shape[1]
        big = int(patch_index.max().item() + 1) * (width + 1) + 1
        key = torch.where(pmask, rows * (width + 1) + cols, big + torch.arange(n, device=x.device))
        order = key.argsort(dim=1)
        patches = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[-1]))
        pmask = pmask.gather(1, order)
        rc = patch_index.gather(1, order[..., None].expand(-1, -1, 2))
        patches = patches * pmask[..., None].to(patches.dtype)
        rc = torch.where(pmask[..., None], rc, torch.full_like(rc, -1))
        image_embeds = torch.cat([x[:, :1], patches], dim=1)
        image_mask = torch.cat([x_mask[:, :1], pmask.to(x_mask.dtype)], dim=1)
        return image_embeds, image_mask, rc

    def _layout(self, enc, image_mask: np.ndarray, rc: np.ndarray) -> dict:
        ids = enc["input_ids"].numpy()
        text_valid = enc["attention_mask"].numpy().astype(bool)
        batch, t_len = ids.shape
        n_img = image_mask.shape[1]
        special_ids = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}
        modality = np.concatenate([np.full((batch, t_len), TEXT), np.full((batch, n_img), IMAGE)], 1).astype(np.int8)
        special = np.zeros((batch, t_len + n_img), dtype=bool)
        special[:, :t_len] = np.isin(ids, list(special_ids)) & text_valid
        special[:, t_len] = True
        patch_rc = np.full((batch, t_len + n_img, 2), -1, dtype=np.int16)
        patch_rc[:, t_len + 1 :] = rc
        valid = np.concatenate([text_valid, image_mask], 1)
        tokens, grids = [], []
        for b in range(batch):
            text_tokens = self.tokenizer.convert_ids_to_tokens(ids[b].tolist())
            cells = rc[b][rc[b, :, 0] >= 0]
            grids.append((int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1) if len(cells) else (0, 0))
            img_tokens = [IMAGE_CLS_TOKEN] + [
                patch_token(int(r), int(c)) if r >= 0 else "[PAD]" for r, c in rc[b]
            ]
            tokens.append(tuple(text_tokens) + tuple(img_tokens))
        return {
            "tokens": tokens,
            "modality": modality,
            "special": special,
            "patch_rc": patch_rc,
            "valid": valid,
            "grids": grids,
        }

    def _images_seen(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> list[np.ndarray]:
        """Undo normalisation and crop to the patch grid: uint8 ``[h, w, 3]`` per image."""
        ip = self.image_processor
        x = pixel_values.float().numpy()
        if getattr(ip, "do_normalize", True):
            mean = np.asarray(ip.image_mean, dtype=np.float32)[None, :, None, None]
            std = np.asarray(ip.image_std, dtype=np.float32)[None, :, None, None]
            x = x * std + mean
        if getattr(ip, "do_rescale", True):
            x = x / float(ip.rescale_factor)
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        p = self.patch_px
        return [np.ascontiguousarray(x[b, : r * p, : c * p]) for b, (r, c) in enumerate(grids)]

    # -- running -------------------------------------------------------------------------
    def forward(self, batch: EncodedBatch, attentions: bool = True, hidden: bool = True, **overrides: Any):
        """Run the model on an encoded batch.

        Args:
            batch: from `encode`.
            attentions: return attention probabilities.
            hidden: return hidden states.
            **overrides: replace any model input (e.g. ``pixel_mask`` to drop patches).

        Raises:
            NoAttentionError: attentions were asked for and none came back.
        """
        inputs = {**batch.inputs, **overrides}
        out = self.model(**inputs, output_attentions=attentions, output_hidden_states=hidden, return_dict=True)
        if attentions and not out.attentions:
            raise NoAttentionError(
                f"{self.model_id} returned no attention weights. Load it with "
                "attn_implementation='eager' (VLScope does this for you); if it still returns none, "
                "this checkpoint's attention implementation cannot expose them."
            )
        return out

    def capture(self, batch: EncodedBatch, capture: Capture = Capture()) -> Captured:
        """One pass keeping the ``self`` block and the ``main`` stream's hidden states (see `ModelAdapter.capture`)."""
        want = capture.blocks is None or "self" in capture.blocks
        out = self.forward(batch, attentions=want, hidden=capture.hidden)
        att_layers, hid_layers = self.pass_outputs(out, capture.image_pass)
        attentions = {}
        if want:
            layers = list(att_layers)  # per layer [B, H, N, N]: the tensors of the forward graph
            if capture.layers is not None:
                layers = [layers[i] for i in capture.layers]
            if capture.heads is not None:
                layers = [a[:, list(capture.heads)] for a in layers]
            attentions["self"] = layers
        hidden = {"main": torch.stack(tuple(hid_layers))} if capture.hidden and hid_layers is not None else {}
        return Captured(out, attentions, hidden)

    def target_score(self, output: Any, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """VQA/NLVR2: the answer's logit and its probability (`score`); ITM: the match logit and its sigmoid."""
        logits = output.logits if hasattr(output, "logits") else output
        if self.task == "itm":
            return logits[:, 0], torch.sigmoid(logits.float()[:, 0]), "match"
        if self.task not in ("vqa", "nlvr2"):
            raise InputError(f"this needs a VQA, NLVR2 or image-text-matching head; {self.model_id} is {self.task}")
        if target is not None and target not in self.label2id:
            raise InputError(f"{target!r} is not one of {self.model_id}'s answers; pick one it knows")
        index = int(logits[0].argmax()) if target is None else self.label2id[target]
        probs = self.score(logits) if self.task == "vqa" else logits.float().softmax(-1)
        return logits[:, index], probs[:, index], str(self.config.id2label[index])

    def targets(self) -> list[str]:
        return list(self.label2id) if self.task in ("vqa", "nlvr2") else []

    def default_query(self, block: str, layout: TokenLayout) -> int | None:
        """[CLS], the first special token: ViLT's pooler and every head read its row."""
        return layout.first(ROLE_SPECIAL)

    @contextmanager
    def head_mask(self, block: str, keep: torch.Tensor):
        """Multiply each head's context in ``ViltSelfAttention`` by ``keep [B, L, H]``."""
        modules = self.self_attention_modules()
        if block != "self" or keep.shape[1:] != (len(modules), self.n_heads):
            raise ValueError(f"ViLT masks heads of block 'self' with keep [B, {len(modules)}, {self.n_heads}]; "
                             f"got {block!r} {tuple(keep.shape)}")

        def make_hook(layer: int):
            def hook(module, args, output):
                context = output[0]  # [B, N, H * d]
                scale = keep[:, layer].to(context.dtype).repeat_interleave(context.shape[-1] // self.n_heads, dim=1)
                return (context * scale[:, None, :],) + tuple(output[1:])
            return hook

        with self.hooked([(module, make_hook(layer)) for layer, module in enumerate(modules)]):
            yield

    @contextmanager
    def stream_attentions(self, block: str, consume, image_pass: int = 0):
        """Hand each ``ViltSelfAttention``'s probabilities of image pass ``image_pass`` to ``consume`` and drop them
        from its output (see `ModelAdapter.stream_attentions`)."""
        modules = self.self_attention_modules()
        if block != "self" or image_pass not in range(self.n_passes):
            raise ValueError(f"ViLT streams block 'self', image pass 0..{self.n_passes - 1}; got {block!r}, {image_pass}")
        calls = [0]  # NLVR2 runs the encoder once per image: calls [0, L) are pass 0, [L, 2L) pass 1

        def hand_over(module, args, output):
            if (calls[0] // len(modules)) % self.n_passes == image_pass:
                consume(output[1])
            calls[0] += 1
            return (output[0], output[1].new_empty(0), *output[2:])

        with self.hooked([(module, hand_over) for module in modules]):
            yield

    def mask_image_tokens(self, batch: EncodedBatch, drops: Sequence[np.ndarray]) -> EncodedBatch:
        """Variants with patches removed through ``pixel_mask`` (ViLT's image attention mask): no token attends
        to a removed patch."""
        if len(batch) != 1 or self.n_passes != 1:
            raise InputError(f"image-token removal runs on one example of a one-image model; got {len(batch)} "
                             f"example(s) for {self.model_id} ({self.n_passes} image passes)")
        n_text = int(batch.inputs["input_ids"].shape[1])  # pixel_mask covers [image CLS | patches]
        base = batch.inputs["pixel_mask"][0]
        masks = []
        for drop in drops:
            m = base.clone()
            m[torch.as_tensor(np.asarray(drop, dtype=np.int64) - n_text, device=m.device)] = 0
            masks.append(m)
        inputs = {**batch.repeated_inputs(len(masks), exclude=("pixel_mask",)), "pixel_mask": torch.stack(masks)}
        return EncodedBatch(inputs, {k: v * len(masks) for k, v in batch.streams.items()}, batch.main,
                            batch.truncated * len(masks), batch.n_text_full * len(masks))

    def attention_gradients(self, batch: EncodedBatch, target: str | None = None,
                            blocks: Sequence[str] | None = None, image_pass: int = 0) -> Gradients:
        """Attention probabilities and the gradient of one answer's logit with respect to them.

        Forward hooks on each ``ViltSelfAttention`` collect the probabilities the module returns;
        in eval mode (dropout off) they are the very tensors multiplied with the values, so their
        gradient is the gradient of the logit through the attention. ``torch.autograd.grad`` computes
        it without touching the parameters' ``.grad``; the image embeddings are made a leaf that
        requires grad so the pass also works with frozen weights. Gradients are enabled only here.
        The hooks are attached through `hooked`: they see only this pass (not another session's pass
        through the shared model at the same moment) and are removed in ``finally`` whatever happens.

        Args:
            batch: from `encode`, exactly one example.
            target: the answer to explain (a VQA/NLVR2 label); None explains the top one. An
                image-text-matching head always explains its match score.
            blocks: ignored beyond ``self``, ViLT's only block.
            image_pass: which image pass to return for NLVR2 (one encoder pass per image).

        Returns:
            `Gradients` of block ``self``: ``n_layers`` float32 ``[H, N, N]`` per list (rows queries), the
            detached output, the label explained (``"match"`` for ITM) and its logit.

        Raises:
            InputError: more than one example, an unknown label, or a head with no answer logit.
        """
        if len(batch) != 1:
            raise InputError(f"gradient relevancy explains one example at a time; got a batch of {len(batch)}")
        if image_pass not in range(self.n_passes):
            raise InputError(f"{self.model_id} runs {self.n_passes} image pass(es); got pass {image_pass}")
        captured: list[torch.Tensor] = []

        def keep_probs(_module, _args, output):
            captured.append(output[1])

        with self.hooked([(m, keep_probs) for m in self.self_attention_modules()]), torch.enable_grad():
            embeds = batch.inputs["image_embeds"].detach().clone().requires_grad_(True)
            out = self.forward(batch, attentions=True, hidden=False, image_embeds=embeds)
            score, _, chosen = self.target_score(out, target)
            layers = captured[image_pass * self.n_layers : (image_pass + 1) * self.n_layers]
            grads = torch.autograd.grad(score[0], layers, allow_unused=True)
        attentions = [a[0].detach().float() for a in layers]
        gradients = [torch.zeros_like(a) if g is None else g[0].detach().float() for a, g in zip(attentions, grads)]
        return Gradients({"self": attentions}, {"self": gradients}, out.logits.detach(), chosen, float(score[0].detach()))

    def predict(self, logits: torch.Tensor | None, top_k: int = 5, batch: EncodedBatch | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per example.

        VQA heads trained with per-answer sigmoid (the VQAv2 recipe, ``problem_type`` unset or
        multi-label) are scored with a sigmoid; single-label heads with a softmax. An
        image-text-matching head gives one ``("match", sigmoid(logit))``. A masked-LM head
        gives the top tokens at the first ``[MASK]`` of the text, if there is one.
        """
        if logits is not None and not isinstance(logits, torch.Tensor):  # a model output: its logits, if any
            logits = getattr(logits, "logits", None)
        if logits is None:  # a bare ViltModel has no head
            return [[] for _ in range(len(batch) if batch is not None else 1)]
        logits = logits.detach().float()
        if self.task == "nlvr2":
            probs = logits.softmax(-1)
            val, idx = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            labels = self.config.id2label
            return [[(str(labels[int(i)]), float(v)) for v, i in zip(vr, ir)] for vr, ir in zip(val, idx)]
        if self.task == "vqa":
            probs = self.score(logits)
            k = min(top_k, probs.shape[-1])
            val, idx = probs.topk(k, dim=-1)
            labels = self.config.id2label
            return [[(str(labels[int(i)]), float(v)) for v, i in zip(vr, ir)] for vr, ir in zip(val, idx)]
        if self.task == "itm":
            return [[("match", float(torch.sigmoid(v[0])))] for v in logits]
        if self.task == "mlm" and batch is not None:
            return self._predict_mask(logits, batch, top_k)
        return [[] for _ in range(logits.shape[0])]

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Answer probabilities from VQA logits ``[B, n_labels]`` (see `predict`)."""
        if self.config.problem_type == "single_label_classification":
            return logits.float().softmax(-1)
        return torch.sigmoid(logits.float())

    def answer_probabilities(self, logits: torch.Tensor, label: str | None = None) -> tuple[torch.Tensor, str]:
        """The probability of one answer in every row of ``logits`` ``[B, ...]``: ``(probs [B], label)``.

        ``label`` None follows row 0's top answer. VQA heads use `score` (softmax or sigmoid), NLVR2 a
        softmax, an image-text-matching head the sigmoid of its score (label ``"match"``).

        Raises:
            InputError: an unknown label, or a head without answers (MLM, bare ViltModel).
        """
        if self.task == "itm":
            return torch.sigmoid(logits.float()[:, 0]), "match"
        if self.task not in ("vqa", "nlvr2"):
            raise InputError(f"this needs a VQA, NLVR2 or image-text-matching head; {self.model_id} is {self.task}")
        if label is not None and label not in self.label2id:
            raise InputError(f"{label!r} is not one of {self.model_id}'s answers; pick one it knows")
        index = int(logits[0].argmax()) if label is None else self.label2id[label]
        probs = self.score(logits) if self.task == "vqa" else logits.float().softmax(-1)
        return probs[:, index], str(self.config.id2label[index])

    def _predict_mask(self, logits: torch.Tensor, batch: EncodedBatch, top_k: int) -> list:
        out = []
        mask_id = self.tokenizer.mask_token_id
        ids = batch.inputs["input_ids"].cpu()
        for b in range(ids.shape[0]):
            where = (ids[b] == mask_id).nonzero()
            if not len(where):
                out.append([])
                continue
            probs = logits[b, int(where[0])].softmax(-1)
            val, idx = probs.topk(top_k)
            out.append([(self.tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(val, idx)])
        return out

    @property
    def label2id(self) -> dict[str, int]:
        """Answer label -> logit index, built from ``id2label`` (some configs lack a consistent ``label2id``)."""
        cached = self.__dict__.get("_label2id")
        if cached is None:
            cached = {str(v): int(k) for k, v in (self.config.id2label or {}).items()}
            self.__dict__["_label2id"] = cached
        return cached


def _pad_image_tokens(batch: EncodedBatch, width: int) -> EncodedBatch:
    """Pad a batch's image part to ``width`` image tokens (zero embeddings, masked, patch_rc -1)."""
    have = batch.inputs["image_embeds"].shape[1]
    extra = width - have
    if extra == 0:
        return batch
    emb, mask = batch.inputs["image_embeds"], batch.inputs["pixel_mask"]
    batch.inputs["image_embeds"] = torch.cat([emb, emb.new_zeros(emb.shape[0], extra, emb.shape[2])], dim=1)
    batch.inputs["pixel_mask"] = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    batch.streams = {name: [lay.padded(extra, image=0) for lay in layouts] for name, layouts in batch.streams.items()}
    return batch
