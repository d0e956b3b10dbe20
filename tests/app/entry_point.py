"""A fixture that runs pages the way the server does: through the entry point ``streamlit_app.py`` and its
`st.navigation` (`vlcore.ui.navigation.run_app`).

AppTest re-detects the ``pages/`` folder before every run and then runs a page file on its own (Streamlit's
folder mode); the server leaves that mode for good on its first run (`vlcore.ui.state._leave_pages_folder_mode`).
"""

from __future__ import annotations

import pytest
from streamlit.runtime.pages_manager import PagesManager

FOLDER_MODE_INIT = PagesManager.__init__  # Streamlit's own: detects the pages/ folder


@pytest.fixture
def through_entry_point(monkeypatch):
    def without_folder_mode(self, *args, **kwargs):
        FOLDER_MODE_INIT(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", without_folder_mode)
    yield
    PagesManager.uses_pages_directory = None
