"""A model shared between sessions: one call's hooks must not touch another call's forward pass.

The app caches one adapter for every session (`st.cache_resource`), so a head-masking or gradient pass in
one session can run while another session runs a plain forward pass through the same modules. These tests
pause a hooked pass in one thread while its hooks are attached, run a plain pass in another, and check that
both give what they give alone.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.conftest import grey_image, make_tiny_adapter
from vlcore.attribution.ablation import extract_head_importance, head_mask_hooks
from vlcore.models.hooks import hook_scope_active, scoped_forward_hooks
from vlcore.attribution.relevance import extract_relevancy

QUESTION = "what is the color of the shape?"
OTHER = "is there a red cat in the image?"  # another session's input: a different length


@pytest.fixture
def adapter(tiny_tokenizer_dir):
    return make_tiny_adapter(tiny_tokenizer_dir, seed=5)


def plain_logits(adapter, batch) -> torch.Tensor:
    with torch.no_grad():
        return adapter.forward(batch, attentions=True, hidden=True).logits.clone()


def hook_count(adapter) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.model.modules())


class PauseWhileHooked:
    """A pre-hook on layer 0's attention that stops the chosen thread's forward pass while that module has forward
    hooks attached (someone's hooked pass is under way), until `resume` is set."""

    def __init__(self, adapter):
        self.module = adapter.self_attention_modules()[0]
        self.thread: int | None = None
        self.paused, self.resume = threading.Event(), threading.Event()
        self.handle = self.module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if threading.get_ident() == self.thread and module._forward_hooks and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(30), "the plain pass never finished"

    def run_paused(self, target) -> dict:
        """Run ``target()`` in a new thread; return once it is paused inside its hooked pass."""
        result: dict = {}

        def body():
            self.thread = threading.get_ident()
            try:
                result["value"] = target()
            except BaseException as exc:  # reported by the test
                result["error"] = exc
            finally:
                self.paused.set()

        worker = threading.Thread(target=body)
        worker.start()
        assert self.paused.wait(30), "the hooked pass never started"
        result["thread"] = worker
        return result

    def finish(self, result: dict):
        self.resume.set()
        result["thread"].join(30)
        self.handle.remove()
        if "error" in result:
            raise result["error"]
        return result["value"]


def test_a_plain_pass_during_head_masking_is_unchanged(adapter):
    image, other = grey_image(red_cell=(1, 2)), grey_image(red_cell=(3, 0))
    solo_importance = extract_head_importance(adapter, image, QUESTION)
    other_batch = adapter.encode([other], [OTHER])
    solo = plain_logits(adapter, other_batch)

    pause = PauseWhileHooked(adapter)
    running = pause.run_paused(lambda: extract_head_importance(adapter, image, QUESTION, batch_size=4))
    during = plain_logits(adapter, other_batch)  # another session's pass, while every head-mask hook is attached
    drop, label, base = pause.finish(running)

    assert torch.equal(during, solo)
    assert label == solo_importance[1] and base == solo_importance[2]
    np.testing.assert_array_equal(drop, solo_importance[0])
    assert hook_count(adapter) == 0


def test_a_plain_pass_during_a_gradient_pass_changes_neither(adapter):
    image, other = grey_image(red_cell=(0, 4)), grey_image(red_cell=(2, 2))
    solo_rel = extract_relevancy(adapter, image, QUESTION, keep_matrix=True)
    other_batch = adapter.encode([other], [OTHER])
    solo = plain_logits(adapter, other_batch)

    pause = PauseWhileHooked(adapter)
    running = pause.run_paused(lambda: extract_relevancy(adapter, image, QUESTION, keep_matrix=True))
    during = plain_logits(adapter, other_batch)  # its attentions must not be captured by the gradient pass
    rel = pause.finish(running)

    assert torch.equal(during, solo)
    assert rel.answer == solo_rel.answer
    np.testing.assert_array_equal(rel.values, solo_rel.values)
    np.testing.assert_array_equal(rel.R, solo_rel.R)
    assert hook_count(adapter) == 0


def test_two_threads_masking_and_plain_forward_repeatedly(adapter):
    """The issue's scenario: one thread masks heads over and over, the other runs plain passes over and over."""
    image, other = grey_image(red_cell=(1, 1)), grey_image(red_cell=(2, 5))
    solo_drop = extract_head_importance(adapter, image, QUESTION, batch_size=1)[0]
    other_batch = adapter.encode([other], [OTHER])
    solo = plain_logits(adapter, other_batch)
    stop, mismatches, drops, errors = threading.Event(), [], [], []

    def masker():
        try:
            while not stop.is_set():
                drops.append(extract_head_importance(adapter, image, QUESTION, batch_size=1)[0])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=masker)
    thread.start()
    try:
        for _ in range(150):
            logits = plain_logits(adapter, other_batch)
            if not torch.equal(logits, solo):
                mismatches.append(float((logits - solo).abs().max()))
    finally:
        stop.set()
        thread.join(60)
    assert not errors and drops
    assert not mismatches, f"{len(mismatches)} of 150 plain passes ran through another thread's head masks"
    for drop in drops:
        np.testing.assert_array_equal(drop, solo_drop)
    assert hook_count(adapter) == 0


