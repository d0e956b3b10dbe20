"""Streamlit pieces of the dataset browser: source picker, thumbnail grid, detail view."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import streamlit as st

from vlcore.data.browse import answers_html, draw_regions, fact_html, highlight_mentions, make_thumbnail
from vlcore.data.catalog import list_sources
from vlcore.data.example import image_notes
from vlcore.data.paths import local_fingerprint
from vlcore.data.sources import ExampleSource, check_location, easy_vqa_source, open_source
from vlcore.errors import VLScopeError
from vlcore.ui.state import get_param, notice, set_params

RUNNER_PAGE = "pages/2_Run_Model.py"
GRID_COLUMNS = 6
BUNDLED_EXAMPLE = "easy_vqa/test/0"  # what a link shows when its dataset or example cannot be opened
SOURCE_PARAMS = ("ds", "loc", "img", "cfg", "map", "stream", "split")


def get_source(kind: str, location: str, config: str | None, split: str, streaming: bool = False,
               images: str | None = None, mapping: tuple | None = None) -> ExampleSource:
    """An example source, opened once per argument set and version of its local files.

    The cache key holds every argument and the fingerprint of the files read (`local_fingerprint` of the
    location and the images), never the path alone: a dataset rewritten under the same path is indexed again.

    Raises:
        VLScopeError: the location is refused, or the source cannot be opened.
    """
    if kind == "easy_vqa":
        return _open_source("easy_vqa", "easy_vqa", None, split, False, None, None, "")
    location = check_location(location)
    images = check_location(images) if images else None
    fingerprint = local_fingerprint(location) + (f"+{local_fingerprint(images)}" if images else "")
    return _open_source(kind, location, config, split, streaming, images, mapping, fingerprint)


@st.cache_resource(show_spinner="Indexing the dataset…", max_entries=4)
def _open_source(kind: str, location: str, config: str | None, split: str, streaming: bool, images: str | None,
                 mapping: tuple | None, fingerprint: str) -> ExampleSource:
    """`get_source`'s cached part; ``fingerprint`` (the files' version) changes the result like every argument."""
    if kind == "easy_vqa":
        return easy_vqa_source(split)
    source = open_source(kind, location, split, config or None, streaming, images, dict(mapping) if mapping else None)
    return dataclasses.replace(source, fingerprint=fingerprint)


def get_features(location: str, config: str | None, split: str, streaming: bool = False) -> dict:
    """Column name -> feature description of a dataset, for the generic column mapping (cached per version of
    the dataset's files, as `get_source`)."""
    location = check_location(location)
    return _read_features(location, config, split, streaming, local_fingerprint(location))


@st.cache_resource(show_spinner="Reading the dataset's columns…", max_entries=4)
def _read_features(location: str, config: str | None, split: str, streaming: bool, fingerprint: str) -> dict:
    from vlcore.data.generic import describe_features
    from vlcore.data.hub import SourceSpec, load_source

    ds = load_source(SourceSpec(location, split=split, config=config, streaming=streaming))
    return {"features": ds.features, "described": describe_features(ds.features)}


def encode_mapping(mapping: tuple | None) -> str | None:
    """URL form of a column mapping: ``image:picture,question:prompt``.

    >>> encode_mapping((("image", "picture"), ("question", "prompt")))
    'image:picture,question:prompt'
    """
    return ",".join(f"{role}:{col}" for role, col in mapping) if mapping else None


def decode_mapping(text: str | None) -> dict:
    """Inverse of `encode_mapping`; malformed parts are ignored.

    >>> decode_mapping("image:picture,question:prompt,junk")
    {'image': 'picture', 'question': 'prompt'}
    """
    pairs = (part.split(":", 1) for part in (text or "").split(",") if ":" in part)
    return {role.strip(): col.strip() for role, col in pairs if role.strip() and col.strip()}


def mapping_picker(location: str, config: str | None, split: str, streaming: bool = False) -> tuple:
    """Sidebar selectboxes mapping the dataset's columns to image, question, answer, category and id."""
    from vlcore.data.generic import propose_mapping

    found = get_features(location, config, split, streaming)
    columns = list(found["described"])
    from_url = {r: c for r, c in decode_mapping(get_param("map")).items() if c in columns}
    proposed = {**propose_mapping(found["features"]), **from_url}
    mapping = {}
    with st.sidebar.expander("Column mapping", expanded=True):
        for role in ("image", "question", "answer", "category", "id", "image2"):
            options = ([] if role == "image" else ["(none)"]) + columns
            default = proposed.get(role, options[0])
            pick = st.selectbox(role, options, index=options.index(default), key=f"map_{role}",
                                format_func=lambda c: f"{c} ({found['described'][c]})" if c in found["described"] else c)
            if pick != "(none)":
                mapping[role] = pick
    return tuple(sorted(mapping.items()))


def save_upload(upload) -> str:
    """Keep an uploaded parquet/JSON dataset file under the store's uploads folder; returns its path."""
    import hashlib
    from pathlib import Path

    from vlcore.app_files import default_root
    from vlcore.storage.store import atomic_write_bytes

    data = upload.getvalue()
    suffix = Path(upload.name).suffix.lower()
    path = default_root() / "uploads" / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if not path.exists():
        atomic_write_bytes(path, data)
    return str(path)


def thumbnail_png(source: ExampleSource, args: tuple, position: int) -> bytes | None:
    """PNG bytes of one example's thumbnail (``source`` is `get_source(*args)`), or None when unreadable.

    Cached on the source's fingerprint and the image file's (`local_fingerprint`), not on the position alone:
    a dataset or an image replaced under the same path gets a new thumbnail.
    """
    try:
        example = source.example(position)
    except VLScopeError:
        return None
    image_version = local_fingerprint(example.image_path) if example.image_path else ""
    return _thumbnail_png(args, source.fingerprint, position, image_version, example)


@st.cache_data(show_spinner=False, max_entries=4096)
def _thumbnail_png(args: tuple, fingerprint: str, position: int, image_version: str, _example) -> bytes | None:
    """`thumbnail_png`'s cached part; ``_example`` is the one at ``position`` of that source version."""
    try:
        image = _example.load_image()
    except VLScopeError:
        return None
    buf = io.BytesIO()
    make_thumbnail(image).save(buf, format="PNG")
    return buf.getvalue()


def source_picker() -> ExampleSource | None:
    """Sidebar controls choosing a source, location, config and split; the choice goes into the URL.

    Raises:
        VLScopeError: the source cannot be opened (offline hub, bad path, missing split, ...).
    """
    infos = {i.name: i for i in list_sources()}
    names = list(infos)
    current = get_param("ds", "easy_vqa")
    kind = st.sidebar.selectbox("Source", names, index=names.index(current) if current in names else 0,
                                format_func=lambda n: infos[n].title, key="ds")
    info = infos[kind]
    location = config = images = None
    streaming = False
    if info.needs_location:
        location = st.sidebar.text_input("Hub id or path", value=get_param("loc", "") or "", key="loc",
                                         help=info.location_help).strip()
        upload = st.sidebar.file_uploader("…or upload a parquet / JSON file", type=["parquet", "json", "jsonl"],
                                          key="data_upload")
        if upload is not None:
            location = save_upload(upload)
        config = st.sidebar.text_input("Config (optional)", value=get_param("cfg", "") or "", key="cfg").strip() or None
        if kind in ("vcr", "webqa"):
            images = st.sidebar.text_input("Images (vcr1images folder / imgs.tsv)", value=get_param("img", "") or "",
                                           key="images").strip() or None
        streaming = st.sidebar.checkbox("Stream (first 1,000 rows of a large hub set)", key="stream",
                                        value=get_param("stream") == "1")
    splits = list(info.splits) or ["train"]
    wanted = get_param("split", splits[0])
    if info.splits:
        split = st.sidebar.selectbox("Split", splits, index=splits.index(wanted) if wanted in splits else 0, key="split")
    else:
        split = st.sidebar.text_input("Split", value=wanted or "train", key="split").strip() or "train"
    set_params(ds=kind, loc=location or None, img=images, cfg=config, split=split, stream="1" if streaming else None)
    if info.needs_location and not location:
        st.info(f"Enter {info.location_help or 'a hub id or a local path'} in the sidebar.")
        return None
    mapping = mapping_picker(location, config, split, streaming) if kind == "generic" else None
    set_params(map=encode_mapping(mapping))
    args = (kind, location or kind, config, split, streaming, images, mapping)
    st.session_state["source_args"] = args
    return get_source(*args)


def render_grid(source: ExampleSource, positions: np.ndarray) -> int | None:
    """A grid of thumbnails with an Open button each; returns the clicked position."""
    args = st.session_state["source_args"]
    chosen = None
    for row_start in range(0, len(positions), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, pos in zip(cols, positions[row_start : row_start + GRID_COLUMNS]):
            with col:
                png = thumbnail_png(source, args, int(pos))
                if png is None:
                    st.warning("image unavailable")
                else:
                    st.image(png, width="stretch")
                st.caption(str(source.index["question"].iloc[pos])[:80])
                if st.button("Open", key=f"open_{pos}"):
                    chosen = int(pos)
    return chosen


def render_detail(source: ExampleSource, example_id: str) -> None:
    """The opened example: image with boxes, question, choices with gold, facts, and the hand-over."""
    example = source.find(example_id)
    st.divider()
    st.subheader(f"Example `{example.example_id}`")
    for warning in example.meta.get("warnings", []):
        st.warning(warning)
    left, right = st.columns([1, 1])
    with left:
        try:
            image = example.load_image()
            st.image(draw_regions(image, example.regions) if example.regions else image, width="stretch")
            for note in image_notes(image):  # first frame of a GIF, EXIF rotation, 16-bit grey, padding...
                st.caption(f"Image: {note}.")
        except VLScopeError as exc:
            st.warning(f"No image to show: {exc}")
    with right:
        mentions = example.meta.get("mentions", {})
        st.html(f"<p style='font-size:1.2em'>{highlight_mentions(example.question, mentions.get('question', []))}</p>")
        if example.answers:  # dataset text goes out as escaped HTML, never as markdown or raw HTML
            st.html(f"<p>{answers_html(example.answers)}</p>")
        _choices("Answers", example.answer_choices, example.answer_label, mentions.get("answer_choices", []))
        _choices("Rationales", example.rationale_choices, example.rationale_label, mentions.get("rationale_choices", []))
        _facts(example)
        if example.category:
            st.caption(f"{source.categories_label}: {example.category}")
        if st.button("Interpret this example", key="interpret", type="primary"):
            params = {k: v for k, v in st.query_params.to_dict().items() if k in ("ds", "loc", "img", "cfg", "split", "map", "stream", "model", "q", "cat", "ans", "obj")}
            st.switch_page(RUNNER_PAGE, query_params={**params, "ex": example.example_id})


def _choices(title: str, choices, gold: int | None, mentions: list) -> None:
    if not choices:
        return
    st.markdown(f"**{title}**")
    for i, text in enumerate(choices):
        spans = mentions[i] if i < len(mentions) else []
        mark = " ✅ <i>(gold)</i>" if gold == i else ""
        st.html(f"<div>{chr(65 + i)}. {highlight_mentions(text, spans)}{mark}</div>")


def _facts(example) -> None:
    if not example.facts:
        return
    st.markdown("**Facts** (✅ positive)")
    st.html("".join(f"<div>{fact_html(fact)}</div>" for fact in example.facts))


def source_from_url() -> ExampleSource:
    """The source named by the URL (``ds``, ``loc``, ``cfg``, ``split``); easy-VQA test by default.

    Raises:
        VLScopeError: the source cannot be opened.
    """
    kind = get_param("ds", "easy_vqa") or "easy_vqa"
    split = get_param("split", "test") or "test"
    if kind == "easy_vqa":
        return get_source("easy_vqa", "easy_vqa", None, split if split in ("train", "test") else "test")
    mapping = tuple(sorted(decode_mapping(get_param("map")).items())) or None
    return get_source(kind, get_param("loc", "") or "", get_param("cfg"), split, get_param("stream") == "1",
                      get_param("img"), mapping)


def use_bundled_source() -> None:
    """Button callback: switch the browser to the bundled easy-VQA test split."""
    st.session_state["ds"] = "easy_vqa"
    st.session_state["split"] = "test"
    set_params(ds="easy_vqa", loc=None, cfg=None, img=None, map=None, stream=None, split="test", ex=None)


def _sentence(exc: Exception) -> str:
    """An error message as a sentence ending in exactly one full stop (messages may or may not end in one).

    >>> _sentence(ValueError("no such file")), _sentence(ValueError("refused (see the docs)."))
    ('no such file.', 'refused (see the docs).')
    """
    text = str(exc).strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def example_from_url(store=None):
    """The `Example` the URL names: ``ex`` in the URL's dataset (``ds``, ``loc``, ``split``, ...).

    A link whose dataset cannot be opened, or whose example is not in its dataset, shows the bundled
    easy-VQA example `BUNDLED_EXAMPLE` instead (an easy-VQA or upload ``ex`` is kept when only the dataset
    failed), with a one-line notice saying why; the URL is rewritten to name what is shown.

    Args:
        store: the result store, to resolve ``upload/...`` ids.

    Raises:
        VLScopeError: the bundled example itself cannot be loaded.
    """
    from vlcore.data.sources import resolve_example

    example_id = get_param("ex") or BUNDLED_EXAMPLE
    try:
        source = source_from_url()
    except VLScopeError as exc:
        if (get_param("ds") or "easy_vqa") == "easy_vqa":
            raise
        set_params(**dict.fromkeys(SOURCE_PARAMS))  # the dataset is refused: fall back to the bundled one
        return _fall_back(exc, store, example_id)
    try:
        return resolve_example(example_id, store, source)
    except VLScopeError as exc:
        if example_id == BUNDLED_EXAMPLE:
            raise
        return _fall_back(exc, store, None)


def _fall_back(exc: Exception, store, example_id: str | None):
    """``example_id`` without a dataset (easy-VQA and upload ids), else `BUNDLED_EXAMPLE`; says why in a notice."""
    from vlcore.data.sources import resolve_example

    example = None
    if example_id:
        try:
            example = resolve_example(example_id, store, None)
        except VLScopeError:
            example = None
    if example is None:
        example = resolve_example(BUNDLED_EXAMPLE, store, None)
        set_params(ex=None)
        shown = f"the bundled easy-VQA example {BUNDLED_EXAMPLE}"
    else:
        shown = f"{example.example_id} from the bundled easy-VQA samples" if example.source == "easy_vqa" \
            else example.example_id
    notice(f"{_sentence(exc)} Showing {shown} instead.")
    return example
