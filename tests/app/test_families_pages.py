"""Run model, Embeddings, Probing, Annotations, Dataset browser and Home on every model family: the bundled ViLT
demo and tiny BLIP (ITM, VQA), CLIP and SigLIP checkpoints written by tests/models/tiny_*.py and opened as a local
folder (the session key `LOCAL_FOLDER_KEY`, as the model picker keeps it).

Each flow asserts what the page shows against an independent reference: the trace `vlcore.notebook.run` makes
without the store, the adapter's own scores and embeddings, the layouts' token counts.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT
from tests.models.tiny_blip import TINY_CHECKPOINTS as BLIP
from tests.models.tiny_clip import TINY_CHECKPOINTS as CLIP
from vlcore.ui.widgets import LOCAL_FOLDER_KEY

HOME = str(ROOT / "streamlit_app.py")
RUNNER = "pages/2_Run_Model.py"
EMBEDDINGS = "pages/5_Embeddings.py"
PROBING = "pages/7_Probing.py"
EX = "easy_vqa/test/3"  # "does the image contain a circle?" (gold: no)
FAMILIES = ("blip-itm", "blip-vqa", "clip", "siglip")
TITLES = {"demo": "ViLT", "blip-itm": "BLIP", "blip-vqa": "BLIP", "clip": "CLIP / SigLIP", "siglip": "CLIP / SigLIP"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Each tiny checkpoint folder by name, plus ``demo`` (the bundled ViLT, no folder)."""
    root = tmp_path_factory.mktemp("families")
    made = {name: str(write(root / name)) for name, write in {**BLIP, **CLIP}.items()}
    return {"demo": "demo", **made}


def open_family(page: str | None, folder: str, params: dict | None = None, timeout: int = 300) -> AppTest:
    """An AppTest of the app on ``page`` with the model ``folder`` picked as a local folder (``demo``: the demo)."""
    at = AppTest.from_file(HOME, default_timeout=timeout)
    if folder != "demo":
        at.session_state[LOCAL_FOLDER_KEY] = folder
    for key, value in (params or {}).items():
        at.query_params[key] = value
    if page:
        at.switch_page(page)
    return at.run()


def charts(at: AppTest) -> list[tuple[dict, dict[str, pd.DataFrame]]]:
    """Every Vega-Lite chart: its spec and its datasets as frames."""
    out = []
    for element in at.get("vega_lite_chart"):
        frames = {d.name: pa.ipc.open_stream(d.data.data).read_pandas() for d in element.proto.datasets}
        out.append((json.loads(element.proto.spec), frames))
    return out


def overlays(at: AppTest) -> list[pd.DataFrame]:
    """The heat layers (patch rectangles with a value) of the image overlays on the page."""
    found = []
    for spec, frames in charts(at):
        layers = spec.get("layer", [])
        if not any(layer.get("mark", {}).get("type") == "image" for layer in layers):
            continue
        heat = next(layer for layer in layers if layer.get("mark", {}).get("type") == "rect")
        found.append(frames[(heat.get("data") or spec["data"])["name"]])
    return found


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def reference(folder: str, labels=None):
    """The example's trace made the notebook's way (no store, no page) and its adapter."""
    import vlcore.notebook as vn

    trace = vn.run(folder, example=EX, labels=labels)
    return trace, vn._INPUTS[trace][0]


# ---------------------------------------------------------------------------------------
# Run model
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("demo", *FAMILIES))
def test_run_model_shows_each_familys_prediction_and_its_explaining_row(folders, name):
    at = open_family(RUNNER, folders[name], {"ex": EX})
    clean(at)
    trace, adapter = reference(folders[name])
    summary = next(c.value for c in at.caption if "attention blocks:" in c.value)
    assert summary.startswith(f"**{TITLES[name]}**") and all(f"`{b}`" in summary for b in adapter.block_specs())
    prediction = next(m.value for m in at.markdown if m.value.startswith("**Prediction:**"))
    top, value = trace.prediction[0]
    if adapter.answers_compare:  # answers: against the gold, with a verdict
        assert prediction == f"**Prediction:** {top} ({value:.1%}) · **gold:** no · " + (
            "✅ correct" if top == "no" else "❌ incorrect")
    else:  # a pair's score: no gold, no verdict, the scores it explains
        assert f"**{value:.3f}**" in prediction and "gold" not in prediction
        assert any("Gold answers (no) do not apply" in c.value for c in at.caption)
        scores = next(d.value for d in at.dataframe if "target" in d.value.columns)
        assert set(scores["target"]) == ({"match", "similarity"} if name == "blip-itm" else {"match"})
        if name == "blip-itm":  # the ITM head's match probability is the prediction
            assert scores.set_index("target").at["match", "probability"] == pytest.approx(value, rel=1e-5)
    # one overlay: the default query's last-layer row over the image's 16 (ViLT: 64) patches, as the trace has it
    (heat,) = overlays(at)
    view = next(trace.select(b) for b in dict.fromkeys([trace.view, *trace.blocks])
                if trace.blocks[b].attentions is not None and trace.select(b).key_layout.images
                and adapter.default_query(b, trace.select(b).layout) is not None)
    row = view.head_attention(view.n_layers - 1, None)[adapter.default_query(view.view, view.layout)]
    patches, _ = view.key_layout.patch_positions()
    assert len(heat) == len(patches) == (64 if name == "demo" else 16)
    np.testing.assert_allclose(heat["value"], row[heat["token"].to_numpy()], rtol=1e-3, atol=1e-6)


