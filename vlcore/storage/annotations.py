"""Annotators' judgements of a view, in a SQL database (SQLite by default, Postgres in production).

An annotation names the view it judges (the page, the share-link query string, and the example, model,
layer, head and token), who made it, when, a label from a configurable label set, and free text. A view of the
mean over heads is stored with ``head_mean`` true (and no head index); a view without heads has both empty.

    >>> store = AnnotationStore("sqlite://")
    >>> row_id = store.add(annotator="ana", page="heatmaps", example_id="easy_vqa/test/0", label="plausible",
    ...                    head=3, view="ex=easy_vqa%2Ftest%2F0&head=3")
    >>> store.list(annotator="ana")[["annotator", "label", "head"]].to_dict("records")
    [{'annotator': 'ana', 'label': 'plausible', 'head': 3}]

The schema is created on first use. Its version lives in the ``schema_version`` table; opening an
older database runs the migrations in ``MIGRATIONS`` one version at a time. Every statement is built
with SQLAlchemy Core (bound parameters); no value is ever formatted into SQL text.

The default database is ``annotations.sqlite`` under the store root (``$VLSCOPE_CACHE``), opened in WAL
mode with a busy timeout so that several annotators can save at once.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from vlcore.errors import AnnotationError
from vlcore.storage.tables import frame_to_csv, frame_to_parquet

SCHEMA_VERSION = 3
DB_FILENAME = "annotations.sqlite"
SQLITE_BUSY_TIMEOUT_MS = 30_000
DEFAULT_LABELS = (
    "plausible",
    "implausible",
    "head tracks the mentioned object",
    "answer wrong because…",
    "other",
)
MAX_TEXT = 10_000
COLUMNS = ["id", "created_at", "annotator", "page", "example_id", "model", "layer", "head", "head_mean", "token",
           "view", "label", "text"]
MEAN = "mean"  # the head of a view that shows the mean over heads

metadata = sa.MetaData()
annotations = sa.Table(
    "annotations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("annotator", sa.String(100), nullable=False),
    sa.Column("page", sa.String(100), nullable=False),
    sa.Column("example_id", sa.String(500)),
    sa.Column("model", sa.String(300)),
    sa.Column("layer", sa.Integer),
    sa.Column("head", sa.Integer),
    sa.Column("head_mean", sa.Boolean),  # true: the view shows the mean over heads (head is empty); added in v3
    sa.Column("token", sa.Integer),
    sa.Column("view", sa.Text, nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
)
INDEXES = (
    sa.Index("ix_annotations_example", annotations.c.example_id, annotations.c.head),
    sa.Index("ix_annotations_annotator", annotations.c.annotator),
    sa.Index("ix_annotations_label", annotations.c.label),
)
schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))


def _migrate_1_to_2(conn: Connection) -> None:
    """Version 2 adds indexes for the page filters (example + head, annotator, label)."""
    for index in INDEXES:
        index.create(conn, checkfirst=True)


def _migrate_2_to_3(conn: Connection) -> None:
    """Version 3 adds ``head_mean``: a view of the mean over heads was stored with an empty head, like a view
    without heads. Older rows keep it empty (unknown)."""
    column = sa.schema.CreateColumn(annotations.c.head_mean).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE annotations ADD COLUMN {column}"))  # a constant column definition


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}  # N -> N + 1


def default_url() -> str:
    """``$VLSCOPE_ANNOTATIONS_URL``, else the SQLite file ``annotations.sqlite`` under the store root."""
    env = os.environ.get("VLSCOPE_ANNOTATIONS_URL")
    if env:
        return env
    from vlcore.app_files import default_root

    root = default_root()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / DB_FILENAME).resolve()}"


def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    """WAL journal and a busy timeout on every new SQLite connection (the ``connect`` event)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_MS)}")  # a constant, not user input
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def prepare_engine(engine: Engine) -> Engine:
    """Attach the SQLite pragmas to ``engine`` (no-op for other databases); returns it."""
    if engine.dialect.name == "sqlite" and not sa.event.contains(engine, "connect", _sqlite_pragmas):
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        engine.dispose()  # connections opened before the listener would lack the pragmas
    return engine


