"""Which local files VLScope may read: everything a dataset or a link names must lie in a data root."""

from __future__ import annotations

import os
from pathlib import Path

from vlcore.errors import InputError

from vlcore.app_files import APP_ROOT as REPO_ROOT  # the checkout, or the installed vlscope_app


def data_roots() -> list[Path]:
    """Folders whose files may be read: the bundled ``sample_data``, the easy-VQA package data, the
    store's uploads and inputs, and every folder in ``VLSCOPE_DATA_ROOTS`` (``os.pathsep``-separated)."""
    from vlcore.store import default_root

    roots = [REPO_ROOT / "sample_data", default_root() / "uploads", default_root() / "inputs"]
    try:
        import easy_vqa

        roots.append(Path(easy_vqa.__file__).parent / "data")
    except ImportError:  # pragma: no cover - a dependency
        pass
    roots += [Path(p).expanduser() for p in os.environ.get("VLSCOPE_DATA_ROOTS", "").split(os.pathsep) if p]
    return [r.resolve() for r in roots]


def is_allowed(path: str | Path) -> bool:
    """True when ``path`` (resolved, symlinks followed, ``~`` expanded) lies inside a data root; False for a
    path that cannot be resolved (a NUL byte, an unknown ``~user``, a symlink loop)."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):
        return False
    return any(resolved == root or root in resolved.parents for root in data_roots())


def check_local_file(path: str | Path) -> Path:
    """The resolved path when it lies inside a data root.

    Raises:
        InputError: the path is outside every data root (a dataset or a link may not read it).
    """
    if not is_allowed(path):
        raise InputError(
            f"{Path(path).name!r} lies outside the folders VLScope may read; add its folder to "
            "VLSCOPE_DATA_ROOTS to allow it"
        )
    return Path(path).expanduser().resolve()
