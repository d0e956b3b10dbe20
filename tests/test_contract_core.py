"""The core runs through the adapter contract only: faithfulness, ablation, relevance, statistics and sweeps on a
hand-written two-stream adapter whose answers are known by hand (no ViLT anywhere).

`FakeAdapter` reads a 4 x 4 px image as a 2 x 2 grid of cells and a text. Two streams:

- ``vision``: the 4 patches (row-major) and then the image summary ``[IMG]``, *last* (so any "row 0" or
  "token 0" assumption reads a patch);
- ``text``: ``[CLS]`` and the words, padded to the batch's longest text.

Each patch carries one feature ``f = (mean R - mean G) / 255`` of its cell: 1 for a pure red cell, 0 for grey;
the summary's ``f`` is 0. Three blocks, one layer each:

- ``vision.self`` (1 head): every query's row is ``softmax_k(10 f_k)`` over the visible image tokens;
- ``text.self`` (1 head, causal): every query spreads uniformly over the valid keys up to itself;
- ``text.cross`` (2 heads): text queries over image keys, head 0 ``softmax_k(20 f_k)``, head 1 uniform.

The default query (the row a prediction reads) is the summary in ``vision.self`` and the last word in the
text blocks. Two labels, ``red`` and ``grey``: ``logit_red = 4 (keep_0 c_0 + keep_1 c_1) + 2 g - 3``, ``logit_grey = 0``, with
``c_h = Σ_k A_cross[h, CLS, k] f_k`` and ``g = Σ_k A_vision[IMG, k] f_k``. So with one red cell among the four,
``c_0 = e^20 / (e^20 + 4)``, ``c_1 = 1/5``, ``g = e^10 / (e^10 + 4)``; without it every term is 0 and
``logit_red = -3``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlcore.analysis.stats import compute_trace_summaries, not_applicable
from vlcore.attribution.ablation import extract_head_importance
from vlcore.attribution.faithfulness import compute_perturbation_curves, evaluate_faithfulness
from vlcore.attribution.relevance import compute_raw_map, compute_rollout, compute_rollout_map, extract_relevancy
from vlcore.data.example import Example
from vlcore.errors import InputError
from vlcore.models.base import BlockSpec, Capture, Captured, EncodedBatch, Gradients, ModelAdapter
from vlcore.run.extract import extract_trace
from vlcore.run.sweep import run_sweep, summarize_batch
from vlcore.storage.sweeps import load_sweep, load_sweep_vectors
from vlcore.trace import (
    IMAGE_CLS_TOKEN,
    ROLE_IMAGE_SUMMARY,
    ROLE_PATCH,
    ROLE_SPECIAL,
    ROLE_TEXT,
    ImageGrid,
    TokenLayout,
    patch_token,
)

LABELS = ("red", "grey")
SUMMARY = 4  # the image summary's index in the vision stream
E10, E20 = math.exp(10), math.exp(20)


def red_image(cell: tuple[int, int] | None) -> Image.Image:
    arr = np.full((4, 4, 3), 128, np.uint8)
    if cell is not None:
        arr[cell[0] * 2 : cell[0] * 2 + 2, cell[1] * 2 : cell[1] * 2 + 2] = (255, 0, 0)
    return Image.fromarray(arr)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def p_red(red: bool, greys: int, keep=(1.0, 1.0)) -> float:
    """The model's probability of "red" by hand, with the red cell visible or not and ``greys`` grey cells."""
    n = greys + 1 + red  # visible image tokens: the greys, the summary, the red cell
    c0 = E20 / (E20 + n - 1) if red else 0.0
    c1 = 1.0 / n if red else 0.0
    g = E10 / (E10 + n - 1) if red else 0.0
    return sigmoid(4 * (keep[0] * c0 + keep[1] * c1) + 2 * g - 3)


