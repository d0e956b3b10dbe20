"""The Logit lens page on the tiny LLaVA folder (tests/models/tiny_llava.py) and on the bundled ViLT demo.

What the page draws is checked against the trace `vlcore.notebook.run` makes of the same example without the store
or the page: the rank and probability of the final token per layer and generated token, the layer's top-5 in the
tooltip, and each image token's top word on its grid cell at the chosen layer.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.app.test_families_pages import charts, clean, open_family
from tests.models.tiny_llava import write_llava

PAGE = "pages/8_Logit_Lens.py"
EX = "easy_vqa/test/3"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> str:
    return str(write_llava(tmp_path_factory.mktemp("lens") / "llava"))


@pytest.fixture(scope="module")
def reference(llava):
    """The example's trace made the notebook's way (no store, no page)."""
    import vlcore.notebook as vn

    return vn.run(llava, example=EX)


def chart(at, title: str):
    """The spec and datasets of the chart titled ``title``."""
    return next((s, f) for s, f in charts(at) if title in str(s.get("title", "")))


def image_words(at) -> dict[tuple[int, int], str]:
    """(row, col) -> the word written on that cell of the image chart."""
    spec, frames = chart(at, "Image tokens' top token")
    text = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "text")
    frame = frames[text["data"]["name"]]
    return {(int(r), int(c)): w for r, c, w in zip(frame["row"], frame["col"], frame["word"])}


def expected_words(trace, layer: int) -> dict[tuple[int, int], str]:
    lens, lm = trace.meta["lens"], trace.streams["lm"]
    return {tuple(int(v) for v in lm.cell[p]): words[0]
            for p, words in zip(lens["image_positions"], lens["image_top_tokens"][layer])}


def test_rank_and_probability_charts_are_the_traces_logit_lens(llava, reference):
    at = open_family(PAGE, llava, {"ex": EX})
    clean(at)
    lens = reference.meta["lens"]
    rank = np.asarray(lens["rank"])
    n_lens, n_steps = rank.shape
    assert n_lens == reference.blocks["lm.generated"].attentions.shape[0] + 1  # embeddings + every layer
    spec, frames = chart(at, "Rank of the final token")
    data = frames[spec["data"]["name"]]
    assert spec["encoding"]["color"]["scale"]["type"] == "log"
    got = np.full_like(rank, -9)
    got[data["layer"].to_numpy(), data["step"].to_numpy()] = data["rank"].to_numpy()
    np.testing.assert_array_equal(got, rank)
    generated = reference.streams["generated"].tokens
    assert data.sort_values(["layer", "step"])["label"].tolist() == [f"{t}: {generated[t]}"
                                                                     for _ in range(n_lens) for t in range(n_steps)]
    row = data[(data["layer"] == n_lens - 1) & (data["step"] == 0)].iloc[0]
    top = lens["top_tokens"][n_lens - 1][0]
    assert row["top"].split(" · ")[0] == f"{top[0]} {lens['top_probs'][n_lens - 1][0][0]:.3f}"
    spec, frames = chart(at, "Probability of the final token")
    data = frames[spec["data"]["name"]].sort_values(["layer", "step"])
    np.testing.assert_allclose(data["prob"], np.asarray(lens["prob"]).ravel(), rtol=1e-4, atol=1e-7)


def test_image_tokens_words_follow_the_layer_slider_and_the_url(llava, reference):
    n_lens = len(reference.meta["lens"]["rank"])
    at = open_family(PAGE, llava, {"ex": EX})
    assert at.select_slider(key="lens_layer").value == n_lens - 1  # the last layer by default
    words = image_words(at)
    assert len(words) == 16 and words == expected_words(reference, n_lens - 1)  # the 4 x 4 grid
    at.select_slider(key="lens_layer").set_value(0).run()
    clean(at)
    assert image_words(at) == expected_words(reference, 0)
    assert at.query_params["layer"] == ["0"] or at.query_params["layer"] == "0"
    fresh = open_family(PAGE, llava, {"ex": EX, "layer": "1"})
    clean(fresh)
    assert fresh.select_slider(key="lens_layer").value == 1
    assert image_words(fresh) == expected_words(reference, 1)
    assert "layer 1" in str(chart(fresh, "Image tokens' top token")[0]["title"])


def test_a_model_that_does_not_generate_gets_one_line():
    at = open_family(PAGE, "demo", {"ex": EX})
    clean(at)
    model = next(c.value for c in at.caption if "vilt" in c.value).split("`")[1]
    assert [i.value for i in at.info] == [
        ("The logit lens applies to generative models (decoders that write their answer token by token); "
         f"{model} does not generate. Pick a generative checkpoint in the sidebar.")]
    assert not charts(at)
