"""Sweeps with a generative adapter (the tiny LLaVA of `tests/models/tiny_llava.py`): left-padded batches answer as
single examples do, a batch of 4 sweeps to the batch-of-1 result (floats within a tolerance), the prompt-row head
summaries computed during the pass are kept as extra metrics and equal an eager reference, a stopped sweep resumes
to the uninterrupted result, and generated answers are compared with gold answers after VQA normalisation."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.models.tiny_llava import write_llava
from vlcore.analysis.stats import BUILTIN_METRICS
from vlcore.data.example import Example
from vlcore.models.attention_capture import eager_attention
from vlcore.models.base import Capture
from vlcore.models.registry import load_adapter
from vlcore.run.evaluate import evaluate_accuracy
from vlcore.run.sweep import PROMPT_METRICS, run_sweep
from vlcore.storage.sweeps import load_sweep
from vlcore.trace import ROLE_IMAGE_SUMMARY, ROLE_PATCH

# Prompts of different lengths, so a batch is left-padded.
QUESTIONS = ["what is the color of the cat?", "is there a dog?", "what is in the image on the left?", "color?",
             "is the square red", "dog", "what is the color of the square in the image?"]
RTOL, ATOL = 1e-3, 1e-5  # across batch sizes (the last float bits differ)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    a = load_adapter(str(write_llava(tmp_path_factory.mktemp("llava"))), device="cpu")
    a.max_new_tokens = 4
    return a


def make_examples(gold=("red",)) -> list[Example]:
    rng = np.random.default_rng(0)
    return [Example(example_id=f"gen/{i}", question=q, answers=tuple(gold),
                    image=Image.fromarray(rng.integers(0, 255, (24 + 8 * (i % 3), 40, 3), dtype=np.uint8)),
                    source="generic") for i, q in enumerate(QUESTIONS)]


def sweep(adapter, examples, folder, batch_size, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    shutil.rmtree(folder, ignore_errors=True)
    run_sweep(adapter, examples, folder, dataset="gen", batch_size=batch_size, **kwargs)
    preds, heads = load_sweep(folder)
    return preds, heads.sort_values(["example_id", "layer", "head", "metric"], ignore_index=True)


def test_a_left_padded_batch_answers_and_attends_as_single_examples(adapter):
    examples = make_examples()[:4]
    images, texts = [e.load_image() for e in examples], [e.question for e in examples]
    batch = adapter.encode(images, texts)
    prompt_mask = batch.inputs["attention_mask"][:, : batch.inputs["prompt_len"]]
    assert (prompt_mask[:, 0] == 0).any() and (prompt_mask[:, -1] == 1).all()  # left padding
    with torch.no_grad():
        joint = adapter.capture(batch, Capture(blocks=("lm.generated",), hidden=False))
    for b in range(4):
        one = adapter.encode(images[b:b + 1], texts[b:b + 1])
        with torch.no_grad():
            alone = adapter.capture(one, Capture(blocks=("lm.generated",), hidden=False))
        assert joint.output.answers[b] == alone.output.answers[0]
        assert joint.output.answer_ids[b] == alone.output.answer_ids[0]
        n = len(alone.output.answer_ids[0])
        keys = batch.streams["lm"][b].valid  # the padded row's keys that are tokens of the example
        for layer in range(adapter.n_layers):
            rows = joint.attentions["lm.generated"][layer][b, :, :n]
            ref = alone.attentions["lm.generated"][layer][0, :, :n]
            torch.testing.assert_close(rows[..., keys[: rows.shape[-1]]], ref[..., : int(keys.sum())],
                                       rtol=RTOL, atol=ATOL)
            assert float(rows[..., ~keys[: rows.shape[-1]]].abs().sum()) == 0.0  # nothing on padding
        for name in ("entropy", "key_mass"):
            np.testing.assert_allclose(getattr(joint.output.summaries, name)[b],
                                       getattr(alone.output.summaries, name)[0], rtol=RTOL, atol=ATOL)


def test_a_batch_of_four_sweeps_to_the_batch_of_one_result(adapter, tmp_path):
    examples = make_examples()
    p1, h1 = sweep(adapter, examples, tmp_path / "b1", 1)
    p4, h4 = sweep(adapter, examples, tmp_path / "b4", 4)
    assert p1["prediction"].tolist() == p4["prediction"].tolist() and p1["prediction"].map(len).gt(0).any()
    np.testing.assert_allclose(p4["probability"], p1["probability"], rtol=RTOL, atol=1e-12)
    assert (h1[["example_id", "layer", "head", "metric"]].astype(str).to_numpy()
            == h4[["example_id", "layer", "head", "metric"]].astype(str).to_numpy()).all()
    np.testing.assert_allclose(h4["value"], h1["value"], rtol=RTOL, atol=ATOL)  # NaN where NaN
    metrics = set(h4["metric"].astype(str))
    assert set(PROMPT_METRICS) <= metrics and set(BUILTIN_METRICS) <= metrics
    prompt = h4[h4["metric"].astype(str).isin(PROMPT_METRICS)]
    assert len(prompt) == len(examples) * adapter.n_layers * adapter.n_heads * 2
    assert prompt["value"].between(0, 1).all()


def _eager_prompt_summaries(adapter, example) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``[L, H]`` entropy (by visible keys) and image share over the prompt's rows, from the full eager
    attention of the teacher-forced sequence (one example, no padding)."""
    batch = adapter.encode([example.load_image()], [example.question])
    P = int(batch.inputs["prompt_len"])
    lay = batch.streams["lm"][0]
    image = torch.as_tensor(np.isin(lay.role, (ROLE_PATCH, ROLE_IMAGE_SUMMARY)))
    with torch.no_grad(), eager_attention(adapter.model):
        out = adapter.model(**adapter._model_inputs(batch.inputs), output_attentions=True, use_cache=False)
    entropy, share = [], []
    for att in out.attentions[: adapter.n_layers]:  # the decoder's layers ([1, H, N, N])
        a = att[0, :, :P, :].double()  # prompt rows, every key
        seen = torch.arange(P, dtype=torch.float64) + 1  # causal, no padding: row i sees i + 1 keys
        h = -(a * torch.log(a.clamp_min(1e-300))).sum(-1)
        keep = seen >= 2
        entropy.append((h[:, keep] / torch.log(seen[keep])).mean(-1).numpy())
        share.append(a[..., : image.shape[0]][..., image].sum(-1).mean(-1).numpy())
    return np.stack(entropy), np.stack(share)