class FakeAdapter(ModelAdapter):
    """See the module docstring."""

    family = "fake"
    tasks = ("zero_shot",)
    task = "zero_shot"
    model_id = "fake@1"
    patch_px = 2
    max_text_len = 8

    def __init__(self):
        self._keep: torch.Tensor | None = None

    def block_specs(self) -> dict[str, BlockSpec]:
        return {"vision.self": BlockSpec("vision", "vision", 1, 1, False, "image tokens"),
                "text.self": BlockSpec("text", "text", 1, 1, True, "text, causal"),
                "text.cross": BlockSpec("text", "vision", 1, 2, False, "text -> image")}

    d_model = 2
    device = "cpu"

    def fingerprint(self) -> dict:
        return {"model_id": self.model_id}

    def info(self) -> dict:
        return {"model_id": self.model_id}

    def encode(self, images, texts) -> EncodedBatch:
        words = [["[CLS]", *t.split()] for t in texts]
        width = max(len(w) for w in words)
        feats, vision, text = [], [], []
        for image, ws in zip(images, words):
            arr = np.asarray(image.convert("RGB"), dtype=np.float32)
            f = [(arr[r * 2 : r * 2 + 2, c * 2 : c * 2 + 2, 0].mean() - arr[r * 2 : r * 2 + 2, c * 2 : c * 2 + 2, 1].mean())
                 / 255 for r in range(2) for c in range(2)]
            feats.append(f + [0.0])
            cells = [(r, c) for r in range(2) for c in range(2)]
            vision.append(TokenLayout.build([patch_token(r, c) for r, c in cells] + [IMAGE_CLS_TOKEN],
                                            [ROLE_PATCH] * 4 + [ROLE_IMAGE_SUMMARY], [0] * 5, cells + [(-1, -1)],
                                            (ImageGrid.regular(np.asarray(image.convert("RGB")), (2, 2), 2),)))
            text.append(TokenLayout.build(ws, [ROLE_SPECIAL] + [ROLE_TEXT] * (len(ws) - 1)).padded(width - len(ws)))
        inputs = {"f": torch.tensor(feats), "vmask": torch.ones(len(texts), 5),
                  "tmask": torch.tensor(np.stack([lay.valid for lay in text]), dtype=torch.float32)}
        return EncodedBatch(inputs, {"vision": vision, "text": text}, "vision", [False] * len(texts),
                            [len(w) for w in words])

    def _run(self, inputs: dict, vision_probs: torch.Tensor | None = None):
        f, vm, tm = inputs["f"], inputs["vmask"], inputs["tmask"]
        b, t = tm.shape
        hide = torch.where(vm > 0, 0.0, float("-inf"))[:, None, None, :]  # [B, 1, 1, 5]
        a_v = vision_probs if vision_probs is not None else (10 * f[:, None, None, :] + hide).expand(b, 1, 5, 5).softmax(-1)
        cross = torch.stack([20 * f, torch.zeros_like(f)], 1)[:, :, None, :] + hide  # [B, 2, 1, 5]
        a_c = cross.expand(b, 2, t, 5).softmax(-1)
        causal = torch.tril(torch.ones(t, t)) * tm[:, None, :]
        a_t = (causal / causal.sum(-1, keepdim=True))[:, None]
        keep = self._keep if self._keep is not None else torch.ones(b, 1, 2)
        c = (a_c[:, :, 0] * f[:, None, :]).sum(-1)  # [B, 2]: the [CLS] row's context per head
        g = (a_v[:, 0, SUMMARY] * f).sum(-1)
        red = 4 * (keep[:, 0] * c).sum(-1) + 2 * g - 3
        logits = torch.stack([red, torch.zeros_like(red)], -1)
        hidden = {"vision": torch.stack([f, g[:, None].expand_as(f)], -1), "text": torch.zeros(b, t, 2)}
        return SimpleNamespace(logits=logits), {"vision.self": a_v, "text.self": a_t, "text.cross": a_c}, hidden

    def capture(self, batch: EncodedBatch, capture: Capture | None = None) -> Captured:
        capture = capture or Capture()
        output, atts, hidden = self._run(batch.inputs)
        wanted = atts if capture.blocks is None else {k: v for k, v in atts.items() if k in capture.blocks}
        hid = {k: torch.stack([v, v]) for k, v in hidden.items()} if capture.hidden else {}
        return Captured(output, {k: v[None] for k, v in wanted.items()}, hid)

    def predict(self, output, top_k: int = 5, batch=None):
        probs = output.logits.softmax(-1)
        return [[(LABELS[int(i)], float(row[i])) for i in row.argsort(descending=True)[:top_k]] for row in probs]

    def target_score(self, output, target=None):
        if target is not None and target not in LABELS:
            raise InputError(f"{target!r} is not one of the fake model's answers")
        index = int(output.logits[0].argmax()) if target is None else LABELS.index(target)
        return output.logits[:, index], output.logits.softmax(-1)[:, index], LABELS[index]

    def targets(self) -> list[str]:
        return list(LABELS)

    def default_query(self, block: str, layout: TokenLayout) -> int | None:
        """The image summary in the vision block; the last word in the text blocks (a pooled end token, as
        CLIP's text tower: not the first special token a layout rule would guess)."""
        return layout.first(ROLE_IMAGE_SUMMARY) if block == "vision.self" else int(np.flatnonzero(layout.valid)[-1])

    @contextmanager
    def head_mask(self, block: str, keep: torch.Tensor):
        if block != "text.cross" or keep.shape[1:] != (1, 2):
            raise ValueError(f"the fake masks heads of text.cross with keep [B, 1, 2]; got {block}, {tuple(keep.shape)}")
        self._keep = keep
        try:
            yield
        finally:
            self._keep = None

    def mask_image_tokens(self, batch: EncodedBatch, drops) -> EncodedBatch:
        masks = torch.ones(len(drops), 5)
        for i, drop in enumerate(drops):
            masks[i, torch.as_tensor(np.asarray(drop, np.int64))] = 0
        inputs = {**batch.repeated_inputs(len(drops)), "vmask": masks}
        return EncodedBatch(inputs, {k: v * len(drops) for k, v in batch.streams.items()}, batch.main,
                            batch.truncated * len(drops), batch.n_text_full * len(drops))

    def attention_gradients(self, batch, target=None, blocks=None, image_pass=0) -> Gradients:
        with torch.enable_grad():
            _, atts, _ = self._run(batch.inputs)
            probs = atts["vision.self"].detach().requires_grad_(True)
            output, _, _ = self._run(batch.inputs, vision_probs=probs)
            score, _, label = self.target_score(output, target)
            (grad,) = torch.autograd.grad(score[0], probs)
        return Gradients({"vision.self": [probs[0].detach()]}, {"vision.self": [grad[0]]}, output, label,
                         float(score[0].detach()))


