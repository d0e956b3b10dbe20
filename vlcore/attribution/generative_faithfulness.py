"""Faithfulness of the maps of a generated answer: image tokens removed in map order, and the pointing game.

A generative model (`ModelAdapter.generates`) explains its answer from the answer's first token, the default query
of its default block (``lm.generated``: generated tokens over the decoder's tokens, the image stream ``lm``). Every
map is a float ``[K]`` vector over the decoder's tokens in trace order (the block's key stream):

- ``raw_attention``: the answer token's attention row in one layer (default the last), the mean over heads;
- ``rollout``: the answer token's rollout row through the decoder, composed with the vision tower's rollout where
  the model keeps it (`vlcore.attribution.relevance.compute_rollout`; stored by the model's pass from layer 0);
- ``relevancy``: Chefer et al.'s gradient relevancy through the decoder's whole attention
  (`vlcore.attribution.dispatch.extract_generation_relevancy`, the first generating step's row);
- ``logit_lens``: at each image token, the probability the logit lens (each layer's residual stream through the
  final norm and the LM head) gives the answer's first token (``Trace.meta["lens"]["image_answer_prob"]``), the
  mean over the ``L + 1`` residual-stream states (embeddings and every layer's output), or one state (``lens_layer``);
  zero on every other token;
- ``random``: the baseline, a seeded random removal order (several seeds averaged); its pointing hit is the
  expected hit of a uniformly random patch (the chance rate).

**Perturbation.** As for every model (`vlcore.attribution.faithfulness.compute_perturbation_curves`): the image
patch tokens of ``lm`` are ranked by the map and removed through `ModelAdapter.mask_image_tokens` (the decoder no
longer attends to them); the answer stays the one generated on the unperturbed input, teacher-forced, and its
probability (the product of its tokens' probabilities, the end token included) and log-probability are tracked.

**Pointing game.** The map's top patch token on ``lm`` (its (row, col) cell on the image as the model saw it,
`vlcore.trace.ImageGrid` boxes) against the easy-VQA shape mask of that image (`compute_shape_mask`), through
`key_side_trace`.

A map the model did not keep is left out of the example's rows (the decoder's rollout of a sequence longer than
the model's rollout limit; a trace without the logit lens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlcore.data.easy_vqa import compute_shape_mask
from vlcore.errors import InputError
from vlcore.trace import Trace

GENERATIVE_METHODS = ("raw_attention", "rollout", "relevancy", "logit_lens", "random")


def answer_block(adapter) -> str:
    """The block whose rows explain the generated answer and whose keys are the image stream's tokens (the default
    block, ``lm.generated``).

    Raises:
        InputError: the default block does not read the image stream.
    """
    spec = adapter.block_specs()[adapter.default_block]
    if spec.key != adapter.image_stream:
        raise InputError(f"{adapter.model_id}'s block {adapter.default_block!r} reads {spec.key!r}, not its image "
                         f"tokens ({adapter.image_stream!r}); faithfulness compares maps over image tokens")
    return adapter.default_block


def key_side_trace(trace: Trace) -> Trace:
    """The trace's viewed block's key stream as a one-stream trace (no attentions), so that a map over the keys
    (``[K]``) is placed on the image by its patch cells: what `pointing_hit` and `top_patch` read.

    >>> from vlcore.trace import TokenLayout, ROLE_GENERATED, ROLE_PATCH, AttentionBlock
    >>> lm = TokenLayout.build(["a", "p"], [0, ROLE_PATCH], [-1, 0], [[-1, -1], [0, 0]])
    >>> gen = TokenLayout.build(["x"], [ROLE_GENERATED])
    >>> t = Trace("e", "m", {"lm": lm, "gen": gen}, {"b": AttentionBlock(None, "gen", "lm")}, {}, "b")
    >>> key_side_trace(t).tokens
    ('a', 'p')
    """
    stream = trace.block.key
    return Trace.single(trace.example_id, trace.model_id, trace.streams[stream], None, None,
                        block=f"{trace.view}:key", stream=stream, prediction=trace.prediction, gold=trace.gold,
                        text=trace.text)


def compute_lens_map(trace: Trace, lens_layer: int | None = None) -> np.ndarray | None:
    """The logit lens's map of the answer over the viewed block's key tokens: float32 ``[K]``, at each image token
    the probability its residual stream gives the answer's first token (mean over the ``L + 1`` states, or state
    ``lens_layer``: 0 the embeddings, ``l`` the output of layer ``l``, negative from the end), 0 elsewhere. None
    when the trace has no lens.

    Raises:
        InputError: ``lens_layer`` out of range.
    """
    lens = trace.meta.get("lens") or {}
    if "image_answer_prob" not in lens:
        return None
    probs = np.asarray(lens["image_answer_prob"], dtype=np.float64)  # [L + 1, I]
    if lens_layer is None:
        per_token = probs.mean(0)
    else:
        n = probs.shape[0]
        if not isinstance(lens_layer, (int, np.integer)) or not -n <= lens_layer < n:
            raise InputError(f"lens layer must be an integer in [{-n}, {n - 1}] (0: the embeddings); got {lens_layer!r}")
        per_token = probs[lens_layer]
    positions = np.asarray(lens["image_positions"], dtype=np.int64)
    out = np.zeros(len(trace.key_layout.tokens), np.float32)
    found = positions >= 0
    out[positions[found]] = per_token[found]
    return out


def compute_answer_maps(adapter, trace: Trace, image, text: str, layer: int = -1,
                        lens_layer: int | None = None) -> dict[str, np.ndarray]:
    """The maps of the answer's first token over the decoder's tokens (the module docstring's four; a map the trace
    lacks is left out).

    Args:
        adapter: the generative adapter the trace came from.
        trace: the trace of ``(image, text)``, viewing `answer_block`.
        image, text: the inputs (the gradient pass runs them again).
        layer: the raw-attention layer.
        lens_layer: the logit lens's state (None: the mean over states).

    Returns:
        ``{method: float32 [K]}`` in the order of `GENERATIVE_METHODS`.
    """
    from vlcore.attribution.dispatch import extract_generation_relevancy
    from vlcore.attribution.relevance import compute_raw_map, stored_rollout, trace_query

    query = trace_query(trace)
    maps = {"raw_attention": compute_raw_map(trace, layer=layer, head=None, query=query)}
    rollout = stored_rollout(trace)
    if rollout is not None:
        maps["rollout"] = rollout[query]
    maps["relevancy"] = np.asarray(extract_generation_relevancy(adapter, image, text)[query], dtype=np.float32)
    lens = compute_lens_map(trace, lens_layer)
    if lens is not None:
        maps["logit_lens"] = lens
    return maps


def generative_faithfulness_rows(adapter, example, fractions: Sequence[float], n_random: int = 3,
                                 min_overlap: float = 0.0, layer: int = -1,
                                 lens_layer: int | None = None) -> list[dict]:
    """Per-method faithfulness of one example on a generative model: one dict per method of `GENERATIVE_METHODS`
    (the random baseline last).

    Keys: those of `vlcore.attribution.faithfulness.faithfulness_rows`, plus ``auc_logprob_positive,
    auc_logprob_negative, auc_logprob_random`` (areas under the answer's log-probability curves).

    Raises:
        InputError: ``n_random`` below 1, or an input the model cannot take.
    """
    from vlcore.attribution.faithfulness import compute_perturbation_curves, pointing_chance, pointing_hit
    from vlcore.run.extract import extract_trace

    if n_random < 1:
        raise InputError(f"a generative model's faithfulness needs the random baseline: n_random >= 1; got {n_random}")
    image = example.load_image()
    trace = extract_trace(adapter, image, example.question, example.example_id, example.answers or None)
    trace = trace.select(answer_block(adapter))
    maps = compute_answer_maps(adapter, trace, image, example.question, layer=layer, lens_layer=lens_layer)
    curves = compute_perturbation_curves(adapter, image, example.question, maps, answer=None, fractions=fractions,
                                         n_random=n_random)
    keys = key_side_trace(trace)
    mask = compute_shape_mask(keys.image)
    chance = pointing_chance(keys, mask, min_overlap)
    rnd = curves[("random", "random")]
    rows = []
    for name in [*maps, "random"]:
        pos, neg = (curves[(name, "positive")], curves[(name, "negative")]) if name in maps else (rnd, rnd)
        rows.append({
            "example_id": example.example_id,
            "method": name,
            "answer": trace.predicted,
            "correct": trace.correct,
            "pointing_hit": pointing_hit(keys, maps[name], mask, min_overlap) if name in maps else chance,
            "pointing_chance": chance,
            "auc_positive": pos.auc,
            "auc_negative": neg.auc,
            "auc_random": rnd.auc,
            "auc_logprob_positive": pos.log_auc,
            "auc_logprob_negative": neg.log_auc,
            "auc_logprob_random": rnd.log_auc,
        })
    return rows
