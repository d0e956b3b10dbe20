"""Cached loaders shared by the pages."""

from __future__ import annotations

import streamlit as st

from vlcore.models.base import ModelAdapter
from vlcore.models.registry import load_adapter
from vlcore.storage.store import Store


@st.cache_resource(show_spinner="Loading model…", max_entries=2)
def get_adapter(source: str, revision: str | None = None, device: str = "auto") -> ModelAdapter:
    """A model adapter, loaded once per (source, revision, device) and shared by every session.

    Sessions may run passes through it at the same moment: hooked passes (head masking, gradient relevancy)
    attach their hooks through `ModelAdapter.hooked`, which confines them to their own call, so a plain pass
    in another session is never changed by them (`vlcore.models.hooks`).
    """
    return load_adapter(source, revision=revision, device=device)


def get_store() -> Store:
    """The result store at ``VLSCOPE_CACHE`` (or the user cache dir); cheap to create."""
    return Store()
