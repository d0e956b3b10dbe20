"""The sweep's statistics path: each layer reduced inside the forward pass (no attention kept), equal to the
reduction after the pass; the CPU shortcuts (entropy table, float16-bit maximum, chunks) equal the direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import grey_image, make_tiny_adapter
from tests.models.test_nlvr2_and_equivalence import NLVR2
from tests.test_extract import examples
from vlcore.analysis import stats
from vlcore.data.example import Example
from vlcore.analysis.stats import BUILTIN_METRICS, SummaryReducer, compute_layer_summaries
from vlcore.run.sweep import _forward_reduced, summarize_batch


def layout(adapter, batch):
    return (torch.from_numpy(batch.modality.astype(np.int64)), torch.from_numpy(batch.special),
            torch.from_numpy(batch.valid)), torch.from_numpy(batch.patch_rc.astype(np.int64))


def hooks_left(adapter) -> int:
    return sum(len(m._forward_hooks) for m in adapter.model.modules())


def test_streamed_reduction_equals_the_reduction_after_the_pass_and_keeps_no_attention(tiny_adapter):
    exs = examples(5)  # mixed image sizes: padded text and patches inside the batch
    batch = tiny_adapter.encode([e.load_image() for e in exs], [e.question for e in exs])
    masks, rc = layout(tiny_adapter, batch)
    with torch.no_grad():
        full = tiny_adapter.forward(batch, attentions=True, hidden=False)
    _, after = compute_layer_summaries(full.attentions, *masks, patch_rc=rc)
    reducer = SummaryReducer(*masks, patch_rc=rc)
    with torch.no_grad():
        out = _forward_reduced(tiny_adapter, batch, reducer, hidden=False, keep_attentions=False).output
    assert [a.numel() for a in out.attentions] == [0] * tiny_adapter.n_layers  # nothing held after the pass
    torch.testing.assert_close(out.logits, full.logits, rtol=0, atol=0)
    np.testing.assert_array_equal(reducer.values().numpy(), after.numpy())  # same inputs, same path, same batch
    assert hooks_left(tiny_adapter) == 0
    kept = SummaryReducer(*masks, patch_rc=rc)
    with torch.no_grad():
        out = _forward_reduced(tiny_adapter, batch, kept, hidden=False, keep_attentions=True).output
    assert all(a.shape == full.attentions[0].shape for a in out.attentions)
    np.testing.assert_array_equal(kept.values().numpy(), after.numpy())


def test_a_failing_reduction_leaves_no_hook_on_the_shared_model(tiny_adapter, monkeypatch):
    exs = examples(2)
    batch = tiny_adapter.encode([e.load_image() for e in exs], [e.question for e in exs])

    def broken(self, attention):
        raise ValueError("planted failure in the statistics")

    monkeypatch.setattr(SummaryReducer, "add", broken)
    with pytest.raises(ValueError, match="planted"):
        summarize_batch(tiny_adapter, batch, exs)
    assert hooks_left(tiny_adapter) == 0


def test_nlvr2_sweep_summarises_the_first_image_pass(tiny_tokenizer_dir):
    nlvr2 = make_tiny_adapter(tiny_tokenizer_dir, **NLVR2)
    pairs = [(grey_image(48, 32, red_cell=(1, 2)), grey_image(32, 32)), (grey_image(32, 32), grey_image(48, 32))]
    texts = ["there is a red cat", "a dog"]
    exs = [Example(f"n/{i}", t, image=p[0], extra_images=(p[1],)) for i, (p, t) in enumerate(zip(pairs, texts))]
    batch = nlvr2.encode(pairs, texts)
    heads = summarize_batch(nlvr2, batch, exs).heads
    with torch.no_grad():
        out = nlvr2.forward(batch, attentions=True, hidden=False)
    masks, rc = layout(nlvr2, nlvr2.pass_batch(batch, 0))
    _, ref = compute_layer_summaries(nlvr2.pass_outputs(out, 0)[0], *masks, patch_rc=rc)
    assert list(heads["metric"].cat.categories) == list(BUILTIN_METRICS)  # rows in [B, L, H, M] order
    np.testing.assert_array_equal(heads["value"].to_numpy(), ref.numpy().reshape(-1))
    assert hooks_left(nlvr2) == 0


def rounded_attention(shape, seed=0, sharp=4.0) -> torch.Tensor:
    """Softmax rows with exact zeros and float16 subnormals, rounded to float16 as the statistics do."""
    g = torch.Generator().manual_seed(seed)
    att = torch.softmax(torch.randn(shape, generator=g) * sharp, -1)
    att[..., 0] = 0.0  # exact zeros
    att[..., 1] = 3e-6  # a float16 subnormal
    return att.half()


def test_entropy_table_and_float16_bit_maximum_equal_the_direct_formulas():
    att16 = rounded_attention((2, 3, 17, 17))
    att = att16.float()
    direct = -(torch.where(att > 0, att * att.log(), 0.0)).double().sum(-1)  # the formula in docs/statistics.md
    torch.testing.assert_close(stats._row_entropy(att16, att, lookup=True).double(), direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats._row_entropy(att16, att, lookup=False).double(), direct, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats._row_max(att16, att, bits=True), att.amax(-1))
    assert torch.equal(stats._row_max(att16, att, bits=False), att.amax(-1))
    uniform = torch.full((1, 1, 1, 16), 1 / 16, dtype=torch.float16)
    assert stats._row_entropy(uniform, uniform.float(), lookup=True).item() == pytest.approx(np.log(16), abs=1e-6)


def test_reducing_a_few_examples_at_a_time_equals_whole_layers():
    from bench.stats import layout as bench_layout

    modality, special, valid, rc = bench_layout(3)
    valid[1, -7:] = False  # padded patches in one example
    att = [torch.softmax(torch.randn(3, 2, valid.shape[1], valid.shape[1]).masked_fill(~valid[:, None, None], -1e9), -1)
           for _ in range(2)]
    whole = SummaryReducer(modality, special, valid, rc, chunk_bytes=None)
    one_by_one = SummaryReducer(modality, special, valid, rc, chunk_bytes=1)
    for a in att:
        whole.add(a)
        one_by_one.add(a)
    assert not torch.isnan(whole.values()).any()
    torch.testing.assert_close(one_by_one.values(), whole.values(), rtol=1e-6, atol=1e-7)
