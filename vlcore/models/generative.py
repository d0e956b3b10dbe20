"""The shared adapter of generative vision-language models (a decoder that writes the answer).

A family module (`vlcore.models.llava`, ...) subclasses `GenerativeAdapter` and says only what differs: the model
and processor classes, where the language model and the vision tower are, which vision-tower attention can be
collected, and how its processor takes images. Everything else is here.

Streams:

- ``lm``: the decoder's sequence as it read it: the chat-template prompt (text and special tokens, the image
  tokens as patches at their (image, row, col) from `vlcore.models.image_tokens`), then the generated tokens that
  were fed back (``ROLE_GENERATED``). The last generated token is never read by the decoder, so it is not in ``lm``.
- ``generated``: the generated tokens (the answer, with the end token when one was produced). Token ``t`` of this
  stream stands for the decoding step that produced it: the query at ``lm`` position ``P - 1 + t`` (the last prompt
  token for ``t = 0``); its hidden states are that position's.
- ``vision`` (families whose vision tower's attention can be collected): the vision tower's tokens.

Blocks:

- ``lm.generated`` (default): the decoder's self-attention, the rows of the generating steps only:
  ``[L, H, n_new, P + n_new - 1]``, row ``t`` over every token it could see. No ``[L, H, N, N]`` stack is ever
  built: the model runs on sdpa and the rows are recomputed from the queries and keys the sdpa kernel got, with the
  mask the model built (causal, sliding window, bidirectional prefix) (`vlcore.models.attention_capture`), equal to
  eager to 1e-4. Per-head summaries over the prompt's rows (entropy by visible keys, share on image tokens) come
  with the output (`GenerationResult.summaries`), reduced in row chunks while the pass runs.
- ``vision.self`` (where the family has one): the vision tower's self-attention.

How a pass runs. ``encode`` builds the prompt with the processor's chat template and generates the answer greedily
(sdpa, ``max_new_tokens``); the batch then holds prompt + answer, so every later pass (``capture``, a head mask,
an image-token mask, a gradient pass) is one teacher-forced forward over that fixed sequence and scores the same
answer. ``capture`` under ``torch.no_grad`` stays on sdpa. Under grad (``attention_gradients``, or a caller taking
gradients of the captured rows) the rows must be tensors of the forward graph, so the language model runs on
eager within a scoped `vlcore.models.attention_capture.eager_attention` context, and a scoped hook rebuilds each
layer's output from the kept rows; switching the implementation changes the shared model's config for the duration
of that pass (as `eager_attention` says: hold the app's lock around gradient passes on a shared model).

The logit lens (`GenerationResult.lens`): each layer's residual stream through the final norm and the LM head; for
each generated step its top tokens and the rank and probability of the token produced; for each image token its
top vocabulary tokens per layer. The language model's ``hidden[L]`` is the last layer's output before the final
norm (transformers returns it after the norm; a scoped hook on the norm keeps the residual).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from vlcore.errors import InputError
from vlcore.models.attention_capture import capture_attention_calls, eager_attention
from vlcore.models.attention_rows import HeadSummaries, HeadSums, accumulate_head_sums, compute_attention_rows
from vlcore.models.base import BlockSpec, Capture, Captured, EncodedBatch, Gradients, ModelAdapter
from vlcore.models.image_tokens import image_token_layouts
from vlcore.trace import (
    PAD_TOKEN,
    ROLE_GENERATED,
    ROLE_IMAGE_SUMMARY,
    ROLE_PAD,
    ROLE_PATCH,
    TokenLayout,
)

LM, GENERATED, VISION = "lm", "generated", "vision"
LM_BLOCK, VISION_BLOCK = "lm.generated", "vision.self"
LM_FULL = "lm.full"  # gradient passes only: the decoder's whole self-attention [H, N, N] (`attention_gradients`)
LENS_TOP, IMAGE_LENS_TOP = 5, 3
# Rollout holds each layer's head-mean [B, N, N] until the pass ends: at most this many elements in all
# (float32: 256 MiB), e.g. 32 layers of a 1,400-token sequence; longer sequences get no rollout (and a note).
ROLLOUT_MAX_ELEMENTS = 2**26
ROLLOUT_CHUNK = 256
IMAGE_ROLES = (ROLE_PATCH, ROLE_IMAGE_SUMMARY)
_BOOKKEEPING = ("answer_ids", "answer_len", "prompt_len", "prompt_keys", "image_keep", "vision_rows",
                "images_per_prompt")


@dataclass
class GenerationResult:
    """One teacher-forced pass of a generative model (`Captured.output`), batch ``B``.

    Attributes:
        logits: ``[B, T, V]``: the decoder's logits at the generating steps (``T`` = the batch's longest answer);
            step ``t`` predicts generated token ``t``.
        answer_ids: per row the generated token ids (the end token included when produced).
        answers: per row the answer text (without special tokens).
        prompt: what a teacher-forced pass on another answer needs: the prompt's model inputs (``input_ids``,
            ``attention_mask`` with the image-token mask applied, ``position_ids`` where the family passes them,
            per-token extras such as ``token_type_ids``, and the image inputs).
        summaries: per-head statistics over the prompt's rows (`HeadSummaries`: entropy, share on image tokens);
            None when ``lm.generated`` was not captured on sdpa.
        lens: the logit lens (see `GenerativeAdapter.logit_lens`); empty without hidden states.
        rollout: float32 ``[B, T, N]``: attention rollout through the decoder (Abnar & Zuidema 2020: per layer the
            mean over heads plus the identity, rows normalised, multiplied over every layer) of each generating
            step's query over the ``lm`` tokens; None unless asked for (`Capture.rollout`) and the sequence is
            short enough (`ROLLOUT_MAX_ELEMENTS`).
    """

    logits: torch.Tensor
    answer_ids: tuple[tuple[int, ...], ...]
    answers: tuple[str, ...]
    prompt: dict
    summaries: HeadSummaries | None = None
    lens: dict = field(default_factory=dict)
    rollout: torch.Tensor | None = None

    def detach(self) -> GenerationResult:
        return dataclasses.replace(self, logits=self.logits.detach())


ATTENTION_MODES = ("sdpa", "eager")
# A vision tower's self-attention is kept only up to this many tokens (no [layer, head, N, N] for N >= 1,024).
MAX_VISION_TOKENS = 1023


def tower_implementation(vision_config) -> str:
    """The attention implementation a square-patch vision tower loads on: eager (its weights are collected) up to
    `MAX_VISION_TOKENS` patches, sdpa above (nothing of size ``[H, N, N]`` is built for a tower it does not show)."""
    side = int(vision_config.image_size) // int(vision_config.patch_size)
    return "eager" if side * side <= MAX_VISION_TOKENS else "sdpa"
MAX_NEW_TOKENS_LIMIT = 512


class ImplementationLock:
    """Passes on sdpa share the model; a pass that switches the shared model to eager runs alone.

    Switching the implementation (`eager_attention`) changes the model for every thread: an sdpa capture running
    meanwhile would see eager layers (and fail: its layers never reach the sdpa wrapper). So sdpa passes take
    the lock shared (any number at once) and an eager pass takes it exclusively (it waits for running sdpa
    passes to end, and new ones wait for it). Writers are preferred, so a stream of sdpa passes cannot starve one.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def significant(values, digits: int = 6) -> list:
    """``values`` rounded to ``digits`` significant digits, as nested lists for JSON (a probability of 3e-9 stays
    3e-9, where rounding to decimals would make it 0; NaN stays NaN).

    >>> significant([0.123456789, 3.14159e-9, 0.0, float("nan")], 3)
    [0.123, 3.14e-09, 0.0, nan]
    """
    a = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(a) & (a != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitude = np.where(finite, np.floor(np.log10(np.abs(np.where(finite, a, 1.0)))), 0.0)
    scale = 10.0 ** (digits - 1 - magnitude)
    return np.where(finite, np.round(a * scale) / scale, a).tolist()


def image_groups(images: Sequence) -> list[list]:
    """Each prompt's images as a list, from one image or a list of images per prompt."""
    return [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]


@contextmanager
def _scopes(*contexts):
    """Enter ``contexts`` in order (exit in reverse)."""
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def _head_mean_rows(call) -> torch.Tensor:
    """float32 ``[B, N, N]``: one layer's attention averaged over heads, every query row (computed in chunks of
    rows, so no ``[B, H, N, N]`` tensor is held)."""
    n = call.query.shape[2]
    out = torch.zeros(call.query.shape[0], n, call.n_keys, dtype=torch.float32, device=call.query.device)
    for start in range(0, n, ROLLOUT_CHUNK):
        chunk = list(range(start, min(start + ROLLOUT_CHUNK, n)))
        out[:, chunk[0]:chunk[-1] + 1] = compute_attention_rows(call, chunk).mean(1)
    return out


def _rollout_matrix(layers: Sequence[torch.Tensor]) -> np.ndarray:
    """float64 ``[N, N]``: the rollout of one example's self-attention layers (``[H, N, N]`` each)."""
    n = layers[0].shape[-1]
    eye = np.eye(n)
    out = eye.copy()
    for layer in layers:
        a_hat = layer.double().mean(0).cpu().numpy() + eye
        out = (a_hat / a_hat.sum(-1, keepdims=True)) @ out
    return out


def rollout_rows(means: Sequence[torch.Tensor], steps: Sequence[int]) -> torch.Tensor:
    """Rows ``steps`` of the attention rollout ``Â_{L-1} ··· Â_0`` with ``Â_l = normalise_rows(mean_h A_l + I)``.

    Computed from the last layer down (``v ← v Â_l``), so only the asked rows are ever multiplied: ``[B, S, N]``
    float32 (each row sums to 1).

    Args:
        means: per layer the head-mean attention ``[B, N, N]`` (rows queries).
        steps: the query rows wanted.
    """
    B, N, _ = means[0].shape
    eye = torch.eye(N, device=means[0].device)
    v = eye[list(steps)].expand(B, -1, -1).clone()
    for mean in reversed(means):
        a_hat = mean + eye
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        v = v @ a_hat
    return v



# Tower sequences per example of the pass running in this context, for a tower that runs several per example (crops,
# tiles, frames): maps a per-example vision head mask onto the tower's batch.
_TOWER_SEQUENCES: ContextVar[tuple[int, ...] | None] = ContextVar("vlscope_tower_sequences", default=None)


def _per_tower_sequence(keep: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """``keep [B, H]`` per example -> ``[n_sequences, H]`` per tower sequence (the counts of the running pass)."""
    counts = _TOWER_SEQUENCES.get()
    if keep.shape[0] == 1:
        return keep.expand(n_sequences, -1)
    if counts is not None and len(counts) == keep.shape[0] and sum(counts) == n_sequences:
        return keep.repeat_interleave(torch.tensor(counts, device=keep.device), 0)
    if keep.shape[0] == n_sequences:
        return keep
    raise ValueError(f"a vision head mask of {keep.shape[0]} rows does not match a pass of {n_sequences} tower "
                     "sequences; mask through adapter.capture, one row per example")


class GenerativeAdapter(ModelAdapter):
    """A generative vision-language model with its processor: streams ``lm``, ``generated`` (and ``vision``);
    blocks ``lm.generated`` (and ``vision.self``). Subclasses set `family`, `tasks`, `title` and override the
    family hooks (the methods under "family hooks" below).

    Args:
        model: the ``...ForConditionalGeneration`` model (language model on sdpa).
        processor: its processor (with a chat template).
        model_id: name plus revision or weights hash.
        device: "cpu", "cuda", or "auto".
        dtype: torch dtype for the weights; float32 unless asked.
    """

    task = "vqa"
    title = "generative model"
    several_images = True
    max_new_tokens = 16  # greedy generation stops at the end token or after this many tokens
    passes_position_ids = True  # False: the model computes its own positions (Qwen2-VL's M-RoPE)
    selects_vision_crops = False  # True: the family picks each example's tower sequences itself (NeXT's crops)
    position_offset = 0  # added to the positions passed (PaliGemma counts from 1)
    answer_token_values: ClassVar[dict[str, int]] = {}  # per-token extras' value over the answer (default 0; PaliGemma's
    # token_type_ids: 1, the causal suffix)

    def __init__(self, model, processor, model_id: str, device: str = "auto", dtype=None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device=device, dtype=dtype or torch.float32).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.architecture = type(model).__name__
        self.max_text_len = int(getattr(self.text_config, "max_position_embeddings", 0) or 0)
        self._device = device
        self.attention_mode = "sdpa"
        self._implementation = ImplementationLock()  # shared by every `with_attention` view of this model

    def with_attention(self, mode: str) -> GenerativeAdapter:
        """A view of this adapter (same model) whose passes get the decoder's attention rows by ``mode``:
        ``"sdpa"`` (default: the model runs on sdpa and the rows are recomputed from its queries and keys) or
        ``"eager"`` (the fallback: the decoder runs on eager attention and the rows are its weights; every layer's
        ``[B, H, N, N]`` is held during the pass, and float16 outputs may differ from sdpa's).

        Raises:
            InputError: an unknown mode.
        """
        if mode not in ATTENTION_MODES:
            raise InputError(f"attention mode {mode!r}: expected one of {', '.join(ATTENTION_MODES)}")
        if mode == self.attention_mode:
            return self
        view = copy.copy(self)
        view.attention_mode = mode
        return view

    def with_max_new_tokens(self, n: int) -> GenerativeAdapter:
        """A view of this adapter (same model) that generates at most ``n`` tokens (greedy decoding).

        Raises:
            InputError: ``n`` outside 1..`MAX_NEW_TOKENS_LIMIT`.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise InputError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}; got {n!r}")
        if n == self.max_new_tokens:
            return self
        view = copy.copy(self)
        view.max_new_tokens = n
        return view

    # -- family hooks ------------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def language_model(self):
        """The decoder (with ``.layers`` and ``.norm``)."""
        return self.model.model.language_model

    def _lm_attention(self) -> list:
        return [layer.self_attn for layer in self.language_model.layers]

    def _lm_output_projections(self) -> list:
        return [m.o_proj for m in self._lm_attention()]

    def vision_spec(self) -> BlockSpec | None:
        """The ``vision.self`` block, or None where the vision tower's attention is not collected."""
        return None

    def _vision_attention(self) -> list:
        """The vision tower's attention modules whose forward returns ``(output, weights)`` (eager)."""
        return []

    def _vision_output_projections(self) -> list:
        return [m.out_proj for m in self._vision_attention()]

    def _vision_hidden_modules(self) -> list:
        """Modules whose outputs are the vision tower's hidden states (embeddings first, then each layer)."""
        return []

    def _vision_layouts(self, prompt_layout: TokenLayout, row: int, enc) -> TokenLayout:
        """The ``vision`` stream of one example (only where `vision_spec` is not None)."""
        raise NotImplementedError

    def _vision_feature_layers(self) -> int:
        """How many of the tower's layers the decoder's image features pass through (all by default; LLaVA reads
        ``hidden_states[vision_feature_layer]``, so the layers after it never reach the decoder)."""
        spec = self.vision_spec()
        return spec.n_layers if spec is not None else 0

    def _selected_tower_hooks(self, index: torch.Tensor) -> list:
        """For a tower that runs several sequences per example (NeXT's crops, Idefics3's frames): hooks making each
        tower attention layer return only the sequences ``index`` (one per example: ``[B, H, N, N]``). With grad,
        the layer's output is rebuilt from the weights with those sequences spliced back in, so that a gradient of
        the output reaches them (as the decoder's rows, `_graph_row_hooks`)."""
        values: dict[int, torch.Tensor] = {}
        hooks = []
        for layer, module in enumerate(self._vision_attention()):
            def keep_values(_m, _a, out, layer=layer):
                values[layer] = out

            def select(m, _a, output, layer=layer):
                weights = output[1]
                part = weights[index]
                v = values.pop(layer)
                if not torch.is_grad_enabled():
                    return (output[0], part, *output[2:])
                spliced = weights.index_copy(0, index, part)
                crops, n = v.shape[:2]
                v = v.view(crops, n, -1, m.head_dim).transpose(1, 2)
                context = (spliced @ v.to(spliced.dtype)).transpose(1, 2).reshape(crops, n, -1)
                return (m.out_proj(context.to(output[0].dtype)), part, *output[2:])

            hooks += [(module.v_proj, keep_values), (module, select)]
        return hooks

    @contextmanager
    def _tower_sequences(self, per_example: Sequence[int], index: torch.Tensor, select: bool) -> Iterator[None]:
        """While a pass runs a tower of several sequences per example (``per_example`` of them): vision head masks
        map each example's row onto its sequences, and with ``select`` the tower attention keeps only sequence
        ``index[b]`` of example ``b`` (`_selected_tower_hooks`)."""
        reset = _TOWER_SEQUENCES.set(tuple(int(n) for n in per_example))
        try:
            with self.hooked(self._selected_tower_hooks(index) if select else []):
                yield
        finally:
            _TOWER_SEQUENCES.reset(reset)

    def vision_note(self) -> str | None:
        """Why the vision tower's attention is not shown, where it is not (e.g. a tower that returns no weights)."""
        return None

    def _check_images(self, images: list) -> list[list]:
        """Each prompt's images as a list (an image, or a list or tuple of images, per prompt), in RGB.

        Raises:
            InputError: something that is not a PIL image, or a prompt without an image.
        """
        out = []
        for item in images:
            group = list(item) if isinstance(item, (list, tuple)) else [item]
            if not group:
                raise InputError(f"{self.title} needs at least one image per question; got none")
            for im in group:
                if not isinstance(im, Image.Image):
                    raise InputError(f"{self.title} reads PIL images (one, or a list of several, per question); got "
                                     f"{type(im).__name__}. Open the file as an image first")
            out.append([im if im.mode == "RGB" else im.convert("RGB") for im in group])
        return out

    def _process(self, images: list[list], prompts: list[str]):
        """The processor's batch (left-padded); ``images``: each prompt's images (this processor takes them as one
        flat list, in prompt order; a family whose processor wants one list per prompt overrides this)."""
        flat = [im for group in image_groups(images) for im in group]
        return self.processor(images=flat, text=prompts, padding=True, padding_side="left", return_tensors="pt")

    def prompt_text(self, question: str, n_images: int = 1) -> str:
        """The question after ``n_images`` images, through the processor's chat template, ready for the answer."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    # -- description --------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def block_specs(self) -> dict[str, BlockSpec]:
        tcfg = self.text_config
        specs = {LM_BLOCK: BlockSpec(GENERATED, LM, int(tcfg.num_hidden_layers), int(tcfg.num_attention_heads),
                                     True, "generated tokens -> everything before them (decoder)")}
        vision = self.vision_spec()
        if vision is not None:
            specs[VISION_BLOCK] = vision
        return specs

    @property
    def image_stream(self) -> str:
        """``lm``: the image tokens as the decoder reads them (what the generated tokens' maps lie on, and what
        image-token removal takes away)."""
        return LM

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> str:
        return self._device

    @property
    def generates(self) -> bool:
        return True

    def block_order(self, target: str | None = None) -> list[tuple[str, int]]:
        """The vision tower's layers (where collected), then the decoder's."""
        specs = self.block_specs()
        return [(name, layer) for name in (VISION_BLOCK, LM_BLOCK) if name in specs
                for layer in range(specs[name].n_layers)]

    def fingerprint(self) -> dict:
        ip = getattr(self.processor, "image_processor", None)
        fields = ("crop_size", "size", "image_mean", "image_std", "max_pixels", "min_pixels", "do_image_splitting",
                  "max_image_size")
        return {"model_id": self.model_id, "architecture": self.architecture,
                "dtype": str(next(self.model.parameters()).dtype),
                **{name: str(getattr(ip, name, None)) for name in fields},
                "chat_template": self.processor.chat_template, "max_new_tokens": self.max_new_tokens,
                "trace_meta": 4,  # what `trace_meta` stores (2: rollout; 3: the lens's answer map; 4: significant digits)
                "attention": self.attention_mode}

    def info(self) -> dict:
        tcfg = self.text_config
        out = {"model_id": self.model_id, "architecture": self.architecture, "family": self.family, "task": self.task,
               "parameters": sum(p.numel() for p in self.model.parameters()), "layers": self.n_layers,
               "heads": self.n_heads, "kv_heads": int(getattr(tcfg, "num_key_value_heads", 0) or 0),
               "d_model": self.d_model, "max_new_tokens": self.max_new_tokens, "device": self.device}
        vision = self.vision_spec()
        if vision is not None:
            out.update(vision_layers=vision.n_layers, vision_heads=vision.n_heads)
        note = self.vision_note()
        if note:
            out["vision_note"] = note
        return out

    def head_output_modules(self, block: str) -> list:
        """Each layer's linear map reading the heads' concatenated outputs ``[B, N, H * d]``."""
        if block == LM_BLOCK:
            return self._lm_output_projections()
        if block == VISION_BLOCK and self.vision_spec() is not None:
            return self._vision_output_projections()
        raise KeyError(f"{self.title} has no block {block!r}; blocks: {list(self.block_specs())}")

    # -- inputs -----------------------------------------------------------------------------------
    def encode(self, images: list, texts: list[str]) -> EncodedBatch:
        """Prompts through the chat template (left-padded), then greedy generation (sdpa, ``max_new_tokens``): the
        batch holds prompt + answer (see the module docstring).

        Raises:
            InputError: empty text, a mismatch between images and texts, or something that is not an image.
        """
        if len(images) != len(texts):
            raise InputError(f"got {len(images)} images for {len(texts)} texts; pass one image per text")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InputError("the text is empty: type a question for the image")
        images = self._check_images(list(images))
        enc = self._process(images, [self.prompt_text(t, len(group)) for t, group in zip(texts, images)])
        prompt_layouts = [t.layout for t in image_token_layouts(enc, self.processor, self.config)]
        batch = self.encode_processed(self._prompt_inputs(enc), prompt_layouts)
        batch.inputs["images_per_prompt"] = torch.tensor([len(group) for group in images])
        if self.vision_spec() is not None:
            batch.streams[VISION] = [self._vision_layouts(lay, b, enc) for b, lay in enumerate(prompt_layouts)]
            if any(len(group) > 1 for group in images) and not self.selects_vision_crops:
                # the tower's batch is every image: keep each prompt's first
                firsts = np.cumsum([0] + [len(group) for group in images[:-1]])
                batch.inputs["vision_rows"] = torch.as_tensor(firsts, device=batch.inputs["input_ids"].device)
        return batch

    def encode_processed(self, prompt: dict, layouts: Sequence[TokenLayout]) -> EncodedBatch:
        """Generate from prompts already processed (the model's inputs on its device: ``input_ids``,
        ``attention_mask``, the image inputs; ``layouts`` their `TokenLayout` s) and return the batch of prompt +
        answer with the ``lm`` and ``generated`` streams (no ``vision`` stream). `encode` is this after the
        processor; a benchmark or a caller with its own inputs can start here."""
        new, lengths = self._generate(prompt)
        return self._sequence_batch(prompt, new, lengths, list(layouts), [len(p) for p in prompt["input_ids"]])

    def _prompt_inputs(self, enc) -> dict:
        """The processor's tensors on the device (floating ones in the model's dtype)."""
        dev, dtype = self.device, next(self.model.parameters()).dtype
        out = {}
        for key, value in enc.items():
            if isinstance(value, torch.Tensor):
                out[key] = value.to(dev, dtype=dtype) if value.is_floating_point() else value.to(dev)
        return out

    def _per_token_keys(self, inputs: dict) -> list[str]:
        """Inputs laid out per prompt token (``[B, P]`` like ``input_ids``), extended over the fed-back answer."""
        shape = inputs["input_ids"].shape
        return [k for k, v in inputs.items()
                if k not in ("input_ids", "attention_mask", "position_ids") and isinstance(v, torch.Tensor)
                and tuple(v.shape) == tuple(shape)]

    def _generate(self, prompt: dict) -> tuple[torch.Tensor, list[int]]:
        """Greedy tokens ``[B, T]`` and per row the answer length (up to and including the end token)."""
        eos = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        with torch.no_grad(), self._implementation.shared():  # never while another pass switched it to eager
            seq = self.model.generate(**prompt, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad, eos_token_id=list(eos) or None,
                                      suppress_tokens=self._placeholder_ids() or None)
        new = seq[:, prompt["input_ids"].shape[1]:]
        lengths = []
        for row in new.tolist():
            ends = [i for i, t in enumerate(row) if t in eos]
            lengths.append(ends[0] + 1 if ends else len(row))
        return new, lengths

    def _placeholder_ids(self) -> list[int]:
        """Token ids that stand for image content (image/video placeholders, image begin/end markers): never
        generated (a model with random weights would otherwise write one, and feeding it back asks for an image
        that is not there)."""
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "boi_token_index",
                 "eoi_token_index", "vision_start_token_id", "vision_end_token_id", "vision_token_id")
        ids = {getattr(self.config, n, None) for n in names}
        return sorted(int(i) for i in ids if isinstance(i, int) and i >= 0)

    def _end_token(self) -> tuple[int, ...]:
        """The token that ends a typed answer: the first end token of the generation config (Qwen's ``<|im_end|>``
        ends a turn, not ``<|endoftext|>``), else the tokenizer's; none when neither has one."""
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        first = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        return () if first is None or isinstance(first, (list, tuple)) else (int(first),)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return set(eos) if isinstance(eos, (list, tuple)) else ({int(eos)} if eos is not None else set())

    def _sequence_batch(self, prompt: dict, new: torch.Tensor, lengths: list[int], prompt_layouts: list[TokenLayout],
                        n_full: list[int]) -> EncodedBatch:
        """The batch of prompt + fed-back answer tokens (all but each row's last), with its ``lm`` and
        ``generated`` streams."""
        B, P = prompt["input_ids"].shape
        T = new.shape[1]
        fed = new[:, : max(T - 1, 0)]
        fed_mask = torch.tensor([[int(t < n - 1) for t in range(fed.shape[1])] for n in lengths],
                                dtype=prompt["attention_mask"].dtype, device=fed.device).reshape(B, -1)
        mask = torch.cat([prompt["attention_mask"], fed_mask], 1)
        inputs = dict(prompt)
        for key in self._per_token_keys(prompt):
            value = torch.full_like(prompt[key][:, :1], self.answer_token_values.get(key, 0))
            inputs[key] = torch.cat([prompt[key], value.expand(-1, fed.shape[1])], 1)
        inputs.update(input_ids=torch.cat([prompt["input_ids"], fed.to(prompt["input_ids"].dtype)], 1),
                      attention_mask=mask, answer_ids=new, answer_len=torch.tensor(lengths, device=new.device),
                      prompt_len=P, prompt_keys=tuple(sorted(prompt)))
        if self.passes_position_ids:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0) + self.position_offset
        lm, gen = [], []
        for b in range(B):
            ids = new[b].tolist()
            words = [self.tokenizer.decode([i]) for i in ids]
            n = lengths[b]
            gen.append(TokenLayout.build([w if t < n else PAD_TOKEN for t, w in enumerate(words)],
                                         [ROLE_GENERATED if t < n else ROLE_PAD for t in range(T)]))
            lay = prompt_layouts[b]
            k = fed.shape[1]
            roles = [ROLE_GENERATED if t < n - 1 else ROLE_PAD for t in range(k)]
            lm.append(TokenLayout(lay.tokens + tuple(w if r != ROLE_PAD else PAD_TOKEN for w, r in zip(words, roles)),
                                  np.concatenate([lay.role, np.asarray(roles, np.int8)]),
                                  np.concatenate([lay.image_of, np.full(k, -1, np.int16)]),
                                  np.concatenate([lay.cell, np.full((k, 2), -1, np.int16)]), lay.images))
        return EncodedBatch(inputs, {LM: lm, GENERATED: gen}, LM, [False] * B, n_full)

    # -- running ----------------------------------------------------------------------------------
    def _model_inputs(self, inputs: dict) -> dict:
        """The model's keyword arguments for a teacher-forced pass over ``inputs`` (bookkeeping keys dropped, the
        image-token mask applied to the attention mask)."""
        out = {k: v for k, v in inputs.items() if k not in _BOOKKEEPING}
        if inputs.get("image_keep") is not None:
            out["attention_mask"] = out["attention_mask"] * inputs["image_keep"].to(out["attention_mask"].dtype)
        return out

    def _tower_selection(self, batch: EncodedBatch) -> tuple[list[int], list[int]] | None:
        """For a tower that runs several sequences per example (crops, tiles, frames) and keeps one of them per
        example: (sequences per example, the tower-batch index of each example's kept one). None otherwise."""
        return None

    def capture(self, batch: EncodedBatch, capture: Capture = Capture()) -> Captured:
        """One teacher-forced pass over prompt + answer keeping the asked blocks (per layer ``[B, H', Q, K]``) and
        the hidden states of every stream (``[L + 1, B, N, D]``), with the logit lens when hidden states are kept.
        Under ``torch.no_grad`` the decoder stays on sdpa; with grad enabled it runs on eager (module docstring).
        A tower of several sequences per example keeps the attention and hidden states of the one
        `_tower_selection` names (with grad, the kept weights are tensors of the forward graph)."""
        selection = self._tower_selection(batch)
        if selection is None:
            return self._capture_pass(batch, capture)
        wanted = set(self.block_specs()) if capture.blocks is None else set(capture.blocks)
        per_example, kept = selection
        index = torch.tensor(kept, device=self.device)
        with self._tower_sequences(per_example, index, VISION_BLOCK in wanted):
            captured = self._capture_pass(batch, capture)
        if VISION in captured.hidden:
            captured.hidden[VISION] = captured.hidden[VISION][:, index]
        return captured

    def _capture_pass(self, batch: EncodedBatch, capture: Capture) -> Captured:
        """`capture`'s pass, the tower's sequences as they come."""
        wanted = set(self.block_specs()) if capture.blocks is None else set(capture.blocks)
        inputs = batch.inputs
        P, T = int(inputs["prompt_len"]), int(inputs["answer_ids"].shape[1])
        steps = list(range(P - 1, P - 1 + T))
        n_lm = len(self._lm_attention())
        lm_layers = tuple(range(n_lm)) if capture.layers is None else tuple(capture.layers)
        rows: dict[int, torch.Tensor] = {}
        sums: dict[int, HeadSums] = {}
        vision_att: list[torch.Tensor] = []
        kept: dict[str, object] = {}
        vision_hidden: list[torch.Tensor] = []
        hooks = [(self.language_model.norm, lambda _m, args, _o: kept.__setitem__("last", args[0]))]
        if capture.hidden and self.vision_spec() is not None:
            hooks += [(m, lambda _m, _a, out: vision_hidden.append(out[0] if isinstance(out, tuple) else out))
                      for m in self._vision_hidden_modules()]
        if VISION_BLOCK in wanted and self.vision_spec() is not None:
            hooks += [(m, lambda _m, _a, out: vision_att.append(out[1])) for m in self._vision_attention()]
        grad = torch.is_grad_enabled()
        model_inputs = self._model_inputs(inputs)
        image_keys = torch.as_tensor(np.stack([np.isin(lay.role, IMAGE_ROLES) for lay in batch.streams[LM]]))[:, :P]
        prompt_rows = torch.as_tensor(np.stack([lay.valid for lay in batch.streams[LM]]))[:, :P]
        means: dict[int, torch.Tensor] = {}
        B, N = inputs["input_ids"].shape
        roll = (capture.rollout and not grad and LM_BLOCK in wanted and len(lm_layers) == n_lm
                and n_lm * B * N * N <= ROLLOUT_MAX_ELEMENTS)
        full: dict[int, torch.Tensor] = {}
        if LM_FULL in wanted and not grad:
            raise ValueError(f"{LM_FULL} is the decoder's whole attention for gradient passes; capture it with grad")
        eager = (LM_BLOCK in wanted or LM_FULL in wanted) and (grad or self.attention_mode == "eager")
        if eager:
            hooks += self._graph_row_hooks(steps, rows, lm_layers, means if roll else None,
                                           full if LM_FULL in wanted else None)
            scope = _scopes(self._implementation.exclusive(), eager_attention(self.model))
        elif LM_BLOCK in wanted:
            def on_call(call):
                rows[call.layer] = compute_attention_rows(call, [s - call.query_start for s in steps])
                acc = sums.setdefault(call.layer, HeadSums.zeros(call.query.shape[0], call.n_heads))
                accumulate_head_sums(call, acc, prompt_rows, image_keys, 256)
                if roll:
                    means[call.layer] = _head_mean_rows(call)
            scope = _scopes(self._implementation.shared(), capture_attention_calls(self.model, lm_layers, on_call))
        else:
            scope = self._implementation.shared()
        with self.hooked(hooks), scope:
            out = self.model(**model_inputs, output_hidden_states=capture.hidden, use_cache=False)
        attentions = {}
        if LM_BLOCK in wanted:
            attentions[LM_BLOCK] = self._heads([rows[i] for i in lm_layers], capture)
        if LM_FULL in wanted:
            attentions[LM_FULL] = self._heads([full[i] for i in lm_layers], capture)
        if VISION_BLOCK in wanted and self.vision_spec() is not None:
            chosen = vision_att if capture.layers is None else [vision_att[i] for i in capture.layers]
            if inputs.get("vision_rows") is not None:  # several images in a prompt: the first image's tower pass
                chosen = [a[inputs["vision_rows"]] for a in chosen]
            attentions[VISION_BLOCK] = self._heads(chosen, capture)
        lm_hidden = torch.stack((*out.hidden_states[:-1], kept["last"])) if capture.hidden else None
        hidden = {}
        if capture.hidden:
            hidden = {LM: lm_hidden, GENERATED: lm_hidden[:, :, P - 1:P - 1 + T]}
            if vision_hidden:
                hidden[VISION] = torch.stack(vision_hidden)
                if inputs.get("vision_rows") is not None:
                    hidden[VISION] = hidden[VISION][:, inputs["vision_rows"]]
        result = self._result(out.logits[:, P - 1:P - 1 + T], inputs, model_inputs, sums)
        if roll:
            result.rollout = rollout_rows([means[i] for i in range(n_lm)], steps)
        if capture.hidden and not grad:
            result.lens = self.logit_lens(lm_hidden, result, batch)
        return Captured(result, attentions, hidden)

    @staticmethod
    def _heads(layers: list[torch.Tensor], capture: Capture) -> list[torch.Tensor]:
        return layers if capture.heads is None else [a[:, list(capture.heads)] for a in layers]

    def _graph_row_hooks(self, steps: list[int], rows: dict, layers: tuple[int, ...],
                         means: dict | None = None, full: dict | None = None) -> list:
        """Hooks that make the generating rows tensors of the forward graph under eager attention: each layer's
        output is rebuilt from its probabilities with those rows spliced back in (``W[:, :, steps]``), so a
        gradient of the output reaches them. With ``means``, each layer's head-mean weights are kept too (for
        the rollout)."""
        values: dict[int, torch.Tensor] = {}
        hooks = []
        for layer, (module, o_proj) in enumerate(zip(self._lm_attention(), self._lm_output_projections())):
            if layer not in layers:
                continue

            def keep_values(_m, _a, out, layer=layer):
                values[layer] = out

            def rebuild(m, _a, output, layer=layer, o_proj=o_proj):
                weights = output[1]
                b, h, n, _ = weights.shape
                part = weights[:, :, steps[0]:steps[-1] + 1]
                spliced = torch.cat([weights[:, :, :steps[0]], part, weights[:, :, steps[-1] + 1:]], 2)
                v = values.pop(layer)
                v = v.view(b, n, -1, m.head_dim).transpose(1, 2).repeat_interleave(h // (v.shape[-1] // m.head_dim), 1)
                context = (spliced @ v.to(spliced.dtype)).transpose(1, 2).reshape(b, n, h * m.head_dim)
                rows[layer] = part if torch.is_grad_enabled() else part.clone()  # not a view of [B, H, N, N]
                if means is not None:
                    means[layer] = weights.detach().float().mean(1)
                if full is not None:  # the whole matrix as the graph uses it: gradients reach every row
                    full[layer] = spliced
                return (o_proj(context.to(output[0].dtype)), spliced)

            hooks += [(module.v_proj, keep_values), (module, rebuild)]
        return hooks

    def _result(self, logits: torch.Tensor, inputs: dict, model_inputs: dict, sums: dict) -> GenerationResult:
        P = int(inputs["prompt_len"])
        ids = tuple(tuple(row[:n]) for row, n in zip(inputs["answer_ids"].tolist(), inputs["answer_len"].tolist()))
        answers = tuple(self.tokenizer.decode(list(i), skip_special_tokens=True).strip() for i in ids)
        per_token = set(self._per_token_keys({k: v for k, v in inputs.items() if k in inputs["prompt_keys"]}))
        per_token |= {"input_ids", "attention_mask", "position_ids"}
        prompt = {k: (v[:, :P] if k in per_token else v) for k, v in model_inputs.items()}
        if inputs.get("images_per_prompt") is not None:
            prompt["images_per_prompt"] = inputs["images_per_prompt"]
        summaries = HeadSummaries.from_sums(sums, True) if sums else None
        return GenerationResult(logits, ids, answers, prompt, summaries)

    # -- the logit lens -----------------------------------------------------------------------------
    def logit_lens(self, hidden: torch.Tensor, result: GenerationResult, batch: EncodedBatch) -> dict[str, np.ndarray]:
        """Each layer's residual stream through the final norm and the LM head.

        Args:
            hidden: the ``lm`` stream's ``[L + 1, B, N, D]`` (pre-norm residual stream).
            result: the pass's result (for the generated ids).
            batch: the batch (for the image-token positions).

        Returns:
            ``generated_top_ids`` int32 / ``generated_top_probs`` float32 ``[B, L + 1, T, 5]``: each generating
            step's top tokens per layer; ``generated_rank`` int32 / ``generated_prob`` float32 ``[B, L + 1, T]``:
            the rank (0 = top) and probability of the token finally produced (-1 / NaN past a row's answer);
            ``image_positions`` int64 ``[B, I]`` (``lm`` positions of the image tokens, padded layout) and
            ``image_top_ids`` int32 ``[B, L + 1, I, 3]``: their top vocabulary tokens per layer;
            ``image_answer_prob`` float32 ``[B, L + 1, I]``: the probability each image token's lens gives the
            answer's first token (a logit-lens map of the answer over the image).
        """
        P, T = int(batch.inputs["prompt_len"]), int(batch.inputs["answer_ids"].shape[1])
        n_layers = hidden.shape[0]
        target = batch.inputs["answer_ids"].to(hidden.device)
        valid = torch.arange(T, device=hidden.device)[None] < batch.inputs["answer_len"].to(hidden.device)[:, None]
        image = [np.flatnonzero(np.isin(lay.role, IMAGE_ROLES)) for lay in batch.streams[LM]]
        n_img = min(len(i) for i in image)
        positions = torch.as_tensor(np.stack([i[:n_img] for i in image]), device=hidden.device).long()
        out = {k: [] for k in ("generated_top_ids", "generated_top_probs", "generated_rank", "generated_prob",
                               "image_top_ids", "image_answer_prob")}
        with torch.no_grad():
            for layer in range(n_layers):
                logp = self._lens_logits(hidden[layer, :, P - 1:P - 1 + T]).log_softmax(-1)
                top = logp.topk(min(LENS_TOP, logp.shape[-1]), -1)
                chosen = logp.gather(-1, target[..., None])[..., 0]
                rank = (logp > chosen[..., None]).sum(-1)
                out["generated_top_ids"].append(top.indices.int())
                out["generated_top_probs"].append(top.values.exp())
                out["generated_rank"].append(torch.where(valid, rank, -1).int())
                out["generated_prob"].append(torch.where(valid, chosen.exp(), torch.nan))
                img = torch.gather(hidden[layer], 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
                k = min(IMAGE_LENS_TOP, logp.shape[-1])
                img_logp = self._lens_logits(img).log_softmax(-1)
                out["image_top_ids"].append(img_logp.topk(k, -1).indices.int())
                first = target[:, :1, None].expand(-1, img_logp.shape[1], 1)  # the answer's first token
                out["image_answer_prob"].append(img_logp.gather(-1, first)[..., 0].exp())
        lens = {k: torch.stack(v, 1).float().cpu().numpy() if "prob" in k else torch.stack(v, 1).cpu().numpy()
                for k, v in out.items()}
        lens["image_positions"] = positions.cpu().numpy()
        return lens

    def _lens_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of residual-stream states through the final norm and the LM head (softcapping where the
        model applies it)."""
        logits = self.model.lm_head(self.language_model.norm(hidden)).float()
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def trace_meta(self, captured: Captured, batch: EncodedBatch, row: int) -> dict:
        """JSON-able extras stored with one example's trace: the logit lens (token strings, ranks and
        probabilities per layer, image tokens' top words by ``lm`` position in the trimmed layout) and the
        per-head summaries over the prompt's rows."""
        result: GenerationResult = captured.output
        meta: dict = {"generates": True, "answer": result.answers[row]}
        keep = np.flatnonzero(batch.streams[LM][row].valid)
        new_index = {int(p): i for i, p in enumerate(keep)}
        n = len(result.answer_ids[row])
        lens = result.lens
        if lens:
            word = self.tokenizer.convert_ids_to_tokens
            top_ids = lens["generated_top_ids"][row][:, :n]
            meta["lens"] = {
                "top_tokens": [[word(step.tolist()) for step in layer] for layer in top_ids],
                "top_probs": significant(lens["generated_top_probs"][row][:, :n]),
                "rank": lens["generated_rank"][row][:, :n].tolist(),
                "prob": significant(lens["generated_prob"][row][:, :n]),
                "image_positions": [new_index.get(int(p), -1) for p in lens["image_positions"][row]],
                "image_top_tokens": [[word(t.tolist()) for t in layer] for layer in lens["image_top_ids"][row]],
                "image_answer_prob": significant(lens["image_answer_prob"][row]),
            }
        if result.summaries is not None:
            s = result.summaries
            meta["prompt_head_summaries"] = {
                "layers": list(s.layers), "entropy": np.round(s.entropy[row], 6).tolist(),
                "image_share": np.round(s.key_mass[row], 6).tolist(), "rows": int(s.n_rows[row])}
        if result.rollout is not None:
            meta["rollout"] = self._rollout_meta(captured, batch, row, keep, n)
        note = self.vision_note()
        if note:
            meta["vision_note"] = note
        return meta

    def _rollout_meta(self, captured: Captured, batch: EncodedBatch, row: int, keep: np.ndarray, n: int) -> dict:
        """The rollout rows of one example over its trimmed ``lm`` tokens (``lm``: through the decoder) and, where
        the vision tower's attention was captured, the same rows with the image tokens' share spread through the
        vision tower's own rollout (``composed``, as LVLM-Interpret composes them): image token ``i``'s value
        goes to patch ``j`` in proportion to ``R_vision[i, j]`` over the patches, the image's total unchanged."""
        rows = captured.output.rollout[row][:n][:, torch.as_tensor(keep, device=captured.output.rollout.device)]
        rows = rows.double().cpu().numpy()
        out = {"block": LM_BLOCK, "lm": significant(rows)}
        if VISION_BLOCK in captured.attentions and captured.attentions[VISION_BLOCK]:
            vision = batch.streams[VISION][row]
            patches = np.flatnonzero(vision.role == ROLE_PATCH)
            layers = captured.attentions[VISION_BLOCK][: self._vision_feature_layers()]  # the layers the decoder reads
            r_vis = _rollout_matrix([a[row] for a in layers])[patches][:, patches]
            r_vis = r_vis / np.maximum(r_vis.sum(1, keepdims=True), 1e-12)
            new_index = {int(p): i for i, p in enumerate(keep)}
            where = [[new_index[p] for p in self._lm_positions_of(batch, int(i), row) if p in new_index]
                     for i in patches]
            # a decoder image token pooling several patches (Gemma 3: 4 x 4) splits its value evenly over them
            pooled = np.zeros(rows.shape[1])
            for w in where:
                pooled[w] += 1
            image = np.flatnonzero(pooled)
            composed = rows.copy()
            composed[:, image] = 0
            for t in range(len(rows)):
                spread = np.array([(rows[t, w] / pooled[w]).sum() for w in where]) @ r_vis
                for j, w in enumerate(where):
                    if w:
                        composed[t, w] += spread[j] / len(w)
            out["composed"] = significant(composed)
        return out

    # -- outputs -------------------------------------------------------------------------------------
    def _logprob(self, output: GenerationResult, ids: Sequence[int]) -> torch.Tensor:
        """Differentiable ``[B]``: the summed log-probability of ``ids`` as each row's answer."""
        scores = []
        for b in range(output.logits.shape[0]):
            if tuple(ids) == output.answer_ids[b]:  # the pass read this answer: its own logits
                logp = output.logits[b, : len(ids)].float().log_softmax(-1)
            else:
                logp = self._teacher_forced(output, b, ids)
            scores.append(logp.gather(-1, torch.as_tensor(ids, device=logp.device)[:, None]).sum())
        return torch.stack(scores)

    def _teacher_forced(self, output: GenerationResult, b: int, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), V]`` log-probabilities of row ``b``'s prompt followed by ``ids`` (one more pass)."""
        p = output.prompt
        dev = p["input_ids"].device
        P = p["input_ids"].shape[1]
        extra = torch.as_tensor(ids[:-1], dtype=p["input_ids"].dtype, device=dev)[None]
        row = self._row_inputs(p, b)
        inputs = dict(row)
        inputs["input_ids"] = torch.cat([row["input_ids"], extra], 1)
        inputs["attention_mask"] = torch.cat([row["attention_mask"], torch.ones_like(extra)], 1)
        if "position_ids" in row:
            start = row["position_ids"][0, -1] + 1
            inputs["position_ids"] = torch.cat([row["position_ids"],
                                                start + torch.arange(extra.shape[1], device=dev)[None]], 1)
        for key in self._per_token_keys(row):
            value = self.answer_token_values.get(key, 0)
            inputs[key] = torch.cat([row[key], torch.full_like(extra, value, dtype=row[key].dtype)], 1)
        with self._implementation.shared():
            out = self.model(**inputs, use_cache=False)
        return out.logits[0, P - 1:].float().log_softmax(-1)

    @staticmethod
    def _row_inputs(prompt: dict, b: int) -> dict:
        """Row ``b``'s model inputs of a prompt dict: per-example tensors sliced to the row; with several images
        in a prompt, per-image tensors (``pixel_values``, ``image_sizes``) sliced to the row's own images."""
        B = prompt["input_ids"].shape[0]
        counts = prompt.get("images_per_prompt")
        owner = None
        if counts is not None and int(counts.sum()) != B:
            owner = torch.repeat_interleave(torch.arange(B), counts.cpu())
        row = {}
        for key, value in prompt.items():
            if key == "images_per_prompt":
                continue
            if isinstance(value, torch.Tensor) and owner is not None and value.shape[:1] == owner.shape:
                row[key] = value[(owner == b).to(value.device)]
            elif isinstance(value, torch.Tensor) and value.shape[:1] == (B,):
                row[key] = value[b:b + 1]
            else:
                row[key] = value
        return row

    def predict(self, output: GenerationResult, top_k: int = 5,
                batch: EncodedBatch | None = None) -> list[list[tuple[str, float]]]:
        """``[(generated answer, its probability)]`` per row: the product of its tokens' probabilities (the end
        token included when it was generated)."""
        with torch.no_grad():
            probs = [float(self._logprob(dataclasses.replace(output, logits=output.logits[b:b + 1],
                                                             answer_ids=(ids,)), ids).exp()[0])
                     for b, ids in enumerate(output.answer_ids)]
        return [[(answer, p)] for answer, p in zip(output.answers, probs)]

    def target_score(self, output: GenerationResult, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The summed log-probability of the target answer's tokens, teacher-forced after each row's prompt, and
        its probability. None: row 0's generated answer (its own tokens, the end token included when generated);
        a target equal to a generated answer is scored with that answer's tokens, any other with the tokenizer's
        tokens and the end token. The generated answer is read from the pass's own logits (differentiable with
        respect to its captured attention); another answer takes one more pass per row.

        Raises:
            InputError: an empty answer.
        """
        ids, label = self._target_ids(output.answers, output.answer_ids, target)
        score = self._logprob(output, ids)
        return score, score.detach().exp(), label

    def _target_ids(self, answers: Sequence[str], answer_ids: Sequence[tuple[int, ...]],
                    target: str | None) -> tuple[tuple[int, ...], str]:
        """The token ids scored for ``target`` and its label (see `target_score`).

        Raises:
            InputError: an empty answer, or one without tokens.
        """
        if target is None:
            ids, label = tuple(answer_ids[0]), answers[0]
        else:
            if not isinstance(target, str) or not target.strip():
                raise InputError("the answer to explain is empty: type an answer")
            label = target.strip()
            ids = next((tuple(i) for a, i in zip(answers, answer_ids) if a == label), None)
            if ids is None:
                ids = tuple(self.tokenizer(label, add_special_tokens=False)["input_ids"]) + self._end_token()
        if not ids:
            raise InputError(f"the answer {label!r} has no tokens for {self.model_id}; type another answer")
        return ids, label

    def _with_answer(self, batch: EncodedBatch, ids: Sequence[int]) -> EncodedBatch:
        """One example's batch with ``ids`` fed back as its answer instead of the generated one (the same prompt
        and images), so that a pass over it scores ``ids`` from its own logits."""
        inputs = batch.inputs
        P, width = int(inputs["prompt_len"]), inputs["input_ids"].shape
        prompt = {}
        for key in inputs["prompt_keys"]:
            value = inputs[key]
            per_token = isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(width)
            prompt[key] = value[:, :P] if per_token else value
        lm = batch.streams[LM][0]
        layout = TokenLayout(lm.tokens[:P], lm.role[:P], lm.image_of[:P], lm.cell[:P], lm.images)
        new = torch.as_tensor([list(ids)], dtype=inputs["answer_ids"].dtype, device=inputs["answer_ids"].device)
        out = self._sequence_batch(prompt, new, [len(ids)], [layout], batch.n_text_full)
        for key in ("images_per_prompt", "vision_rows"):
            if key in inputs:
                out.inputs[key] = inputs[key]
        for name, layouts in batch.streams.items():
            out.streams.setdefault(name, layouts)
        return out

    @staticmethod
    def generated_query_positions(lm: TokenLayout) -> np.ndarray:
        """Where each generating step's query sits in an ``lm`` layout (padded or trimmed): the last prompt token
        for step 0, then each fed-back answer token (row ``t`` of ``lm.generated`` is row ``[t]`` of these in the
        decoder's whole attention)."""
        generated = np.flatnonzero(lm.role == ROLE_GENERATED)
        prompt = np.flatnonzero(lm.valid & (lm.role != ROLE_GENERATED))
        return np.concatenate([prompt[-1:], generated]).astype(np.int64)

    def default_query(self, block: str, layout: TokenLayout) -> int | None:
        """``lm.generated``: the first generated token's step; ``vision.self``: the vision tower's first summary
        token (its CLS), if any."""
        if block == VISION_BLOCK:
            return layout.first(ROLE_IMAGE_SUMMARY)
        return layout.first(ROLE_GENERATED)

    # -- interventions -------------------------------------------------------------------------------
    @contextmanager
    def head_mask(self, block: str, keep: torch.Tensor):
        """Multiply each head's output by ``keep [B, L, H]`` where the block's output projection reads it
        (``o_proj`` in the decoder, ``out_proj`` in the vision tower). The answer stays the one generated."""
        spec = self.block_specs().get(block)
        if spec is None or tuple(keep.shape[1:]) != (spec.n_layers, spec.n_heads):
            shape = f"[B, {spec.n_layers}, {spec.n_heads}]" if spec else "(no such block)"
            raise ValueError(f"{self.title} masks heads of {list(self.block_specs())} with keep [B, L, H]; got block "
                             f"{block!r} keep {tuple(keep.shape)} (expected {shape})")

        def make_hook(layer: int):
            def hook(module, args, _output):
                context = args[0]
                width = context.shape[-1] // spec.n_heads
                rows = keep[:, layer]
                if block == VISION_BLOCK:  # a tower of several sequences per example: each example's row on all
                    rows = _per_tower_sequence(rows, context.shape[0])
                scale = rows.to(context.device, context.dtype).repeat_interleave(width, dim=1)
                return torch.nn.functional.linear(context * scale[:, None, :], module.weight, module.bias)
            return hook

        with self.hooked([(m, make_hook(layer)) for layer, m in enumerate(self.head_output_modules(block))]):
            yield

    def _lm_positions_of(self, batch: EncodedBatch, index: int, row: int = 0) -> list[int]:
        """The ``lm`` positions of ``vision`` token ``index`` of example ``row`` (a patch: the decoder image tokens
        on the same grid and cell; a summary token: the decoder's summary tokens)."""
        lm = batch.streams[LM][row]
        vision = batch.streams[VISION][row]
        if vision.role[index] == ROLE_PATCH:
            g, cell = int(vision.image_of[index]), vision.cell[index]
            return np.flatnonzero((lm.role == ROLE_PATCH) & (lm.image_of == g) & (lm.cell == cell).all(1)).tolist()
        return np.flatnonzero(lm.role == ROLE_IMAGE_SUMMARY).tolist()

    def mask_image_tokens(self, batch: EncodedBatch, drops: Sequence[np.ndarray]) -> EncodedBatch:
        """Variants with image tokens removed from the decoder's view: their keys get attention mask 0 in every
        decoder layer (the vision tower still sees the whole image). ``drops`` index the image stream (`image_stream`)."""
        if len(batch) != 1:
            raise InputError(f"image-token removal runs on one example; got {len(batch)}")
        stream = batch.streams[self.image_stream][0]
        base = batch.inputs.get("image_keep")
        base = torch.ones_like(batch.inputs["attention_mask"][0]) if base is None else base[0]
        keeps = []
        for drop in drops:
            drop = np.asarray(drop, dtype=np.int64)
            if drop.size and (drop.min() < 0 or drop.max() >= stream.n_tokens):
                raise InputError(f"image tokens to remove must index the {stream.n_tokens} tokens of the "
                                 f"{self.image_stream!r} stream; got {drop.tolist()}")
            if drop.size and not np.isin(stream.role[drop], IMAGE_ROLES).all():
                raise InputError(f"only image tokens can be removed; {drop[~np.isin(stream.role[drop], IMAGE_ROLES)].tolist()} "
                                 "are not image tokens")
            k = base.clone()
            k[torch.as_tensor(drop, dtype=torch.long)] = 0
            keeps.append(k)
        inputs = {**batch.repeated_inputs(len(keeps), exclude=("image_keep",)), "image_keep": torch.stack(keeps)}
        return EncodedBatch(inputs, {k: v * len(keeps) for k, v in batch.streams.items()}, batch.main,
                            batch.truncated * len(keeps), batch.n_text_full * len(keeps))

    def attention_gradients(self, batch: EncodedBatch, target: str | None = None,
                            blocks: Sequence[str] | None = None, image_pass: int = 0) -> Gradients:
        """Every block's probabilities and the gradient of the target score with respect to them, from one pass
        with grad (the decoder on eager in a scoped context; see the module docstring).

        Raises:
            InputError: more than one example, an empty target, or an image pass other than 0.
        """
        if len(batch) != 1:
            raise InputError(f"gradient relevancy explains one example at a time; got a batch of {len(batch)}")
        if image_pass != 0:
            raise InputError(f"{self.model_id} runs one image pass per example; got pass {image_pass}")
        names = list(self.block_specs()) if blocks is None else list(blocks)
        unknown = [n for n in names if n not in self.block_specs() and n != LM_FULL]
        if unknown:
            raise InputError(f"{self.title} has no block {unknown[0]!r}; blocks: {[*self.block_specs(), LM_FULL]}")
        answered = batch.inputs["answer_ids"][0, : int(batch.inputs["answer_len"][0])].tolist()
        ids, _ = self._target_ids([self.tokenizer.decode(answered, skip_special_tokens=True).strip()], [answered], target)
        if list(ids) != answered:  # another answer than the generated one: explain a pass that reads it
            batch = self._with_answer(batch, ids)
        with torch.enable_grad():
            pixels = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
            captured = self.capture(dataclasses.replace(batch, inputs={**batch.inputs, "pixel_values": pixels}),
                                    Capture(blocks=tuple(names), hidden=False))
            score, _, label = self.target_score(captured.output, target)
            layers = [a for name in names for a in captured.layers(name)]
            grads = iter(torch.autograd.grad(score[0], layers, allow_unused=True))
        attentions, gradients = {}, {}
        for name in names:
            attentions[name] = [a[0].detach().float() for a in captured.layers(name)]
            gradients[name] = [torch.zeros_like(a) if g is None else g[0].detach().float()
                               for a, g in zip(attentions[name], grads)]
        return Gradients(attentions, gradients, captured.output.detach(), label, float(score[0].detach()))
