"""Streamlit glue for what a model says about one example, for every family: the family and its task, the
prediction (answers, or a pair's score), the scores a target explains, the map of the row that explains it, and
the zero-shot task with its candidate labels.

Nothing here names a family: it reads the adapter contract (`vlcore.models.base`): ``answers_compare`` decides
whether gold answers and accuracy apply, ``targets`` and ``target_score`` give the scores, ``default_query`` the
row whose attention over the image explains the prediction, ``tasks`` whether zero-shot classification is offered
(through the adapter's ``with_candidates``, when it has one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from vlcore.errors import VLScopeError
from vlcore.models.base import TASK_NAMES, Capture
from vlcore.models.registry import families
from vlcore.trace import ROLE_PATCH, Trace
from vlcore.ui.state import get_param, set_params

ZERO_SHOT = "zero_shot"  # the task key of TASK_NAMES for zero-shot classification over candidate labels
MAX_VOCABULARY = 200  # a dataset's most frequent answers offered as default candidate labels
MAX_SCORED_TARGETS = 12  # pair-scoring models: every target scored when there are at most this many


def family_title(adapter) -> str:
    """The adapter's family as users name it (its registry entry's title), or its short name."""
    return next((f.title for f in families() if f.name == adapter.family), str(adapter.family))


def task_text(task: str) -> str:
    """What a task means to a user (`TASK_NAMES`), or the key itself."""
    return TASK_NAMES.get(task, task)


def per_stream(value) -> str:
    """A per-tower figure (``{"vision": 12, "text": 12}``) or a plain one, as text.

    >>> per_stream({"vision": 2, "text": 4}), per_stream(12)
    ('vision 2, text 4', '12')
    """
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def model_summary(adapter) -> str:
    """One line: family, the loaded task, the family's other tasks, and the attention blocks."""
    others = [t for t in getattr(adapter, "tasks", ()) if t != adapter.task]
    blocks = "; ".join(f"`{name}` {spec.title or f'{spec.query} → {spec.key}'} ({spec.n_layers} × {spec.n_heads})"
                       for name, spec in adapter.block_specs().items())
    also = f" · the family also does: {'; '.join(task_text(t) for t in others)}" if others else ""
    return f"**{family_title(adapter)}** · task: {task_text(adapter.task)}{also} · attention blocks: {blocks}"


# ---------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------


def answer_vocabulary(source, limit: int = MAX_VOCABULARY) -> list[str]:
    """A dataset's gold answers, most frequent first (ties alphabetical), at most ``limit``: the default candidate
    labels of zero-shot classification. Empty when the dataset has no answers."""
    if source is None or "answers" not in source.index.columns:
        return []
    counts = pd.Series([str(a).strip() for row in source.index["answers"] for a in (row or ()) if str(a).strip()],
                       dtype=object).value_counts()
    if counts.empty:
        return []
    frame = counts.rename_axis("label").reset_index(name="n").sort_values(["n", "label"], ascending=[False, True])
    return frame["label"].head(limit).tolist()


def parse_candidates(text: str) -> list[str]:
    """Comma-separated labels, trimmed, empty and repeated ones dropped, in order.

    >>> parse_candidates(" red, blue ,, red,green ")
    ['red', 'blue', 'green']
    """
    return list(dict.fromkeys(part.strip() for part in (text or "").split(",") if part.strip()))


