"""Head statistics of a generative model (the tiny LLaVA folder): the language model's heads' share of attention
on image tokens and normalised entropy, over the prompt's rows and the generated tokens' rows, and the image-token
sink at a threshold the user sets.

References: the prompt rows' numbers are the trace's own ``meta["prompt_head_summaries"]`` (reduced by the adapter
while the model ran); the generated rows' are recomputed from the ``lm.generated`` block by the statistics module
(`vlcore.analysis.stats.compute_trace_summaries`: ``txtq_to_img``, ``entropy``), an implementation independent of
the page's (`vlcore.analysis.image_sinks`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.app.test_families_pages import charts, clean, open_family
from tests.models.tiny_llava import write_llava

PAGE = "pages/3_Head_Statistics.py"
EX = "easy_vqa/test/3"
PANEL = "Language-model heads: attention to image tokens"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> str:
    return str(write_llava(tmp_path_factory.mktemp("genstats") / "llava"))


@pytest.fixture(scope="module")
def reference(llava):
    """``(prompt share, prompt entropy, generated share, generated entropy)``, each ``[L, H]``, of the example's
    trace made the notebook's way."""
    import vlcore.notebook as vn
    from vlcore.analysis.stats import compute_trace_summaries

    trace = vn.run(llava, example=EX)
    prompt = trace.meta["prompt_head_summaries"]
    stats = compute_trace_summaries(trace.select("lm.generated"))

    def table(metric):
        return stats[stats["metric"] == metric].pivot(index="layer", columns="head", values="value").to_numpy()

    return (np.asarray(prompt["image_share"]), np.asarray(prompt["entropy"]), table("txtq_to_img"),
            table("entropy"))


def head_tables(at, metric: str) -> list[np.ndarray]:
    """The ``[L, H]`` tables of every layer × head heatmap of ``metric`` on the page."""
    found = []
    for _, frames in charts(at):
        for frame in frames.values():
            if "metric" in frame and len(frame) and (frame["metric"] == metric).all():
                found.append(frame.pivot(index="layer", columns="head", values="mean").to_numpy())
    return found


@pytest.fixture(scope="module")
def page(llava):
    at = open_family(PAGE, llava, {"ex": EX})
    clean(at)
    return at


def test_image_share_and_entropy_over_prompt_and_generated_rows(page, reference):
    prompt_share, prompt_entropy, gen_share, gen_entropy = reference
    assert PANEL in [s.value for s in page.subheader]
    shares = head_tables(page, "image_share")
    entropies = head_tables(page, "entropy")
    assert len(shares) == len(entropies) == 2  # generated rows, then prompt rows
    np.testing.assert_allclose(shares[0], gen_share, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(shares[1], prompt_share, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropies[0], gen_entropy, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(entropies[1], prompt_entropy, rtol=1e-5, atol=1e-6)
    assert not np.allclose(shares[0], shares[1], atol=1e-3)  # two different row sets, not one table twice
    layers = next(d.value for d in page.dataframe if "generated tokens' rows" in d.value.columns)
    np.testing.assert_allclose(layers["generated tokens' rows"], gen_share.mean(1), rtol=1e-4)
    np.testing.assert_allclose(layers["prompt rows"], prompt_share.mean(1), rtol=1e-5)


def test_sink_follows_the_threshold_and_the_row_set(llava, reference):
    _, _, gen_share, _ = reference
    at = open_family(PAGE, llava, {"ex": EX})
    line = next(m.value for m in at.markdown if m.value.startswith("Sink over"))
    early = gen_share.mean(1)[:2].mean()
    assert line == (f"Sink over the generated tokens' rows: no layer (it does not stay below the cutoff) · "
                    f"early level {early:.4f} · cutoff {0.1 * early:.4f}")  # 2 layers: nothing below 0.1 x early
    # at threshold 1 the cutoff is the early level itself: layer 1 is under it iff its share is below layer 0's
    layer_share = gen_share.mean(1)
    assert layer_share[1] < layer_share[0]  # this seed's model
    at.slider(key="sink_threshold").set_value(1.0).run()
    clean(at)
    line = next(m.value for m in at.markdown if m.value.startswith("Sink over"))
    assert line.startswith("Sink over the generated tokens' rows: layer **1** ·")
    heads = next(d.value for d in at.dataframe if "sink layer" in d.value.columns)
    expected = [1 if gen_share[1, h] < gen_share[:, h].mean() else None for h in range(gen_share.shape[1])]
    assert [None if pd.isna(v) else int(v) for v in heads["sink layer"].tolist()] == expected
    at.radio(key="sink_rows").set_value("prompt").run()
    clean(at)
    prompt = np.asarray(reference[0]).mean(1)
    line = next(m.value for m in at.markdown if m.value.startswith("Sink over"))
    assert line.startswith("Sink over the prompt rows:") and f"early level {prompt.mean():.4f}" in line


def test_a_model_that_does_not_generate_has_no_language_model_panel():
    at = open_family(PAGE, "demo", {"ex": EX})
    clean(at)
    assert PANEL not in [s.value for s in at.subheader]
    assert not [d for d in at.dataframe if "sink layer" in d.value.columns]
