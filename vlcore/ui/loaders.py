"""Cached loaders shared by the pages."""

from __future__ import annotations

import streamlit as st

from vlcore.models.base import ModelAdapter
from vlcore.models.registry import load_adapter
from vlcore.store import Store


@st.cache_resource(show_spinner="Loading model…", max_entries=2)
def get_adapter(source: str, revision: str | None = None, device: str = "auto") -> ModelAdapter:
    """A model adapter, loaded once per (source, revision, device)."""
    return load_adapter(source, revision=revision, device=device)


def get_store() -> Store:
    """The result store at ``VLSCOPE_CACHE`` (or the user cache dir); cheap to create."""
    return Store()