def task_picker(adapter, source=None):
    """Sidebar choice of the task for a model that can also classify over candidate labels (zero-shot): the
    adapter as loaded, or a view of it with the candidate labels (URL ``task=zero_shot`` and, when typed,
    ``labels``). The labels default to the dataset's answer vocabulary (`answer_vocabulary`).

    Returns:
        The adapter to run: the one given, or its zero-shot view (the shared adapter is never changed).
    """
    if not adapter.takes_candidates or adapter.candidates:
        return adapter
    modes = (adapter.task, ZERO_SHOT)
    wanted = get_param("task")
    mode = st.sidebar.radio("Task", modes, index=modes.index(wanted) if wanted in modes else 0, key="task_mode",
                            format_func=task_text)
    if mode != ZERO_SHOT:
        set_params(task=None, labels=None)
        return adapter
    vocabulary = answer_vocabulary(source)
    default = ", ".join(vocabulary)
    typed = st.sidebar.text_area("Candidate labels (comma-separated)", value=get_param("labels") or default,
                                 key="zs_labels", help="The dataset's answers by default; type your own.")
    labels = parse_candidates(typed)
    set_params(task=ZERO_SHOT, labels=None if typed.strip() == default else typed.strip())
    st.sidebar.caption(f"{len(labels)} candidate label(s)" + (" (the dataset's answers)" if typed.strip() == default
                                                               and vocabulary else ""))
    if not labels:
        st.sidebar.error("Type at least one candidate label (comma-separated); showing image-text similarity "
                         "until then.")
        return adapter
    try:
        return adapter.with_candidates(labels)
    except VLScopeError as exc:
        st.sidebar.error(f"{exc}; showing image-text similarity until then.")
        return adapter


# ---------------------------------------------------------------------------------------
# The prediction
# ---------------------------------------------------------------------------------------


def show_prediction(trace: Trace, adapter) -> None:
    """The prediction as the task gives it: answers (top-k bars, gold and verdict) where gold answers compare
    (`ModelAdapter.answers_compare`), else the pair's score with a line saying why gold does not apply."""
    from vlcore.charts.base import build_prediction_chart

    if not trace.prediction:
        st.info(f"{adapter.model_id} has no prediction head ({task_text(adapter.task)}): the attention and the "
                "hidden states are still there to look at.")
        return
    top, value = trace.prediction[0]
    if adapter.generates:
        show_generated_tokens(trace)
    if adapter.answers_compare:
        verdict = {True: " · ✅ correct", False: " · ❌ incorrect", None: ""}[trace.correct if trace.gold else None]
        gold = f" · **gold:** {', '.join(trace.gold)}" if trace.gold else ""
        st.markdown(f"**Prediction:** {top} ({value:.1%}){gold}{verdict}")
        st.altair_chart(build_prediction_chart(list(trace.prediction), trace.gold), width="stretch")
        return
    name = "" if top == trace.text else f"{top} · "  # a similarity's label is the text itself
    st.markdown(f"**Prediction:** {name}**{value:.3f}** — {task_text(adapter.task)}")
    if trace.gold:
        st.caption(f"Gold answers ({', '.join(trace.gold)}) do not apply: this model scores the image-text pair "
                   f"({task_text(adapter.task)}), it gives no answer to compare; there is no accuracy either.")


HEATMAPS_PAGE = "pages/4_Attention_Heatmaps.py"


def show_generated_tokens(trace: Trace) -> None:
    """A generated answer token by token: each token a link that opens its attention (its row of the block whose
    queries are the generated tokens) on the Heatmaps page, with the logit lens's probability of it at the last
    layer when the trace has one."""
    from vlcore.ui.state import carried_params

    block = next((name for name, b in trace.blocks.items() if b.query == "generated"), None)
    layout = trace.streams.get("generated")
    if block is None or layout is None or not layout.n_tokens:
        return
    lens = trace.meta.get("lens") or {}
    final = (lens.get("prob") or [None])[-1]
    st.markdown("**Answer, token by token** (click a token to see what it looked at):")
    params = {**carried_params(), "block": block}
    params.pop("tok", None)
    columns = st.columns(min(layout.n_tokens, 8))
    for t, token in enumerate(layout.tokens):
        shown = token.strip() or repr(token)
        help_text = f"step {t}" + (f" · p = {final[t]:.3f} at the last layer" if final and t < len(final) else "")
        columns[t % len(columns)].page_link(HEATMAPS_PAGE, label=f"{t}: {shown}", query_params={**params, "tok": str(t)},
                                            help=help_text)


@dataclass(frozen=True)
class PairScores:
    """The scores a pair-scoring model gives one example: a row per target it can explain, and the cosine of
    the image and text embeddings where the model has a shared space."""

    table: pd.DataFrame  # columns target, score, probability
    cosine: float | None


