"""`Trace` and `TokenLayout`: one example through one model, the record every other part of VLScope reads.

A model reads one or more token **streams** (ViLT: one joint stream; BLIP and CLIP: ``vision`` and ``text``;
a generative model: its decoder's sequence). Each stream has a `TokenLayout` saying, per token, its string,
its role (text, special, image patch, image summary, generated, pad) and, for image tokens, the image and
the (row, col) of the cell it covers on that image's grid. Image tokens may sit anywhere in a sequence,
a sequence may hold several images, and a cell may cover a merged block of patches: the layout says so,
nobody else guesses.

A trace holds named **attention blocks** (ViLT ``self``; BLIP ``vision.self``, ``text.self``, ``text.cross``;
CLIP ``vision.self``, ``text.self``), each float16 ``[layer, head, query, key]`` with its own query stream and
key stream, and hidden states per stream, float16 ``[L + 1, n_tokens, d_model]`` (``hidden[0]`` the embedding
output, ``hidden[l]`` the output of layer ``l``, before any final norm: the residual stream).

The flat accessors (``tokens``, ``modality``, ``attentions``, ``hidden``, ``to_grid`` ...) read the block a
trace is **viewing** (``trace.view``; `Trace.select` returns the same trace viewing another block): its query
stream's layout and its attention stack. For a self-attention block, queries and keys share one layout, so
the square ``[N, N]`` views of round one hold. A cross block's keys have their own layout: ``key_layout``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# The layout of a stored Trace and of a sweep's files; a stored item of another version is computed again.
TRACE_VERSION = 2

TEXT, IMAGE = 0, 1  # modality codes
BLOCKS = ("txt2txt", "txt2img", "img2txt", "img2img")  # modality quadrants of a square attention matrix
Block = Literal["txt2txt", "txt2img", "img2txt", "img2img"]

# Token roles.
ROLE_TEXT, ROLE_SPECIAL, ROLE_PATCH, ROLE_IMAGE_SUMMARY, ROLE_GENERATED, ROLE_PAD = range(6)
ROLES = ("text", "special", "patch", "image_summary", "generated", "pad")

# Token strings used for the image part of the sequence.
IMAGE_CLS_TOKEN = "[IMG]"
PAD_TOKEN = "[PAD]"


def patch_token(row: int, col: int) -> str:
    """The display string of the patch token at grid cell (row, col).

    >>> patch_token(2, 5)
    '<patch 2,5>'
    """
    return f"<patch {row},{col}>"


def _frozen(*arrays: np.ndarray | None) -> None:
    for arr in arrays:
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)  # traces come from caches: never modify in place


@dataclass(frozen=True, eq=False)
class ImageGrid:
    """One image as a model saw it, and the grid of cells its tokens cover.

    Attributes:
        image: uint8 ``[h, w, 3]``: the image after the processor (resized, cropped, padded).
        grid: ``(rows, cols)`` of token cells.
        boxes: int32 ``[rows, cols, 4]``: each cell's pixel box ``(x0, y0, x1, y1)`` on ``image``, end exclusive.
    """

    image: np.ndarray
    grid: tuple[int, int]
    boxes: np.ndarray

    def __post_init__(self) -> None:
        _frozen(self.image, self.boxes)

    @classmethod
    def regular(cls, image: np.ndarray, grid: tuple[int, int], cell_px: int | tuple[int, int]) -> ImageGrid:
        """A grid of equal square (or ``(height, width)``) cells from the top-left corner.

        >>> g = ImageGrid.regular(np.zeros((4, 6, 3), np.uint8), (2, 3), 2)
        >>> g.boxes[1, 2].tolist()
        [4, 2, 6, 4]
        """
        ch, cw = (cell_px, cell_px) if isinstance(cell_px, int) else cell_px
        rows, cols = int(grid[0]), int(grid[1])
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        boxes = np.stack([c * cw, r * ch, (c + 1) * cw, (r + 1) * ch], axis=-1).astype(np.int32)
        return cls(np.asarray(image, dtype=np.uint8), (rows, cols), boxes)

    @property
    def cell_px(self) -> int:
        """The width in pixels of the top-left cell (all cells of a regular grid)."""
        return int(self.boxes[0, 0, 2] - self.boxes[0, 0, 0])


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """One token sequence: what each position is.

    Attributes:
        tokens: ``N`` display strings.
        role: int8 ``[N]``, indices into ``ROLES``.
        image_of: int16 ``[N]``: the image an image token belongs to, -1 for other tokens.
        cell: int16 ``[N, 2]``: (row, col) of an image patch token on its image's grid, -1 otherwise.
        images: the images, in ``image_of`` order.
    """

    tokens: tuple[str, ...]
    role: np.ndarray
    image_of: np.ndarray
    cell: np.ndarray
    images: tuple[ImageGrid, ...] = ()

    def __post_init__(self) -> None:
        _frozen(self.role, self.image_of, self.cell)

    @classmethod
    def build(cls, tokens, roles, image_of=None, cell=None, images=()) -> TokenLayout:
        """A layout from per-token lists; ``image_of`` and ``cell`` default to -1 (no image).

        >>> lay = TokenLayout.build(["[CLS]", "hi", "[IMG]"], [ROLE_SPECIAL, ROLE_TEXT, ROLE_IMAGE_SUMMARY], [-1, -1, 0])
        >>> lay.modality.tolist(), lay.special.tolist()
        ([0, 0, 1], [True, False, True])
        """
        n = len(tokens)
        image_of = np.full(n, -1, np.int16) if image_of is None else np.asarray(image_of, np.int16)
        cell = np.full((n, 2), -1, np.int16) if cell is None else np.asarray(cell, np.int16).reshape(n, 2)
        return cls(tuple(str(t) for t in tokens), np.asarray(roles, np.int8), image_of, cell, tuple(images))

    @classmethod
    def from_modality(cls, tokens, modality, special, patch_rc, images=(), valid=None) -> TokenLayout:
        """The layout of a single-image sequence described by modality / special / (row, col) arrays."""
        modality, special = np.asarray(modality), np.asarray(special, bool)
        patch_rc = np.asarray(patch_rc, np.int16)
        role = np.where(modality == IMAGE, np.where(special, ROLE_IMAGE_SUMMARY, ROLE_PATCH),
                        np.where(special, ROLE_SPECIAL, ROLE_TEXT)).astype(np.int8)
        if valid is not None:
            role = np.where(np.asarray(valid, bool), role, ROLE_PAD).astype(np.int8)
        image_of = np.where(modality == IMAGE, 0, -1).astype(np.int16)
        return cls(tuple(tokens), role, image_of, patch_rc.copy(), tuple(images))

    # -- per-token views ---------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def modality(self) -> np.ndarray:
        """int8 ``[N]``: 1 for image tokens (patches, image summaries, and padding inside an image's run of
        tokens, which has an ``image_of``), 0 for the rest."""
        image = np.isin(self.role, (ROLE_PATCH, ROLE_IMAGE_SUMMARY)) | ((self.role == ROLE_PAD) & (self.image_of >= 0))
        return image.astype(np.int8)

    @property
    def special(self) -> np.ndarray:
        """bool ``[N]``: special text tokens and image summary tokens."""
        return np.isin(self.role, (ROLE_SPECIAL, ROLE_IMAGE_SUMMARY))

    @property
    def valid(self) -> np.ndarray:
        """bool ``[N]``: False for padding."""
        return self.role != ROLE_PAD

    @property
    def patch_rc(self) -> np.ndarray:
        """int16 ``[N, 2]``: (row, col) of patch tokens (any image), -1 for the rest."""
        return np.where((self.role == ROLE_PATCH)[:, None], self.cell, -1).astype(np.int16)

    def index(self, *roles: int) -> np.ndarray:
        """int64 indices of the tokens with one of ``roles``, in sequence order."""
        return np.flatnonzero(np.isin(self.role, roles))

    def patch_positions(self, image: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Token indices of the patches of one image and their (row, col): int64 ``[P]``, int16 ``[P, 2]``."""
        idx = np.flatnonzero((self.role == ROLE_PATCH) & (self.image_of == image))
        return idx, self.cell[idx]

    def to_grid(self, values: np.ndarray, image: int = 0) -> np.ndarray:
        """Per-token ``values [N]`` placed on one image's grid: float32 ``[rows, cols]``, NaN where no token.

        Several tokens on one cell (never in the supported layouts) keep the last one's value.
        """
        grid = np.full(self.images[image].grid, np.nan, dtype=np.float32)
        idx, rc = self.patch_positions(image)
        grid[rc[:, 0], rc[:, 1]] = np.asarray(values)[idx]
        return grid

    def first(self, *roles: int) -> int | None:
        """Index of the first token with one of ``roles``, or None."""
        idx = self.index(*roles)
        return int(idx[0]) if len(idx) else None

    def padded(self, extra: int, image: int = -1) -> TokenLayout:
        """The layout with ``extra`` padding tokens appended (inside image ``image``'s run when not -1)."""
        if extra <= 0:
            return self
        return TokenLayout(self.tokens + (PAD_TOKEN,) * extra,
                           np.concatenate([self.role, np.full(extra, ROLE_PAD, np.int8)]),
                           np.concatenate([self.image_of, np.full(extra, image, np.int16)]),
                           np.concatenate([self.cell, np.full((extra, 2), -1, np.int16)]), self.images)

    def trimmed(self) -> TokenLayout:
        """The layout without its padding tokens."""
        keep = self.valid
        return TokenLayout(tuple(t for t, k in zip(self.tokens, keep) if k), self.role[keep], self.image_of[keep],
                           self.cell[keep], self.images)


