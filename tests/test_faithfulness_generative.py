"""Faithfulness of a generated answer's maps on the tiny LLaVA (`vlcore.attribution.generative_faithfulness`):
planted maps on the pointing game, the removal order handed to `mask_image_tokens`, curves against the model run
by hand with plain transformers, the four maps read back from the trace, and the CLI's five-row table."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.models.tiny_llava import write_llava
from vlcore.attribution.faithfulness import (
    compute_patch_coverage,
    compute_perturbation_curves,
    evaluate_faithfulness,
    faithfulness_rows,
    pointing_chance,
    pointing_hit,
)
from vlcore.attribution.generative_faithfulness import (
    GENERATIVE_METHODS,
    compute_answer_maps,
    compute_lens_map,
    key_side_trace,
)
from vlcore.data.easy_vqa import compute_shape_mask
from vlcore.data.example import Example
from vlcore.errors import InputError
from vlcore.models.registry import load_adapter
from vlcore.run.extract import extract_trace
from vlcore.trace import ROLE_GENERATED, ROLE_PATCH

QUESTION = "what is the color of the cat?"
SHAPE_CELLS = {(0, 2), (0, 3), (1, 2), (1, 3)}  # the square below, on the tiny model's 4 x 4 grid of 8 px cells


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("llava-faithfulness"))


@pytest.fixture(scope="module")
def adapter(folder):
    a = load_adapter(str(folder))
    a.max_new_tokens = 3
    return a


def square_image() -> Image.Image:
    """An easy-VQA-like 64 px image: a flat background, a red square on its top-right quarter (the model sees it at
    32 px: cells rows 0-1, cols 2-3)."""
    arr = np.full((64, 64, 3), (236, 240, 250), np.uint8)
    arr[:32, 32:] = (200, 30, 30)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def trace(adapter):
    return extract_trace(adapter, square_image(), QUESTION, "sq", ("red",)).select("lm.generated")


def cell_map(trace, cells, elsewhere: float = 0.0) -> np.ndarray:
    """A map over the decoder's tokens: 1 on the image tokens of ``cells``, ``elsewhere`` on the rest."""
    lm = trace.key_layout
    values = np.full(lm.n_tokens, elsewhere, np.float32)
    for i in lm.index(ROLE_PATCH):
        if tuple(lm.cell[i]) in cells:
            values[i] = 1.0
    return values


# -- the pointing game on the decoder's image tokens ------------------------------------------------------------


def test_a_map_on_the_shapes_cells_hits_and_one_on_a_corner_misses(trace):
    keys = key_side_trace(trace)
    assert keys.n_tokens == trace.key_layout.n_tokens and keys.image.shape == (32, 32, 3)
    mask = compute_shape_mask(keys.image)
    coverage = compute_patch_coverage(keys, mask)
    assert {tuple(rc) for rc in np.argwhere(coverage == 1.0)} == SHAPE_CELLS
    assert coverage[3, 0] == 0.0
    assert pointing_hit(keys, cell_map(trace, SHAPE_CELLS), mask)
    assert not pointing_hit(keys, cell_map(trace, {(3, 0)}), mask)
    # the largest value on a text token does not count: only image tokens are pointed at
    text_heavy = cell_map(trace, {(3, 0)})
    text_heavy[trace.key_layout.tokens.index("what")] = 9.0
    assert not pointing_hit(keys, text_heavy, mask)
    assert pointing_chance(keys, mask) == pytest.approx((coverage > 0).mean())
    # the query side (the generated tokens) has no patches: the map must be placed through the key side
    with pytest.raises(InputError):
        pointing_hit(trace, cell_map(trace, SHAPE_CELLS), mask)


def test_the_lens_map_is_the_mean_over_states_at_the_image_tokens(trace):
    lens = trace.meta["lens"]
    positions = list(lens["image_positions"])
    n_states, n_image = np.shape(lens["image_answer_prob"])
    planted = np.arange(n_states * n_image, dtype=np.float64).reshape(n_states, n_image) / 100
    positions[0] = -1  # a token trimmed away is left out
    meta = {**trace.meta, "lens": {**lens, "image_answer_prob": planted.tolist(), "image_positions": positions}}
    t = dataclasses.replace(trace, meta=meta)
    got = compute_lens_map(t)
    assert got.shape == (trace.key_layout.n_tokens,)
    np.testing.assert_allclose(got[positions[1:]], planted.mean(0)[1:], rtol=1e-6)
    assert np.count_nonzero(got) == n_image - 1
    np.testing.assert_allclose(compute_lens_map(t, lens_layer=-1)[positions[1:]], planted[-1, 1:], rtol=1e-6)
    np.testing.assert_allclose(compute_lens_map(t, lens_layer=0)[positions[2:]], planted[0, 2:], rtol=1e-6)
    with pytest.raises(InputError, match="lens layer"):
        compute_lens_map(t, lens_layer=n_states)
    assert compute_lens_map(dataclasses.replace(trace, meta={})) is None


