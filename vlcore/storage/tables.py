"""Tables to and from bytes: CSV and parquet, written the same way everywhere (no index, ISO dates)."""

from __future__ import annotations

import io

import pandas as pd

from vlcore.storage.store import DamagedFileError


def frame_to_csv(frame: pd.DataFrame) -> bytes:
    """UTF-8 CSV bytes without the index; datetimes in ISO 8601 with microseconds and the offset."""
    return frame.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%f%z").encode("utf-8")


def frame_to_parquet(frame: pd.DataFrame) -> bytes:
    """Parquet bytes (pyarrow) without the index."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def parquet_from_bytes(data: bytes, what: str, columns: list[str] | None = None, required: tuple[str, ...] = ()):
    """A pandas DataFrame from parquet bytes, parsed in memory (so an ``OSError`` here is the content, not the disk).

    Raises:
        DamagedFileError: not a parquet file (no magic bytes, a bad footer, corrupt compressed pages), or a
            column in ``columns`` / ``required`` is missing.
    """
    import pyarrow as pa

    try:
        frame = pd.read_parquet(io.BytesIO(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DamagedFileError(f"damaged {what}: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DamagedFileError(f"damaged {what}: no column {missing[0]!r}")
    return frame
