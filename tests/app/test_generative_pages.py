"""A generative model on the pages (issue 16, section 4), through the tiny LLaVA checkpoint opened as a local folder:
the answer token by token on Run Model, each token's row on the Heatmaps page, the decoder's rollout composed with
the vision tower's, and the Embeddings page projecting the decoder's text and image tokens.

Every value on a page is checked against the trace the notebook API makes of the same example without the store
(`vlcore.notebook.run`), which is computed independently of the page.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import numpy as np
import pytest

from tests.app.test_families_pages import EX, EMBEDDINGS, RUNNER, clean, open_family, overlays, reference
from tests.models.tiny_llava import write_llava
from vlcore.trace import ROLE_PATCH

HEATMAPS = "pages/4_Attention_Heatmaps.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_llava(tmp_path_factory.mktemp("llava-pages") / "llava"))


@pytest.fixture(scope="module")
def trace(folder):
    return reference(folder)[0]


def test_run_model_lists_the_answer_token_by_token_each_opening_its_row(folder, trace):
    at = open_family(RUNNER, folder, {"ex": EX})
    clean(at)
    assert any(m.value.startswith("**Answer, token by token**") for m in at.markdown)
    links = [link.proto for link in at.get("page_link") if link.proto.label[:1].isdigit()]
    generated = trace.streams["generated"]
    assert [link.label for link in links] and len(links) == generated.n_tokens
    final = trace.meta["lens"]["prob"][-1]
    for link in links:
        query = parse_qs(link.query_string)
        t = int(query["tok"][0])
        assert link.page == "Attention_Heatmaps" and query["block"] == ["lm.generated"] and query["ex"] == [EX]
        assert link.label == f"{t}: {generated.tokens[t].strip() or repr(generated.tokens[t])}"
        assert link.help == f"step {t} · p = {final[t]:.3f} at the last layer"
    prediction = next(m.value for m in at.markdown if m.value.startswith("**Prediction:**"))
    assert prediction.startswith(f"**Prediction:** {trace.prediction[0][0]} ")
    lens = [link.proto for link in at.get("page_link") if link.proto.label == "Open in Logit lens"]
    assert len(lens) == 1 and "ex=" in lens[0].query_string


def test_heatmaps_open_a_generated_tokens_row_over_the_image(folder, trace):
    view = trace.select("lm.generated")
    t = min(2, view.n_tokens - 1)
    at = open_family(HEATMAPS, folder, {"ex": EX, "block": "lm.generated", "tok": str(t)})
    clean(at)
    heat = overlays(at)[0]
    row = view.head_attention(view.n_layers - 1, None)[t]
    patches = view.key_layout.index(ROLE_PATCH)
    assert sorted(heat["token"]) == sorted(patches.tolist())
    np.testing.assert_allclose(heat["value"], row[heat["token"].to_numpy()], rtol=1e-3, atol=1e-6)
    assert view.key_layout.n_tokens > view.n_tokens  # its keys: the prompt (text, image) and earlier answer tokens


def test_rollout_of_a_generated_token_is_composed_with_the_vision_towers(folder, trace):
    view = trace.select("lm.generated")
    t = min(1, view.n_tokens - 1)
    at = open_family(HEATMAPS, folder, {"ex": EX, "block": "lm.generated", "tok": str(t), "method": "rollout"})
    clean(at)
    assert any(s.value == "Attention rollout through the decoder composed with the vision tower's rollout · layers 0–1"
               for s in at.subheader)
    assert not any("Rollout does not apply" in i.value for i in at.info)
    composed = np.asarray(trace.meta["rollout"]["composed"])[t]
    heat = overlays(at)[0]
    np.testing.assert_allclose(heat["value"], composed[heat["token"].to_numpy()], rtol=1e-4, atol=1e-7)


def test_embeddings_project_the_decoders_text_and_image_tokens(folder, trace):
    at = open_family(EMBEDDINGS, folder, {"ex": EX})
    clean(at)
    lm = trace.streams["lm"]
    n_text = int(((lm.modality == 0) & lm.valid).sum())
    n_image = len(lm.index(ROLE_PATCH))
    assert any(c.value.startswith(f"1 example(s) · {n_text} text and {n_image} image tokens") for c in at.caption)
    assert any("NMI between the layer" in c.value for c in at.caption)  # both modalities: fusion degree applies


def test_the_eager_fallback_is_picked_in_the_sidebar_and_carried_by_the_link(folder, trace):
    at = open_family(HEATMAPS, folder, {"ex": EX, "block": "lm.generated", "tok": "0", "attn": "eager"})
    clean(at)
    assert at.radio(key="attn_mode").value == "eager"
    view = trace.select("lm.generated")  # the sdpa trace: the eager weights agree to float16 precision
    heat = overlays(at)[0]
    row = view.head_attention(view.n_layers - 1, None)[0]
    np.testing.assert_allclose(heat["value"], row[heat["token"].to_numpy()], rtol=2e-3, atol=1e-5)
    assert at.query_params["attn"] in ("eager", ["eager"])
    at.radio(key="attn_mode").set_value("sdpa").run()
    clean(at)
    assert "attn" not in at.query_params


def test_max_new_tokens_is_set_in_the_sidebar_and_a_bad_link_value_gets_a_notice(folder, trace):
    at = open_family(RUNNER, folder, {"ex": EX, "new": "3"})
    clean(at)
    assert at.number_input(key="gen_max_new").value == 3
    links = [link.proto for link in at.get("page_link") if link.proto.label[:1].isdigit()]
    assert len(links) == min(3, trace.streams["generated"].n_tokens)  # greedy: the first 3 of the 16-token answer
    assert [link.label for link in links] == [f"{t}: {w.strip() or repr(w)}" for t, w in
                                              enumerate(trace.streams["generated"].tokens[:3])]
    at = open_family(RUNNER, folder, {"ex": EX, "new": "many"})
    clean(at)
    assert at.number_input(key="gen_max_new").value == 16
    assert any("Ignored `new=many`" in m.value for m in [*at.info, *at.warning, *at.caption, *at.markdown])


def test_a_trace_without_a_stored_rollout_says_why(trace):
    """A generative trace whose sequence was too long for the in-pass rollout: the heatmaps say why, not that the
    block is a cross block."""
    import dataclasses

    from vlcore.ui.heatmaps import method_reason

    view = trace.select("lm.generated")
    bare = dataclasses.replace(view, meta={k: v for k, v in view.meta.items() if k != "rollout"})
    reason = method_reason("rollout", bare, None)
    assert reason.startswith("Rollout was not computed for this example") and "2^26" in reason
    assert method_reason("rollout", view, None) is None
