"""The attention-block picker of the heatmaps and statistics pages (URL ``block``).

A model exposes named attention blocks (`vlcore.models.base.ModelAdapter.block_specs`: ViLT ``self``; BLIP
``vision.self``, ``text.self``, ``text.cross``; CLIP ``vision.self``, ``text.self``). A page views one at a time:
`pick_block` lists them with their titles in the sidebar when there is more than one, opens the link's ``block``
(a name the model does not have gets a one-line notice and the default block), and writes the choice back into
the URL. `select_block` is the trace viewing that block, one object per (trace, block), so that the caches keyed
on a trace object (its fingerprint, its chart data) keep working across reruns.
"""

from __future__ import annotations

import threading
import weakref

import streamlit as st

from vlcore.models.base import BlockSpec, ModelAdapter
from vlcore.trace import Trace
from vlcore.ui.state import get_choice, set_params

BLOCK_WIDGET = "attn_block"  # the sidebar selectbox's key

_SELECTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SELECTED_LOCK = threading.Lock()


def block_label(name: str, spec: BlockSpec) -> str:
    """How a block is named in the picker: its name, title and size.

    >>> block_label("text.cross", BlockSpec("text", "vision", 12, 12, False, "text -> image cross-attention"))
    'text.cross · text -> image cross-attention (12 × 12)'
    """
    title = f" · {spec.title}" if spec.title else ""
    return f"{name}{title} ({spec.n_layers} × {spec.n_heads})"


def block_names(adapter: ModelAdapter, trace: Trace | None = None) -> list[str]:
    """The adapter's blocks in display order; with a trace, only those it holds attentions for."""
    names = list(adapter.block_specs())
    if trace is not None:
        names = [n for n in names if n in trace.blocks and trace.blocks[n].attentions is not None]
    return names


def pick_block(adapter: ModelAdapter, trace: Trace | None = None) -> str:
    """The viewed block: a sidebar picker when the model has more than one, bound to the URL's ``block``.

    Args:
        adapter: the loaded model.
        trace: when given, only blocks whose attentions the trace holds are offered.

    Returns:
        A block name (the adapter's `default_block` unless the link or the picker names another).
    """
    specs = adapter.block_specs()
    names = block_names(adapter, trace) or [adapter.default_block]
    default = adapter.default_block if adapter.default_block in names else names[0]
    wanted = get_choice("block", names, default)  # anything else: a one-line notice and the default
    if len(names) == 1:
        set_params(block=None)
        return names[0]
    if st.session_state.get(BLOCK_WIDGET) not in (None, *names):  # another model's block
        del st.session_state[BLOCK_WIDGET]
    block = st.sidebar.selectbox("Attention block", names, index=names.index(wanted), key=BLOCK_WIDGET,
                                 format_func=lambda n: block_label(n, specs[n]) if n in specs else n,
                                 help="Which attention stack the page shows: a tower's self-attention, or a "
                                      "cross-attention (rows the text tokens, columns the image patches).")
    set_params(block=block)
    return block


def select_block(trace: Trace, block: str) -> Trace:
    """``trace.select(block)``, the same object for the same trace and block.

    Raises:
        KeyError: the trace has no such block.
    """
    if block == trace.view:
        return trace
    with _SELECTED_LOCK:
        known = _SELECTED.get(trace, {}).get(block)
    if known is not None:
        return known
    selected = trace.select(block)
    with _SELECTED_LOCK:
        _SELECTED.setdefault(trace, {})[block] = selected
    return selected
