"""The app's pages and the run around each of them (called by ``streamlit_app.py``, the entry point).

`st.navigation` names the first page "Home" (the ``pages/`` folder alone would call it after the entry point's
file, "streamlit app"), keeps every other page's title and URL path (``pages/4_Attention_Heatmaps.py`` is
"Attention Heatmaps" at ``/Attention_Heatmaps``), and lets one place wrap every page: before it runs, the view
carried across pages comes back (`vlcore.ui.state.begin_run`); after it, the run's URL writes are applied in one
update (`vlcore.ui.state.apply_params`).
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from vlcore.app_files import APP_ROOT as ROOT  # the checkout, or the installed vlscope_app (pip install .)
from vlcore.ui.state import apply_params, begin_run

HOME_TITLE = "Home"
NOT_CARRYING = ("pages/6_Annotations.py",)  # its ``ex`` is a filter, not the example being looked at


def page_files() -> list[str]:
    """The page scripts, ``pages/N_Title.py``, in their number order."""
    return sorted(f"pages/{p.name}" for p in (ROOT / "pages").glob("*.py"))


def run_app(home: Callable[[], None]) -> None:
    """Register the pages (``home`` first, titled Home), then run the one the URL asks for."""
    files = page_files()
    pages = [st.Page(home, title=HOME_TITLE, default=True), *(st.Page(f) for f in files)]
    current = st.navigation(pages)
    script = next((f for f, p in zip(files, pages[1:]) if p.url_path == current.url_path), None)
    begin_run(current.url_path, carries=script is not None and script not in NOT_CARRYING)
    current.run()
    apply_params()