# -- perturbation: the order handed to the adapter, the values against plain transformers ----------------------


def test_image_tokens_are_removed_in_the_maps_order(adapter, trace, monkeypatch):
    lm = trace.key_layout
    patches = lm.index(ROLE_PATCH)
    values = np.zeros(lm.n_tokens, np.float32)
    ranked = patches[[5, 0, 12, 3]]
    values[ranked] = [4.0, 3.0, 2.0, 1.0]
    values[lm.tokens.index("what")] = 99.0  # text is never removed, whatever its value
    seen = []
    real = adapter.mask_image_tokens

    def spy(batch, drops):
        seen.append([np.asarray(d).tolist() for d in drops])
        return real(batch, drops)

    monkeypatch.setattr(adapter, "mask_image_tokens", spy)
    curves = compute_perturbation_curves(adapter, square_image(), QUESTION, {"plant": values}, answer=None,
                                         fractions=(1 / 16, 2 / 16, 4 / 16), orders=("positive", "negative"),
                                         n_random=0)
    assert len(seen) == 1  # one batched pass
    pos, neg = seen[0][1:4], seen[0][4:7]
    assert seen[0][0] == []
    assert pos == [ranked[:1].tolist(), ranked[:2].tolist(), ranked[:4].tolist()]
    last = [int(p) for p in patches if p not in ranked]  # negative: zeros first (ties in sequence order)
    assert neg == [last[:1], last[:2], last[:4]]
    assert curves[("plant", "positive")].n_patches == 16