def test_clip_similarity_shows_the_cosine_of_its_shared_space(folders):
    at = open_family(RUNNER, folders["clip"], {"ex": EX})
    clean(at)
    trace, adapter = reference(folders["clip"])
    from vlcore.data.sources import resolve_example
    from vlcore.ui.prediction import compute_pair_scores

    example = resolve_example(EX, None)
    expected = compute_pair_scores(adapter, example.load_image(), example.question).cosine
    line = next(m.value for m in at.markdown if m.value.startswith("**Cosine similarity**"))
    assert line.endswith(f"**{expected:.4f}**")
    assert expected == pytest.approx(trace.prediction[0][1], abs=1e-5)  # CLIP's pair "probability" is the cosine


@pytest.mark.parametrize("name", ("clip", "siglip"))
def test_zero_shot_classifies_over_the_datasets_answers_then_typed_labels(folders, name):
    from vlcore.data.sources import easy_vqa_source
    from vlcore.ui.prediction import answer_vocabulary

    vocabulary = answer_vocabulary(easy_vqa_source("test"))
    assert {"circle", "red", "yes", "no"} <= set(vocabulary) and len(vocabulary) == 13
    at = open_family(RUNNER, folders[name], {"ex": EX})
    at.radio(key="task_mode").set_value("zero_shot").run()
    clean(at)
    assert at.query_params["task"] == "zero_shot" and at.text_area(key="zs_labels").value == ", ".join(vocabulary)
    trace, _ = reference(folders[name], labels=vocabulary)
    bars = next(f for s, fs in charts(at) for f in fs.values() if "answer" in f.columns)
    assert bars["answer"].tolist() == [label for label, _ in trace.prediction]
    np.testing.assert_allclose(bars["probability"], [p for _, p in trace.prediction], rtol=1e-5)
    at.text_area(key="zs_labels").set_value("circle, square ,red").run()
    clean(at)
    assert at.query_params["labels"] == "circle, square ,red"
    bars = next(f for s, fs in charts(at) for f in fs.values() if "answer" in f.columns)
    assert set(bars["answer"]) == {"circle", "square", "red"}
    if name == "clip":  # a softmax over the candidates
        assert bars["probability"].sum() == pytest.approx(1.0, abs=1e-5)


def test_a_model_without_zero_shot_offers_no_task_choice(folders):
    at = open_family(RUNNER, folders["blip-itm"], {"ex": EX, "task": "zero_shot"})
    clean(at)
    assert not [r for r in at.radio if r.key == "task_mode"]
    assert any("image-text matching" in c.value for c in at.caption if "attention blocks:" in c.value)


@pytest.mark.parametrize("name, accuracy", [("blip-itm", None), ("blip-vqa", "number"), ("clip", None)])
def test_sweep_runs_for_every_family_with_accuracy_only_where_answers_compare(folders, name, accuracy):
    at = open_family(RUNNER, folders[name])
    at.number_input(key="sweep_n").set_value(4).run()
    at.button(key="sweep_start").click().run()
    clean(at)
    done = next(m.value for m in at.markdown if m.value.startswith("**Sweep:**"))
    table = next(d.value for d in at.dataframe if "probability" in d.value.columns)
    assert len(table) == 4 and done.startswith("**Sweep:** 4/4 examples done")
    # a similarity's prediction is the text itself: shown once, as the question
    assert ("prediction" in table.columns) == (name != "clip")
    if accuracy is None:
        assert done.endswith("accuracy n/a") and not {"gold", "correct"} & set(table.columns)
        assert any("No accuracy: this model scores each image-text pair" in c.value for c in at.caption)
    else:
        from vlcore.storage.store import Store
        from vlcore.storage.sweeps import load_sweep

        preds, _ = load_sweep(Store().list_sweeps()[0]["path"])
        assert done.endswith(f"accuracy {preds['correct'].astype(float).mean():.3f}") and "correct" in table.columns


