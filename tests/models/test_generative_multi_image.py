"""Several images in one prompt, on the generative adapters (`GenerativeAdapter.encode` takes an image or a list of
images per question): each image's tokens form their own grid, a change to the second image reaches only its
tokens, and a vision tower's block keeps each prompt's first image (the tower's batch holds every image)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlcore.errors import InputError
from vlcore.models.base import Capture
from vlcore.models.registry import load_adapter
from vlcore.trace import ROLE_PATCH

QUESTION = "what is the color of the cat?"
FAMILIES = {"llava": ("tests.models.tiny_llava", "llava"), "qwen2-vl": ("tests.models.tiny_qwen2_vl", "qwen2-vl"),
            "gemma3": ("tests.models.tiny_gemma3", "gemma3"), "idefics3": ("tests.models.tiny_idefics3", "idefics3"),
            "llava_next": ("tests.models.tiny_llava_next", "llava_next"),
            "llava_onevision": ("tests.models.tiny_llava_next", "llava_onevision")}
_LOADED: dict = {}


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def adapter(request, tmp_path_factory):
    if request.param not in _LOADED:
        module, key = FAMILIES[request.param]
        write = importlib.import_module(module).TINY_CHECKPOINTS[key]
        a = load_adapter(str(write(tmp_path_factory.mktemp(request.param) / key)))
        a.max_new_tokens = 2
        _LOADED[request.param] = a
    return _LOADED[request.param]


def image(seed: int, planted: bool = False) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    if planted:
        arr[:16, :16] = 255
    return Image.fromarray(arr)


def embedded(adapter, batch) -> torch.Tensor:
    with torch.no_grad():
        return adapter.capture(batch, Capture(blocks=(), hidden=True)).hidden["lm"][0, 0]  # decoder input, row 0


def test_a_change_to_the_second_image_reaches_only_its_tokens(adapter):
    base = adapter.encode([[image(0), image(1)]], [QUESTION])
    other = adapter.encode([[image(0), image(1, planted=True)]], [QUESTION])
    lm = base.streams["lm"][0]
    grids = sorted(set(lm.image_of[lm.image_of >= 0].tolist()))
    assert len(lm.images) >= 2 and len(grids) == len(lm.images)
    n_prompt = int(base.inputs["prompt_len"])
    changed = np.flatnonzero((embedded(adapter, base) - embedded(adapter, other)).abs().amax(-1)[:n_prompt].numpy() > 1e-5)
    second = {g for g in grids if lm.images[g].image is not None and g >= len(lm.images) // 2}
    assert len(changed) and set(lm.image_of[changed].tolist()) <= second, "only the second image's tokens change"
    assert (lm.role[changed] == ROLE_PATCH).all()


def test_each_prompt_keeps_its_first_images_tower_pass(adapter):
    if adapter.vision_spec() is None:
        pytest.skip(f"{adapter.family} shows no vision-tower block")
    if adapter.config.model_type == "llava_onevision":
        pytest.skip("OneVision pads each image of a multi-image prompt to a square: its tower input is not the "
                    "single-image one")
    batch = adapter.encode([[image(0), image(1)], image(2)], [QUESTION, QUESTION])
    with torch.no_grad():
        got = adapter.capture(batch, Capture(blocks=("vision.self",), hidden=True))
        alone = [adapter.capture(adapter.encode([image(s)], [QUESTION]), Capture(blocks=("vision.self",), hidden=True))
                 for s in (0, 2)]
    for row, ref in enumerate(alone):
        torch.testing.assert_close(got.stacked("vision.self")[:, row], ref.stacked("vision.self")[:, 0],
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.hidden["vision"][:, row], ref.hidden["vision"][:, 0], rtol=1e-4, atol=1e-5)


def test_an_empty_image_list_is_a_one_line_error(adapter):
    with pytest.raises(InputError, match="at least one image"):
        adapter.encode([[]], [QUESTION])


def test_another_answer_is_scored_with_each_rows_own_images(adapter):
    """A batch of two prompts, the first with two images: scoring an answer that was not generated runs each row
    on its own images (before, every row got every image and the model refused the pass)."""
    images, texts = [[image(0), image(1)], image(2)], [QUESTION, QUESTION]
    with torch.no_grad():
        both = adapter.target_score(adapter.capture(adapter.encode(images, texts), Capture(hidden=False)).output, "red")[0]
        alone = [adapter.target_score(adapter.capture(adapter.encode([group], [QUESTION]), Capture(hidden=False)).output,
                                      "red")[0][0] for group in images]
    torch.testing.assert_close(both, torch.stack(alone), rtol=1e-4, atol=1e-4)


def test_the_notebook_runs_several_images_in_one_prompt_and_a_one_image_model_says_no(adapter):
    import vlcore.notebook as vn

    if adapter.family != "llava":
        pytest.skip("one family is enough for the notebook path")
    trace = vn.run(adapter, image=[image(0), image(1)], text=QUESTION)
    assert len(trace.streams["lm"].images) == 2
    with pytest.raises(InputError, match="reads one image per question"):
        vn.run("demo", image=[image(0), image(1)], text=QUESTION)
    one = vn.run("demo", image=np.asarray(image(0)).tolist(), text=QUESTION)  # pixel rows as nested lists: one image
    assert one.prediction