def reference_logprobs(adapter, image, masks: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """The greedy answer's summed log-probability with the image tokens ``masks[i]`` (indices among the image
    tokens, in sequence order) hidden from the decoder's attention: plain transformers, no adapter code."""
    model, processor = adapter.model, adapter.processor
    enc = processor(images=[image], text=[adapter.prompt_text(QUESTION)], return_tensors="pt")
    P = enc["input_ids"].shape[1]
    with torch.no_grad():
        answer = model.generate(**enc, max_new_tokens=adapter.max_new_tokens, do_sample=False)[0, P:].tolist()
    eos = adapter.tokenizer.eos_token_id
    answer = answer[:answer.index(eos) + 1] if eos in answer else answer
    ids = torch.cat([enc["input_ids"], torch.tensor([answer[:-1]], dtype=torch.long)], 1)
    image_at = np.flatnonzero(ids[0].numpy() == model.config.image_token_index)
    out = []
    for hide in masks:
        mask = torch.ones_like(ids)
        mask[0, image_at[hide]] = 0
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"],
                           position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits
        logp = logits[0, P - 1:].float().log_softmax(-1)
        out.append(float(logp.gather(-1, torch.tensor(answer)[:, None]).sum()))
    return np.array(out), answer


def test_curves_equal_the_answer_probability_with_the_tokens_hidden_by_hand(adapter, trace):
    """A map planted on the model's own dependence: each image token's drop in the answer's log-probability when
    it alone is hidden. The positive order removes the most needed token first, so its curve falls first."""
    image = square_image()
    single, answer = reference_logprobs(adapter, image, [np.array([], int)] + [np.array([i]) for i in range(16)]
                                        + [np.arange(16)])
    full, alone, none_left = single[0], single[1:17], single[17]
    assert trace.streams["generated"].n_tokens == len(answer)
    lm = trace.key_layout
    values = np.zeros(lm.n_tokens, np.float32)
    values[lm.index(ROLE_PATCH)] = full - alone  # the drop when each token alone is hidden
    curves = compute_perturbation_curves(adapter, image, QUESTION, {"need": values}, answer=None,
                                         fractions=(1 / 16, 1.0), n_random=0)
    pos, neg = curves[("need", "positive")], curves[("need", "negative")]
    assert pos.answer == trace.predicted
    np.testing.assert_allclose(pos.log_probabilities, [full, alone.min(), none_left], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(neg.log_probabilities, [full, alone.max(), none_left], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(pos.probabilities, np.exp(pos.log_probabilities), rtol=1e-5)
    assert pos.probabilities[0] == pytest.approx(trace.prediction[0][1], rel=1e-3)
    assert pos.probabilities[1] < neg.probabilities[1] and alone.min() < alone.max()


# -- the maps and one example's rows ---------------------------------------------------------------------------


def test_the_four_maps_are_the_answer_tokens_rows(adapter, trace):
    from vlcore.attribution.dispatch import extract_generation_relevancy

    image = square_image()
    maps = compute_answer_maps(adapter, trace, image, QUESTION)
    assert list(maps) == list(GENERATIVE_METHODS[:4])
    assert all(v.shape == (trace.key_layout.n_tokens,) for v in maps.values())
    np.testing.assert_allclose(maps["raw_attention"], trace.attentions[-1, :, 0].astype(np.float32).mean(0),
                               rtol=1e-3, atol=1e-6)
    stored = trace.meta["rollout"]
    np.testing.assert_allclose(maps["rollout"], (stored.get("composed") or stored["lm"])[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["relevancy"], extract_generation_relevancy(adapter, image, QUESTION)[0],
                               rtol=1e-5, atol=1e-8)
    lens = trace.meta["lens"]
    np.testing.assert_allclose(maps["logit_lens"][lens["image_positions"]], np.mean(lens["image_answer_prob"], 0),
                               rtol=1e-5)
    # the answer token's row sees the prompt only: it sums to 1 there and is 0 on the fed-back answer
    prompt = int(np.flatnonzero(trace.key_layout.valid & (trace.key_layout.role != ROLE_GENERATED)).max()) + 1
    assert maps["raw_attention"][:prompt].sum() == pytest.approx(1.0, abs=2e-3)
    assert not maps["raw_attention"][prompt:].any() and not maps["rollout"][prompt:].any()


def test_rows_of_one_example_end_with_the_random_baseline(adapter):
    example = Example("sq", QUESTION, image=square_image(), answers=("red",))
    rows = pd.DataFrame(faithfulness_rows(adapter, example, fractions=(0.25, 0.5, 1.0), n_random=2))
    assert rows["method"].tolist() == list(GENERATIVE_METHODS)
    rnd = rows.set_index("method").loc["random"]
    assert rnd["pointing_hit"] == rnd["pointing_chance"] == pytest.approx(4 / 16)
    assert rnd["auc_positive"] == rnd["auc_negative"] == rnd["auc_random"]
    assert (rows["auc_random"] == rnd["auc_random"]).all() and (rows["auc_positive"] <= 1.0).all()
    assert (rows["auc_logprob_positive"] <= 0).all() and rows["answer"].nunique() == 1
    with pytest.raises(InputError, match="n_random"):
        faithfulness_rows(adapter, example, n_random=0)


def test_evaluate_on_planted_examples_summarises_five_rows(adapter):
    examples = [Example(f"g/{i}", QUESTION, image=square_image(), answers=("red",)) for i in range(2)]
    details = []
    table = evaluate_faithfulness(adapter, examples, fractions=(0.5, 1.0), n_random=1, details=details)
    assert table["method"].tolist() == list(GENERATIVE_METHODS) and (table["n"] == 2).all()
    assert {"auc_logprob_positive", "auc_logprob_negative", "auc_logprob_random"} <= set(table.columns)
    assert table["pointing_accuracy"].between(0, 1).all() and len(details[0]) == 10


# -- the command line ------------------------------------------------------------------------------------------


def test_cli_on_the_tiny_llava_writes_the_five_row_table(folder, tmp_path, capsys):
    from vlcore.cli import main

    out, details = tmp_path / "table.csv", tmp_path / "rows.csv"
    code = main(["faithfulness", "--model", str(folder), "--limit", "2", "--n-random", "1", "--out", str(out),
                 "--details", str(details), "--lens-layer", "-1"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "first 2 examples" in lines[0] and lines[1].split()[:3] == ["method", "n", "pointing_accuracy"]
    assert [line.split()[0] for line in lines[2:]] == list(GENERATIVE_METHODS)
    table = pd.read_csv(out)
    assert table["method"].tolist() == list(GENERATIVE_METHODS) and (table["n"] == 2).all()
    assert table[["pointing_accuracy", "pointing_chance"]].stack().between(0, 1).all()
    assert (table["auc_positive"] <= 0.9 + 1e-9).all()
    rows = pd.read_csv(details)
    assert len(rows) == 10 and rows["example_id"].iloc[0] == "easy_vqa/test/0"


def test_cli_lens_layer_on_a_model_without_a_lens_is_one_line(capsys):
    from tests.conftest import DEMO_DIR
    from vlcore.cli import main

    assert main(["faithfulness", "--model", str(DEMO_DIR), "--limit", "1", "--lens-layer", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--lens-layer" in err[0]