def test_zero_shot_sweep_has_an_accuracy_over_the_labels(folders):
    at = open_family(RUNNER, folders["clip"], {"task": "zero_shot"})
    at.number_input(key="sweep_n").set_value(4).run()
    at.button(key="sweep_start").click().run()
    clean(at)
    table = next(d.value for d in at.dataframe if "prediction" in d.value.columns)
    done = next(m.value for m in at.markdown if m.value.startswith("**Sweep:**"))
    correct = [p in g for p, g in zip(table["prediction"], table["gold"])]
    assert done.endswith(f"accuracy {np.mean(correct):.3f}") and table["correct"].tolist() == correct


# ---------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------


def scatter(at: AppTest) -> pd.DataFrame:
    from vlcore.charts.embeddings import SELECT_PARAM

    return next(next(iter(fs.values())) for s, fs in charts(at)
                if any(p.get("name") == SELECT_PARAM for p in s.get("params", [])))


@pytest.mark.parametrize("name", ("demo", "blip-itm", "clip", "siglip"))
def test_embeddings_project_each_stream_and_say_why_fusion_does_not_apply(folders, name):
    at = open_family(EMBEDDINGS, folders[name], {"ex": EX})
    clean(at)
    trace, _ = reference(folders[name])
    streams = [s for s in trace.streams if trace.hiddens.get(s) is not None and trace.streams[s].n_tokens >= 3]
    pickers = [s for s in at.selectbox if s.key == "emb_stream"]
    assert len(pickers) == (len(streams) > 1)
    for stream in streams:
        if pickers:
            at.selectbox(key="emb_stream").set_value(stream).run()
            clean(at)
        points = scatter(at)
        layout = trace.streams[stream]
        assert len(points) == layout.n_tokens and points["token"].tolist() == list(range(layout.n_tokens))
        assert points["text"].tolist() == list(layout.tokens)
        kinds = set(points["modality"])
        fusion = [s for s, _ in charts(at) if "Fusion degree" in json.dumps(s.get("title", ""))]
        notes = [i.value for i in at.info if i.value.startswith("Fusion degree: n/a")]
        if kinds == {"text", "image"}:  # text and image share this stream (ViLT)
            assert fusion and not notes
        else:
            assert not fusion and len(notes) == 1 and f"the {stream} stream holds only" in notes[0]
        if name != "demo":  # a pair-scoring model: gold answers say nothing about being right
            assert set(points["correct"]) == {"unknown"}


@pytest.mark.parametrize("name", ("clip", "siglip"))
def test_shared_space_holds_the_images_texts_and_labels_with_their_cosines(folders, name):
    at = open_family(EMBEDDINGS, folders[name], {"ex": EX})
    at.slider(key="emb_shared_n").set_value(5).run()
    clean(at)
    _, frames = next(c for c in charts(at) if "unit embeddings" in json.dumps(c[0].get("title", "")))
    points = next(f for f in frames.values() if "kind" in f.columns and len(f) > 10)
    counts = points["kind"].value_counts().to_dict()
    assert counts == {"image": 5, "text": 5, "label": 13}
    assert points.loc[points["kind"] == "image", "example_id"].iloc[0] == EX
    _, adapter = reference(folders[name])
    from vlcore.data.sources import resolve_example
    from vlcore.ui.shared_space import extract_joint_embeddings

    example = resolve_example(EX, None)
    image, text = extract_joint_embeddings(adapter, [example.load_image()], [example.question])
    ranking = next(d.value for d in at.dataframe if "cosine" in d.value.columns)
    own = ranking.loc[ranking["kind"] == "text", "cosine"].iloc[0]
    expected = float(image[0] @ text[0] / np.linalg.norm(image[0]) / np.linalg.norm(text[0]))
    assert own == pytest.approx(expected, abs=1e-5)
    assert len(ranking) == 14 and ranking["cosine"].is_monotonic_decreasing


