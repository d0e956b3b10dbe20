"""Which local files VLScope may read: everything a dataset or a link names must lie in a data root."""

from __future__ import annotations

import os
from pathlib import Path

from vlcore.app_files import APP_ROOT as REPO_ROOT  # the checkout, or the installed vlscope_app
from vlcore.errors import InputError


def data_roots() -> list[Path]:
    """Folders whose files may be read: the bundled ``sample_data``, the easy-VQA package data, the
    store's uploads and inputs, and every folder in ``VLSCOPE_DATA_ROOTS`` (``os.pathsep``-separated)."""
    from vlcore.app_files import default_root

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


FINGERPRINT_MAX_ENTRIES = 4096  # files and folders stat-ed at most per fingerprint (a folder of images stops there)


def local_fingerprint(location: str | Path | None) -> str:
    """A fingerprint of the local file or folder a dataset is read from, for cache keys: it changes when a file
    is rewritten, replaced, added or removed, so a cache keyed on it never returns what an older file gave.

    A file gives its size, modification time (ns), inode and change time; a folder the same for itself, each
    entry and each entry of a subfolder (two levels: a ``save_to_disk`` DatasetDict keeps its Arrow files in
    one folder per split), at most `FINGERPRINT_MAX_ENTRIES` entries. As in `datasets`, stat data stand for the
    content, so a multi-gigabyte file is never read to key a cache. Anything else (a hub id, a missing path)
    gives "".

    >>> local_fingerprint("org/not-a-local-path"), local_fingerprint(None)
    ('', '')
    """
    import hashlib

    if not location:
        return ""
    path = Path(location).expanduser()
    try:
        entries = [path] if path.is_file() else _folder_entries(path) if path.is_dir() else []
    except OSError:
        return ""
    digest = hashlib.sha256()
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:  # removed while listed
            continue
        digest.update(f"{entry.relative_to(path) if entry != path else ''}|{st.st_size}|{st.st_mtime_ns}|"
                      f"{st.st_ino}|{st.st_ctime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16] if entries else ""


def _folder_entries(folder: Path) -> list[Path]:
    """The folder, its entries, then its subfolders' entries, at most `FINGERPRINT_MAX_ENTRIES` in all (listing
    stops there, so a folder of a million images costs no more than one of four thousand; the folder's own
    entries, where annotation files live, come first)."""
    from itertools import islice

    out = [folder, *sorted(islice(folder.iterdir(), FINGERPRINT_MAX_ENTRIES - 1))]
    for entry in out[1:]:
        if len(out) >= FINGERPRINT_MAX_ENTRIES:
            break
        if entry.is_dir():
            out += sorted(islice(entry.iterdir(), FINGERPRINT_MAX_ENTRIES - len(out)))
    return out
