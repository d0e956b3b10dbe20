"""Attention rollout of a generative model, computed during its sdpa pass (`GenerativeAdapter`, `Capture.rollout`),
against an independent reference: the same teacher-forced sequence run on eager attention with every layer's full
``[H, N, N]`` weights, rolled out by `vlcore.attribution.relevance.rollout_matrices`; and its composition with the
vision tower's rollout against a loop over the image tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_llava import write_llava
from vlcore.attribution.relevance import compute_rollout, rollout_matrices, stored_rollout
from vlcore.errors import InputError
from vlcore.models.attention_capture import extract_eager_attention
from vlcore.models.base import Capture
from vlcore.models.registry import load_adapter
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_PATCH

QUESTION = "what is the color of the cat?"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    a = load_adapter(str(write_llava(tmp_path_factory.mktemp("llava-rollout"))))
    a.max_new_tokens = 4
    return a


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_rollout_rows_equal_the_eager_rollout_for_a_left_padded_batch(adapter):
    batch = adapter.encode([image(0), image(1)], [QUESTION, "is there a red square in the image?"])
    with torch.no_grad():
        captured = adapter.capture(batch, Capture(rollout=True, hidden=False))
    rows = captured.output.rollout.numpy()  # [B, T, N]
    P, T = batch.inputs["prompt_len"], batch.inputs["answer_ids"].shape[1]
    _, eager = extract_eager_attention(adapter.model, adapter._model_inputs(batch.inputs))
    for b in range(2):
        valid = batch.streams["lm"][b].valid  # left padding: the reference runs on the valid tokens only
        full = np.stack([layer[b].numpy() for layer in eager])[:, :, valid][:, :, :, valid]
        reference = rollout_matrices(full)
        steps = [int(np.flatnonzero(valid).tolist().index(P - 1 + t)) for t in range(T)
                 if valid[P - 1 + t] or t == 0]
        np.testing.assert_allclose(rows[b][: len(steps)][:, valid], reference[steps], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(rows[b].sum(-1)[: len(steps)], 1.0, atol=1e-5)
    assert batch.streams["lm"][0].valid.sum() != batch.streams["lm"][1].valid.sum(), "the batch is left-padded"


def test_no_rollout_unless_asked_and_none_under_grad(adapter):
    batch = adapter.encode([image(2)], [QUESTION])
    with torch.no_grad():
        assert adapter.capture(batch, Capture(hidden=False)).output.rollout is None
    with torch.enable_grad():
        assert adapter.capture(batch, Capture(rollout=True, hidden=False)).output.rollout is None


def test_trace_rollout_is_composed_with_the_vision_towers_rollout(adapter):
    trace = extract_trace(adapter, image(3), QUESTION, "ex")
    view = trace.select("lm.generated")
    lm_rows = np.asarray(trace.meta["rollout"]["lm"])
    composed = np.asarray(trace.meta["rollout"]["composed"])
    assert lm_rows.shape == composed.shape == (view.n_tokens, len(view.key_layout.tokens))
    np.testing.assert_array_equal(stored_rollout(view), composed.astype(np.float32))
    np.testing.assert_array_equal(compute_rollout(view), composed.astype(np.float32))  # what the pages read
    # reference: each decoder image token's share spread over the patches by the tower's rollout (patch rows
    # renormalised over the patches), the text tokens' values unchanged
    vision = trace.streams["vision"]
    patches = np.flatnonzero(vision.role == ROLE_PATCH)
    # the tiny LLaVA reads hidden_states[-2]: its last tower layer never reaches the decoder, so it is left out
    assert adapter.config.vision_feature_layer == -2
    used = trace.blocks["vision.self"].attentions[:-1].astype(np.float64)
    tower = rollout_matrices(used)[patches][:, patches]
    tower /= tower.sum(1, keepdims=True)
    lm = trace.streams["lm"]
    position = {tuple(lm.cell[i]): i for i in np.flatnonzero(lm.role == ROLE_PATCH)}
    cells = [tuple(vision.cell[i]) for i in patches]
    for t in range(len(lm_rows)):
        expected = lm_rows[t].copy()
        for j, cell in enumerate(cells):
            expected[position[cell]] = sum(lm_rows[t, position[c]] * tower[i, j] for i, c in enumerate(cells))
        np.testing.assert_allclose(composed[t], expected, rtol=2e-3, atol=1e-6)  # float16 tower weights
        image_cols = list(position.values())
        assert composed[t, image_cols].sum() == pytest.approx(lm_rows[t, image_cols].sum(), rel=1e-5)


def test_the_eager_fallback_gives_the_same_trace_and_is_its_own_cache_entry(adapter):
    """The user-picked eager fallback: the decoder runs on eager (weights, not recomputed rows) and gives the same
    rows, rollout and answer as the sdpa capture to 1e-4; the mode is part of the fingerprint (store key)."""
    eager = adapter.with_attention("eager")
    assert eager.model is adapter.model and adapter.attention_mode == "sdpa"
    assert eager.fingerprint() != adapter.fingerprint()
    a = extract_trace(adapter, image(4), QUESTION, "ex")
    b = extract_trace(eager, image(4), QUESTION, "ex")
    assert a.prediction[0][0] == b.prediction[0][0]
    np.testing.assert_allclose(b.blocks["lm.generated"].attentions.astype(np.float32),
                               a.blocks["lm.generated"].attentions.astype(np.float32), atol=1e-3)  # float16 traces
    np.testing.assert_allclose(b.meta["rollout"]["lm"], a.meta["rollout"]["lm"], atol=1e-4)
    assert adapter.model.config.get_text_config()._attn_implementation == "sdpa", "restored after the eager pass"
    with pytest.raises(InputError):
        adapter.with_attention("flash")


def test_an_eager_pass_waits_for_running_sdpa_passes_and_never_breaks_them(adapter):
    """Two threads on one shared model: one keeps capturing on sdpa while the other runs eager passes. Without the
    lock the sdpa passes would see eager layers midway (an AttentionCaptureError); with it every pass succeeds."""
    import threading

    batch = adapter.encode([image(5)], [QUESTION])
    eager = adapter.with_attention("eager")
    errors = []

    def run(a, n):
        try:
            for _ in range(n):
                with torch.no_grad():
                    a.capture(batch, Capture(hidden=False))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(adapter, 12)), threading.Thread(target=run, args=(eager, 12))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_typed_answer_ends_with_the_configs_first_end_token(adapter):
    """Qwen lists ``[<|im_end|>, <|endoftext|>]`` (151645, 151643): a turn ends with the first, not the smallest."""
    config = adapter.model.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = [5, 3]
        assert adapter._end_token() == (5,)
        config.eos_token_id = 3
        assert adapter._end_token() == (3,)
    finally:
        config.eos_token_id = saved


def test_generation_never_runs_while_another_pass_switched_the_model_to_eager(adapter, monkeypatch):
    """`generate` (every `encode`) and the scoring passes take the implementation lock: while an eager pass holds
    the model, a concurrent `encode` waits (before, it ran on the switched model: a layer that got no mask from
    sdpa's mask builder attended both ways, and a wrong answer was cached under the sdpa key)."""
    import threading

    eager = adapter.with_attention("eager")
    batch = adapter.encode([image(6)], [QUESTION])
    seen, release, entered = [], threading.Event(), threading.Event()
    real = adapter.model.generate

    def generate(*args, **kwargs):
        seen.append(adapter.model.config.get_text_config()._attn_implementation)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter.model, "generate", generate)
    import contextlib

    import vlcore.models.generative as generative

    real_eager = generative.eager_attention

    @contextlib.contextmanager
    def slow_eager(model):  # hold the switched model until the other thread has tried to generate
        with real_eager(model):
            entered.set()
            release.wait(5)
            yield

    monkeypatch.setattr(generative, "eager_attention", slow_eager)
    t = threading.Thread(target=lambda: eager.capture(batch, Capture(hidden=False)))
    with torch.no_grad():
        t.start()
        entered.wait(5)
        worker = threading.Thread(target=lambda: adapter.encode([image(7)], [QUESTION]))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and seen == [], "generation waits for the eager pass"
        release.set()
        t.join()
        worker.join()
    assert seen == ["sdpa"]
