"""Where a sweep folder lives: a local folder, or a URL (``s3://``, ``gs://``, ``file://``, any fsspec protocol).

Workers on other machines cannot write to the driver's disk, so a Ray sweep's workers write their parts
straight to the target. The driver reads and checks the folder (`vlcore.run.sweep`'s own functions: manifest,
finished ids, merging) on a local copy of it, a *staging* folder, and pushes what changed back. For a local
path the staging folder is the output folder itself and nothing is copied.

URLs go through pyarrow's filesystems (``s3``, ``gs``, ``hdfs``, ``file``); any other protocol fsspec knows
(``memory``, ``az`` with adlfs, ``hf``) is wrapped with ``pyarrow.fs.FSSpecHandler``.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from vlcore.errors import InputError
from vlcore.storage.store import atomic_write_bytes

# Written last when a sweep is merged (predictions mark completion), and the manifest after it.
_LAST = ("predictions.parquet", "manifest.json")


def is_url(out: str | Path) -> bool:
    """True for ``scheme://...`` (a path with no scheme is a local folder).

    >>> is_url("s3://bucket/sweep"), is_url("runs/sweep"), is_url(Path("/tmp/x"))
    (True, False, False)
    """
    return isinstance(out, str) and "://" in out


@dataclass
class SweepTarget:
    """A sweep folder at a local path or a URL; picklable, so workers get it whole.

    Attributes:
        where: what the user gave (path or URL), for messages.
        fs: the pyarrow filesystem, None for a local folder.
        path: the folder inside ``fs`` (the local folder itself when ``fs`` is None).
    """

    where: str
    fs: object | None
    path: str
    _pulled: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def local(self) -> Path | None:
        """The folder on this machine, or None for a URL."""
        return Path(self.path) if self.fs is None else None

    def write(self, name: str, data: bytes) -> None:
        """Write one file of the folder whole (never half a file).

        A local folder and ``file://`` write a temporary file and rename it; object stores write an object
        in one request, which is atomic.
        """
        if self.fs is None:
            atomic_write_bytes(Path(self.path) / name, data)
            return
        dest = f"{self.path}/{name}"
        if self.fs.type_name != "local":
            with self.fs.open_output_stream(dest) as fh:
                fh.write(data)
            return
        self.fs.create_dir(self.path, recursive=True)
        tmp = f"{self.path}/.{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        self.fs.move(tmp, dest)

    def names(self) -> list[str]:
        """The folder's file names (temporary files and locks left out); empty when it does not exist."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """The local folder to read and check the sweep in, locked as `vlcore.run.sweep.run_sweep` locks it.

        For a URL, a temporary copy of the remote folder (removed afterwards); `push` makes the remote match it.
        """
        with tempfile.TemporaryDirectory(prefix="vlscope-sweep-") as tmp:
            staging = self.local or Path(tmp)
            staging.mkdir(parents=True, exist_ok=True)
            with FileLock(str(staging / ".lock")):
                self.pull(staging)
                yield staging

    def pull(self, staging: Path, only_new: bool = False) -> None:
        """Copy the remote folder's files into ``staging`` (``only_new``: those not copied before); no-op when local."""
        if self.fs is None:
            return
        for name in self.names():
            if only_new and name in self._pulled:
                continue
            with self.fs.open_input_stream(f"{self.path}/{name}") as fh:
                atomic_write_bytes(staging / name, fh.read())
            self._pulled[name] = (staging / name).stat().st_mtime_ns

    def push(self, staging: Path) -> None:
        """Make the remote folder what ``staging`` holds: upload new or changed files, delete the rest.

        Merged files go up before the parts they replace are deleted, predictions and manifest last. No-op when
        the target is local (``staging`` is the folder).
        """
        if self.fs is None:
            return
        here = {p.name: p.stat().st_mtime_ns for p in staging.iterdir() if p.is_file() and not p.name.startswith(".")}
        changed = sorted((n for n, t in here.items() if self._pulled.get(n) != t),
                         key=lambda n: (_LAST.index(n) + 1 if n in _LAST else 0, n))
        for name in changed:
            self.write(name, (staging / name).read_bytes())
            self._pulled[name] = here[name]
        for name in set(self._pulled) - set(here):
            self.fs.delete_file(f"{self.path}/{name}")
            del self._pulled[name]


def open_target(out: str | Path) -> SweepTarget:
    """The sweep folder at ``out``: a local path, or a URL read through pyarrow or fsspec.

    Raises:
        InputError: an unknown protocol or a URL that cannot be opened (missing credentials, no such bucket).
    """
    if not is_url(out):
        return SweepTarget(str(out), None, str(Path(out).expanduser().resolve()))
    import pyarrow as pa
    from pyarrow import fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(out)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # pyarrow knows s3, gs, hdfs, file; fsspec the rest
        fs, path = _fsspec(out)
    return SweepTarget(out, fs, path.rstrip("/"))


def _fsspec(out: str):
    import fsspec
    from pyarrow import fs as pafs

    try:
        fs, path = fsspec.core.url_to_fs(out)
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot write a sweep to {out}: {exc}. Give a local folder or an s3://, gs:// or "
                         "file:// URL (other protocols need their fsspec package installed)") from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
