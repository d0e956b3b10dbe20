"""Gradient relevancy of a generated answer (`vlcore.attribution.dispatch.extract_generation_relevancy`) against an
independent reference: the model run by hand on eager attention with ``output_attentions``, ``retain_grad`` on
every layer's weights, the answer's summed log-probability back-propagated, and Chefer et al.'s rule written out
as a loop over layers and heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.tiny_llava import write_llava
from vlcore.attribution.dispatch import extract_block_relevancy, extract_generation_relevancy
from vlcore.models.attention_capture import eager_attention
from vlcore.models.registry import load_adapter

QUESTION = "what is the color of the cat?"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    a = load_adapter(str(write_llava(tmp_path_factory.mktemp("llava-relevancy"))))
    a.max_new_tokens = 3
    return a


def reference(adapter, image) -> np.ndarray:
    batch = adapter.encode([image], [QUESTION])
    inputs = adapter._model_inputs(batch.inputs)
    P, answer = batch.inputs["prompt_len"], batch.inputs["answer_ids"][0, : int(batch.inputs["answer_len"][0])]
    with torch.enable_grad(), eager_attention(adapter.model):
        out = adapter.model(**inputs, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        logp = out.logits[0, P - 1:P - 1 + len(answer)].float().log_softmax(-1)
        logp.gather(-1, answer[:, None]).sum().backward()
    n = out.attentions[0].shape[-1]
    rel = np.eye(n)
    for a in out.attentions:
        att, grad = a[0].detach().double().numpy(), a.grad[0].double().numpy()
        a_bar = np.zeros((n, n))
        for h in range(att.shape[0]):
            a_bar += np.maximum(att[h] * grad[h], 0) / att.shape[0]
        rel = rel + a_bar @ rel
    rel -= np.eye(n)
    first = P - 1  # the first generating step's query: the last prompt token
    return rel[[first + t for t in range(len(answer))]]


def test_relevancy_of_the_generated_answer_equals_the_rule_written_out(adapter):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    got = extract_generation_relevancy(adapter, image, QUESTION)
    expected = reference(adapter, image)
    assert got.shape == expected.shape and got.shape[0] >= 1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
    assert np.abs(got).sum() > 0
    # the pages' entry point: the first generated token's row
    np.testing.assert_allclose(extract_block_relevancy(adapter, image, QUESTION), got[0], rtol=1e-6)
    assert adapter.model.config.get_text_config()._attn_implementation == "sdpa"


def test_a_typed_answer_is_explained_through_a_pass_that_reads_it(adapter):
    """Explaining an answer other than the generated one: the gradient comes from a teacher-forced pass over that
    answer (before, its score came from another pass, every gradient was None and the map was all zeros)."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    got = extract_generation_relevancy(adapter, image, QUESTION, target="red blue")
    ids = adapter.tokenizer("red blue", add_special_tokens=False)["input_ids"] + list(adapter._end_token())
    batch = adapter.encode([image], [QUESTION])
    assert batch.inputs["answer_ids"][0].tolist()[: len(ids)] != ids, "the typed answer is not the generated one"
    # reference: the prompt followed by the typed answer, run by hand on eager
    P = batch.inputs["prompt_len"]
    prompt = {k: batch.inputs[k][:, :P] for k in ("input_ids", "attention_mask")}
    seq = torch.cat([prompt["input_ids"], torch.tensor([ids[:-1]])], 1)
    with torch.enable_grad(), eager_attention(adapter.model):
        out = adapter.model(input_ids=seq, attention_mask=torch.ones_like(seq),
                            pixel_values=batch.inputs["pixel_values"], output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        logp = out.logits[0, P - 1:].float().log_softmax(-1)
        logp.gather(-1, torch.tensor(ids)[:, None]).sum().backward()
    n = seq.shape[1]
    rel = np.eye(n)
    for a in out.attentions:
        a_bar = np.maximum(a[0].detach().double().numpy() * a.grad[0].double().numpy(), 0).mean(0)
        rel = rel + a_bar @ rel
    expected = (rel - np.eye(n))[[P - 1 + t for t in range(len(ids))]]
    assert np.abs(got).sum() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
