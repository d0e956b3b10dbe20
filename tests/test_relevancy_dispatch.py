"""`extract_block_relevancy` picks the rule that fits the block, and gives what that rule gives."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.models.tiny_blip import blip_itm
from tests.models.tiny_clip import write_tiny_clip, write_tiny_siglip
from vlcore.attribution.bimodal import extract_bimodal_relevancy
from vlcore.attribution.dispatch import extract_block_relevancy
from vlcore.attribution.relevance import extract_relevancy
from vlcore.attribution.towers import extract_tower_relevancy
from vlcore.models.registry import load_adapter

TEXT = "a photo of a red cat"


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_a_cross_block_follows_the_bimodal_rules(tmp_path_factory, image):
    adapter = load_adapter(str(blip_itm(tmp_path_factory.mktemp("blip"))), device="cpu")
    values = extract_block_relevancy(adapter, image, TEXT, None, "text.cross")
    reference = extract_bimodal_relevancy(adapter, image, TEXT, None, query_stream="text").values["vision"]
    np.testing.assert_allclose(values, reference, rtol=1e-6)
    assert values.shape == (1 + 16,)  # the key stream: image CLS and a 4 x 4 grid


def test_a_self_block_with_a_query_row_follows_the_single_stream_rule(tmp_path_factory, image):
    adapter = load_adapter(str(write_tiny_clip(tmp_path_factory.mktemp("clip"))), device="cpu")
    values = extract_block_relevancy(adapter, image, TEXT, None, "vision.self")
    np.testing.assert_allclose(values, extract_relevancy(adapter, image, TEXT, None, block="vision.self").values)


def test_a_pooled_tower_goes_through_its_pooling_block(tmp_path_factory, image):
    adapter = load_adapter(str(write_tiny_siglip(tmp_path_factory.mktemp("siglip"))), device="cpu")
    values = extract_block_relevancy(adapter, image, TEXT, None, "vision.self")
    np.testing.assert_allclose(values, extract_tower_relevancy(adapter, image, TEXT, None).maps["vision"].values)
    assert values.shape == (16,)