def parse_labels(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A label set from a list or a ``;``-separated string: stripped, de-duplicated, order kept.

    >>> parse_labels("plausible; implausible;;plausible")
    ('plausible', 'implausible')
    """
    if value is None:
        return ()
    items = value.split(";") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        label = str(item).strip()
        if label and label not in out:
            out.append(label)
    return tuple(out)


def load_label_set(configured: str | Iterable[str] | None = None, file: Path | None = None) -> tuple[str, ...]:
    """The label set: ``configured`` (secrets ``[annotations] labels``), else ``$VLSCOPE_LABELS``
    (``;``-separated), else ``labels = [...]`` in ``file`` (``.streamlit/vlscope_labels.toml``), else
    ``DEFAULT_LABELS``.

    Raises:
        AnnotationError: the labels file exists but is not valid TOML with a list of strings.
    """
    for source in (configured, os.environ.get("VLSCOPE_LABELS")):
        labels = parse_labels(source)
        if labels:
            return labels
    if file is not None and file.is_file():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AnnotationError(f"{file} is not valid TOML ({exc}); write `labels = [\"plausible\", ...]`") from exc
        labels = data.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise AnnotationError(f"{file}: expected `labels = [\"plausible\", ...]`, got {labels!r}")
        if parse_labels(labels):
            return parse_labels(labels)
    return DEFAULT_LABELS


def _clean_text(name: str, value: object, limit: int, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            article = "an" if name[0] in "aeiou" else "a"
            raise AnnotationError(f"the {name} is empty: type {article} {name} before saving")
        return None
    if not isinstance(value, str):
        raise AnnotationError(f"the {name} must be text, got {type(value).__name__}")
    value = value.strip()
    if len(value) > limit:
        raise AnnotationError(f"the {name} is {len(value):,} characters long; the limit is {limit:,}")
    return value


def _clean_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AnnotationError(f"the {name} must be a whole number >= 0 or empty, got {value!r}")
    return int(value)


class AnnotationStore:
    """Annotations in any SQLAlchemy database.

    Args:
        engine_or_url: an ``Engine`` (e.g. ``st.connection(...).engine``) or a URL; None is
            ``default_url()``.
        labels: the allowed labels (``add`` refuses others); default ``DEFAULT_LABELS``.
    """

    def __init__(self, engine_or_url: Engine | str | None = None, labels: Sequence[str] = DEFAULT_LABELS):
        if isinstance(engine_or_url, Engine):
            engine = engine_or_url
        else:
            engine = sa.create_engine(engine_or_url or default_url())
        self.engine = prepare_engine(engine)
        self.labels = tuple(labels)
        self._ready = False
        self._lock = threading.Lock()

    def with_labels(self, labels: Sequence[str]) -> AnnotationStore:
        """The same database (engine, schema state) with another label set."""
        clone = copy.copy(self)
        clone.labels = tuple(labels)
        return clone

    # schema ---------------------------------------------------------------------------------------------

    def ensure_schema(self) -> int:
        """Create or migrate the schema (once per store object); returns the schema version."""
        if self._ready:
            return SCHEMA_VERSION
        with self._lock:
            if not self._ready:
                for attempt in range(3):  # two processes creating the schema at once: one wins, retry
                    try:
                        with self._db_errors("open"):
                            self._create_or_migrate()
                        break
                    except AnnotationError:
                        if attempt == 2:
                            raise
                        time.sleep(0.1 * (attempt + 1))
                    except sa.exc.IntegrityError:
                        if attempt == 2:
                            raise
                self._ready = True
        return SCHEMA_VERSION

    def _create_or_migrate(self) -> None:
        with self.engine.begin() as conn:
            if not sa.inspect(conn).has_table("schema_version"):
                metadata.create_all(conn, checkfirst=True)
                conn.execute(sa.insert(schema_version).values(version=SCHEMA_VERSION))
                return
            version = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
            if version is None:
                raise AnnotationError(f"{self.where}: the schema_version table is empty; "
                                      "restore it or point VLScope at a new database")
            if version > SCHEMA_VERSION:
                raise AnnotationError(f"{self.where} has annotation schema version {version}, newer than this "
                                      f"VLScope's {SCHEMA_VERSION}; upgrade VLScope")
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(sa.update(schema_version).values(version=version))

    def schema_version(self) -> int:
        """The version recorded in the database."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar())

    @contextlib.contextmanager
    def _db_errors(self, action: str):
        """Database unreachable, locked past the timeout, or refusing: an AnnotationError naming it."""
        try:
            yield
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            first = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
            raise AnnotationError(f"could not {action} the annotations database {self.where} "
                                  f"({first[0] if first else type(exc).__name__}); check that it is reachable "
                                  "and [connections.annotations] in .streamlit/secrets.toml") from exc

    @property
    def where(self) -> str:
        """The database URL, password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    # writing --------------------------------------------------------------------------------------------

    def add(self, *, annotator: str, page: str, label: str, text: str = "", example_id: str | None = None,
            model: str | None = None, layer: int | None = None, head: int | str | None = None,
            token: int | None = None, view: str = "", labels: Sequence[str] | None = None) -> int:
        """Save one annotation; returns its id.

        Args:
            annotator: who judges (required).
            page: the page's name, e.g. ``heatmaps`` (required).
            label: one of ``labels`` (default: the store's label set).
            text: free text (may be empty).
            example_id, model, layer, head, token: the view's coordinates (None where not applicable;
                head ``"mean"`` (`MEAN`) is the mean over heads, stored as ``head_mean`` true).
            view: the share-link query string of the view.

        Raises:
            AnnotationError: an empty annotator or page, a label outside the set, a negative index,
                or text over the length limits.
        """
        allowed = tuple(labels) if labels is not None else self.labels
        row = {
            "created_at": datetime.now(timezone.utc),
            "annotator": _clean_text("annotator name", annotator, 100, required=True),
            "page": _clean_text("page", page, 100, required=True),
            "example_id": _clean_text("example id", example_id, 500, required=False),
            "model": _clean_text("model", model, 300, required=False),
            "layer": _clean_int("layer", layer), "head": None if head == MEAN else _clean_int("head", head),
            "head_mean": head == MEAN, "token": _clean_int("token", token),
            "view": _clean_text("view", view, MAX_TEXT, required=False) or "",
            "label": _clean_text("label", label, 200, required=True),
            "text": _clean_text("text", text, MAX_TEXT, required=False) or "",
        }
        if row["label"] not in allowed:
            raise AnnotationError(f"label {row['label']!r} is not in the label set ({', '.join(allowed)}); "
                                  "pick one of those or add it to the label set first")
        self.ensure_schema()
        with self._db_errors("write to"), self.engine.begin() as conn:  # first statement writes: no lock upgrade
            result = conn.execute(sa.insert(annotations).values(**row))
            return int(result.inserted_primary_key[0])

    # reading --------------------------------------------------------------------------------------------

    def list(self, annotator: str | None = None, label: str | None = None, example_id: str | None = None,
             page: str | None = None, model: str | None = None, head: int | str | None = None,
             limit: int | None = 10_000) -> pd.DataFrame:
        """Annotations matching every given filter, newest first, as a DataFrame with ``COLUMNS``
        (``created_at`` tz-aware UTC; ``layer``/``head``/``token`` nullable integers, ``head_mean`` nullable
        boolean). ``head="mean"`` selects views of the mean over heads."""
        self.ensure_schema()
        query = sa.select(annotations).order_by(annotations.c.created_at.desc(), annotations.c.id.desc())
        if head == MEAN:
            query = query.where(annotations.c.head_mean.is_(True))
            head = None
        for column, value in (("annotator", annotator), ("label", label), ("example_id", example_id),
                              ("page", page), ("model", model), ("head", head)):
            if value is not None:
                query = query.where(annotations.c[column] == value)
        if limit is not None:
            query = query.limit(int(limit))
        with self._db_errors("read"), self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        frame = pd.DataFrame([dict(r) for r in rows], columns=COLUMNS)
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        for column in ("id", "layer", "head", "token"):
            frame[column] = frame[column].astype("Int64")
        frame["head_mean"] = frame["head_mean"].astype("boolean")
        return frame

    def labels_used(self) -> list[str]:
        """Distinct labels in the database, sorted."""
        return self._distinct("label")

    def annotators(self) -> list[str]:
        """Distinct annotator names in the database, sorted."""
        return self._distinct("annotator")

    def pages(self) -> list[str]:
        """Distinct pages annotated, sorted."""
        return self._distinct("page")

    def _distinct(self, column: str) -> list[str]:
        self.ensure_schema()
        with self._db_errors("read"), self.engine.connect() as conn:
            values = conn.execute(sa.select(annotations.c[column]).distinct()).scalars().all()
        return sorted(values)

    def count(self) -> int:
        """Number of annotations."""
        self.ensure_schema()
        with self._db_errors("read"), self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(annotations)).scalar())

    def export_csv(self, **filters) -> bytes:
        """The ``list(**filters)`` table as UTF-8 CSV (ISO timestamps)."""
        return frame_to_csv(self.list(**filters))

    def export_parquet(self, **filters) -> bytes:
        """The ``list(**filters)`` table as parquet bytes."""
        return frame_to_parquet(self.list(**filters))


def head_labels(frame: pd.DataFrame) -> pd.Series:
    """The head of each annotation as shown to a reader: its index, ``mean`` (the mean over heads) or empty.

    >>> head_labels(pd.DataFrame({"head": pd.array([3, None, None], dtype="Int64"),
    ...                           "head_mean": pd.array([False, True, None], dtype="boolean")})).tolist()
    ['3', 'mean', '']
    """
    mean = frame["head_mean"].fillna(False).astype(bool)
    index = frame["head"].astype("string").fillna("")
    return index.where(~mean, MEAN).astype(object)