def test_embeddings_of_a_blip_sweep_keep_its_text_stream(folders):
    at = open_family(RUNNER, folders["blip-itm"])
    at.number_input(key="sweep_n").set_value(3).run()
    at.button(key="sweep_start").click().run()
    clean(at)
    at = open_family(EMBEDDINGS, folders["blip-itm"], {"scope": "sweep"})
    clean(at)
    points = scatter(at)
    assert set(points["modality"]) == {"text"} and points["example_id"].nunique() == 3
    assert at.selectbox(key="emb_slice").options == ["all"]
    assert any("A sweep keeps the vectors of the model's `text` stream" in c.value for c in at.caption)
    assert any(i.value.startswith("Fusion degree: n/a: the text stream holds only text tokens") for i in at.info)


# ---------------------------------------------------------------------------------------
# Probing
# ---------------------------------------------------------------------------------------


def make_probe_sweep(folder: str, n: int) -> AppTest:
    at = open_family(PROBING, folder, timeout=600)
    at.number_input(key="probe_sweep_n").set_value(n).run()
    at.button(key="probe_sweep_go").click().run()
    return at


def test_probing_a_clip_sweep_offers_its_image_tokens_and_says_why_words_cannot_be_probed(folders):
    at = make_probe_sweep(folders["clip"], 12)
    clean(at)  # the image CLS does not vary at the embedding layer: the probe fit used to raise LinAlgError
    kinds = at.selectbox(key="probe_kind").options
    assert kinds == ["image CLS", "image patches"]
    curve = next(f for s, fs in charts(at) for f in fs.values() if "series" in f.columns and "layer" in f.columns)
    assert sorted(curve["layer"].unique()) == [0, 1, 2]
    assert at.markdown[0].value.startswith("**answer** from **image CLS**")
    at.radio(key="probe_type").set_value("attention").run()
    clean(at)
    (note,) = [i.value for i in at.info if "attention probe does not apply" in i.value]
    assert "vision.self, text.self" in note and "representation probe applies" in note


def test_probing_a_blip_sweep_ranks_its_cross_attention_heads(folders):
    at = make_probe_sweep(folders["blip-itm"], 40)
    clean(at)
    assert at.selectbox(key="probe_kind").options == ["text [CLS]", "mean of the question's words",
                                                     "each word piece of the question"]
    at.radio(key="probe_type").set_value("attention").run()
    clean(at)
    heads = next(d.value for d in at.dataframe if "weight" in d.value.columns)
    assert len(heads) == 2 * 4  # text.cross: 2 layers x 4 heads
    assert "txtq_to_img_rank" not in heads.columns  # n/a on a cross block, left out of the rankings
    weights = next(f for s, fs in charts(at) for f in fs.values() if {"layer", "head", "mean"} <= set(f.columns))
    assert len(weights) == 8


# ---------------------------------------------------------------------------------------
# Annotations, Dataset browser, Home
# ---------------------------------------------------------------------------------------


def test_an_annotation_on_a_blip_view_is_listed_and_opens_its_page(folders):
    at = open_family(RUNNER, folders["blip-itm"], {"ex": EX})
    clean(at)
    at.text_input(key="annotator_name_input").set_value("carla")
    at.button(key="FormSubmitter:annotate-Save annotation").click().run()
    clean(at)
    trace, _ = reference(folders["blip-itm"])
    at = open_family("pages/6_Annotations.py", folders["blip-itm"])
    clean(at)
    table = at.dataframe[0].value
    assert table["model"].tolist() == [trace.model_id] and table["example_id"].tolist() == [EX]
    assert table["page"].tolist() == [RUNNER]


def test_the_browser_hands_an_example_to_the_folders_model(folders):
    at = open_family("pages/1_Dataset_Browser.py", folders["clip"])
    clean(at)
    next(b for b in at.button if b.key == "open_3").click().run()
    at.button(key="interpret").click().run()
    clean(at)
    assert at.title[0].value == "Run model" and at.query_params["ex"] == EX
    assert any(c.value.startswith("**CLIP / SigLIP**") for c in at.caption)
    assert len(overlays(at)) == 1


def test_home_keeps_showing_the_bundled_demo_whatever_model_is_picked(folders):
    at = open_family(None, folders["blip-itm"])
    clean(at)
    assert any("`vilt-tiny-easyvqa@" in c.value for c in at.caption)
    assert any("`llava-tiny-easyvqa@" in c.value for c in at.caption)  # both bundled demos, whatever is picked
    vilt, generative = overlays(at)
    assert len(vilt) == len(generative) == 64  # both read 64x64 images as 8x8 grids
    assert sum(m.value.startswith("**Prediction:**") for m in at.markdown) == 2