@dataclass(frozen=True, eq=False)
class AttentionBlock:
    """One named stack of attention probabilities.

    Attributes:
        attentions: float16 ``[L, H, Q, K]`` (rows sum to 1 over the keys a query sees), or None when a sweep
            kept only summaries.
        query: the stream whose tokens are the rows.
        key: the stream whose tokens are the columns.
        n_visible: int32 ``[Q]``: keys each query can see (a causal mask sees fewer); None: all ``K``.
    """

    attentions: np.ndarray | None
    query: str
    key: str
    n_visible: np.ndarray | None = None

    def __post_init__(self) -> None:
        _frozen(self.attentions, self.n_visible)

    @property
    def is_self(self) -> bool:
        return self.query == self.key


@dataclass(frozen=True, eq=False)
class Trace:
    """One example through one model.

    Attributes:
        example_id: id of the example (dataset id or a content hash for user input).
        model_id: model name plus revision or weights hash, e.g. ``vilt-tiny@sha256:ab12``.
        streams: the token layout of each stream, by name.
        blocks: the attention blocks, by name (see the module docstring).
        hiddens: float16 ``[L + 1, N_stream, D]`` per stream, or None.
        view: the block the flat accessors read.
        prediction: top-k ``(label, probability)`` pairs, best first.
        gold: the gold answer(s) if known.
        text_truncated: True when the text was cut to the model's text positions.
        text: the text as given.
        meta: free-form JSON-able extras (task, score function, truncation details, family).
    """

    example_id: str
    model_id: str
    streams: dict[str, TokenLayout]
    blocks: dict[str, AttentionBlock]
    hiddens: dict[str, np.ndarray | None]
    view: str
    prediction: tuple[tuple[str, float], ...] = ()
    gold: tuple[str, ...] | None = None
    text_truncated: bool = False
    text: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.view not in self.blocks:
            raise ValueError(f"view {self.view!r} is not one of the blocks {sorted(self.blocks)}")
        for name, block in self.blocks.items():
            for stream in (block.query, block.key):
                if stream not in self.streams:
                    raise ValueError(f"block {name!r} reads stream {stream!r}; streams: {sorted(self.streams)}")
        _frozen(*self.hiddens.values())

    @classmethod
    def single(cls, example_id: str, model_id: str, layout: TokenLayout, attentions: np.ndarray | None,
               hidden: np.ndarray | None, block: str = "self", stream: str = "main", **kwargs) -> Trace:
        """A one-stream trace with one self-attention block (ViLT's shape)."""
        return cls(example_id, model_id, {stream: layout}, {block: AttentionBlock(attentions, stream, stream)},
                   {stream: hidden}, block, **kwargs)

    @classmethod
    def from_arrays(cls, example_id: str, model_id: str, tokens, modality, special, patch_rc, grid, image,
                    patch_px: int, attentions, hidden, prediction=(), gold=None, text_truncated: bool = False,
                    text: str = "", meta: dict | None = None) -> Trace:
        """A one-stream trace from flat per-token arrays and one image on a regular patch grid (none when the
        grid is empty): the shape of ViLT's joint sequence and of hand-built test traces."""
        images = (ImageGrid.regular(image, tuple(grid), int(patch_px)),) if int(np.prod(grid)) else ()
        layout = TokenLayout.from_modality(tokens, modality, special, patch_rc, images)
        return cls.single(example_id, model_id, layout, attentions, hidden, prediction=tuple(prediction), gold=gold,
                          text_truncated=text_truncated, text=text, meta=dict(meta or {}))

    def select(self, block: str) -> Trace:
        """The same trace viewing ``block``.

        Raises:
            KeyError: no such block (the message lists the trace's blocks).
        """
        if block not in self.blocks:
            raise KeyError(f"this trace has no attention block {block!r}; it has {sorted(self.blocks)}")
        return self if block == self.view else dataclasses.replace(self, view=block)

    def with_arrays(self, attentions: np.ndarray | None = None, hidden: np.ndarray | None = None,
                    image: np.ndarray | None = None) -> Trace:
        """A copy with the viewed block's attentions, its query stream's hidden states, or the first image (same
        grid and cell boxes) replaced; None keeps a field."""
        blocks, hiddens, streams = dict(self.blocks), dict(self.hiddens), dict(self.streams)
        if attentions is not None:
            blocks[self.view] = dataclasses.replace(self.block, attentions=np.asarray(attentions))
        if hidden is not None:
            hiddens[self.block.query] = np.asarray(hidden)
        if image is not None:
            name = next(n for n in (self.block.query, self.block.key, *streams) if streams[n].images)
            first = streams[name].images[0]
            images = (ImageGrid(np.asarray(image, np.uint8), first.grid, first.boxes), *streams[name].images[1:])
            streams[name] = dataclasses.replace(streams[name], images=images)
        return dataclasses.replace(self, blocks=blocks, hiddens=hiddens, streams=streams)

    # -- the viewed block --------------------------------------------------------------------
    @property
    def block(self) -> AttentionBlock:
        return self.blocks[self.view]

    @property
    def layout(self) -> TokenLayout:
        """The query stream's layout of the viewed block."""
        return self.streams[self.block.query]

    @property
    def key_layout(self) -> TokenLayout:
        """The key stream's layout of the viewed block (``layout`` for a self-attention block)."""
        return self.streams[self.block.key]

    @property
    def attentions(self) -> np.ndarray | None:
        """float16 ``[L, H, Q, K]`` of the viewed block, or None."""
        return self.block.attentions

    @property
    def hidden(self) -> np.ndarray | None:
        """float16 ``[L + 1, N, D]`` of the viewed block's query stream, or None."""
        return self.hiddens.get(self.block.query)

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.layout.tokens

    @property
    def modality(self) -> np.ndarray:
        return self.layout.modality

    @property
    def special(self) -> np.ndarray:
        return self.layout.special

    @property
    def patch_rc(self) -> np.ndarray:
        return self.layout.patch_rc

    @property
    def images(self) -> tuple[ImageGrid, ...]:
        """Every image of the trace (the first stream that has images)."""
        for layout in (self.key_layout, self.layout, *self.streams.values()):
            if layout.images:
                return layout.images
        return ()

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the first image's grid; (0, 0) without an image."""
        return self.images[0].grid if self.images else (0, 0)

    @property
    def image(self) -> np.ndarray:
        """uint8 ``[h, w, 3]``: the first image as the model saw it."""
        return self.images[0].image if self.images else np.zeros((0, 0, 3), np.uint8)

    @property
    def patch_px(self) -> int:
        """Cell side in pixels on the first image."""
        return self.images[0].cell_px if self.images else 0

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
        """Whether the top prediction is a gold answer after VQA answer normalisation (`normalize_answer`: "Red."
        matches "red"); None without gold, without a prediction, or when the
        prediction is a pair's score rather than an answer (``meta["answers_compare"]`` False: image-text
        matching, similarity)."""
        if not self.gold or not self.prediction or self.meta.get("answers_compare") is False:
            return None
        return answer_in_gold(self.predicted, self.gold)

    def n_visible(self) -> np.ndarray:
        """int64 ``[Q]``: how many keys each query of the viewed block can see."""
        block = self.block
        if block.n_visible is not None:
            return block.n_visible.astype(np.int64)
        return np.full(self.layout.n_tokens, self.key_layout.n_tokens, dtype=np.int64)

    def token_index(self, modality: int, include_special: bool = False) -> np.ndarray:
        """Indices of the tokens of one modality in the viewed block's query stream, in sequence order.

        Args:
            modality: ``TEXT`` (0) or ``IMAGE`` (1).
            include_special: keep special tokens and image summaries when True.

        Returns:
            int64 ``[k]`` token indices.
        """
        return _modality_index(self.layout, modality, include_special)

    def text_index(self, include_special: bool = False) -> np.ndarray:
        """Indices of text tokens (``[k_text]``)."""
        return self.token_index(TEXT, include_special)

    def image_index(self, include_special: bool = False) -> np.ndarray:
        """Indices of image tokens (``[k_image]``); patches only unless ``include_special``."""
        return self.token_index(IMAGE, include_special)

    def block_index(self, block: Block, include_special: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Query and key indices of one modality quadrant of the viewed block.

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
        return (_modality_index(self.layout, pick[src], include_special),
                _modality_index(self.key_layout, pick[dst], include_special))

    def block_attention(self, layer: int, head: int | None, block: Block, include_special: bool = False) -> np.ndarray:
        """The attention sub-matrix of one modality quadrant, float32 ``[k_query, k_key]``."""
        att = self.head_attention(layer, head)
        rows, cols = self.block_index(block, include_special)
        return att[np.ix_(rows, cols)]

    def head_attention(self, layer: int, head: int | None) -> np.ndarray:
        """float32 ``[Q, K]`` attention of one head, or the mean over heads when ``head`` is None."""
        if self.attentions is None:
            raise ValueError("this trace was captured without attentions (summary-only sweep)")
        att = self.attentions[layer]
        return att.mean(0, dtype=np.float32) if head is None else att[head].astype(np.float32)

    def patch_positions(self, image: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Query-stream token indices of one image's patches and their (row, col)."""
        return self.layout.patch_positions(image)

    def to_grid(self, values: np.ndarray, image: int = 0) -> np.ndarray:
        """Per-query-token ``values [N]`` on one image's grid: float32 ``[rows, cols]``, NaN where no patch."""
        return self.layout.to_grid(values, image)


def _modality_index(layout: TokenLayout, modality: int, include_special: bool) -> np.ndarray:
    keep = (layout.modality == modality) & layout.valid
    if not include_special:
        keep &= ~layout.special
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------------------
# Answer matching: the official VQA evaluation's normalisation. It lives here, in the bottom layer, so that
# `Trace.correct` can use it; `vlcore.analysis.answers` is its public home (with VQA accuracy).
# ---------------------------------------------------------------------------------------

_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # the VQA rule: a period goes unless a digit follows it ("2.5" stays)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# The contracted forms the VQA evaluation restores (each also reached from its spellings without some apostrophes).
_CONTRACTED = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm", "i've",
    "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've",
    "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she's", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've",
    "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've"
)


def _spellings(word: str) -> set[str]:
    """``word`` with every subset of its apostrophes removed (itself included)."""
    out = {""}
    for ch in word:
        out = {s + ch for s in out} | ({s for s in out} if ch == "'" else set())
    return out


_CONTRACTIONS = {variant: word for word in _CONTRACTED for variant in _spellings(word) if variant != word}


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it: punctuation stripped (a character between words
    becomes a space, one beside a space goes; commas inside numbers go: "1,000" is "1000"; a period goes unless a
    digit follows it: "2.5" stays), lower-cased, number words as digits ("two" is "2"), the articles a/an/the
    dropped, and contractions written with their apostrophes ("dont" is "don't").

    >>> normalize_answer("Two."), normalize_answer("the Red"), normalize_answer("Yes!"), normalize_answer("2.5")
    ('2', 'red', 'yes', '2.5')
    """
    given = text = " ".join(str(answer).split())
    in_number = _COMMA_IN_NUMBER.search(given) is not None
    for p in _PUNCT:  # the rule reads the answer as given, not as the earlier replacements left it
        text = text.replace(p, "" if in_number or f"{p} " in given or f" {p}" in given else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def answer_in_gold(prediction: str | None, gold) -> bool:
    """True when ``prediction`` equals one of the ``gold`` answers after `normalize_answer`.

    >>> answer_in_gold("Red.", ["red", "dark red"]), answer_in_gold("blue", ["red"])
    (True, False)
    """
    if prediction is None:
        return False
    key = normalize_answer(prediction)
    return any(key == normalize_answer(g) for g in gold)
