"""The one interface every model family implements, and the batch it produces."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlcore.models.hooks import scoped_forward_hooks

TASKS = ("vqa", "itm", "mlm", "base", "nlvr2")


@dataclass
class EncodedBatch:
    """A batch of (image, text) pairs ready for the model, plus the token layout.

    ``N`` is the padded sequence length ``T + 1 + P`` (text, image CLS, patches).

    Attributes:
        inputs: keyword arguments for the model's forward, on the model's device.
        tokens: per example, its ``N`` token strings (padding included, as "[PAD]").
        modality: int8 ``[B, N]``; 0 text, 1 image.
        special: bool ``[B, N]``.
        patch_rc: int16 ``[B, N, 2]``; -1 where the token is not a patch.
        valid: bool ``[B, N]``; False for padding.
        grids: per example (rows, cols).
        images: per example uint8 ``[rows * patch, cols * patch, 3]``: what the model saw.
        truncated: per example, whether the text was cut.
        n_text_full: per example, the text length in tokens before truncation.
    """

    inputs: dict[str, Any]
    tokens: list[tuple[str, ...]]
    modality: np.ndarray
    special: np.ndarray
    patch_rc: np.ndarray
    valid: np.ndarray
    grids: list[tuple[int, int]]
    images: list[np.ndarray]
    truncated: list[bool]
    n_text_full: list[int] = field(default_factory=list)
    pair: EncodedBatch | None = None  # the second image's layout (NLVR2); its inputs live in ``inputs``

    def __len__(self) -> int:
        return len(self.tokens)

    def repeated_inputs(self, n: int, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The model inputs with every tensor repeated ``n`` times along the batch (for batched variants of
        one example); keys in ``exclude`` are left out."""
        return {k: v.repeat(n, *([1] * (v.dim() - 1))) if hasattr(v, "repeat") else v
                for k, v in self.inputs.items() if k not in exclude}


class ModelAdapter(ABC):
    """A loaded model with its processor, behind one interface.

    Adapters own every quirk of their family (hook paths, patch order, text limits).

    One adapter is shared by every session of the app (`vlcore.ui.loaders.get_adapter`), and passes from
    several sessions may run through its model at the same moment. Every pass that attaches hooks therefore
    goes through `hooked`, whose hooks act only on that pass (`vlcore.models.hooks`): plain passes need no
    lock and are never changed by another call's hooks.
    """

    model_id: str
    task: str
    patch_px: int
    max_text_len: int

    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abstractmethod
    def n_heads(self) -> int: ...

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> str: ...

    @abstractmethod
    def encode(self, images: list, texts: list[str]) -> EncodedBatch:
        """Turn PIL images and texts into model inputs with a deterministic token layout."""

    @abstractmethod
    def forward(self, batch: EncodedBatch, attentions: bool = True, hidden: bool = True, **kwargs: Any) -> Any:
        """Run the model; the output has ``logits``, ``attentions`` and ``hidden_states``."""

    def self_attention_modules(self) -> list:
        """Each layer's self-attention module, in layer order, for hooks. Its forward output is a tuple whose
        first item is the per-head context ``[B, N, H * d_head]`` (heads contiguous) and whose second is the
        attention probabilities ``[B, H, N, N]``.

        Raises:
            NotImplementedError: the adapter exposes no attention modules (no head masking or gradient pass).
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its attention modules")

    def hooked(self, hooks: Iterable[tuple[Any, Callable]]) -> AbstractContextManager[None]:
        """Attach forward hooks for one pass: ``with adapter.hooked([(module, hook), ...]): adapter.model(...)``.

        The only way VLScope attaches hooks to a model. Within the block the hooks act on forward passes run by
        this thread and context only; another session's concurrent pass through the same shared model goes
        through them unchanged and unseen (see `vlcore.models.hooks` for why this, rather than a lock). They are
        registered in ``try`` and removed in ``finally``.

        Args:
            hooks: ``(module, hook)`` pairs; ``hook(module, args, output)`` may return a replacement output.
        """
        return scoped_forward_hooks(hooks)

    n_passes: int = 1  # image passes per example (2 for NLVR2: one encoder pass per image)

    def pass_outputs(self, out: Any, image_pass: int = 0) -> tuple:
        """``(attentions, hidden_states)`` of one image pass: per-layer tuples."""
        if image_pass != 0:
            raise ValueError(f"{self.model_id} runs one image pass per example; got pass {image_pass}")
        return out.attentions, getattr(out, "hidden_states", None)

    def pass_layout(self, batch: EncodedBatch, image_pass: int = 0) -> EncodedBatch:
        """The token layout of one image pass."""
        return batch if image_pass == 0 else batch.pair

    def attention_gradients(self, batch: EncodedBatch, label: str | None = None, image_pass: int = 0) -> tuple:
        """One forward and backward pass for gradient-weighted relevancy (Chefer et al., 2021).

        Args:
            batch: from `encode`, one example.
            label: the answer whose logit is differentiated; None for the predicted one.
            image_pass: which image pass's attentions to return (NLVR2 runs one per image).

        Returns:
            ``(attentions, gradients, logits, label)``: per layer, float32 ``[H, N, N]`` attention
            probabilities and the gradient of the chosen logit with respect to them (padded
            layout of ``batch``), the logits ``[1, n_labels]``, and the label explained.

        Raises:
            NotImplementedError: the adapter has no gradient pass.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement gradient relevancy")

    @abstractmethod
    def predict(self, logits: Any, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per example from the logits."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Everything about the model and its processing that changes a result."""

    @abstractmethod
    def info(self) -> dict:
        """Size, layers, heads, width, device and task, for display."""