def test_no_hook_survives_an_error_inside_a_hooked_pass(adapter):
    image = grey_image(red_cell=(1, 2))
    batch = adapter.encode([image], [QUESTION])
    solo = plain_logits(adapter, batch)
    last = adapter.self_attention_modules()[-1]

    def fail(module, args):
        raise RuntimeError("failed inside the hooked pass")

    handle = last.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the hooked pass"):
            extract_head_importance(adapter, image, QUESTION)
        with pytest.raises(RuntimeError, match="inside the hooked pass"):
            extract_relevancy(adapter, image, QUESTION)
        with pytest.raises(RuntimeError, match="inside the hooked pass"):
            with head_mask_hooks(adapter, torch.zeros(1, 2, 2)):
                adapter.model(**batch.inputs)
    finally:
        handle.remove()
    assert hook_count(adapter) == 0
    assert not hook_scope_active()
    assert torch.equal(plain_logits(adapter, batch), solo)


def test_a_hook_that_fails_to_register_takes_the_others_with_it(adapter):
    modules = adapter.self_attention_modules()
    with pytest.raises(AttributeError):
        with scoped_forward_hooks([(modules[0], lambda m, a, o: None), (object(), lambda m, a, o: None)]):
            pass
    assert hook_count(adapter) == 0


def test_scoped_hooks_act_only_inside_their_own_scope(adapter):
    batch = adapter.encode([grey_image()], [QUESTION])
    module = adapter.self_attention_modules()[0]
    seen: list[str] = []
    outer_hook = [(module, lambda m, a, o: seen.append("outer"))]
    inner_hook = [(module, lambda m, a, o: seen.append("inner"))]
    with torch.no_grad():
        with scoped_forward_hooks(outer_hook):
            assert hook_scope_active()
            adapter.model(**batch.inputs)
            with scoped_forward_hooks(inner_hook):
                adapter.model(**batch.inputs)
            # another thread inside this scope's lifetime: the hook does not see its pass
            thread = threading.Thread(target=lambda: adapter.model(**batch.inputs))
            thread.start()
            thread.join()
        adapter.model(**batch.inputs)
    assert seen == ["outer", "outer", "inner"]
    assert not hook_scope_active() and hook_count(adapter) == 0


def test_every_module_hook_in_vlcore_goes_through_the_scoped_helper():
    """A hook registered anywhere else would again leak into other sessions' passes."""
    import re
    from pathlib import Path

    import vlcore

    root = Path(vlcore.__file__).parent
    pattern = re.compile(r"register_(forward_hook|forward_pre_hook|full_backward_hook|full_backward_pre_hook|"
                         r"backward_hook|module_forward_hook)\b")
    offenders = [
        f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py") if path.name != "hooks.py"
        for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
    ]
    assert not offenders, f"register hooks through ModelAdapter.hooked, not directly: {offenders}"
