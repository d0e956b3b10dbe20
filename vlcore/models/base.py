"""The adapter contract: everything VLScope's core calls on a model, and the batch it produces.

One adapter per model family (`vlcore.models.vilt`, `vlcore.models.blip`, `vlcore.models.clip`). Code outside
`vlcore/models/` reads a model only through this interface: it never names a family, never branches on a task
string, never reaches into ``adapter.model``. A family that needs something else adds a method here.

The words:

- **stream**: a token sequence the model reads (ViLT ``main``; BLIP and CLIP ``vision`` and ``text``).
  Its `TokenLayout` says what each position is.
- **block**: a named stack of attention probabilities ``[layer, head, query, key]`` with a query stream and a
  key stream (`BlockSpec`).
- **target**: what is explained: an answer label, ``"match"`` for an image-text score, a class label.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlcore.models.hooks import scoped_forward_hooks
from vlcore.trace import TokenLayout

# Every task any adapter supports, with what it means to a user.
TASK_NAMES = {
    "vqa": "visual question answering (an answer classifier or generator)",
    "itm": "image-text matching (a match probability)",
    "mlm": "masked language modelling",
    "base": "a bare encoder (no head)",
    "nlvr2": "two images and a statement (NLVR2)",
    "similarity": "image-text similarity (two towers)",
    "zero_shot": "zero-shot classification over candidate labels",
}

# Tasks whose prediction is an answer that a dataset's gold answers can be compared with; the others score the
# pair itself (a match probability, a similarity), so a gold answer says nothing about them being right.
ANSWER_TASKS = ("vqa", "nlvr2", "zero_shot")


@dataclass(frozen=True)
class BlockSpec:
    """One attention block a model can expose.

    Attributes:
        query: the stream whose tokens are the rows.
        key: the stream whose tokens are the columns.
        n_layers: layers in the block.
        n_heads: heads per layer.
        causal: each query sees only keys up to itself (entropy is normalised by the visible keys).
        title: a few words for the UI, e.g. "text -> image cross-attention".
    """

    query: str
    key: str
    n_layers: int
    n_heads: int
    causal: bool = False
    title: str = ""

    @property
    def is_self(self) -> bool:
        return self.query == self.key


@dataclass(frozen=True)
class Capture:
    """What a forward pass keeps.

    Attributes:
        blocks: block names to keep; None keeps every block.
        layers: layer indices to keep (the same for every block); None keeps all.
        heads: head indices to keep; None keeps all.
        hidden: keep hidden states of every stream.
        image_pass: for models that run one encoder pass per image (ViLT NLVR2), the pass to keep.
        rollout: also compute what an adapter precomputes for attention rollout when its blocks alone cannot
            give it (a generative model keeps only the generated tokens' rows, so it rolls out its decoder
            during the pass); ignored by adapters whose blocks roll out as they are.
    """

    blocks: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    hidden: bool = True
    image_pass: int = 0
    rollout: bool = False


@dataclass
class Captured:
    """The result of `ModelAdapter.capture`.

    Attributes:
        output: the model's output, for `ModelAdapter.predict` and `ModelAdapter.target_score`.
        attentions: block name -> the captured layers' probabilities, either a list of per-layer float tensors
            ``[B, H', Q, K]`` (preferably the very tensors of the forward graph, so a caller can take gradients
            with respect to them) or one stacked tensor ``[L', B, H', Q, K]``.
        hidden: stream name -> float ``[L + 1, B, N, D]``.
    """

    output: Any
    attentions: dict[str, Any] = field(default_factory=dict)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)

    def stacked(self, block: str) -> torch.Tensor:
        """float ``[L', B, H', Q, K]`` of one captured block."""
        att = self.attentions[block]
        return att if isinstance(att, torch.Tensor) else torch.stack(tuple(att))

    def layers(self, block: str) -> list[torch.Tensor]:
        """The per-layer tensors ``[B, H', Q, K]`` of one captured block."""
        att = self.attentions[block]
        return list(att.unbind(0)) if isinstance(att, torch.Tensor) else list(att)


@dataclass
class Gradients:
    """One gradient pass (`ModelAdapter.attention_gradients`), for one example.

    Attributes:
        attentions: block name -> per layer float32 ``[H, Q, K]`` probabilities (padded layout of the batch).
        gradients: block name -> per layer float32 ``[H, Q, K]``: d(target score) / d(probabilities).
        output: the model's detached output.
        label: the target explained.
        score: the target's score (a logit or similarity) as a float.
    """

    attentions: dict[str, list[torch.Tensor]]
    gradients: dict[str, list[torch.Tensor]]
    output: Any
    label: str
    score: float


@dataclass
class EncodedBatch:
    """A batch of (image, text) pairs ready for the model, with the layout of every stream.

    Attributes:
        inputs: keyword arguments for the model's forward, on the model's device.
        streams: stream name -> one `TokenLayout` per example, padded to the batch's length (``ROLE_PAD``).
        main: the stream the flat views below read.
        truncated: per example, whether the text was cut.
        n_text_full: per example, the text length in tokens before truncation.
        pair: the second image pass's batch (ViLT NLVR2); its inputs live in ``inputs``.
    """

    inputs: dict[str, Any]
    streams: dict[str, list[TokenLayout]]
    main: str
    truncated: list[bool]
    n_text_full: list[int] = field(default_factory=list)
    pair: EncodedBatch | None = None

    def __len__(self) -> int:
        return len(self.streams[self.main])

    @property
    def layouts(self) -> list[TokenLayout]:
        """The main stream's layout per example (padded)."""
        return self.streams[self.main]

    # Flat views of the main stream, stacked over the batch.
    @property
    def tokens(self) -> list[tuple[str, ...]]:
        return [lay.tokens for lay in self.layouts]

    @property
    def modality(self) -> np.ndarray:
        return np.stack([lay.modality for lay in self.layouts])

    @property
    def special(self) -> np.ndarray:
        return np.stack([lay.special for lay in self.layouts])

    @property
    def patch_rc(self) -> np.ndarray:
        return np.stack([lay.patch_rc for lay in self.layouts])

    @property
    def valid(self) -> np.ndarray:
        return np.stack([lay.valid for lay in self.layouts])

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [self._images(b)[0].grid if self._images(b) else (0, 0) for b in range(len(self))]

    @property
    def images(self) -> list[np.ndarray]:
        return [self._images(b)[0].image if self._images(b) else np.zeros((0, 0, 3), np.uint8) for b in range(len(self))]

    def _images(self, b: int):
        for layouts in (self.layouts, *self.streams.values()):
            if layouts[b].images:
                return layouts[b].images
        return ()

    def repeated_inputs(self, n: int, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The model inputs with every tensor repeated ``n`` times along the batch (for batched variants of
        one example); keys in ``exclude`` are left out."""
        return {k: v.repeat(n, *([1] * (v.dim() - 1))) if hasattr(v, "repeat") else v
                for k, v in self.inputs.items() if k not in exclude}


class ModelAdapter(ABC):
    """A loaded model with its processor, behind one interface.

    Adapters own every quirk of their family (hook paths, patch order, text limits, output tuples).

    One adapter is shared by every session of the app (`vlcore.ui.loaders.get_adapter`), and passes from
    several sessions may run through its model at the same moment. Every pass that attaches hooks therefore
    goes through `hooked`, whose hooks act only on that pass (`vlcore.models.hooks`): plain passes need no
    lock and are never changed by another call's hooks.
    """

    family: str  # e.g. "vilt", "blip", "clip"
    tasks: tuple[str, ...]  # what this family's checkpoints can do (keys of TASK_NAMES)
    model_id: str
    task: str  # the loaded checkpoint's task
    patch_px: int
    max_text_len: int
    n_passes: int = 1  # image passes per example (2 for NLVR2: one encoder pass per image)
    several_images: bool = False  # True: one prompt may hold several images (`encode` takes a list per text)

    # -- description -------------------------------------------------------------------------
    @abstractmethod
    def block_specs(self) -> dict[str, BlockSpec]:
        """Every attention block the model exposes, by name, in display order."""

    @property
    def default_block(self) -> str:
        """The block a view opens on."""
        return next(iter(self.block_specs()))

    @property
    def image_stream(self) -> str:
        """The stream holding the image tokens (the main stream of a single-stream model)."""
        return self.main_stream

    @property
    def main_stream(self) -> str:
        return self.block_specs()[self.default_block].query

    @property
    def n_layers(self) -> int:
        """Layers of the default block."""
        return self.block_specs()[self.default_block].n_layers

    @property
    def n_heads(self) -> int:
        """Heads of the default block."""
        return self.block_specs()[self.default_block].n_heads

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> str: ...

    @abstractmethod
    def fingerprint(self) -> dict:
        """Everything about the model and its processing that changes a result."""

    @abstractmethod
    def info(self) -> dict:
        """Size, layers, heads, width, device, family and task, for display."""

    # -- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, images: list, texts: list[str]) -> EncodedBatch:
        """Turn PIL images and texts into model inputs with a deterministic layout of every stream.

        Raises:
            InputError: empty text, mismatched lists, an image the family cannot read.
        """

    # -- running -------------------------------------------------------------------------------
    @abstractmethod
    def capture(self, batch: EncodedBatch, capture: Capture = Capture()) -> Captured:
        """One forward pass, keeping the blocks, layers, heads and hidden states ``capture`` asks for.

        Raises:
            NoAttentionError: a block was asked for and the model returned no weights for it.
        """

    def trace_meta(self, captured: Captured, batch: EncodedBatch, row: int) -> dict:
        """JSON-able extras stored in one example's ``Trace.meta`` (a generative model's logit lens and per-head
        summaries); none by default."""
        return {}

    @property
    def generates(self) -> bool:
        """True for a model that writes its answer token by token (the ``generated`` stream and its block)."""
        return False

    @abstractmethod
    def predict(self, output: Any, top_k: int = 5, batch: EncodedBatch | None = None) -> list[list[tuple[str, float]]]:
        """Top-k ``(label, probability)`` per example from a model output."""

    @abstractmethod
    def target_score(self, output: Any, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The score to explain for ``target`` in every row of a batched output.

        Args:
            output: the model's output (``Captured.output``), batch ``B``.
            target: an answer label, ``"match"``, a class label; None: row 0's top prediction.

        Returns:
            ``(score [B], probability [B], label)``: the differentiable score (a logit or similarity),
            its probability under the model, and the target explained.

        Raises:
            InputError: a target the model does not know, or a checkpoint with nothing to explain.
        """

    def targets(self) -> list[str]:
        """The targets a user may pick (answer labels, class labels); empty when free-form."""
        return []

    @property
    def answers_compare(self) -> bool:
        """True when a prediction is an answer that gold answers can be compared with (`ANSWER_TASKS`): accuracy
        and "correct" apply; False for a pair's score (image-text matching, similarity)."""
        return self.task in ANSWER_TASKS

    # -- optional capabilities (a family that has them overrides these) -----------------------
    @property
    def takes_candidates(self) -> bool:
        """True when the model can classify an image over candidate labels a user gives (`with_candidates`)."""
        return False

    @property
    def candidates(self) -> tuple[str, ...]:
        """The candidate labels this adapter classifies over (a `with_candidates` view); empty otherwise."""
        return ()

    def with_candidates(self, labels: Sequence[str] | None, template: str = "{}") -> ModelAdapter:
        """A view of this adapter (same model, nothing copied; the shared adapter unchanged) that classifies the
        image over ``labels``, each read as ``template.format(label)``; None or empty: the plain task.

        Raises:
            NotImplementedError: the model scores fixed answers or pairs only (`takes_candidates` is False).
            InputError: an empty or repeated label, or a template without ``{}``.
        """
        raise NotImplementedError(f"{self.model_id} cannot classify over candidate labels")

    def prompt(self, label: str) -> str:
        """The text the model reads for a candidate label."""
        return label

    @property
    def has_joint_space(self) -> bool:
        """True when the model embeds images and texts in one space (`joint_embeddings`)."""
        return False

    def joint_embeddings(self, output: Any) -> tuple[np.ndarray, np.ndarray]:
        """float32 unit ``(image [B, d], text [B, d])`` embeddings in the shared space, from a captured output.

        Raises:
            NotImplementedError: the model has no shared image-text space (`has_joint_space` is False).
        """
        raise NotImplementedError(f"{self.model_id} has no shared image-text embedding space")

    def block_order(self, target: str | None = None) -> list[tuple[str, int]]:
        """The ``(block, layer)`` steps in the order the model applies them for ``target`` (gradient relevancy
        through several blocks follows it, `vlcore.attribution.bimodal`). One block: its layers in order.

        Raises:
            NotImplementedError: several blocks and the adapter does not say how they interleave.
        """
        specs = self.block_specs()
        if len(specs) == 1:
            name, spec = next(iter(specs.items()))
            return [(name, layer) for layer in range(spec.n_layers)]
        raise NotImplementedError(f"{type(self).__name__} has {len(specs)} attention blocks but does not say in which "
                                  "order the model applies them (block_order)")

    @abstractmethod
    def default_query(self, block: str, layout: TokenLayout) -> int | None:
        """The query token whose row explains the prediction in ``block`` (e.g. ViLT's [CLS], CLIP's image CLS);
        None when no single row does (a pooled head)."""

    # -- interventions -------------------------------------------------------------------------
    def head_mask(self, block: str, keep: torch.Tensor) -> AbstractContextManager[None]:
        """A context in which each head's output in ``block`` is multiplied by ``keep`` ``[B, L, H]`` (1 keeps,
        0 removes), row ``b`` of the batch by ``keep[b]``. Only passes run inside the context by this thread see
        it (the hooks go through `hooked`).

        Raises:
            NotImplementedError: the adapter cannot mask heads in that block.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot mask heads")

    def mask_image_tokens(self, batch: EncodedBatch, drops: Sequence[np.ndarray]) -> EncodedBatch:
        """Variants of a one-example batch with image tokens removed from the model's view, for perturbation.

        Args:
            batch: from `encode`, one example.
            drops: per variant, int indices into ``batch.streams[image_stream][0]`` of image tokens to remove.

        Returns:
            A batch of ``len(drops)`` rows, row ``i`` without the tokens ``drops[i]``.

        Raises:
            NotImplementedError: the adapter cannot remove image tokens.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot remove image tokens")

    def stream_attentions(self, block: str, consume: Callable[[torch.Tensor], None],
                          image_pass: int = 0) -> AbstractContextManager[None]:
        """A context in which each layer's attention probabilities of ``block`` are handed over as the pass
        computes them, and not kept (for statistics reduced inside the pass: `vlcore.run.sweep`).

        Inside it, a `capture` with ``block`` in `Capture.blocks`, run by this thread, calls ``consume(probs)``
        with float ``[B, H, Q, K]`` once per layer, in layer order (only for ``image_pass`` of a model that runs
        several); its `Captured.attentions` of ``block`` then hold empty placeholders. Hooks go through `hooked`.

        Raises:
            NotImplementedError: the adapter cannot hand attentions over during a pass (the caller then
                reduces `Captured.attentions` after it); raised when called, before any pass.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot hand attentions over during a pass")

    def pass_batch(self, batch: EncodedBatch, image_pass: int = 0) -> EncodedBatch:
        """The layout-bearing batch of one image pass (the second image of ViLT NLVR2 is ``batch.pair``)."""
        return batch if image_pass == 0 else batch.pair

    def attention_gradients(self, batch: EncodedBatch, target: str | None = None,
                            blocks: Sequence[str] | None = None, image_pass: int = 0) -> Gradients:
        """One forward and backward pass for gradient-weighted relevancy (Chefer et al., 2021).

        Args:
            batch: from `encode`, one example.
            target: what to explain (see `target_score`); None: the top prediction.
            blocks: blocks whose probabilities and gradients to return; None: all.
            image_pass: which image pass's blocks to return (NLVR2).

        Raises:
            InputError: more than one example, an unknown target.
            NotImplementedError: the adapter has no gradient pass.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement gradient relevancy")

    # -- hooks -----------------------------------------------------------------------------------
    def hooked(self, hooks: Iterable[tuple[Any, Callable]]) -> AbstractContextManager[None]:
        """Attach forward hooks for one pass: ``with adapter.hooked([(module, hook), ...]): adapter.capture(...)``.

        The only way VLScope attaches hooks to a model. Within the block the hooks act on forward passes run by
        this thread and context only; another session's concurrent pass through the same shared model goes
        through them unchanged and unseen (see `vlcore.models.hooks` for why this, rather than a lock). They are
        registered in ``try`` and removed in ``finally``.

        Args:
            hooks: ``(module, hook)`` pairs; ``hook(module, args, output)`` may return a replacement output.
        """
        return scoped_forward_hooks(hooks)