def test_the_prompt_metrics_equal_an_eager_reference(adapter, tmp_path):
    examples = make_examples()[:3]
    _, heads = sweep(adapter, examples, tmp_path / "s", 2)
    for example in examples:
        entropy, share = _eager_prompt_summaries(adapter, example)
        mine = heads[heads["example_id"] == example.example_id]
        for name, ref in (("prompt_entropy", entropy), ("prompt_image_share", share)):
            got = mine[mine["metric"] == name].sort_values(["layer", "head"])["value"].to_numpy()
            np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-5)
    assert 0.05 < heads.loc[heads["metric"] == "prompt_image_share", "value"].mean() < 0.95  # image tokens matter


def test_a_stopped_sweep_resumes_to_the_uninterrupted_result(adapter, tmp_path):
    examples = make_examples()
    whole_p, whole_h = sweep(adapter, examples, tmp_path / "whole", 3)
    folder = tmp_path / "stopped"
    polls = iter([False, True])  # one batch, then stop
    run_sweep(adapter, examples, folder, dataset="gen", batch_size=3, should_stop=lambda: next(polls, True))
    assert len(list(folder.glob("part-*.predictions.parquet"))) == 1
    assert not (folder / "predictions.parquet").exists()
    run_sweep(adapter, examples, folder, dataset="gen", batch_size=3)
    preds, heads = load_sweep(folder)
    pd.testing.assert_frame_equal(preds.reset_index(drop=True), whole_p.reset_index(drop=True))
    pd.testing.assert_frame_equal(heads.sort_values(["example_id", "layer", "head", "metric"], ignore_index=True),
                                  whole_h)


def test_generated_answers_are_correct_after_vqa_normalisation(adapter, tmp_path):
    """Gold answers that differ from the generated ones only in case, punctuation and articles count as correct in
    the sweep's rows and in the accuracy; unrelated gold answers do not."""
    examples = make_examples(gold=("zebra",))
    preds, _ = sweep(adapter, examples, tmp_path / "first", 4)
    assert preds["correct"].tolist() == [False] * len(examples)
    assert evaluate_accuracy(adapter, examples, batch_size=4) == 0.0
    golds = {row.example_id: f"The {row.prediction.upper()}." for row in preds.itertuples()}
    assert all(g != p for g, p in zip(golds.values(), preds["prediction"]))  # an exact comparison would fail
    restated = [Example(example_id=e.example_id, question=e.question, image=e.image, answers=(golds[e.example_id],),
                        source="generic") for e in examples]
    again, _ = sweep(adapter, restated, tmp_path / "second", 4)
    assert again["prediction"].tolist() == preds["prediction"].tolist()
    assert again["correct"].tolist() == [True] * len(examples)
    assert evaluate_accuracy(adapter, restated, batch_size=3) == 1.0


def _generative_checkpoints() -> list:
    """Every tiny generative checkpoint of tests/models/tiny_*.py (name, writer) other than LLaVA's."""
    import importlib
    from pathlib import Path

    found = []
    for path in sorted(Path(__file__).parent.joinpath("models").glob("tiny_*.py")):
        module = importlib.import_module(f"tests.models.{path.stem}")
        found += [(name, write) for name, write in module.TINY_CHECKPOINTS.items() if name != "llava"]
    return found


@pytest.mark.parametrize("name, write", _generative_checkpoints(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_generative_family_sweeps_a_padded_batch_as_single_examples(name, write, tmp_path):
    from vlcore.errors import UnsupportedModelError

    try:
        other = load_adapter(str(write(tmp_path / name)), device="cpu")
    except UnsupportedModelError:
        pytest.skip(f"{name}: its family is not registered yet")
    if not other.generates:
        pytest.skip(f"{name} is not a generative model")
    other.max_new_tokens = 3
    examples = make_examples()[:3]
    p1, h1 = sweep(other, examples, tmp_path / "b1", 1)
    p3, h3 = sweep(other, examples, tmp_path / "b3", 3)
    assert p1["prediction"].tolist() == p3["prediction"].tolist()
    np.testing.assert_allclose(h3["value"], h1["value"], rtol=RTOL, atol=ATOL)
    assert set(PROMPT_METRICS) <= set(h3["metric"].astype(str))
