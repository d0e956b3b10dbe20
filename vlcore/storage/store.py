"""The result store: a fingerprinted disk cache of traces, sweeps and user inputs.

Layout under the root (``VLSCOPE_CACHE``, else the user's cache dir)::

    traces/ab/<key>.safetensors   one trace: arrays + JSON metadata in the safetensors header
    sweeps/<key>/                 sweep summaries as parquet parts + manifest.json
    inputs/<id>.png, <id>.json    user-uploaded examples

Keys are sha256 fingerprints of everything that changes a result (model id with revision or
weights hash, processor settings, example content, extraction settings). Writes are atomic
(temporary file + ``os.replace``); a damaged entry is dropped and reported, then recomputed by
the caller. Traces are evicted least-recently-used when the traces folder passes its cap.
Nothing here unpickles: safetensors, JSON and parquet only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from vlcore.app_files import default_root
from vlcore.errors import StoreError
from vlcore.trace import TRACE_VERSION, AttentionBlock, ImageGrid, Trace, TokenLayout

SCHEMA_VERSION = TRACE_VERSION  # a trace file of another version is dropped and computed again
DEFAULT_CAP_BYTES = 2 * 1024**3


def fingerprint(*parts: object) -> str:
    """sha256 hex of the canonical JSON of ``parts``.

    >>> fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})
    True
    """
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    On any failure the temporary file is removed and ``path`` is untouched: never a half file. ``durable`` forces
    the bytes to disk before the rename (fsync); a cache entry whose reader checks it and recomputes a damaged one
    (a trace) skips that, since after a power loss the worst case is one recomputation.

    Raises:
        StoreError: the disk is full (or over quota), or the folder cannot be written.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise StoreError(_write_message(path, len(data), exc)) from exc
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _write_message(path: Path, n_bytes: int, exc: OSError) -> str:
    import shutil

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return (f"the disk is full: could not write {path.name} ({n_bytes / 2**20:.1f} MiB) under {path.parent} "
                f"({free}); nothing was half-written. Free some space, clear the result store, or point "
                "VLSCOPE_CACHE at a larger disk.")
    return (f"could not write {path.name} under {path.parent}: {exc.strerror or exc}; nothing was half-written. "
            "Check the folder's permissions or point VLSCOPE_CACHE at a writable folder.")


def trace_to_bytes(trace: Trace) -> bytes:
    """Serialise a trace as safetensors: arrays named ``stream.<s>.<field>``, ``image.<s>.<i>``,
    ``boxes.<s>.<i>``, ``block.<b>.attentions`` / ``.n_visible`` and ``hidden.<s>``; tokens, grids and the
    scalar fields as JSON in the header."""
    arrays: dict[str, np.ndarray] = {}
    streams = {}
    for name, layout in trace.streams.items():
        for field in ("role", "image_of", "cell"):
            arrays[f"stream.{name}.{field}"] = np.ascontiguousarray(getattr(layout, field))
        for i, img in enumerate(layout.images):
            arrays[f"image.{name}.{i}"] = np.ascontiguousarray(img.image)
            arrays[f"boxes.{name}.{i}"] = np.ascontiguousarray(img.boxes)
        streams[name] = {"tokens": list(layout.tokens), "grids": [list(img.grid) for img in layout.images]}
        if trace.hiddens.get(name) is not None:
            arrays[f"hidden.{name}"] = np.ascontiguousarray(trace.hiddens[name])
    blocks = {}
    for name, block in trace.blocks.items():
        if block.attentions is not None:
            arrays[f"block.{name}.attentions"] = np.ascontiguousarray(block.attentions)
        if block.n_visible is not None:
            arrays[f"block.{name}.n_visible"] = np.ascontiguousarray(block.n_visible)
        blocks[name] = {"query": block.query, "key": block.key}
    meta = {
        "schema": SCHEMA_VERSION,
        "example_id": trace.example_id,
        "model_id": trace.model_id,
        "streams": streams,
        "blocks": blocks,
        "view": trace.view,
        "prediction": [list(p) for p in trace.prediction],
        "gold": list(trace.gold) if trace.gold is not None else None,
        "text_truncated": trace.text_truncated,
        "text": trace.text,
        "meta": trace.meta,
    }
    return st_save(arrays, metadata={"vlscope": json.dumps(meta)})


class DamagedFileError(ValueError):
    """A stored file that does not parse as what it claims to be: safe to drop and compute again.

    Readers delete a file only on this error. Anything else (``MemoryError``, an ``OSError`` of the disk,
    a bug) propagates and leaves every file in place.
    """


def safetensors_from_bytes(data: bytes, what: str) -> tuple[dict, dict]:
    """``(arrays, metadata)`` of a safetensors blob.

    Raises:
        DamagedFileError: the bytes are not a safetensors file (bad header, truncated, invalid JSON).
    """
    try:
        arrays = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError) as exc:  # ValueError: JSON (and UTF-8) decoding
        raise DamagedFileError(f"damaged {what}: {type(exc).__name__}: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise DamagedFileError(f"damaged {what}: the safetensors header has no metadata")
    return arrays, meta


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise DamagedFileError(f"damaged trace file: {what}")


def trace_from_bytes(data: bytes) -> Trace:
    """Inverse of `trace_to_bytes`.

    Raises:
        DamagedFileError: a damaged file (also a `ValueError`) or a different schema version. Anything else
            (``MemoryError``, a bug) propagates: only a damaged file may be dropped.
    """
    arrays, header = safetensors_from_bytes(data, "trace file")
    try:
        meta = json.loads(header.get("vlscope", ""))
    except (ValueError, TypeError) as exc:
        raise DamagedFileError(f"damaged trace file: no VLScope metadata ({type(exc).__name__}: {exc})") from exc
    _check(isinstance(meta, dict), "the metadata is not a JSON object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise DamagedFileError(f"trace schema {meta.get('schema')} != {SCHEMA_VERSION}")
    _validate(arrays, meta)
    return _build_trace(arrays, meta)


def _validate(arrays: dict, meta: dict) -> None:
    """Check the fields and shapes `_build_trace` relies on; raises `DamagedFileError`."""
    for name, kind in (("example_id", str), ("model_id", str), ("streams", dict), ("blocks", dict), ("view", str),
                       ("prediction", list), ("text_truncated", bool)):
        _check(isinstance(meta.get(name), kind), f"{name!r} missing or not a {kind.__name__}")
    _check(meta.get("gold") is None or isinstance(meta["gold"], list), "'gold' is not a list")
    _check(all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], (int, float)) for p in meta["prediction"]),
           "'prediction' is not a list of (answer, probability) pairs")
    sizes = {}
    for name, info in meta["streams"].items():
        _check(isinstance(info, dict) and isinstance(info.get("tokens"), list) and isinstance(info.get("grids"), list),
               f"stream {name!r} has no tokens or grids")
        n = sizes[name] = len(info["tokens"])
        for field, shape in (("role", (n,)), ("image_of", (n,)), ("cell", (n, 2))):
            arr = arrays.get(f"stream.{name}.{field}")
            _check(arr is not None and arr.shape == shape, f"stream {name!r}: {field} does not match its {n} tokens")
        for i, grid in enumerate(info["grids"]):
            _check(isinstance(grid, list) and len(grid) == 2, f"stream {name!r}: grid {i} is not (rows, cols)")
            boxes, img = arrays.get(f"boxes.{name}.{i}"), arrays.get(f"image.{name}.{i}")
            _check(img is not None and img.ndim == 3 and boxes is not None and boxes.shape == (*grid, 4),
                   f"stream {name!r}: image {i} or its cell boxes are missing or misshapen")
        hid = arrays.get(f"hidden.{name}")  # [L + 1, N, D]
        _check(hid is None or (hid.ndim == 3 and hid.shape[1] == n), f"'hidden.{name}' does not match {n} tokens")
    _check(meta["view"] in meta["blocks"], f"the view {meta['view']!r} is not a block")
    for name, info in meta["blocks"].items():
        _check(isinstance(info, dict) and info.get("query") in sizes and info.get("key") in sizes,
               f"block {name!r} names a stream that is not stored")
        att = arrays.get(f"block.{name}.attentions")  # [L, H, Q, K]
        q, k = sizes[info["query"]], sizes[info["key"]]
        _check(att is None or (att.ndim == 4 and att.shape[2:] == (q, k)),
               f"block {name!r} attentions do not match its {q} x {k} tokens")


def _build_trace(arrays: dict, meta: dict) -> Trace:
    streams = {}
    for name, info in meta["streams"].items():
        images = tuple(ImageGrid(arrays[f"image.{name}.{i}"], tuple(grid), arrays[f"boxes.{name}.{i}"])
                       for i, grid in enumerate(info["grids"]))
        streams[name] = TokenLayout(tuple(info["tokens"]), arrays[f"stream.{name}.role"],
                                    arrays[f"stream.{name}.image_of"], arrays[f"stream.{name}.cell"], images)
    blocks = {name: AttentionBlock(arrays.get(f"block.{name}.attentions"), info["query"], info["key"],
                                   arrays.get(f"block.{name}.n_visible")) for name, info in meta["blocks"].items()}
    return Trace(
        example_id=meta["example_id"],
        model_id=meta["model_id"],
        streams=streams,
        blocks=blocks,
        hiddens={name: arrays.get(f"hidden.{name}") for name in streams},
        view=meta["view"],
        prediction=tuple((str(a), float(b)) for a, b in meta["prediction"]),
        gold=tuple(meta["gold"]) if meta.get("gold") is not None else None,
        text_truncated=bool(meta["text_truncated"]),
        text=meta.get("text", ""),
        meta=meta.get("meta", {}),
    )


class Store:
    """A disk cache rooted at ``root``.

    Args:
        root: cache folder; `default_root()` when None.
        cap_bytes: size cap of the traces folder; least recently used traces go first.
    """

    def __init__(self, root: str | Path | None = None, cap_bytes: int = DEFAULT_CAP_BYTES):
        self.root = Path(root) if root is not None else default_root()
        self.cap_bytes = int(cap_bytes)
        self.notices: list[str] = []

    # -- traces ---------------------------------------------------------------------------
    def trace_path(self, key: str) -> Path:
        return self.root / "traces" / key[:2] / f"{key}.safetensors"

    def has_trace(self, key: str) -> bool:
        return self.trace_path(key).is_file()

    def get_trace(self, key: str) -> Trace | None:
        """The stored trace, or None when absent or damaged (a damaged file is deleted)."""
        path = self.trace_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            trace = trace_from_bytes(data)
        except DamagedFileError as exc:  # only a file that does not parse is dropped; anything else propagates
            path.unlink(missing_ok=True)
            self.notices.append(f"dropped a damaged cache entry ({exc}); it will be recomputed")
            return None
        try:
            os.utime(path)  # mark as recently used for LRU eviction
        except FileNotFoundError:  # evicted by another session meanwhile: the trace is still good
            pass
        return trace

    def put_trace(self, key: str, trace: Trace) -> Path:
        """Write a trace atomically, then evict old traces past the cap."""
        path = self.trace_path(key)
        atomic_write_bytes(path, trace_to_bytes(trace), durable=False)  # read back through trace_from_bytes' checks
        self.evict(keep=path)
        return path

    def get_or_compute_trace(self, key: str, compute: Callable[[], Trace]) -> tuple[Trace, bool]:
        """Load a trace, or compute and store it under a file lock so that only one process computes.

        Returns:
            ``(trace, cached)``; ``cached`` is True when nothing was computed.
        """
        trace = self.get_trace(key)
        if trace is not None:
            return trace, True
        lock_path = self.root / "locks" / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            trace = self.get_trace(key)
            if trace is not None:
                return trace, True
            trace = compute()
            try:
                self.put_trace(key, trace)
            except StoreError as exc:  # the result is good; only caching it failed
                self.notices.append(f"the result was computed but not stored: {exc}")
        return trace, False

    def evict(self, keep: Path | None = None) -> int:
        """Delete least-recently-used traces until the traces folder is under the cap.

        Returns:
            the number of files deleted.
        """
        files = [(st, p) for p in (self.root / "traces").glob("*/*.safetensors") if (st := _stat(p)) is not None]
        total = sum(s.st_size for s, _ in files)
        removed = 0
        for st, path in sorted(files, key=lambda f: f[0].st_mtime_ns):
            if total <= self.cap_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= st.st_size
            removed += 1
        return removed

    def get_input(self, input_id: str):
        """The stored user example behind ``upload/<hash>`` as an `Example`, or None (see `uploads.get_input`)."""
        from vlcore.storage.uploads import get_input

        return get_input(self, input_id)

    # -- sweeps & inputs ----------------------------------------------------------------------
    def sweep_dir(self, key: str) -> Path:
        return self.root / "sweeps" / key

    def list_sweeps(self) -> list[dict]:
        """Manifests of the stored sweeps, newest first.

        A damaged manifest, or one written by another extraction version (``schema``), is skipped with a
        notice: its sweep is run again, never read with the wrong layout.
        """
        out = []
        for manifest in (self.root / "sweeps").glob("*/manifest.json"):
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                self.notices.append(f"skipped the sweep in {manifest.parent.name[:12]}: its manifest is damaged; "
                                    "run the sweep again")
                continue
            if not isinstance(data, dict) or data.get("schema") != TRACE_VERSION:
                got = data.get("schema") if isinstance(data, dict) else None
                self.notices.append(f"skipped the sweep in {manifest.parent.name[:12]}: written with schema {got}, "
                                    f"this VLScope reads {TRACE_VERSION}; run the sweep again")
                continue
            data["path"] = str(manifest.parent)
            out.append(data)
        return sorted(out, key=lambda m: m.get("updated", 0), reverse=True)

    # -- housekeeping -------------------------------------------------------------------------
    def size_bytes(self) -> int:
        """Total bytes under the root."""
        return sum(st.st_size for p in self.root.rglob("*") if (st := _stat(p)) is not None and p.is_file())

    def clear(self) -> None:
        """Delete every trace, sweep and lock (user inputs are kept)."""
        import shutil

        for sub in ("traces", "sweeps", "locks"):
            shutil.rmtree(self.root / sub, ignore_errors=True)


def _stat(path: Path):
    """``path.stat()``, or None when another session removed the file meanwhile."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