def compute_pair_scores(adapter, image, text: str) -> PairScores:
    """One pass without attentions; `ModelAdapter.target_score` of the default target and, when there are at most
    `MAX_SCORED_TARGETS`, of every target (e.g. an image-text matching head's and a similarity score)."""
    import torch

    targets = adapter.targets()
    wanted = [None, *(targets if len(targets) <= MAX_SCORED_TARGETS else [])]
    batch = adapter.encode([image], [text])
    with torch.no_grad():
        output = adapter.capture(batch, Capture(blocks=(), hidden=False)).output
        rows = {}
        for target in wanted:
            score, prob, label = adapter.target_score(output, target)
            rows.setdefault(label, (float(score[0]), float(prob[0])))
    cosine = None
    if adapter.has_joint_space:
        img, txt = adapter.joint_embeddings(output)
        cosine = float(np.dot(img[0], txt[0]) / max(np.linalg.norm(img[0]) * np.linalg.norm(txt[0]), 1e-12))
    table = pd.DataFrame([(k, s, p) for k, (s, p) in rows.items()], columns=["target", "score", "probability"])
    return PairScores(table, cosine)


@st.cache_data(max_entries=64, show_spinner=False)
def _pair_scores(model_key: str, example_key: str, _adapter, _image, _text: str) -> PairScores:
    """`compute_pair_scores`, once per model fingerprint and example content (``_adapter``, ``_image`` and
    ``_text`` are what those keys name)."""
    return compute_pair_scores(_adapter, _image, _text)


def show_pair_scores(adapter, example, image_pass: int = 0) -> None:
    """For a model that scores the pair (no answers): every score it can explain, and the shared-space cosine."""
    from vlcore.data.example import content_hash
    from vlcore.run.extract import model_image_input

    if adapter.answers_compare or adapter.n_passes != 1 or image_pass:
        return
    image = model_image_input(adapter, example)
    model_key = json.dumps(adapter.fingerprint(), sort_keys=True, default=str)
    scores = _pair_scores(model_key, f"{example.example_id}|{content_hash(image, example.question)}", adapter, image,
                          example.question)
    st.dataframe(scores.table, hide_index=True, key="pair_scores", column_config={
        "score": st.column_config.NumberColumn("score (logit, log-odds or similarity)", format="%.4f"),
        "probability": st.column_config.NumberColumn("probability (the similarity where one pair has none)",
                                                     format="%.4f")})
    if scores.cosine is not None:
        st.markdown(f"**Cosine similarity** of the image and text embeddings in the shared space: "
                    f"**{scores.cosine:.4f}**")


# ---------------------------------------------------------------------------------------
# The row that explains the prediction, over the image
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplainingMap:
    """The attention of the row that explains the prediction, over the image's patches.

    Attributes:
        trace: the trace viewing the block the row is in (its keys hold the patches).
        values: float32 ``[K]`` the row, last layer, mean over heads.
        title: what the map shows.
    """

    trace: Trace
    values: np.ndarray
    title: str


def explaining_map(trace: Trace, adapter) -> ExplainingMap | None:
    """The first block (the trace's view first) whose keys hold image patches and that has a default query
    (`ModelAdapter.default_query`): that query's last-layer row, mean over heads (a joint encoder's [CLS] over
    its sequence, a cross-attention decoder's [CLS] over the image, a tower's image CLS or its pooling probe).
    None when no block has one."""
    specs = adapter.block_specs()
    for name in dict.fromkeys([trace.view, *trace.blocks]):
        view = trace.select(name)
        if view.attentions is None or not len(view.key_layout.index(ROLE_PATCH)):
            continue
        query = adapter.default_query(name, view.layout)
        if query is None:
            continue
        values = view.head_attention(view.n_layers - 1, None)[query]
        spec = specs.get(name)
        what = spec.title if spec is not None and spec.title else name
        return ExplainingMap(view, values, f"{view.tokens[query]} attention over the image · {what} · last layer, "
                                           "mean over heads")
    return None
