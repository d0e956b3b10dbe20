"""The Heatmaps and Embeddings pages on every generative family's tiny checkpoint (LLaVA, NeXT, OneVision, Qwen2-VL,
Qwen2.5-VL, SmolVLM/Idefics3, PaliGemma, Gemma 3), opened as a local folder: a generated token's rollout on the
image equals the rollout the trace stores, and the decoder's text and image tokens are projected (NeXT's tile grid
once crashed the Embeddings page's thumbnails).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from tests.app.test_families_pages import EMBEDDINGS, EX, clean, open_family, overlays, reference
from vlcore.trace import ROLE_PATCH

HEATMAPS = "pages/4_Attention_Heatmaps.py"
MODULES = ("tiny_llava", "tiny_llava_next", "tiny_qwen2_vl", "tiny_idefics3", "tiny_paligemma", "tiny_gemma3")


def _checkpoints() -> dict:
    found = {}
    for name in MODULES:
        found.update(importlib.import_module(f"tests.models.{name}").TINY_CHECKPOINTS)
    return found


CHECKPOINTS = _checkpoints()
_FOLDERS: dict = {}


@pytest.fixture(params=sorted(CHECKPOINTS), scope="module")
def folder(request, tmp_path_factory) -> str:
    if request.param not in _FOLDERS:
        _FOLDERS[request.param] = str(CHECKPOINTS[request.param](Path(tmp_path_factory.mktemp(request.param)) / "ckpt"))
    return _FOLDERS[request.param]


def test_a_generated_tokens_rollout_is_drawn_on_the_image(folder):
    trace = reference(folder)[0].select("lm.generated")
    at = open_family(HEATMAPS, folder, {"ex": EX, "block": "lm.generated", "tok": "0", "method": "rollout"})
    clean(at)
    rows = np.asarray(trace.meta["rollout"].get("composed") or trace.meta["rollout"]["lm"])
    heat = overlays(at)[0]
    assert len(heat) and set(heat["token"]) <= set(trace.key_layout.index(ROLE_PATCH).tolist())
    np.testing.assert_allclose(heat["value"], rows[0][heat["token"].to_numpy()], rtol=1e-4, atol=1e-7)


def test_the_decoders_text_and_image_tokens_are_projected(folder):
    trace = reference(folder)[0]
    at = open_family(EMBEDDINGS, folder, {"ex": EX})
    clean(at)
    lm = trace.streams["lm"]
    n_image = len(lm.index(ROLE_PATCH))
    assert any(f"text and {n_image} image tokens" in c.value for c in at.caption)
