"""What the analysis pages share: the model, example and trace named by the URL, and the sweep picker.

Every analysis page (statistics, heatmaps, embeddings) starts with `load_model` and then either
`load_example_trace` (one example: read from the store, computed on a miss, so a shared link to an
example nobody has run yet still opens) or `pick_sweep` (a stored sweep of the current model).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from vlcore.errors import VLScopeError
from vlcore.models.base import ModelAdapter
from vlcore.storage.store import Store
from vlcore.trace import Trace
from vlcore.ui.loaders import get_adapter, get_store
from vlcore.ui.state import get_head, get_int, get_param, notice, set_params

DEFAULT_EXAMPLE = "easy_vqa/test/0"
TRACE_MEMORY_ENTRIES = 4  # traces kept in memory, shared by every session of the server
TRACE_MEMORY_BYTES = 1 << 29  # and at most 512 MiB of their arrays (a ViLT-B trace of 234 tokens: ~21 MB)


@dataclass
class TraceContext:
    """The model, the store, the example and its full trace; ``key`` is the trace's store key, a fingerprint of
    the model, its processing, the example's content and the extraction settings (caches of results derived
    from the trace are keyed on it, never on the example's id or text)."""

    adapter: ModelAdapter
    store: Store
    example: object
    trace: Trace
    cached: bool
    key: str


def load_model() -> tuple[ModelAdapter, Store]:
    """Sidebar model picker, then the cached adapter; stops the page with a message on failure."""
    from vlcore.ui.widgets import model_picker, show_model_info

    store = get_store()
    source = model_picker()
    if not source:
        st.info("Enter a model to run.")
        st.stop()
    try:
        adapter = get_adapter(source)
    except VLScopeError as exc:
        st.error(str(exc))
        st.stop()
    show_model_info(adapter.info())
    return attention_picker(adapter), store


ATTENTION_LABELS = {"sdpa": "recomputed from sdpa (fast, default)", "eager": "eager attention (fallback)"}


def attention_picker(adapter: ModelAdapter) -> ModelAdapter:
    """Sidebar controls of a generative model: the most tokens greedy decoding writes (URL ``new``,
    `with_max_new_tokens`), and how its attention weights are obtained (URL ``attn``): the rows recomputed from
    the sdpa kernel's queries and keys, or the eager fallback (`with_attention`). Other models get none."""
    if not adapter.generates:
        return adapter
    from vlcore.models.generative import MAX_NEW_TOKENS_LIMIT
    from vlcore.ui.state import get_choice, get_int, set_params

    key = "attn_mode"
    if key not in st.session_state:
        st.session_state[key] = get_choice("attn", tuple(ATTENTION_LABELS), "sdpa")
    limit = MAX_NEW_TOKENS_LIMIT
    if "gen_max_new" not in st.session_state:
        st.session_state["gen_max_new"] = get_int("new", adapter.max_new_tokens, 1, limit)
    n_new = st.sidebar.number_input("Max new tokens", 1, limit, key="gen_max_new", step=1,
                                    help="Greedy decoding stops at the end token or after this many tokens.")
    set_params(new=None if n_new == adapter.max_new_tokens else str(n_new))
    adapter = adapter.with_max_new_tokens(int(n_new))
    mode = st.sidebar.radio("Attention weights", list(ATTENTION_LABELS), key=key, format_func=ATTENTION_LABELS.get,
                            help="sdpa: the model runs on its fast attention and the weights of the rows shown are "
                                 "recomputed from its queries and keys (equal to eager to 1e-4). Eager: the decoder "
                                 "runs on eager attention (every layer's full weights held; in float16 its outputs "
                                 "can differ from sdpa's).")
    set_params(attn=None if mode == "sdpa" else mode)
    return adapter.with_attention(mode)


