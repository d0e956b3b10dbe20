"""Streamlit glue of the Embeddings page's shared-space section: a two-tower model's image and text
embeddings in the space its similarity compares them in, with the candidate labels.

Cached per model fingerprint, example set (source, split, file version, ids, the selected example's content) and
label list; the model passes run without attentions.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

SHARED_EXAMPLES = 16  # examples whose image and text embeddings the shared-space view shows by default
MAX_SHARED_LABELS = 50  # candidate labels drawn in the shared space at most
_JOINT_CHUNK = 32  # pairs per pass


def has_shared_space(adapter) -> bool:
    """Whether the model embeds images and texts in one space (it exposes ``joint_embeddings``)."""
    return adapter.has_joint_space


def extract_joint_embeddings(adapter, images: list, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(image [B, d], text [B, d])`` embeddings of image-text pairs (passes without attentions).

    Raises:
        InputError: what `ModelAdapter.encode` raises.
    """
    import torch

    from vlcore.models.base import Capture

    parts_i, parts_t = [], []
    for start in range(0, len(texts), _JOINT_CHUNK):
        batch = adapter.encode(list(images[start : start + _JOINT_CHUNK]), list(texts[start : start + _JOINT_CHUNK]))
        with torch.no_grad():
            out = adapter.capture(batch, Capture(blocks=(), hidden=False)).output
        img, txt = adapter.joint_embeddings(out)
        parts_i.append(np.asarray(img, np.float32))
        parts_t.append(np.asarray(txt, np.float32))
    return np.concatenate(parts_i), np.concatenate(parts_t)


def shared_space_frame(image_vecs: np.ndarray, text_vecs: np.ndarray, label_vecs: np.ndarray, example_ids: list[str],
                       texts: list[str], labels: list[str]) -> pd.DataFrame:
    """One PCA of the examples' image and text embeddings and the labels' text embeddings, all unit-normed.

    Args:
        image_vecs: ``[E, d]`` one image embedding per example.
        text_vecs: ``[E, d]`` each example's text embedding.
        label_vecs: ``[K, d]`` candidate labels' text embeddings (``K`` may be 0).
        example_ids, texts: per example; labels: per label.

    Returns:
        Columns ``kind`` (``image``/``text``/``label``), ``example_id`` ("" for labels), ``text``, ``x``, ``y``,
        ``cosine`` (with the example's image; for a label, with the first example's image).
    """
    from vlcore.analysis.projection import apply_pca, pca_components

    def unit(x):
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    img, txt = unit(image_vecs), unit(text_vecs)
    lab = unit(label_vecs) if len(label_vecs) else np.zeros((0, img.shape[1]), np.float32)
    allv = np.concatenate([img, txt, lab])
    coords = apply_pca(allv, *pca_components(allv)) if len(allv) >= 3 else np.zeros((len(allv), 2), np.float32)
    n, k = len(img), len(lab)
    return pd.DataFrame({
        "kind": ["image"] * n + ["text"] * n + ["label"] * k,
        "example_id": list(example_ids) * 2 + [""] * k,
        "text": ["(image)"] * n + list(texts) + list(labels),
        "x": coords[:, 0], "y": coords[:, 1],
        "cosine": np.concatenate([np.ones(n), (img * txt).sum(1), lab @ img[0] if n else np.zeros(k)]),
    })


@st.cache_data(max_entries=16, show_spinner="Embedding images and texts in the shared space…")
def shared_space(model_key: str, examples_key: str, labels: tuple[str, ...], _adapter, _examples) -> pd.DataFrame:
    """`shared_space_frame` of ``_examples`` (their first images and questions) and ``labels`` (read through the
    adapter's prompt template when it has one), once per model fingerprint, example set and label list."""
    images = [e.load_image() for e in _examples]
    texts = [e.question for e in _examples]
    img, txt = extract_joint_embeddings(_adapter, images, texts)
    label_vecs = np.zeros((0, img.shape[1]), np.float32)
    if labels:
        prompt = _adapter.prompt
        _, label_vecs = extract_joint_embeddings(_adapter, [images[0]] * len(labels), [prompt(lb) for lb in labels])
    return shared_space_frame(img, txt, label_vecs, [e.example_id for e in _examples], texts, list(labels))


def shared_space_for(adapter, source, example_id: str | None, store, n: int) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """`shared_space` of the selected example and the source's first ``n - 1`` others, with the candidate labels
    (the zero-shot labels in use, else the dataset's answers, at most `MAX_SHARED_LABELS`).

    Raises:
        VLScopeError: the example or the source cannot be read.
    """
    from vlcore.data.example import content_hash
    from vlcore.data.sources import resolve_example
    from vlcore.ui.prediction import answer_vocabulary

    examples = []
    if example_id:
        examples.append(resolve_example(example_id, store, source))
    for position in range(min(len(source), n + 1) if source is not None else 0):
        if len(examples) >= n:
            break
        example = source.example(position)
        if example.example_id not in {e.example_id for e in examples}:
            examples.append(example)
    labels = tuple((adapter.targets() or answer_vocabulary(source))[:MAX_SHARED_LABELS])
    model_key = json.dumps(adapter.fingerprint(), sort_keys=True, default=str)
    where = f"{getattr(source, 'key', '')}/{getattr(source, 'split', '')}@{getattr(source, 'fingerprint', '')}"
    first = examples[0]
    key = f"{where}|{[e.example_id for e in examples]}|{content_hash(first.load_image(), first.question)}"
    return shared_space(model_key, key, labels, adapter, examples), labels


def shared_space_panel(adapter, source, example_id: str, store) -> None:
    """The shared-space section: a slider for how many examples, the PCA of their image and text embeddings with
    the candidate labels, and the selected example's text and labels ranked by cosine with its image."""
    from vlcore.charts.embeddings import build_shared_space_chart
    from vlcore.errors import VLScopeError

    st.subheader("Image and text embeddings in the shared space")
    n = st.slider("Examples drawn (their images and texts)", 1, 64, SHARED_EXAMPLES, key="emb_shared_n")
    try:
        frame, labels = shared_space_for(adapter, source, example_id, store, n)
    except VLScopeError as exc:
        st.error(str(exc))
        return
    st.altair_chart(build_shared_space_chart(frame, example_id, f"One PCA of {len(frame):,} unit embeddings"))
    st.caption(f"The towers' final embeddings (what the similarity compares): {n} example(s)' images and texts, "
               "lines joining each pair" + (f", and {len(labels)} candidate label(s)" if labels else "")
               + ". Cosine similarity is the dot product of these unit vectors.")
    st.dataframe(shared_ranking(frame, example_id), hide_index=True, key="emb_shared_table",
                 column_config={"cosine": st.column_config.NumberColumn(format="%.4f")})


def shared_ranking(frame: pd.DataFrame, example_id: str) -> pd.DataFrame:
    """The selected example's text and the candidate labels, by cosine with that example's image (best first)."""
    own = frame[(frame["kind"] == "text") & (frame["example_id"] == example_id)]
    if frame["example_id"].iloc[0] == example_id:  # labels were scored against the first (selected) image
        own = pd.concat([own, frame[frame["kind"] == "label"]])
    return own[["kind", "text", "cosine"]].sort_values("cosine", ascending=False, ignore_index=True)