@pytest.fixture
def fake():
    return FakeAdapter()


QUESTION = "what colour"


def test_the_fake_model_answers_as_computed_by_hand(fake):
    trace = extract_trace(fake, red_image((1, 0)), QUESTION, "x")
    assert trace.predicted == "red" and trace.prediction[0][1] == pytest.approx(p_red(True, 3), abs=1e-6)
    assert extract_trace(fake, red_image(None), QUESTION, "y").predicted == "grey"


# -- relevance: the default query's row, per self block; a cross block is refused with the reason -------------


def test_relevancy_explains_the_default_query_not_token_0(fake):
    rel = extract_relevancy(fake, red_image((1, 1)), QUESTION)
    assert rel.block == "vision.self" and rel.query == SUMMARY and rel.answer == "red"
    assert rel.layout.tokens[SUMMARY] == IMAGE_CLS_TOKEN and rel.tokens == rel.layout.tokens
    # R = I + (dlogit/dA ⊙ A)^+ with dlogit/dA[IMG, k] = 2 f_k: the summary's row is 2 A[IMG, red] at the red cell
    expected = np.zeros(5, np.float32)
    expected[3] = 2 * E10 / (E10 + 4)
    np.testing.assert_allclose(rel.values, expected, rtol=1e-5, atol=1e-7)
    assert rel.to_grid()[1, 1] == pytest.approx(expected[3], rel=1e-5)
    assert rel.image.shape == (4,) and rel.text.shape == (0,)  # the vision stream has no words


