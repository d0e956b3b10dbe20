"""CLIP and SigLIP adapter: ``CLIPModel`` and ``SiglipModel``, two towers whose only meeting point is a score.

Streams and blocks:

- ``vision``: CLIP's class embedding (``ROLE_IMAGE_SUMMARY``, ``[IMG]``) then the patches row-major; SigLIP has
  patches only. Block ``vision.self`` (the default block).
- ``text``: the tokens as the tokenizer gives them. CLIP pads to the longest text of a batch with its end token
  under an attention mask: those pads are ``ROLE_PAD`` and trimmed from a trace. SigLIP pads every text to its
  text positions (64 in the real model) with ``</s>`` and was trained **without** a mask: the pads are tokens the
  model reads (rows sum to 1 only with them) and the last one is the pooled token, so they are kept as
  ``ROLE_SPECIAL``. Block ``text.self``, causal for CLIP (``Captured`` rows hold the mask's zeros).
- SigLIP only: ``probe``, one token, the learned probe of the attention-pooling head
  (``SiglipMultiheadAttentionPoolingHead``); block ``vision.pool`` (one layer, probe -> patches). Rollout into the
  pooling head is that block's mean row times the rollout of ``vision.self`` (`vlcore.attribution.towers`).

There is no cross-modal block. Default queries: CLIP's image CLS and the text's pooled end token (the model's own
rule: argmax of the ids with a legacy ``eos_token_id == 2``, else the first end token); SigLIP's last text
position; SigLIP's vision tower has no single row (None), its probe is query 0 of ``vision.pool``.

Tasks. ``similarity`` (the image-text pair is the example): the score is the pair's logit, ``scale * cos``
(SigLIP ``+ bias``), the label ``"match"``, and the prediction ``[(text, p)]`` with ``p`` SigLIP's sigmoid (a
probability: SigLIP is trained with a per-pair sigmoid) or CLIP's **cosine similarity** in [-1, 1] (CLIP is trained
with a softmax over a batch; one pair alone has no probability). ``zero_shot``: `ClipAdapter.with_candidates`
gives a view of the adapter that classifies the image over candidate labels, each read through a prompt template
(``"{}"`` by default, e.g. ``"a photo of a {}."``); probabilities are CLIP's softmax over the candidates or SigLIP's
per-label sigmoid, and ``target_score(output, label)`` is that label's logit. The candidates' text embeddings are
the classifier's weights: computed once without any intervention and cached (recomputed when the text tower's
weights change). The example's own text still runs through the text tower (the ``text`` stream); when it is a
candidate's prompt, that candidate's logit is computed from the example's text pass, so the label's relevancy
reaches the text tower (`ClipAdapter.prompt` gives the prompt to pass as text).

Interventions. `ClipAdapter.head_mask` scales each head's context before a layer's output projection (a scoped
hook on ``out_proj``), or the pooling head's per-head context. `ClipAdapter.mask_image_tokens` removes tokens by
an attention mask on the vision tower's keys (passed through ``vision_model``'s keyword arguments to every layer)
and on the pooling head's keys: a removed token is seen by no query; its own row is still computed and never read
(CLIP pools the class token, SigLIP's probe sees only the kept patches). The pooling head always runs through
`pool_attention` (the same arithmetic as ``nn.MultiheadAttention``, per head) so its probabilities are tensors
of the forward graph.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import json
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlcore.errors import InputError, ModelLoadError, NoAttentionError, UnsupportedModelError
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

ARCHITECTURES = {"CLIPModel": "similarity", "SiglipModel": "similarity"}
TASKS = ("similarity", "zero_shot")
PROBE_TOKEN = "[PROBE]"
CANDIDATE_CHUNK = 256  # candidate prompts per text-tower pass when embedding the classifier
CANDIDATE_SETS = 4  # candidate label sets whose embeddings an adapter keeps


class _TowerFamily(Family):
    """`Family` whose tasks include ``zero_shot``, which no architecture names (any checkpoint can do it)."""

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS


FAMILY = _TowerFamily(
    name="clip",
    title="CLIP / SigLIP",
    model_types=("clip", "siglip"),
    architectures=ARCHITECTURES,
    checkpoints={
        "openai/clip-vit-base-patch32": "CLIP ViT-B/32 (7 x 7 patches of 32 px)",
        "openai/clip-vit-base-patch16": "CLIP ViT-B/16 (14 x 14 patches of 16 px)",
        "google/siglip-base-patch16-224": "SigLIP B/16 (sigmoid scores, attention-pooling head)",
    },
)

# The pooling head's per-head keep [B, H] while a `head_mask("vision.pool", ...)` is open in this context.
_POOL_KEEP: ContextVar[torch.Tensor | None] = ContextVar("vlscope_pool_keep", default=None)
# Blocks whose attentions `stream_attentions` hands over in this context, and where the pooling head's go.
_STREAMED: ContextVar[frozenset] = ContextVar("vlscope_streamed_blocks", default=frozenset())
_POOL_CONSUMER: ContextVar[Any] = ContextVar("vlscope_pool_consumer", default=None)


def load(ctx: LoadContext) -> ClipAdapter:
    """Load a CLIP or SigLIP checkpoint (eager attention) with its processor."""
    import transformers
    from transformers import AutoProcessor

    model = ctx.from_pretrained(getattr(transformers, ctx.architecture), attn_implementation="eager")
    try:
        processor = ctx.processor(AutoProcessor)
    except ModelLoadError as exc:
        if ctx.config.model_type == "siglip" and not _has_sentencepiece():
            raise ModelLoadError(
                f"{ctx.source!r} is SigLIP, whose tokenizer needs the sentencepiece package, which is not "
                "installed; run `pip install sentencepiece` and load it again.") from exc
        raise
    return ClipAdapter(model, processor.tokenizer, processor.image_processor, model_id=ctx.model_id,
                       device=ctx.device, dtype=ctx.dtype)


def _has_sentencepiece() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentencepiece") is not None


@dataclass
class TowerBatch(EncodedBatch):
    """An `EncodedBatch` that also keeps the texts as given (the similarity prediction's label)."""

    texts: tuple[str, ...] = ()


@dataclass
class TowerOutput:
    """What a CLIP / SigLIP pass gives `ClipAdapter.predict` and `ClipAdapter.target_score`.

    Attributes:
        image_embeds: float ``[B, d]`` unit image embeddings in the shared space.
        text_embeds: float ``[B, d]`` unit embeddings of each example's text.
        pair_logits: float ``[B]``: ``scale * cos`` (SigLIP ``+ bias``) of each image with its own text.
        candidate_logits: float ``[B, K]`` over the candidate labels (zero-shot), else None.
        candidates: the K candidate labels.
        texts: the example texts.
        sigmoid: True for SigLIP (per-pair sigmoid probabilities), False for CLIP (softmax over candidates).
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    pair_logits: torch.Tensor
    candidate_logits: torch.Tensor | None
    candidates: tuple[str, ...]
    texts: tuple[str, ...]
    sigmoid: bool

    @property
    def logits(self) -> torch.Tensor:
        """``[B, K]`` candidate logits (zero-shot), else the pair logits as ``[B, 1]``."""
        return self.candidate_logits if self.candidate_logits is not None else self.pair_logits[:, None]

    @property
    def cosine(self) -> torch.Tensor:
        """float ``[B]``: cosine similarity of each image with its own text."""
        return (self.image_embeds * self.text_embeds).sum(-1)

    def candidate_probabilities(self) -> torch.Tensor:
        """float32 ``[B, K]``: softmax over the candidates (CLIP) or each label's sigmoid (SigLIP)."""
        logits = self.candidate_logits.float()
        return torch.sigmoid(logits) if self.sigmoid else logits.softmax(-1)

    def pair_probability(self) -> torch.Tensor:
        """float32 ``[B]``: SigLIP's sigmoid of the pair logit; CLIP's cosine similarity (not a probability)."""
        return torch.sigmoid(self.pair_logits.float()) if self.sigmoid else self.cosine.float()

    def detach(self) -> TowerOutput:
        return TowerOutput(self.image_embeds.detach(), self.text_embeds.detach(), self.pair_logits.detach(),
                           None if self.candidate_logits is None else self.candidate_logits.detach(),
                           self.candidates, self.texts, self.sigmoid)


def pool_attention(mha: torch.nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   key_keep: torch.Tensor | None = None, head_keep: torch.Tensor | None = None):
    """``nn.MultiheadAttention`` (batch first, packed in-projection) computed per head.

    Args:
        mha: the module (its weights are used; it is not called).
        query, key, value: float ``[B, Q, D]``, ``[B, N, D]``, ``[B, N, D]``.
        key_keep: float ``[B, N]``, 0 for keys no query may see; None keeps all.
        head_keep: float ``[B, H]`` multiplying each head's context; None keeps all.

    Returns:
        ``(output [B, Q, D], probabilities [B, H, Q, N])``; a query whose keys are all removed reads nothing
        (its probabilities are 0, its output the projection's bias).
    """
    b, n_heads, dim = query.shape[0], mha.num_heads, mha.embed_dim
    head_dim = dim // n_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)

    def heads(x, w, bias):
        return F.linear(x, w, bias).view(b, -1, n_heads, head_dim).transpose(1, 2)

    q, k, v = heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv)
    scores = (q * head_dim ** -0.5) @ k.transpose(-1, -2)
    if key_keep is not None:
        seen = key_keep[:, None, None, :].to(device=scores.device, dtype=scores.dtype)
        scores = scores.masked_fill(seen == 0, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    if key_keep is not None:
        probs = probs * seen  # all keys removed: the softmax is uniform over them; read nothing instead
    context = probs @ v
    if head_keep is not None:
        context = context * head_keep.to(device=context.device, dtype=context.dtype)[:, :, None, None]
    return mha.out_proj(context.transpose(1, 2).reshape(b, -1, dim)), probs


class ClipAdapter(ModelAdapter):
    """A ``CLIPModel`` or ``SiglipModel`` with its tokenizer and image processor (see the module docstring).

    Args:
        model: a ``CLIPModel`` or ``SiglipModel``.
        tokenizer: its tokenizer.
        image_processor: its image processor.
        model_id: name plus revision or weights hash.
        device: "cpu", "cuda", or "auto".
        dtype: torch dtype for the weights; float32 unless asked.
    """

    family = "clip"
    tasks = TASKS

    def __init__(self, model, tokenizer, image_processor, model_id: str, device: str = "auto", dtype=None):
        arch = type(model).__name__
        if arch not in ARCHITECTURES:
            raise ValueError(f"not a supported CLIP / SigLIP class: {arch}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device=device, dtype=dtype or torch.float32).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.architecture = arch
        self.siglip = arch == "SiglipModel"
        self.task = "similarity"
        vision = model.config.vision_config
        self.patch_px = int(vision.patch_size)
        self.grid = int(vision.image_size) // self.patch_px
        self.max_text_len = int(model.config.text_config.max_position_embeddings)
        self.pool = getattr(model.vision_model, "head", None) if self.siglip else None
        if self.siglip and self.pool is None:
            raise UnsupportedModelError(f"{model_id} is a SigLIP without its attention-pooling head "
                                        "(vision_use_head=False): it has no image embedding to compare")
        if self.pool is not None and not (self.pool.attention.batch_first and self.pool.attention._qkv_same_embed_dim):
            raise UnsupportedModelError(f"{model_id}: the pooling head's attention layout is not the one SigLIP uses")
        self._device = device
        self._candidates: tuple[str, ...] = ()
        self._template = "{}"
        self._cache: dict = {}  # (prompts, text-tower weight versions) -> candidate embeddings; shared by views
        self._cache_lock = threading.Lock()

    # -- zero-shot candidates -------------------------------------------------------------
    def with_candidates(self, labels: Sequence[str] | None, template: str = "{}") -> ClipAdapter:
        """A view of this adapter (same model, nothing copied) for zero-shot classification over ``labels``.

        The shared adapter is left as it is, so sessions sharing it never see each other's labels.
        ``labels`` None or empty gives a similarity view.

        Args:
            labels: the candidate labels (a dataset's answer vocabulary, labels a user typed).
            template: how a label is read by the text tower, with ``{}`` for the label.

        Raises:
            InputError: an empty or repeated label, or a template without ``{}``.
        """
        view = copy.copy(self)
        view.set_candidates(labels, template)
        return view

    def set_candidates(self, labels: Sequence[str] | None, template: str = "{}") -> None:
        """Set the candidate labels on this adapter in place (a notebook's own adapter; a shared one should use
        `with_candidates`). See `with_candidates`."""
        labels = tuple(labels or ())
        bad = [lab for lab in labels if not isinstance(lab, str) or not lab.strip()]
        if bad:
            raise InputError(f"candidate labels must be non-empty strings; got {bad[:3]!r}")
        if len(set(labels)) != len(labels):
            raise InputError("candidate labels must be distinct; remove the repeated ones")
        if labels and (not isinstance(template, str) or template.count("{}") != 1):
            raise InputError(f"the prompt template needs one '{{}}' where the label goes; got {template!r}")
        self._candidates, self._template = labels, template if labels else "{}"
        self.task = "zero_shot" if labels else "similarity"

    @property
    def candidates(self) -> tuple[str, ...]:
        return self._candidates

    @property
    def takes_candidates(self) -> bool:
        return True

    @property
    def has_joint_space(self) -> bool:
        return True

    def prompt(self, label: str) -> str:
        """The text the text tower reads for a candidate label."""
        return self._template.replace("{}", label)

    # -- description -----------------------------------------------------------------------
    def block_specs(self) -> dict[str, BlockSpec]:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        specs = {
            "vision.self": BlockSpec("vision", "vision", int(vision.num_hidden_layers), int(vision.num_attention_heads),
                                     False, "image tower self-attention"),
            "text.self": BlockSpec("text", "text", int(text.num_hidden_layers), int(text.num_attention_heads),
                                   not self.siglip, "text tower self-attention" + ("" if self.siglip else " (causal)")),
        }
        if self.pool is not None:
            specs["vision.pool"] = BlockSpec("probe", "vision", 1, int(self.pool.attention.num_heads), False,
                                             "attention-pooling head: the probe over the patches")
        return specs

    @property
    def image_stream(self) -> str:
        return "vision"

    @property
    def d_model(self) -> int:
        """Width of the vision tower (the text tower's: ``model.config.text_config.hidden_size``)."""
        return int(self.model.config.vision_config.hidden_size)

    @property
    def device(self) -> str:
        return self._device

    def tower_layers(self, block: str) -> list:
        """The encoder layers of the tower that ``block`` belongs to."""
        tower = self.model.vision_model if block.startswith("vision") else self.model.text_model
        return list(tower.encoder.layers)

    def fingerprint(self) -> dict:
        ip = self.image_processor.to_dict()
        keys = ("size", "crop_size", "image_mean", "image_std", "do_resize", "do_center_crop", "do_normalize",
                "resample", "do_rescale", "rescale_factor", "do_convert_rgb")
        candidates = json.dumps([self._template, *self._candidates])
        return {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "dtype": str(next(self.model.parameters()).dtype),
            "image_processor": {k: (dict(v) if isinstance(v, dict) else v) for k, v in ip.items() if k in keys},
            "max_text_len": self.max_text_len,
            "task": self.task,
            "candidates": hashlib.sha256(candidates.encode()).hexdigest()[:16] if self._candidates else None,
        }

    def info(self) -> dict:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        return {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "family": self.family,
            "task": self.task,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "layers": int(vision.num_hidden_layers),
            "heads": int(vision.num_attention_heads),
            "d_model": int(vision.hidden_size),
            "text_layers": int(text.num_hidden_layers),
            "text_heads": int(text.num_attention_heads),
            "text_d_model": int(text.hidden_size),
            "patch_px": self.patch_px,
            "max_text_len": self.max_text_len,
            "candidates": len(self._candidates),
            "device": self.device,
        }

    # -- inputs ------------------------------------------------------------------------------
    def encode(self, images: list, texts: list[str]) -> TowerBatch:
        """Encode PIL images and texts: streams ``vision`` and ``text`` (and SigLIP's ``probe``).

        Raises:
            InputError: mismatched lists, something that is not an image, an empty text (allowed in zero-shot
                mode, where the image alone is classified).
        """
        if len(images) != len(texts):
            raise InputError(f"got {len(images)} images for {len(texts)} texts; pass one image per text")
        for text in texts:
            if not isinstance(text, str) or (not text.strip() and self.task != "zero_shot"):
                raise InputError("the text is empty: type a caption to compare with the image")
        if any(not hasattr(im, "convert") for im in images):
            raise InputError("CLIP and SigLIP read PIL images; got " + ", ".join({type(im).__name__ for im in images}))
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        enc = self._tokenize(list(texts))
        full = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        seen = self._images_seen(pixel_values)
        grids = [(ImageGrid.regular(im, (self.grid, self.grid), self.patch_px),) for im in seen]
        streams = {"vision": [self._vision_layout(g) for g in grids], "text": self._text_layouts(enc)}
        if self.pool is not None:
            probe = TokenLayout.build([PROBE_TOKEN], [ROLE_IMAGE_SUMMARY])  # a summary of the image; no cells
            streams["probe"] = [probe] * len(grids)
        inputs = {"pixel_values": pixel_values.to(self.device), "input_ids": enc["input_ids"].to(self.device)}
        if not self.siglip:
            inputs["attention_mask"] = enc["attention_mask"].to(self.device)
        return TowerBatch(inputs, streams, "vision", [n > self.max_text_len for n in full], full, texts=tuple(texts))

    def _tokenize(self, texts: list[str]) -> dict:
        """CLIP: padded to the longest text under a mask; SigLIP: padded to its text positions, as it was trained."""
        padding = "max_length" if self.siglip else True
        return self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_text_len,
                              return_tensors="pt")

    def _vision_layout(self, images: tuple[ImageGrid]) -> TokenLayout:
        cells = [(r, c) for r in range(self.grid) for c in range(self.grid)]
        head = [] if self.siglip else [(IMAGE_CLS_TOKEN, ROLE_IMAGE_SUMMARY, (-1, -1))]
        rows = head + [(patch_token(r, c), ROLE_PATCH, (r, c)) for r, c in cells]
        return TokenLayout.build([t for t, _, _ in rows], [r for _, r, _ in rows], [0] * len(rows),
                                 [c for _, _, c in rows], images)

    def _text_layouts(self, enc) -> list[TokenLayout]:
        ids = enc["input_ids"].numpy()
        valid = np.ones_like(ids, bool) if self.siglip else enc["attention_mask"].numpy().astype(bool)
        tok = self.tokenizer
        marks = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        specials = (set(tok.all_special_ids) - {tok.unk_token_id}) | marks  # an unknown word is text
        special = np.isin(ids, [i for i in specials if i is not None])
        role = np.where(~valid, ROLE_PAD, np.where(special, ROLE_SPECIAL, ROLE_TEXT))
        return [TokenLayout.build(self.tokenizer.convert_ids_to_tokens(ids[b].tolist()), role[b])
                for b in range(len(ids))]

    def _images_seen(self, pixel_values: torch.Tensor) -> list[np.ndarray]:
        """Undo normalisation and rescaling: uint8 ``[h, w, 3]`` per image, cropped to the patch grid."""
        ip = self.image_processor
        x = pixel_values.float().numpy()
        if getattr(ip, "do_normalize", True):
            x = x * np.asarray(ip.image_std, np.float32)[None, :, None, None] + \
                np.asarray(ip.image_mean, np.float32)[None, :, None, None]
        if getattr(ip, "do_rescale", True):
            x = x / float(ip.rescale_factor)
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        side = self.grid * self.patch_px
        return [np.ascontiguousarray(im[:side, :side]) for im in x]

    # -- running -----------------------------------------------------------------------------
    def _run(self, batch: EncodedBatch, attentions: Sequence[str] = (), hidden: bool = False,
             pixel_values: torch.Tensor | None = None):
        """One pass of both towers: ``(TowerOutput, vision output, text output, pool probabilities or None)``;
        the towers return the attentions of the blocks in ``attentions``."""
        inputs = batch.inputs
        keep = inputs.get("vision_keep")
        pool: dict = {}
        hooks = [(self.pool.attention, self._pool_hook(keep, pool))] if self.pool is not None else []
        extra = {} if keep is None else {"attention_mask": _key_mask(keep.to(self.device), self.model.dtype)}
        with self.hooked(hooks):
            vision = self.model.vision_model(pixel_values=inputs["pixel_values"] if pixel_values is None
                                             else pixel_values, output_attentions="vision.self" in attentions,
                                             output_hidden_states=hidden, **extra)
        text = self.model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                     output_attentions="text.self" in attentions, output_hidden_states=hidden)
        image_embeds = vision.pooler_output if self.siglip else self.model.visual_projection(vision.pooler_output)
        text_embeds = text.pooler_output if self.siglip else self.model.text_projection(text.pooler_output)
        texts = getattr(batch, "texts", ()) or tuple("" for _ in range(len(batch)))
        return self._scores(image_embeds, text_embeds, texts), vision, text, pool.get("probs")

    def _pool_hook(self, keep: torch.Tensor | None, sink: dict):
        def hook(module, args, output):
            out, probs = pool_attention(module, *args[:3], key_keep=keep, head_keep=_POOL_KEEP.get())
            sink["probs"] = probs
            return out, probs.mean(1)
        return hook

    def _scale_bias(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        bias = self.model.logit_bias if self.siglip else 0.0
        return self.model.logit_scale.exp(), bias

    def _scores(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, texts: tuple[str, ...]) -> TowerOutput:
        image = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        scale, bias = self._scale_bias()
        pair = (image * text).sum(-1) * scale + bias
        candidate = None
        if self._candidates:
            weights = self.candidate_embeddings().to(image.dtype)
            candidate = image @ weights.T * scale + bias
            prompts = {self.prompt(lab): k for k, lab in enumerate(self._candidates)}
            own = torch.zeros_like(candidate, dtype=torch.bool)
            for b, t in enumerate(texts):
                if t in prompts:  # the example's text is this label's prompt: its logit comes from this pass
                    own[b, prompts[t]] = True
            candidate = torch.where(own, pair[:, None].expand_as(candidate), candidate)
        return TowerOutput(image, text, pair, candidate, self._candidates, tuple(texts), self.siglip)

    def candidate_embeddings(self) -> torch.Tensor:
        """float ``[K, d]``: unit text embeddings of the candidates' prompts (the zero-shot classifier's weights).

        Computed without gradients, outside every hooked scope (no head mask applies), and cached (the last
        `CANDIDATE_SETS` label sets, shared by every view of this adapter) until the text tower's weights change.
        """
        prompts = tuple(self.prompt(lab) for lab in self._candidates)
        key = (prompts, tuple((id(p), p._version) for p in self._text_parameters()))
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        embeds = contextvars.Context().run(self._embed_prompts, list(prompts))
        with self._cache_lock:
            self._cache[key] = embeds
            while len(self._cache) > CANDIDATE_SETS:
                self._cache.pop(next(iter(self._cache)))
        return embeds

    def _text_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.model.text_model.parameters())
        return params if self.siglip else params + list(self.model.text_projection.parameters())

    def _embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), CANDIDATE_CHUNK):
                enc = self._tokenize(prompts[start : start + CANDIDATE_CHUNK])
                mask = None if self.siglip else enc["attention_mask"].to(self.device)
                pooled = self.model.text_model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask).pooler_output
                feats = pooled if self.siglip else self.model.text_projection(pooled)
                out.append(feats / feats.norm(p=2, dim=-1, keepdim=True))
        return torch.cat(out)

    def capture(self, batch: EncodedBatch, capture: Capture = Capture()) -> Captured:
        """One pass keeping the asked blocks (per-layer tensors of the forward graph) and both towers' hidden states.

        ``capture.layers`` and ``capture.heads`` keep the indices that exist in each block (the towers may differ
        in depth and heads; the pooling block has one layer).

        Raises:
            NoAttentionError: attentions were asked for and a tower returned none.
        """
        specs = self.block_specs()
        wanted = [name for name in specs if capture.blocks is None or name in capture.blocks]
        streamed = _STREAMED.get() & set(wanted)
        out, vision, text, pool = self._run(batch, [n for n in wanted if n not in streamed], hidden=capture.hidden)
        if "vision.pool" in streamed and pool is not None:
            _POOL_CONSUMER.get()(pool)
        found = {"vision.self": vision.attentions, "text.self": text.attentions,
                 "vision.pool": None if pool is None else (pool,)}
        attentions = {name: [torch.empty(0)] * specs[name].n_layers for name in streamed}  # handed over already
        for name in (n for n in wanted if n not in streamed):
            if not found[name]:
                raise NoAttentionError(
                    f"{self.model_id} returned no attention weights for {name}. Load it with "
                    "attn_implementation='eager' (VLScope does this for you).")
            layers = _select(list(found[name]), capture.layers, capture.heads)
            if layers:
                attentions[name] = layers
        hidden = {}
        if capture.hidden:
            hidden = {"vision": torch.stack(tuple(vision.hidden_states)), "text": torch.stack(tuple(text.hidden_states))}
            if self.pool is not None:  # the probe before the head, then the head's output (the pooled image)
                probe = self.pool.probe.expand(len(vision.pooler_output), 1, -1)
                hidden["probe"] = torch.stack((probe, vision.pooler_output[:, None]))
        return Captured(out, attentions, hidden)

    # -- predictions and targets ---------------------------------------------------------------
    def predict(self, output: TowerOutput, top_k: int = 5, batch: EncodedBatch | None = None) -> list[list[tuple[str, float]]]:
        """Zero-shot: the top-k candidates with CLIP's softmax or SigLIP's sigmoid probabilities. Similarity:
        ``[(text, p)]`` with SigLIP's sigmoid or CLIP's cosine similarity (see the module docstring)."""
        if output.candidate_logits is not None:
            probs = output.candidate_probabilities().detach()
            val, idx = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            return [[(output.candidates[int(i)], float(v)) for v, i in zip(vr, ir)] for vr, ir in zip(val, idx)]
        probs = output.pair_probability().detach()
        texts = output.texts or ("match",) * len(probs)
        return [[(texts[b] or "match", float(probs[b]))] for b in range(len(probs))]

    def target_score(self, output: TowerOutput, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``"match"`` (or the example's text, or None in similarity mode): the pair logit and its probability
        (`TowerOutput.pair_probability`). A candidate label (None: row 0's top one in zero-shot mode): its logit
        and probability.

        Raises:
            InputError: a target that is neither ``"match"`` nor a candidate label.
        """
        if output.candidate_logits is None or target == "match":
            if target not in (None, "match") and target not in output.texts:
                raise InputError(f"{self.model_id} scores the image against its text ('match'); {target!r} is not a "
                                 "target here. Set candidate labels for zero-shot classification.")
            return output.pair_logits, output.pair_probability(), "match"
        if target is None:
            index = int(output.candidate_logits[0].argmax())
        elif target in output.candidates:
            index = output.candidates.index(target)
        else:
            raise InputError(f"{target!r} is not one of the {len(output.candidates)} candidate labels; pick one of "
                             f"them or 'match'")
        return output.candidate_logits[:, index], output.candidate_probabilities()[:, index], output.candidates[index]

    def targets(self) -> list[str]:
        return list(self._candidates)

    def joint_embeddings(self, output: TowerOutput) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(image [B, d], text [B, d])``: unit embeddings in the shared space (cosine = dot product)."""
        return (output.image_embeds.detach().float().cpu().numpy(), output.text_embeds.detach().float().cpu().numpy())

    def default_query(self, block: str, layout: TokenLayout) -> int | None:
        """CLIP: the image CLS and the pooled end token; SigLIP: the last text position, the probe, and None for
        ``vision.self`` (the pooling head reads every patch)."""
        if block == "vision.pool":
            return 0
        if block == "vision.self":
            return None if self.siglip else layout.first(ROLE_IMAGE_SUMMARY)
        if block == "text.self":
            if self.siglip:
                return layout.n_tokens - 1
            ids = np.asarray(self.tokenizer.convert_tokens_to_ids(list(layout.tokens)))
            return self._pooled_index(ids, layout.valid)
        raise InputError(f"{self.model_id} has no attention block {block!r}; it has {sorted(self.block_specs())}")

    def _pooled_index(self, ids: np.ndarray, valid: np.ndarray) -> int:
        """The text position CLIP pools (``CLIPTextModel.forward``'s rule)."""
        eos = self.model.config.text_config.eos_token_id
        if eos == 2:  # legacy configs: the end token is the highest id
            return int(np.argmax(np.where(valid, ids, -1)))
        hits = np.flatnonzero((ids == eos) & valid)
        return int(hits[0]) if len(hits) else 0

    # -- interventions ---------------------------------------------------------------------------
    @contextmanager
    def head_mask(self, block: str, keep: torch.Tensor):
        """Multiply each head's context in ``block`` by ``keep [B, L, H]`` (before the layer's output projection;
        for ``vision.pool``, the pooling head's per-head context)."""
        spec = self.block_specs().get(block)
        if spec is None or tuple(keep.shape[1:]) != (spec.n_layers, spec.n_heads):
            shape = "?" if spec is None else f"[B, {spec.n_layers}, {spec.n_heads}]"
            raise ValueError(f"{self.model_id} masks heads of {sorted(self.block_specs())} with keep {shape}; got "
                             f"{block!r} {tuple(keep.shape)}")
        if block == "vision.pool":
            token = _POOL_KEEP.set(keep[:, 0])
            try:
                yield
            finally:
                _POOL_KEEP.reset(token)
            return

        def make_hook(layer: int):
            def hook(module, args, output):
                context = args[0]  # [B, N, H * d]: the heads' contexts side by side
                scale = keep[:, layer].to(device=context.device, dtype=context.dtype)
                scale = scale.repeat_interleave(context.shape[-1] // spec.n_heads, dim=1)
                return F.linear(context * scale[:, None, :], module.weight, module.bias)
            return hook

        with self.hooked([(layer.self_attn.out_proj, make_hook(i)) for i, layer in enumerate(self.tower_layers(block))]):
            yield

    @contextmanager
    def stream_attentions(self, block: str, consume, image_pass: int = 0):
        """Hand each layer's probabilities of ``block`` to ``consume`` as the pass computes them, keeping none
        (see `ModelAdapter.stream_attentions`): a scoped hook on each attention module of the tower (its output's
        weights replaced by an empty tensor); for ``vision.pool``, the head's one layer after the pass."""
        specs = self.block_specs()
        if block not in specs or image_pass != 0:
            raise ValueError(f"{self.model_id} streams one of {sorted(specs)}, image pass 0; got {block!r}, {image_pass}")
        streamed = _STREAMED.set(_STREAMED.get() | {block})
        try:
            if block == "vision.pool":
                consumer = _POOL_CONSUMER.set(consume)
                try:
                    yield
                finally:
                    _POOL_CONSUMER.reset(consumer)
                return

            def hand_over(_module, _args, output):
                consume(output[1])
                return (output[0], output[1].new_empty(0), *output[2:])

            with self.hooked([(layer.self_attn, hand_over) for layer in self.tower_layers(block)]):
                yield
        finally:
            _STREAMED.reset(streamed)

    def mask_image_tokens(self, batch: EncodedBatch, drops: Sequence[np.ndarray]) -> TowerBatch:
        """Variants of one example with vision tokens hidden from every query (a key mask in the vision tower and
        the pooling head; see the module docstring).

        Raises:
            InputError: more than one example, or an index outside the vision stream.
        """
        if len(batch) != 1:
            raise InputError(f"image-token removal runs on one example; got {len(batch)}")
        n = batch.streams["vision"][0].n_tokens
        base = batch.inputs.get("vision_keep")
        keeps = []
        for drop in drops:
            idx = np.asarray(drop, dtype=np.int64).reshape(-1)
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise InputError(f"image tokens to remove must be indices in [0, {n - 1}]; got {idx.tolist()[:5]}")
            keep = torch.ones(n) if base is None else base[0].detach().float().cpu().clone()
            keep[torch.as_tensor(idx)] = 0
            keeps.append(keep)
        v = len(keeps)
        inputs = {**batch.repeated_inputs(v, exclude=("vision_keep",)), "vision_keep": torch.stack(keeps).to(self.device)}
        return TowerBatch(inputs, {k: lay * v for k, lay in batch.streams.items()}, batch.main, batch.truncated * v,
                          batch.n_text_full * v, texts=tuple(getattr(batch, "texts", ()) * v))

    def attention_gradients(self, batch: EncodedBatch, target: str | None = None,
                            blocks: Sequence[str] | None = None, image_pass: int = 0) -> Gradients:
        """Attention probabilities of each block and the gradient of the explained score with respect to them.

        Forward hooks (through `hooked`) on each tower's attention modules keep the probabilities they return: in
        eval mode they are the very tensors multiplied with the values. The pooling head's come from
        `pool_attention`. Gradients are taken with ``torch.autograd.grad`` (parameters' ``.grad`` untouched); the
        pixels and text embeddings are made to require grad so frozen weights work too.

        Args:
            batch: from `encode`, one example.
            target: ``"match"``, a candidate label, or None (see `target_score`).
            blocks: blocks to return; None: all.
            image_pass: must be 0.

        Raises:
            InputError: more than one example, another image pass, an unknown target.
        """
        if len(batch) != 1:
            raise InputError(f"gradient relevancy explains one example at a time; got a batch of {len(batch)}")
        if image_pass != 0:
            raise InputError(f"{self.model_id} runs one image pass per example; got pass {image_pass}")
        specs = self.block_specs()
        names = [name for name in specs if blocks is None or name in blocks]
        kept: dict[str, list[torch.Tensor]] = {"vision.self": [], "text.self": []}

        def keep_probs(name):
            def hook(_module, _args, output):
                kept[name].append(output[1])
            return hook

        def needs_grad(_module, _args, output):
            return output if output.requires_grad else output.detach().requires_grad_(True)

        hooks = [(layer.self_attn, keep_probs(name)) for name in kept for layer in self.tower_layers(name)]
        hooks.append((self.model.text_model.embeddings, needs_grad))
        with self.hooked(hooks), torch.enable_grad():
            pixels = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
            out, _, _, pool = self._run(batch, pixel_values=pixels)
            score, _, label = self.target_score(out, target)
            if pool is not None:
                kept["vision.pool"] = [pool]
            layers = [t for name in names for t in kept[name]]
            grads = iter(torch.autograd.grad(score[0], layers, allow_unused=True))
        attentions, gradients = {}, {}
        for name in names:
            attentions[name] = [a[0].detach().float() for a in kept[name]]
            gradients[name] = [torch.zeros_like(a) if g is None else g[0].detach().float()
                               for a, g in zip(attentions[name], grads)]
        return Gradients(attentions, gradients, out.detach(), label, float(score[0].detach()))


def _key_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float ``[B, 1, 1, N]`` additive mask: 0 where a key is kept, the dtype's minimum where it is removed."""
    return ((1.0 - keep.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]


def _select(layers: list[torch.Tensor], keep_layers, keep_heads) -> list[torch.Tensor]:
    """Per-layer ``[B, H, Q, K]`` tensors restricted to the layer and head indices that exist in this block."""
    if keep_layers is not None:
        layers = [layers[i] for i in keep_layers if -len(layers) <= i < len(layers)]
    if keep_heads is not None and layers:
        heads = [h for h in keep_heads if 0 <= h < layers[0].shape[1]]
        layers = [a[:, heads] for a in layers] if heads else []
    return layers