class TraceMemory:
    """The last few traces read from a store, by store folder and key, so that a rerun does not read and
    decode the file again (~15 ms for a ViLT-B trace).

    Traces are frozen with read-only arrays, so every session can share one object. An entry is used only
    while the store still has the same file (same inode and size): a trace deleted, evicted, damaged or
    rewritten on disk goes through the store again (which recomputes a damaged one).
    """

    def __init__(self, max_entries: int = TRACE_MEMORY_ENTRIES, max_bytes: int = TRACE_MEMORY_BYTES):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[Trace, tuple, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _file_id(path: Path) -> tuple | None:
        try:
            st_ = os.stat(path)
        except OSError:
            return None
        return st_.st_dev, st_.st_ino, st_.st_size

    def get(self, store: Store, key: str) -> Trace | None:
        """The remembered trace, or None (not remembered, or its file changed or went away)."""
        name = (str(store.root), key)
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            return None
        path = store.trace_path(key)
        if self._file_id(path) != entry[1]:
            with self._lock:
                self._entries.pop(name, None)
            return None
        try:
            os.utime(path)  # recently used, as a read from the store marks it (LRU eviction on disk)
        except OSError:
            pass
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
        return entry[0]

    def put(self, store: Store, key: str, trace: Trace) -> None:
        """Remember a trace just read or stored (not when its file is missing or it alone is too big)."""
        size = sum(a.nbytes for a in (trace.attentions, trace.hidden, trace.image) if a is not None)
        file_id = self._file_id(store.trace_path(key))
        if file_id is None or size > self.max_bytes:
            return
        with self._lock:
            self._entries[(str(store.root), key)] = (trace, file_id, size)
            self._entries.move_to_end((str(store.root), key))
            while len(self._entries) > self.max_entries or sum(e[2] for e in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@st.cache_resource(show_spinner=False)
def trace_memory() -> TraceMemory:
    """The server's `TraceMemory` (one per process, shared by every session; cleared with Streamlit's caches)."""
    return TraceMemory()


class RememberingStore:
    """A `Store` whose trace look-ups try a `TraceMemory` first (everything else goes to the store)."""

    def __init__(self, store: Store, memory: TraceMemory):
        self._store, self._memory = store, memory
        self.last_key: str | None = None  # the key of the last trace asked for

    def get_or_compute_trace(self, key: str, compute) -> tuple[Trace, bool]:
        self.last_key = key
        trace = self._memory.get(self._store, key)
        if trace is not None:
            return trace, True
        trace, cached = self._store.get_or_compute_trace(key, compute)
        self._memory.put(self._store, key, trace)
        return trace, cached

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def load_example_trace(adapter: ModelAdapter, store: Store, image_pass: int = 0) -> TraceContext:
    """The trace of the URL's example (``ex``, default the first easy-VQA test question).

    The example is resolved through the URL's dataset (``ds``/``loc``/``split``...); its trace comes
    from the store or is computed now. Errors stop the page with a message. The last few traces stay in
    memory (`trace_memory`), so a rerun on the same example does not read the store again.
    """
    from vlcore.run.extract import trace_for_example
    from vlcore.ui.browser import example_from_url

    try:
        example = example_from_url(store)  # a bad link falls back to the bundled example, with a notice
    except VLScopeError as exc:
        st.error(str(exc))
        st.stop()
    remembering = RememberingStore(store, trace_memory())
    try:
        with st.spinner(f"Running {adapter.model_id} on {example.example_id}…"):
            trace, cached = trace_for_example(adapter, example, remembering, image_pass=image_pass)
    except VLScopeError as exc:
        st.error(str(exc))
        st.stop()
    for text in store.notices:
        st.info(text)
    store.notices.clear()
    return TraceContext(adapter, store, example, trace, cached, remembering.last_key)


def list_model_sweeps(store: Store, adapter: ModelAdapter, block: str | None = None) -> list[dict]:
    """Manifests of the stored sweeps of this model, newest first; with ``block``, only the sweeps of that
    attention block (a manifest without one summarised the model's default block)."""
    sweeps = [m for m in store.list_sweeps() if m.get("model_id") == adapter.model_id]
    if block is None:
        return sweeps
    return [m for m in sweeps if (m.get("block") or adapter.default_block) == block]


def sweep_label(manifest: dict) -> str:
    """How a sweep is named in pickers: dataset, size, completion and key prefix."""
    done = "" if manifest.get("complete") else " (unfinished)"
    return f"{manifest.get('dataset') or '?'} · {manifest.get('n_examples', '?')} examples{done} · {Path(manifest['path']).name[:12]}"


def pick_sweep(store: Store, adapter: ModelAdapter, block: str | None = None) -> Path | None:
    """Sidebar picker of this model's sweeps (URL ``sweep``), of one attention block when ``block`` is given;
    None when there is none."""
    sweeps = list_model_sweeps(store, adapter, block)
    if not sweeps:
        of_block = f" on block {block}" if block is not None and len(adapter.block_specs()) > 1 else ""
        st.info(f"No sweep of {adapter.model_id}{of_block} is stored yet. Run one on the **Run model** page "
                "(\"Sweep …\" expander), then come back.")
        return None
    keys = [Path(m["path"]).name for m in sweeps]
    wanted = get_param("sweep") or ""
    index = next((i for i, k in enumerate(keys) if wanted and k.startswith(wanted)), 0)
    if wanted and not keys[index].startswith(wanted):
        notice(f"The link's sweep `{wanted}` is not in this store; showing the newest sweep of this model.")
    index = st.sidebar.selectbox("Sweep", range(len(sweeps)), index=index, key="sweep_pick",
                                 format_func=lambda i: sweep_label(sweeps[i]))
    set_params(sweep=keys[index][:12])
    for note in sweeps[index].get("notices", []):  # damaged parts dropped, batch size lowered, ...
        st.info(f"This sweep: {note}")
    if not sweeps[index].get("complete", True):
        st.info("This sweep is unfinished: its statistics cover the examples done so far. Start it again on the "
                "Run model page to resume.")
    return Path(sweeps[index]["path"])


def pick_layer_head(n_layers: int, n_heads: int, allow_mean: bool = True, prefix: str = "") -> tuple[int, int | None]:
    """Sidebar layer and head selectors bound to the URL (``layer``, ``head``; ``head=mean`` is the mean).

    Returns:
        ``(layer, head)``; head None means the mean over heads.
    """
    layer = get_int("layer", n_layers - 1, 0, n_layers - 1)
    head = get_head(n_heads)
    options = (["mean"] if allow_mean else []) + list(range(n_heads))
    current = "mean" if head is None else head
    if current not in options:
        current = options[0]
    _fit_widget_state(f"{prefix}layer", list(range(n_layers)), layer)  # another block: other sizes
    _fit_widget_state(f"{prefix}head", options, current)
    if n_layers > 1:
        layer = st.sidebar.slider("Layer", 0, n_layers - 1, layer, key=f"{prefix}layer")
    else:
        layer = 0
        st.sidebar.caption("Layer 0 (the only layer)")
    pick = st.sidebar.selectbox("Head", options, index=options.index(current), key=f"{prefix}head",
                                format_func=lambda h: "mean over heads" if h == "mean" else f"head {h}")
    set_params(layer=layer, head=pick)
    return layer, None if pick == "mean" else int(pick)


def pick_rollout_start(n_layers: int) -> int:
    """Sidebar slider of rollout's first layer (0 with a single layer)."""
    _fit_widget_state("hm_rollout_start", list(range(n_layers)), 0)
    if n_layers < 2:
        return 0
    return int(st.sidebar.slider("Rollout from layer", 0, n_layers - 1, 0, key="hm_rollout_start"))


def _fit_widget_state(key: str, options: list, fallback) -> None:
    """Replace a widget's remembered value that the current options no longer hold (a block with fewer layers
    or heads) by ``fallback``, before the widget is drawn."""
    if key in st.session_state and st.session_state[key] not in options:
        st.session_state[key] = fallback