def test_rollout_and_raw_maps_read_the_default_query_and_refuse_a_cross_block(fake):
    trace = extract_trace(fake, red_image((0, 1)), QUESTION, "x")
    assert trace.view == "vision.self"
    row = np.array([1, E10, 1, 1, 1]) / (E10 + 4)
    np.testing.assert_allclose(compute_raw_map(trace), row, rtol=1e-3)  # float16 trace
    rollout = (row + np.eye(5)[SUMMARY]) / 2  # one layer: normalise_rows(A + I) = (A + I) / 2
    np.testing.assert_allclose(compute_rollout_map(trace), rollout, rtol=1e-3, atol=1e-6)
    cross = trace.select("text.cross")
    np.testing.assert_allclose(compute_raw_map(cross, head=1), np.full(5, 0.2), rtol=1e-3)  # [CLS] row, head 1
    with pytest.raises(InputError, match="cross-attention block"):
        compute_rollout(cross)
    # the trace keeps the adapter's default queries; the text blocks' is the last word, not [CLS]
    assert trace.meta["default_query"] == {"vision.self": SUMMARY, "text.self": 2, "text.cross": 2}
    np.testing.assert_allclose(compute_raw_map(trace.select("text.self")), np.full(3, 1 / 3), rtol=1e-3)
    np.testing.assert_allclose(compute_rollout_map(trace.select("text.self")), [1 / 6, 1 / 6, 2 / 3], rtol=1e-3)
    with pytest.raises(InputError, match="cross-attention block"):
        extract_relevancy(fake, red_image((0, 1)), QUESTION, block="text.cross")


# -- faithfulness: image tokens removed by the adapter, read from the image stream's layout ---------------------


def test_perturbation_removes_image_tokens_through_the_adapter(fake):
    image = red_image((1, 0))
    values = np.array([0.1, 0.2, 0.9, 0.0, 5.0], np.float32)  # the summary (5.0) is never removed
    curves = compute_perturbation_curves(fake, image, QUESTION, {"map": values}, fractions=(0.25, 0.5, 0.75, 1.0),
                                         n_random=0)
    pos, neg = curves[("map", "positive")], curves[("map", "negative")]
    assert pos.answer == "red" and pos.n_patches == 4 and pos.n_removed.tolist() == [0, 1, 2, 3, 4]
    # positive: the red cell (0.9) goes first; negative: 0.0, 0.1, 0.2, then the red cell
    np.testing.assert_allclose(pos.probabilities, [p_red(True, 3)] + [p_red(False, 0)] * 4, rtol=1e-5)
    np.testing.assert_allclose(neg.probabilities, [p_red(True, 3), p_red(True, 2), p_red(True, 1), p_red(True, 0),
                                                   p_red(False, 0)], rtol=1e-5)
    with pytest.raises(InputError, match="'vision' stream"):
        compute_perturbation_curves(fake, image, QUESTION, {"map": np.zeros(7)})


def test_faithfulness_evaluation_runs_on_the_fake_model(fake):
    examples = [Example(f"f/{i}", QUESTION, image=red_image(cell), answers=("red",))
                for i, cell in enumerate([(0, 0), (1, 1)])]
    details = []
    table = evaluate_faithfulness(fake, examples, fractions=(0.25, 0.5), n_random=1, details=details)
    rows = table.set_index("method")
    assert (rows["pointing_accuracy"] == 1.0).all()  # every map peaks on the red cell, the only non-grey pixels
    assert rows.loc["relevancy", "auc_positive"] < rows.loc["relevancy", "auc_negative"]
    assert details[0]["correct"].all()


# -- ablation: the adapter's head mask and target score ------------------------------------------------------------


def test_head_importance_masks_heads_through_the_adapter(fake):
    drop, label, base = extract_head_importance(fake, red_image((0, 0)), QUESTION, block="text.cross", batch_size=1)
    assert label == "red" and drop.shape == (1, 2)
    assert base == pytest.approx(p_red(True, 3), abs=1e-6)
    np.testing.assert_allclose(drop[0], [base - p_red(True, 3, keep=(0, 1)), base - p_red(True, 3, keep=(1, 0))],
                               rtol=1e-5)


# -- statistics and sweeps: per block, from the layouts ------------------------------------------------------------


def examples_of(cells, golds):
    return [Example(f"s/{i}", text, image=red_image(cell), answers=gold)
            for i, (cell, gold, text) in enumerate(zip(cells, golds, ("what colour", "what is the colour here")))]


