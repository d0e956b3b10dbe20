"""`Trace`: one example through one model, the record every other part of VLScope reads.

Token order is the model's: ``[text tokens (CLS first, SEP last) | image CLS | patches]``.
Patches are stored in row-major order of the patch grid, whatever order the model's
embedding layer sampled them in; ``patch_rc`` gives each patch token's (row, col).

Shapes (``L`` layers, ``H`` heads, ``N`` tokens, ``D`` model width):

- ``attentions``: float16 ``[L, H, N, N]``; rows are queries, columns keys; rows sum to 1.
- ``hidden``: float16 ``[L + 1, N, D]``; ``hidden[0]`` is the embedding output,
  ``hidden[l]`` the output of layer ``l``. ``hidden[L]`` is *before* the model's final
  LayerNorm (ViLT's ``last_hidden_state`` is ``LayerNorm(hidden[L])``): the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# The layout of a stored Trace and of a sweep's files; a stored item of another version is computed again.
TRACE_VERSION = 1

TEXT, IMAGE = 0, 1
BLOCKS = ("txt2txt", "txt2img", "img2txt", "img2img")
Block = Literal["txt2txt", "txt2img", "img2txt", "img2img"]

# Token strings used for the image part of the sequence.
IMAGE_CLS_TOKEN = "[IMG]"


def patch_token(row: int, col: int) -> str:
    """The display string of the patch token at grid cell (row, col).

    >>> patch_token(2, 5)
    '<patch 2,5>'
    """
    return f"<patch {row},{col}>"


@dataclass(frozen=True, eq=False)
class Trace:
    """One example through one model.

    Attributes:
        example_id: id of the example (dataset id or a content hash for user input).
        model_id: model name plus revision or weights hash, e.g. ``vilt-tiny@sha256:ab12``.
        tokens: ``N`` token strings in model order.
        modality: int8 ``[N]``: 0 text, 1 image.
        special: bool ``[N]``: True for [CLS], [SEP] and the image CLS.
        patch_rc: int16 ``[N, 2]``: (row, col) of patch tokens, -1 for every other token.
        grid: (rows, cols) of the patch grid.
        image: uint8 ``[rows * patch_px, cols * patch_px, 3]``: the image as the model saw it.
        patch_px: patch side in pixels.
        attentions: float16 ``[L, H, N, N]`` or None in summary-only sweeps.
        hidden: float16 ``[L + 1, N, D]`` (see the module docstring) or None.
        prediction: top-k ``(label, probability)`` pairs, best first.
        gold: the gold answer(s) if known.
        text_truncated: True when the text was cut to the model's text positions.
        text: the text as given.
        meta: free-form JSON-able extras (task, score function, truncation details).
    """

    example_id: str
    model_id: str
    tokens: tuple[str, ...]
    modality: np.ndarray
    special: np.ndarray
    patch_rc: np.ndarray
    grid: tuple[int, int]
    image: np.ndarray
    patch_px: int
    attentions: np.ndarray | None
    hidden: np.ndarray | None
    prediction: tuple[tuple[str, float], ...] = ()
    gold: tuple[str, ...] | None = None
    text_truncated: bool = False
    text: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("modality", "special", "patch_rc", "image", "attentions", "hidden"):
            arr = getattr(self, name)
            if isinstance(arr, np.ndarray):
                arr.setflags(write=False)  # traces come from caches: never modify in place

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_layers(self) -> int:
        if self.attentions is not None:
            return int(self.attentions.shape[0])
        return int(self.hidden.shape[0]) - 1 if self.hidden is not None else 0

    @property
    def n_heads(self) -> int:
        return int(self.attentions.shape[1]) if self.attentions is not None else 0

    @property
    def predicted(self) -> str | None:
        return self.prediction[0][0] if self.prediction else None

    @property
    def correct(self) -> bool | None:
        if not self.gold or not self.prediction:
            return None
        return self.predicted in self.gold

    def token_index(self, modality: int, include_special: bool = False) -> np.ndarray:
        """Indices of the tokens of one modality, in model order.

        Args:
            modality: ``TEXT`` (0) or ``IMAGE`` (1).
            include_special: keep [CLS]/[SEP]/image CLS when True.

        Returns:
            int64 ``[k]`` token indices.
        """
        keep = self.modality == modality
        if not include_special:
            keep &= ~self.special
        return np.flatnonzero(keep)

    def text_index(self, include_special: bool = False) -> np.ndarray:
        """Indices of text tokens (``[k_text]``)."""
        return self.token_index(TEXT, include_special)

    def image_index(self, include_special: bool = False) -> np.ndarray:
        """Indices of image tokens (``[k_image]``); patches only unless ``include_special``."""
        return self.token_index(IMAGE, include_special)

    def block_index(self, block: Block, include_special: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Query and key indices of one modality block.

        Args:
            block: one of ``BLOCKS``; ``"txt2img"`` means text queries (rows), image keys (columns).
            include_special: keep special tokens in both index lists.

        Returns:
            ``(rows, cols)``: int64 query indices and key indices.
        """
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        src, dst = block.split("2")
        pick = {"txt": TEXT, "img": IMAGE}
        return (
            self.token_index(pick[src], include_special),
            self.token_index(pick[dst], include_special),
        )

    def block_attention(self, layer: int, head: int | None, block: Block, include_special: bool = False) -> np.ndarray:
        """The attention sub-matrix of one block, float32 ``[k_query, k_key]``.

        Args:
            layer: layer index.
            head: head index, or None for the mean over heads.
            block: one of ``BLOCKS``.
            include_special: keep special tokens.
        """
        att = self.head_attention(layer, head)
        rows, cols = self.block_index(block, include_special)
        return att[np.ix_(rows, cols)]

    def head_attention(self, layer: int, head: int | None) -> np.ndarray:
        """float32 ``[N, N]`` attention of one head, or the mean over heads when ``head`` is None."""
        if self.attentions is None:
            raise ValueError("this trace was captured without attentions (summary-only sweep)")
        att = self.attentions[layer]
        return att.mean(0, dtype=np.float32) if head is None else att[head].astype(np.float32)

    def patch_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Token indices of the patches and their (row, col), int64 ``[P]`` and int16 ``[P, 2]``."""
        idx = np.flatnonzero(self.patch_rc[:, 0] >= 0)
        return idx, self.patch_rc[idx]

    def to_grid(self, values: np.ndarray) -> np.ndarray:
        """Place per-token values of the patch tokens on the patch grid.

        Args:
            values: ``[N]`` values, one per token of the trace.

        Returns:
            float32 ``[rows, cols]``; cells without a patch token are NaN.
        """
        grid = np.full(self.grid, np.nan, dtype=np.float32)
        idx, rc = self.patch_positions()
        grid[rc[:, 0], rc[:, 1]] = values[idx]
        return grid
