"""Attention weights of a decoder language model without eager mode.

In transformers 5.x the sdpa and flash kernels return no attention weights, and switching a model to eager
attention holds a ``[batch, head, N, N]`` tensor per layer (tens of GB for a long multimodal prompt) and changes
its outputs in float16. This module leaves the model on sdpa and recomputes only the rows that are needed.

The mechanism. Every decoder in transformers 5.x calls its attention through the ``AttentionInterface``
registry with the queries and keys as the kernel sees them (after rotary or M-RoPE and q/k norms, with the
cache's keys) and the mask the model built for that layer (causal, sliding window, padding, PaliGemma's
bidirectional prefix, Gemma 3's bidirectional image blocks, all already in it). While a capture is open,
``AttentionInterface.register("sdpa", wrapper)`` puts a wrapper in front of the original sdpa function:

- the wrapper calls the original with the same arguments and returns its result unchanged, so the model's
  outputs are exactly those of plain sdpa; the masks are built exactly as for sdpa because the model's
  implementation name stays ``"sdpa"`` (a new name would need its own mask function in
  ``AttentionMaskInterface`` and would change the model's shared config);
- it hands ``(query, key, mask, scaling, softcap, is_causal)`` of the layers asked for to the capture, only
  for passes run by the thread and context that opened it (a `contextvars.ContextVar`, as in
  `vlcore.models.hooks`): another session's pass through the same shared model goes straight to sdpa;
- the registration is reference-counted under a lock and restored in ``finally``; each wrapper keeps its
  own original, so a pass that looked it up just before the restore still runs.

`vlcore.models.attention_rows` rebuilds the rows from the mask the model passed; where sdpa got no mask
(``None`` with ``is_causal``) the rule is sdpa's own: causal, upper-left aligned, when there is more than
one query, none otherwise. Grouped-query heads are expanded by head (head ``h`` reads key head
``h // n_rep``). Nothing of size ``[head, N, N]`` is held: each layer is reduced while the pass runs, to
the rows asked for and per-head sums.

A layer asked for that never reaches the wrapper (a model on eager or flash attention, a family with its
own attention registry) raises `AttentionCaptureError`; empty attentions are never returned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.modeling_utils import AttentionInterface

from vlcore.models.attention_rows import (
    CHUNK_ROWS,
    AttentionCall,
    AttentionCaptureError,
    HeadSummaries,
    HeadSums,
    accumulate_head_sums,
    compute_attention_rows,
)

__all__ = ["AttentionCall", "AttentionCapture", "AttentionCaptureError", "GenerationAttention", "HeadSummaries",
           "capture_attention_calls", "eager_attention", "extract_attention", "extract_eager_attention",
           "extract_eager_generation_attention", "extract_generation_attention", "find_attention_modules"]


# ---------------------------------------------------------------------------------------------------------------
# The capture: a wrapper in front of sdpa, acting only for the scope that opened it


_SCOPES: ContextVar[tuple] = ContextVar("vlscope_attention_scopes", default=())
_INSTALL_LOCK = threading.Lock()
_INSTALLED: list = []  # [wrapper, original, depth] while at least one capture is open
_SDPA_PARAMS = ("dropout", "scaling", "is_causal", "position_bias", "cache")


def _make_wrapper(original: Callable) -> Callable:
    def capturing_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        output = original(module, query, key, value, attention_mask, *args, **kwargs)
        for scope in _SCOPES.get():
            scope.offer(module, query, key, attention_mask, dict(zip(_SDPA_PARAMS, args), **kwargs))
        return output

    capturing_sdpa.vlscope_original = original
    return capturing_sdpa


@contextmanager
def _sdpa_wrapped() -> Iterator[None]:
    """Register the capturing wrapper as ``"sdpa"`` while any capture is open; restore the original after."""
    with _INSTALL_LOCK:
        if not _INSTALLED:
            original = AttentionInterface._global_mapping["sdpa"]
            wrapper = _make_wrapper(original)
            AttentionInterface.register("sdpa", wrapper)
            _INSTALLED.extend([wrapper, original, 0])
        _INSTALLED[2] += 1
    try:
        yield
    finally:
        with _INSTALL_LOCK:
            _INSTALLED[2] -= 1
            if _INSTALLED[2] == 0:
                wrapper, original, _ = _INSTALLED
                if AttentionInterface._global_mapping.get("sdpa") is wrapper:
                    AttentionInterface.register("sdpa", original)
                _INSTALLED.clear()


def _make_call(layer: int, module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               kwargs: dict, end: int) -> AttentionCall:
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        raise AttentionCaptureError(f"Layer {layer} adds a position bias or runs on a paged cache; attention "
                                    "capture supports neither. Use extract_eager_attention for this model.")
    if kwargs.get("dropout", 0.0) and module.training:
        raise AttentionCaptureError(f"Layer {layer} runs attention dropout (training mode); its weights are "
                                    "random. Call model.eval() before capturing.")
    if mask is not None and (mask.ndim != 4 or mask.shape[-1] != key.shape[2]):
        raise AttentionCaptureError(f"Layer {layer} got a mask of shape {tuple(mask.shape)} for "
                                    f"{key.shape[2]} keys; expected [batch, 1, queries, keys].")
    n_q, n_k = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    scaling = kwargs.get("scaling")
    end = n_k if n_q == n_k else max(end + n_q, n_k)  # keys end at the current token (dynamic caches)
    return AttentionCall(layer, query, key, mask, bool(is_causal) and n_q > 1 and mask is None,
                         float(query.shape[-1] ** -0.5 if scaling is None else scaling),
                         kwargs.get("softcap"), end - n_q, end - n_k)


class _Scope:
    """The layers one capture listens to, in the thread that opened it."""

    def __init__(self, modules: dict[int, int], on_call: Callable[[AttentionCall], None]):
        self.modules, self.on_call = modules, on_call
        self.thread = threading.get_ident()
        self.ends: dict[int, int] = {}

    def offer(self, module, query, key, mask, kwargs) -> None:
        layer = self.modules.get(id(module))
        if layer is None or threading.get_ident() != self.thread:
            return
        call = _make_call(layer, module, query, key, mask, kwargs, self.ends.get(layer, 0))
        self.ends[layer] = call.query_start + call.n_queries
        self.on_call(call)


def find_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder language model's self-attention modules, in layer order.

    Raises:
        AttentionCaptureError: the model has no decoder with ``layers[i].self_attn``.
    """
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    except (AttributeError, ValueError, NotImplementedError):
        decoder = model
    layers = getattr(decoder, "layers", None) or getattr(getattr(decoder, "model", None), "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in layers or ()]
    if not modules or any(m is None for m in modules):
        raise AttentionCaptureError(f"{type(model).__name__} has no decoder with layers[i].self_attn; expected a "
                                    "transformers decoder language model (LLaVA, Qwen2-VL, Gemma 3, ...).")
    return modules


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    chosen = tuple(range(n_layers)) if layers is None else tuple(sorted({int(i) for i in layers}))
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_layers:
        raise AttentionCaptureError(f"Layers must lie in 0..{n_layers - 1}; got {list(layers or [])}.")
    return chosen


@contextmanager
def capture_attention_calls(model: torch.nn.Module, layers: Sequence[int] | None = None,
                            on_call: Callable[[AttentionCall], None] | None = None) -> Iterator[list[AttentionCall]]:
    """Capture the queries, keys and masks of the decoder's attention while the model runs on sdpa.

    Within the block, every attention call of the chosen layers made by this thread and context is passed to
    ``on_call`` (or appended to the yielded list) as an `AttentionCall`; the model's outputs are unchanged.
    Other threads' passes through the same model are neither seen nor changed.

    Args:
        model: a transformers decoder (or vision-language) model whose language model uses sdpa.
        layers: decoder layers to capture; None for all.
        on_call: called with each call as it happens (to reduce it at once and keep nothing); None keeps them
            in the yielded list (their tensors are the model's own: a static cache overwrites keys in place).

    Raises:
        AttentionCaptureError: the language model is not on sdpa, a layer is out of range, or a chosen layer
            was never seen by the end of the block (its attention did not go through the sdpa interface).
    """
    modules = find_attention_modules(model)
    chosen = _check_layers(layers, len(modules))
    impl = getattr(getattr(modules[0], "config", None), "_attn_implementation", None)
    if impl != "sdpa":
        raise AttentionCaptureError(f"Attention capture needs the language model on sdpa; it runs {impl!r}. "
                                    "Load it with attn_implementation='sdpa' or use extract_eager_attention.")
    calls: list[AttentionCall] = []
    scope = _Scope({id(modules[i]): i for i in chosen}, on_call or calls.append)
    with _sdpa_wrapped():
        token = _SCOPES.set(_SCOPES.get() + (scope,))
        try:
            yield calls
        finally:
            _SCOPES.reset(token)
    missing = [i for i in chosen if i not in scope.ends]
    if missing:
        raise AttentionCaptureError(f"Layers {missing} never called the sdpa attention interface, so their "
                                    "attention could not be captured (does this family override it?). "
                                    "Use extract_eager_attention for this model.")


# ---------------------------------------------------------------------------------------------------------------
# One forward pass; a generate call; the eager fallback


@dataclass(frozen=True)
class AttentionCapture:
    """What one captured forward pass gives.

    Attributes:
        output: the model's own output (logits, ...), exactly as plain sdpa gives it.
        rows: float32 ``[batch, layer, head, len(positions), n_keys]``: the attention of the query rows asked
            for; None when none were asked for.
        positions: the query positions of ``rows``.
        summaries: per-head statistics over the query set; None when not asked for.
        layers: the layers captured, in order.
    """

    output: Any
    rows: np.ndarray | None
    positions: tuple[int, ...]
    summaries: HeadSummaries | None
    layers: tuple[int, ...]


def _check_rows(rows: Sequence[int] | None, max_rows: int) -> tuple[int, ...]:
    positions = tuple(int(r) for r in (rows or ()))
    if len(positions) > max_rows:
        raise AttentionCaptureError(f"Asked for {len(positions)} attention rows per layer; at most {max_rows} "
                                    "are kept. Use the per-head summaries for whole-prompt statistics.")
    return positions


def extract_attention(model: torch.nn.Module, inputs: dict[str, Any], *, layers: Sequence[int] | None = None,
                      rows: Sequence[int] | None = None, query_set: Any = None, key_set: Any = None,
                      summaries: bool = True, chunk_rows: int = CHUNK_ROWS, max_rows: int = 1024) -> AttentionCapture:
    """Run one forward pass on sdpa and recompute the attention rows and per-head summaries asked for.

    Each layer is reduced while the pass runs; only the rows and ``[batch, head]`` sums are kept.

    Args:
        model: a transformers decoder or vision-language model, language model on sdpa, in eval mode.
        inputs: keyword arguments for ``model(**inputs)``.
        layers: decoder layers; None for all.
        rows: query positions whose full attention rows are returned (e.g. the last prompt token).
        query_set: bool ``[batch, N]``: the query rows the summaries average over; None for all.
        key_set: bool ``[batch, N]``: the keys whose attention share is summarised (e.g. image tokens).
        summaries: whether to compute `HeadSummaries`.
        chunk_rows: query rows reduced at a time.
        max_rows: the most rows per layer that may be asked for.

    Raises:
        AttentionCaptureError: see `capture_attention_calls`; too many rows; a row outside the sequence.
    """
    positions = _check_rows(rows, max_rows)
    kept: dict[int, torch.Tensor] = {}
    sums: dict[int, HeadSums] = {}

    def on_call(call: AttentionCall) -> None:
        local = [p - call.query_start for p in positions]
        if any(not 0 <= i < call.n_queries for i in local):
            raise AttentionCaptureError(f"Rows {list(positions)} must lie in 0..{call.n_queries - 1}.")
        if local:
            kept[call.layer] = compute_attention_rows(call, local).cpu()
        if summaries:
            acc = sums.setdefault(call.layer, HeadSums.zeros(call.query.shape[0], call.n_heads))
            accumulate_head_sums(call, acc, query_set, key_set, chunk_rows)

    with torch.no_grad(), capture_attention_calls(model, layers, on_call):
        output = model(**inputs)
    chosen = tuple(sorted(kept or sums))
    return AttentionCapture(output, np.stack([kept[i].numpy() for i in chosen], 1) if kept else None,
                            positions, HeadSummaries.from_sums(sums, key_set is not None) if summaries else None,
                            _check_layers(layers, len(find_attention_modules(model))))


@dataclass(frozen=True)
class GenerationAttention:
    """The attention of every generated token, from one greedy ``generate`` call.

    Attributes:
        sequences: int64 ``[batch, prompt_len + n_new]``: prompt and generated tokens.
        prompt_len: the (padded) prompt length ``P``.
        weights: float32 ``[batch, layer, head, n_new, P + n_new - 1]``. Row ``t`` is the attention of the
            query that produced generated token ``t`` (position ``P - 1 + t``) over positions
            ``0 .. P - 1 + t``; later keys are 0. A sliding-window layer's keys that left its cache are 0,
            as is every padded prompt column.
        summaries: per-head statistics over the prompt's query rows (None when not asked for).
        layers: the layers, in order.
    """

    sequences: np.ndarray
    prompt_len: int
    weights: np.ndarray
    summaries: HeadSummaries | None
    layers: tuple[int, ...]


_REFUSED_GENERATE = ("num_beams", "cache_implementation", "past_key_values", "assistant_model",
                     "prompt_lookup_num_tokens")


def _prompt_len(inputs: dict[str, Any], generate_kwargs: dict[str, Any]) -> int:
    refused = [k for k in _REFUSED_GENERATE if generate_kwargs.get(k) not in (None, 1)]
    if refused:
        raise AttentionCaptureError(f"Generation capture supports greedy or sampled decoding on the default "
                                    f"dynamic cache; got {refused}. Leave them out (or use eager).")
    ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if ids is None:
        raise AttentionCaptureError("Generation needs input_ids or inputs_embeds in the inputs; got neither.")
    return int(ids.shape[1])


def extract_generation_attention(model: torch.nn.Module, inputs: dict[str, Any], *, max_new_tokens: int,
                                 layers: Sequence[int] | None = None, query_set: Any = None, key_set: Any = None,
                                 summaries: bool = True, chunk_rows: int = CHUNK_ROWS,
                                 **generate_kwargs: Any) -> GenerationAttention:
    """Generate (greedy unless told otherwise) on sdpa and capture every generated token's attention rows.

    Each new token's query is one row over the cached keys; it is recomputed as the step runs and copied to
    the host, so memory grows by ``layer x head x n_new x (P + n_new)`` floats, never ``P x P``. The prompt's
    rows are reduced to per-head summaries in chunks during the first step.

    Args:
        model: a transformers generative model, language model on sdpa, in eval mode.
        inputs: keyword arguments for ``model.generate`` (input_ids, attention_mask, pixel_values, ...).
        max_new_tokens: tokens to generate.
        layers: decoder layers; None for all.
        query_set: bool ``[batch, P]``: prompt rows the summaries average over; None for all.
        key_set: bool ``[batch, P]``: the keys whose share is summarised (e.g. image tokens).
        summaries: whether to summarise the prompt's rows.
        chunk_rows: prompt rows reduced at a time.
        **generate_kwargs: more ``generate`` arguments (beam search and static caches are refused).

    Raises:
        AttentionCaptureError: see `capture_attention_calls`; a generated step left uncaptured.
    """
    P = _prompt_len(inputs, generate_kwargs)
    chosen = _check_layers(layers, len(find_attention_modules(model)))
    recorder = _GenerationRecorder(chosen, P, max_new_tokens, query_set, key_set, summaries, chunk_rows)
    settings = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    with torch.no_grad(), capture_attention_calls(model, chosen, recorder.on_call):
        sequences = model.generate(**inputs, **settings)
    return recorder.result(getattr(sequences, "sequences", sequences))


class _GenerationRecorder:
    """Turns each captured call of a ``generate`` run into generated-token rows and prompt-row sums."""

    def __init__(self, layers: tuple[int, ...], prompt_len: int, max_new_tokens: int, query_set: Any,
                 key_set: Any, summaries: bool, chunk_rows: int):
        self.layers, self.P, self.max_new = layers, prompt_len, max_new_tokens
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.query_set = torch.ones(1, prompt_len, dtype=torch.bool) if query_set is None else query_set
        self.key_set, self.summaries, self.chunk_rows = key_set, summaries, chunk_rows
        self.buffer: torch.Tensor | None = None
        self.sums: dict[int, HeadSums] = {}
        self.filled: set[tuple[int, int]] = set()

    def on_call(self, call: AttentionCall) -> None:
        b, P = call.query.shape[0], self.P
        if self.buffer is None:
            self.buffer = torch.zeros(b, len(self.layers), call.n_heads, self.max_new, P + self.max_new - 1)
        steps = torch.arange(call.n_queries) + call.query_start - (P - 1)
        keep = ((steps >= 0) & (steps < self.max_new)).nonzero().flatten()
        if len(keep):  # the queries that produce generated tokens: one row each over the cached keys
            rows = compute_attention_rows(call, keep).cpu()
            keys = slice(call.key_start, call.key_start + call.n_keys)
            self.buffer[:, self.slot[call.layer]][:, :, steps[keep], keys] = rows
            self.filled.update((call.layer, int(s)) for s in steps[keep])
        if self.summaries and call.query_start < P:  # prompt rows (beyond P they are out of the query set)
            acc = self.sums.setdefault(call.layer, HeadSums.zeros(b, call.n_heads))
            query_set = torch.as_tensor(self.query_set).expand(b, -1)
            accumulate_head_sums(call, acc, query_set, self.key_set, self.chunk_rows)

    def result(self, sequences: torch.Tensor) -> GenerationAttention:
        n_new = sequences.shape[1] - self.P
        missing = sorted({(layer, t) for layer in self.layers for t in range(n_new)} - self.filled)
        if missing or self.buffer is None:
            raise AttentionCaptureError(f"Generated steps {missing[:5]} (layer, step) were not captured; the "
                                        "model skipped the sdpa interface for them. Use eager for this model.")
        weights = self.buffer[:, :, :, :n_new, :self.P + n_new - 1].numpy()
        summaries = HeadSummaries.from_sums(self.sums, self.key_set is not None) if self.summaries else None
        return GenerationAttention(sequences.cpu().numpy(), self.P, weights, summaries, self.layers)


def _decoder_config_key(model: torch.nn.Module) -> tuple[str | None, Any]:
    """The sub-config key of the language model's config (None: the model's own config) and that config."""
    text = getattr(find_attention_modules(model)[0], "config", None)
    if text is None or text is model.config:
        return None, model.config
    for key in getattr(model.config, "sub_configs", {}):
        if getattr(model.config, key, None) is text:
            return key, text
    raise AttentionCaptureError(f"Could not find the language model's config inside {type(model).__name__}'s; "
                                "cannot switch its attention implementation.")


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the language model on eager attention within the block; its previous implementation comes back in
    ``finally``. This changes the model for every caller that shares it: hold the adapter's lock.

    Raises:
        AttentionCaptureError: the language model's config cannot be found.
    """
    key, config = _decoder_config_key(model)
    previous = config._attn_implementation
    model.set_attn_implementation("eager" if key is None else {key: "eager"})
    try:
        yield
    finally:
        model.set_attn_implementation(previous if key is None else {key: previous})


def _eager_layers(attentions: Any, chosen: tuple[int, ...]) -> list[torch.Tensor]:
    if not attentions or any(attentions[i] is None for i in chosen):
        raise AttentionCaptureError("The model returned no attention weights under eager attention; this "
                                    "family does not report them (output_attentions=True was passed).")
    return [attentions[i] for i in chosen]


def extract_eager_attention(model: torch.nn.Module, inputs: dict[str, Any],
                            layers: Sequence[int] | None = None) -> tuple[Any, list[torch.Tensor]]:
    """The fallback: one forward pass on eager attention with ``output_attentions=True``.

    Holds ``[batch, head, N, N]`` per layer (memory grows with N squared); outputs may differ from sdpa's in
    float16. Hold the adapter's lock (see `eager_attention`).

    Returns:
        The model output and, per chosen layer, float ``[batch, n_heads, N, N]``.

    Raises:
        AttentionCaptureError: no attention weights came back.
    """
    chosen = _check_layers(layers, len(find_attention_modules(model)))
    with torch.no_grad(), eager_attention(model):
        output = model(**inputs, output_attentions=True)
    return output, _eager_layers(getattr(output, "attentions", None), chosen)


def extract_eager_generation_attention(model: torch.nn.Module, inputs: dict[str, Any], *, max_new_tokens: int,
                                       layers: Sequence[int] | None = None,
                                       **generate_kwargs: Any) -> GenerationAttention:
    """The fallback for `extract_generation_attention`: ``generate`` on eager with ``output_attentions=True``
    (every step's full attention is held until the end). Same layout; no summaries."""
    P = _prompt_len(inputs, generate_kwargs)
    chosen = _check_layers(layers, len(find_attention_modules(model)))
    settings = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    with torch.no_grad(), eager_attention(model):
        out = model.generate(**inputs, **settings, output_attentions=True, return_dict_in_generate=True)
    n_new = out.sequences.shape[1] - P
    steps = [_eager_layers(step, chosen) for step in (out.attentions or ())]
    if len(steps) != n_new:
        raise AttentionCaptureError(f"Eager generate returned attentions for {len(steps)} of {n_new} steps.")
    b, h = out.sequences.shape[0], steps[0][0].shape[1] if steps else 0
    weights = torch.zeros(b, len(chosen), h, n_new, P + n_new - 1)
    for t, per_layer in enumerate(steps):
        for i, att in enumerate(per_layer):
            row = att[:, :, -1].float().cpu()
            end = P + t
            weights[:, i, :, t, end - row.shape[-1]:end] = row
    return GenerationAttention(out.sequences.cpu().numpy(), P, weights.numpy(), None, chosen)
