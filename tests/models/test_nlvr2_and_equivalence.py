"""The adapter's deterministic image_embeds path computes what the plain HF call computes;
NLVR2 (two images per sentence) runs one encoder pass per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import grey_image, make_tiny_adapter
from vlcore.errors import InputError
from vlcore.run.extract import extract_trace

NLVR2 = dict(arch="ViltForImagesAndTextClassification", num_images=2, num_labels=2, modality_type_vocab_size=3,
             id2label={0: "False", 1: "True"}, label2id={"False": 0, "True": 1})


def plain_logits(adapter, images, text, pair=False):
    enc = adapter.tokenizer([text], return_tensors="pt")
    pix = [adapter.image_processor([im], return_tensors="pt", do_pad=True) for im in images]
    kwargs = {"pixel_values": pix[0]["pixel_values"], "pixel_mask": pix[0]["pixel_mask"]}
    if pair:
        kwargs = {"pixel_values": torch.stack([p["pixel_values"][0] for p in pix])[None],
                  "pixel_mask": torch.stack([p["pixel_mask"][0] for p in pix])[None]}
    with torch.no_grad():
        return adapter.model(**enc, **kwargs).logits


def test_sorted_image_embeds_give_the_plain_forward_pass_logits(tiny_adapter, noise_image):
    batch = tiny_adapter.encode([noise_image], ["what is the color of the cat?"])
    with torch.no_grad():
        ours = tiny_adapter.forward(batch, attentions=False, hidden=False).logits
    assert torch.allclose(ours, plain_logits(tiny_adapter, [noise_image], "what is the color of the cat?"), atol=1e-5)


@pytest.fixture
def nlvr2(tiny_tokenizer_dir):
    return make_tiny_adapter(tiny_tokenizer_dir, **{k: v for k, v in NLVR2.items()})


def test_nlvr2_pair_matches_the_plain_call_and_traces_each_image(nlvr2, noise_image):
    left, right = noise_image, grey_image(48, 32, red_cell=(2, 3))
    batch = nlvr2.encode([(left, right)], ["there is a red cat"])
    with torch.no_grad():
        ours = nlvr2.forward(batch, attentions=False, hidden=False).logits
    assert torch.allclose(ours, plain_logits(nlvr2, [left, right], "there is a red cat", pair=True), atol=1e-5)
    t0 = extract_trace(nlvr2, (left, right), "there is a red cat", "p", image_pass=0)
    t1 = extract_trace(nlvr2, (left, right), "there is a red cat", "p", image_pass=1)
    assert {label for label, _ in t0.prediction} == {"False", "True"}
    assert sum(p for _, p in t0.prediction) == pytest.approx(1.0, abs=1e-5) and t0.prediction == t1.prediction
    assert np.abs(t1.image.astype(int) - np.asarray(right).astype(int)).max() <= 1
    assert not np.array_equal(t0.attentions, t1.attentions)
    assert t1.meta["image_pass"] == 1 and t1.meta["n_image_passes"] == 2


def test_nlvr2_pair_of_different_sizes_drops_padding_from_the_trace(nlvr2):
    left, right = grey_image(48, 32), grey_image(32, 32)
    t1 = extract_trace(nlvr2, (left, right), "a cat", "p", image_pass=1)
    assert t1.grid == (4, 4) and (t1.modality == 1).sum() == 1 + 16 and "[PAD]" not in t1.tokens
    assert np.allclose(t1.attentions.astype(np.float32).sum(-1), 1.0, atol=2e-3)


def test_nlvr2_needs_two_images(nlvr2, noise_image):
    with pytest.raises(InputError, match="two images|2 images"):
        nlvr2.encode([noise_image], ["a cat"])
