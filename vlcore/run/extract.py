"""Run a model on one example into a full `Trace` (every attention and hidden state, fp16).

A full trace exists only for examples a user opens; datasets go through `vlcore.run.sweep`, which keeps
per-example summaries reduced on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlcore.data.example import Example, content_hash
from vlcore.errors import DeviceMemoryError, InputError
from vlcore.models.base import Capture, Captured, EncodedBatch, ModelAdapter
from vlcore.storage.store import Store, fingerprint
from vlcore.trace import TRACE_VERSION, AttentionBlock, Trace


def trace_key(adapter: ModelAdapter, example_hash: str, top_k: int = 5) -> str:
    """Store key of a full trace: model, processing, example content and settings."""
    return fingerprint("trace", TRACE_VERSION, adapter.fingerprint(), example_hash, {"top_k": top_k})


def extract_trace(
    adapter: ModelAdapter,
    image,
    text: str,
    example_id: str,
    gold: Sequence[str] | None = None,
    top_k: int = 5,
    meta: dict | None = None,
    image_pass: int = 0,
) -> Trace:
    """Run one (image, text) pair and capture everything.

    Args:
        adapter: a loaded model adapter.
        image: a PIL image; for an NLVR2 head a pair ``(left, right)``.
        text: the question or caption.
        example_id: id stored in the trace.
        gold: gold answers, if known.
        top_k: how many predictions to keep.
        meta: extra JSON-able fields for ``Trace.meta``.
        image_pass: which image's encoder pass to capture (NLVR2 runs one pass per image; the
            prediction always combines both).

    Returns:
        A `Trace` with every block the adapter exposes (float16 ``[L, H, Q, K]``) and every stream's hidden
        states (``[L + 1, N, D]``); padding tokens (an NLVR2 pair of different sizes) are dropped.
    """
    batch = adapter.encode([image], [text])
    with torch.no_grad():
        captured = adapter.capture(batch, Capture(image_pass=image_pass, rollout=True))
    prediction = adapter.predict(captured.output, top_k=top_k, batch=batch)[0]
    return trace_from_capture(adapter, adapter.pass_batch(batch, image_pass), captured, 0, example_id,
                              prediction=tuple(prediction), gold=tuple(gold) if gold else None,
                              text_truncated=batch.truncated[0], text=text,
                              meta={"task": adapter.task, "family": adapter.family,
                                    "answers_compare": adapter.answers_compare,
                                    "n_text_tokens_full": batch.n_text_full[0], "max_text_len": adapter.max_text_len,
                                    "image_pass": image_pass, "n_image_passes": adapter.n_passes, **(meta or {})})


def trace_from_capture(adapter: ModelAdapter, batch: EncodedBatch, captured: Captured, row: int, example_id: str,
                       **fields) -> Trace:
    """Row ``row`` of a captured pass as a `Trace`: every stream's layout and every block, padding dropped,
    float16.

    Args:
        adapter: the adapter that ran the pass (for its block specs).
        batch: the batch whose ``streams`` describe the captured pass.
        captured: from `ModelAdapter.capture`.
        row: the example's row in the batch.
        example_id: id stored in the trace.
        **fields: further `Trace` fields (prediction, gold, text, meta, ...).
    """
    keep = {name: np.flatnonzero(layouts[row].valid) for name, layouts in batch.streams.items()}
    streams = {name: layouts[row].trimmed() for name, layouts in batch.streams.items()}
    specs = adapter.block_specs()
    blocks = {}
    for name in captured.attentions:
        q, k = _as_index(keep[specs[name].query]), _as_index(keep[specs[name].key])
        arr = _half_stack([layer[row][:, q][:, :, k] for layer in captured.layers(name)])
        visible = _visible_counts(arr) if specs[name].causal else None
        blocks[name] = AttentionBlock(arr, specs[name].query, specs[name].key, visible)
    for name, spec in specs.items():  # blocks not captured: no attentions, layouts still known
        blocks.setdefault(name, AttentionBlock(None, spec.query, spec.key))
    hiddens = {name: captured.hidden[name][:, row][:, _as_index(keep[name])].half().cpu().numpy()
               if name in captured.hidden else None for name in streams}
    view = adapter.default_block if adapter.default_block in captured.attentions or not captured.attentions \
        else next(iter(captured.attentions))
    fields["meta"] = {**fields.get("meta", {}), **adapter.trace_meta(captured, batch, row),
                      "default_query": default_queries(adapter, streams)}
    return Trace(example_id, adapter.model_id, streams, blocks, hiddens, view, **fields)


def default_queries(adapter: ModelAdapter, streams: dict) -> dict[str, int | None]:
    """Per block, the adapter's default query (`ModelAdapter.default_query`) in the trimmed layouts: stored in
    ``Trace.meta["default_query"]``, where `vlcore.attribution.relevance.trace_query` reads it."""
    out = {}
    for name, spec in adapter.block_specs().items():
        query = adapter.default_query(name, streams[spec.query])
        out[name] = None if query is None else int(query)
    return out


def _half_stack(layers: list[torch.Tensor]) -> np.ndarray:
    """float16 ``[L, ...]`` on the host from per-layer tensors (any device, any float dtype), converted in one pass
    into the destination (no float32 stack, no second copy)."""
    out = torch.empty((len(layers), *layers[0].shape), dtype=torch.float16)
    for i, layer in enumerate(layers):
        out[i].copy_(layer)
    return out.numpy()


def _as_index(keep: np.ndarray) -> slice | torch.Tensor:
    """A slice when the kept positions are one run (no copy when indexing a tensor), else an index tensor."""
    if len(keep) and keep[-1] - keep[0] + 1 == len(keep):
        return slice(int(keep[0]), int(keep[-1]) + 1)
    return torch.as_tensor(keep, dtype=torch.long)


def _visible_counts(att: np.ndarray) -> np.ndarray:
    """int32 ``[Q]``: for a causal block, the keys each query sees (its own position + 1)."""
    n_q, n_k = att.shape[-2:]
    return np.minimum(np.arange(n_q) + 1 + (n_k - n_q), n_k).astype(np.int32)


def model_image_input(adapter: ModelAdapter, example: Example):
    """What the adapter reads as the example's image: one PIL image, a pair for NLVR2, or a list of every image
    of an example with several for a model that reads several in one prompt (`ModelAdapter.several_images`).

    Raises:
        InputError: an NLVR2 model on an example with fewer than two images.
    """
    if adapter.n_passes == 1 and adapter.several_images and example.extra_images:
        return example.load_images()  # one prompt, several images: a list
    if adapter.n_passes == 1:
        return example.load_image()
    images = example.load_images()
    if len(images) < adapter.n_passes:
        raise InputError(
            f"{adapter.model_id} compares {adapter.n_passes} images (NLVR2); example {example.example_id} has "
            f"{len(images)}. Upload a second image or map a second image column."
        )
    return tuple(images[: adapter.n_passes])


def trace_for_example(
    adapter: ModelAdapter, example: Example, store: Store, top_k: int = 5, image_pass: int = 0
) -> tuple[Trace, bool]:
    """The example's trace from the store, computing and storing it on a miss.

    Returns:
        ``(trace, cached)``.
    """
    image = model_image_input(adapter, example)
    images = image if isinstance(image, (tuple, list)) else (image,)
    digest = "|".join(content_hash(im, example.question, example.answers) for im in images)
    key = trace_key(adapter, f"{example.example_id}|{digest}|pass{image_pass}", top_k)

    def compute() -> Trace:
        try:
            return extract_trace(
                adapter, image, example.question, example.example_id, example.answers or None, top_k,
                meta={"category": example.category, "source": example.source}, image_pass=image_pass,
            )
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            _free_device_memory(adapter)
            raise DeviceMemoryError(memory_message(adapter, f"on example {example.example_id}")) from exc

    return store.get_or_compute_trace(key, compute)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``torch.OutOfMemoryError``, a CPU allocator's "can't allocate memory" RuntimeError
    and Python's MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def memory_message(adapter: ModelAdapter, what: str) -> str:
    """What to reduce when ``adapter`` ran out of memory."""
    return (f"{adapter.model_id} ran out of memory on {adapter.device} {what}. Reduce the batch size, use smaller "
            "images (fewer patches), or load the weights in float16 (dtype=torch.float16, on a GPU); or run on a "
            "device with more memory.")


def _free_device_memory(adapter: ModelAdapter) -> None:
    if str(adapter.device).startswith("cuda"):
        torch.cuda.empty_cache()