def test_a_causal_block_entropy_is_normalised_by_the_keys_each_query_sees(fake):
    exs = examples_of([(0, 0), (1, 1)], [("red",), ("grey",)])
    batch = fake.encode([e.load_image() for e in exs], [e.question for e in exs])  # texts of 3 and 6 tokens: padded
    heads = summarize_batch(fake, batch, exs, block="text.self").heads
    entropy = heads[heads.metric == "entropy"]["value"].to_numpy()
    np.testing.assert_allclose(entropy, 1.0, atol=2e-3)  # uniform over the visible keys: 1 (log k / log N before)
    trace = extract_trace(fake, exs[1].load_image(), exs[1].question, "t").select("text.self")
    got = compute_trace_summaries(trace).set_index("metric")["value"]
    assert got["entropy"] == pytest.approx(1.0, abs=2e-3) and np.isnan(got["txt2img"])
    assert not_applicable(trace)["txt2img"] == "no image keys in this block"


def test_a_cross_block_has_its_own_sets_and_says_what_does_not_apply(fake):
    exs = examples_of([(0, 1), (1, 0)], [("red",), ("blue",)])
    batch = fake.encode([e.load_image() for e in exs], [e.question for e in exs])
    heads = summarize_batch(fake, batch, exs, block="text.cross").heads
    value = heads.set_index(["example_id", "head", "metric"])["value"]
    # text queries over the 4 patches (the summary is special): head 0 all on the red cell, head 1 1/5 each
    assert value["s/0", 0, "txt2img"] == pytest.approx((E20 + 3) / (E20 + 4) / 4, abs=1e-4)
    assert value["s/1", 1, "txt2img"] == pytest.approx(0.2, abs=1e-3)
    assert value["s/0", 1, "to_imgcls"] == pytest.approx(0.2, abs=1e-3)
    for name in ("txt2txt", "img2img", "txtq_to_img", "cls_to_img", "spatial_distance", "to_cls"):
        assert np.isnan(value["s/0", 0, name]), name
    reasons = not_applicable(fake.block_specs()["text.cross"], {"text": batch.streams["text"][0].trimmed(),
                                                                "vision": batch.streams["vision"][0]})
    assert reasons["txt2txt"] == "no text keys in this block"
    assert reasons["img2img"] == "no image queries in this block"
    assert "one modality" in reasons["txtq_to_img"] and reasons["spatial_distance"] == "no image queries in this block"
    assert not {"txt2img", "cross_modal", "entropy", "max_weight", "to_imgcls"} & set(reasons)


def test_a_sweep_runs_through_the_contract_with_correctness_and_vectors(fake, tmp_path):
    exs = examples_of([(1, 1), None], [("red",), ("red",)])
    out = run_sweep(fake, exs, tmp_path / "sweep", batch_size=2, vector_patches=2)
    preds, heads = load_sweep(out)
    # the fake's task is not "vqa": its answers still meet the gold answers
    assert preds["prediction"].tolist() == ["red", "grey"] and preds["correct"].tolist() == [True, False]
    assert preds["n_text_tokens"].tolist() == [3, 6] and preds["n_image_tokens"].tolist() == [5, 5]
    assert set(heads["layer"]) == {0} and set(heads["head"]) == {0}  # vision.self, the default block: 1 x 1
    entropy = heads[heads.metric == "entropy"].set_index("example_id")["value"]
    assert entropy["s/1"] == pytest.approx(1.0, abs=1e-3)  # no red cell: uniform rows over 5 keys
    vectors = load_sweep_vectors(out)
    # the main (vision) stream: 2 of the 4 patches, spread evenly, and the summary, which is not a patch
    assert vectors["text"][:3] == ["<patch 0,0>", "<patch 1,1>", IMAGE_CLS_TOKEN]
    assert vectors["token"][:3].tolist() == [0, 3, 4] and vectors["patch_rc"][:3].tolist() == [[0, 0], [1, 1], [-1, -1]]
    thumbs = vectors["thumbs"]
    assert (thumbs[0] == 128).all() and (thumbs[1] == (255, 0, 0)).all() and thumbs[2].sum() == 0
    assert vectors["vectors"].shape == (2, 6, 2)
