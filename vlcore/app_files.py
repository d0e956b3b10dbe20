"""Where the app's own files live: the Streamlit scripts, the bundled demo model and the app's settings.

In a checkout they sit at the repository root (``streamlit_app.py``, ``pages/``, ``sample_data/``,
``.streamlit/``). ``pip install`` copies the same files into the ``vlscope_app`` package (see
``pyproject.toml``), where an installed VLScope finds them; ``vlscope app`` runs them from there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import vlcore

MAIN_SCRIPT = "streamlit_app.py"
INSTALLED_PACKAGE = "vlscope_app"


def app_root() -> Path:
    """The folder holding ``streamlit_app.py``, ``pages/``, ``sample_data/`` and ``.streamlit/``.

    The checkout's root when ``vlcore`` is imported from a checkout, else the installed ``vlscope_app``
    package; the checkout's root (even if incomplete) when neither holds the main script.
    """
    checkout = Path(vlcore.__file__).resolve().parents[1]
    if (checkout / MAIN_SCRIPT).is_file():
        return checkout
    spec = importlib.util.find_spec(INSTALLED_PACKAGE)
    for location in (spec.submodule_search_locations or ()) if spec is not None else ():
        if (Path(location) / MAIN_SCRIPT).is_file():
            return Path(location).resolve()
    return checkout


APP_ROOT = app_root()
DEMO_MODEL_DIR = APP_ROOT / "sample_data" / "models" / "vilt-tiny-easyvqa"
GENERATIVE_DEMO_DIR = APP_ROOT / "sample_data" / "models" / "llava-tiny-easyvqa"  # scripts/train_demo_lvlm.py


def default_root() -> Path:
    """``$VLSCOPE_CACHE`` or the platform's user cache dir for "vlscope"."""
    env = os.environ.get("VLSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vlscope"))
