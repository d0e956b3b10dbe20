"""Annotations: SQLite (WAL) and, when VLSCOPE_TEST_PG_URL is set, a real PostgreSQL server."""

from __future__ import annotations

import io
import os
import threading
import uuid

import pandas as pd
import pytest
import sqlalchemy as sa

from vlcore.storage.annotations import (DEFAULT_LABELS, SCHEMA_VERSION, AnnotationStore, default_url, load_label_set,
                                parse_labels)
from vlcore.errors import AnnotationError, VLScopeError

PG_URL = os.environ.get("VLSCOPE_TEST_PG_URL")
PG_SKIP = "VLSCOPE_TEST_PG_URL is not set: no PostgreSQL server to test against (.ci/run starts one)"
INJECTION = "'); DROP TABLE annotations; --"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(not PG_URL, reason=PG_SKIP))])
def make_engine(request, tmp_path):
    """A factory of engines on one fresh database: a SQLite file, or a Postgres schema of its own."""
    engines = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'annotations.sqlite'}"

        def make():
            engines.append(sa.create_engine(url))
            return engines[-1]
    else:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.schema.CreateSchema(schema))

        def make():
            engines.append(sa.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"}))
            return engines[-1]
    yield make
    for engine in engines:
        engine.dispose()
    if request.param == "postgres":
        with admin.connect() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()


@pytest.fixture
def store(make_engine):
    return AnnotationStore(make_engine())


def _add(store, **kw):
    row = dict(annotator="ana", page="heatmaps", label="plausible", example_id="easy_vqa/test/0", model="demo",
               layer=3, head=1, token=0, view="ex=easy_vqa%2Ftest%2F0&layer=3&head=1", text="")
    row.update(kw)
    return store.add(**row)


def test_create_list_filter(store):
    _add(store, text="first")
    _add(store, annotator="bo", label="implausible", head=2, text="second")
    _add(store, example_id="easy_vqa/test/7", page="statistics", head=None, text="third")
    table = store.list()
    assert list(table["text"]) == ["third", "second", "first"]  # newest first
    assert store.count() == 3
    assert list(store.list(annotator="bo")["text"]) == ["second"]
    assert list(store.list(label="plausible")["text"]) == ["third", "first"]
    assert list(store.list(example_id="easy_vqa/test/7")["text"]) == ["third"]
    assert list(store.list(page="heatmaps", head=1)["text"]) == ["first"]
    assert list(store.list(model="demo", limit=1)["text"]) == ["third"]
    assert store.list(annotator="nobody").empty
    first = store.list(annotator="ana", head=1).iloc[0]
    assert (first["layer"], first["head"], first["token"], first["model"]) == (3, 1, 0, "demo")
    assert first["view"] == "ex=easy_vqa%2Ftest%2F0&layer=3&head=1"
    assert first["created_at"].tzinfo is not None
    assert pd.isna(store.list(page="statistics").iloc[0]["head"])  # the mean over heads
    assert store.labels_used() == ["implausible", "plausible"]
    assert store.annotators() == ["ana", "bo"]


def test_exports_parse_back(store):
    _add(store, text="comma, \"quote\" and\nnewline")
    _add(store, annotator="bo", label="other", head=None, text="ünïcode …")
    table = store.list()
    csv = pd.read_csv(io.BytesIO(store.export_csv()))
    parquet = pd.read_parquet(io.BytesIO(store.export_parquet()))
    for back in (csv, parquet):
        assert list(back.columns) == list(table.columns)
        assert list(back["text"]) == list(table["text"])
        assert list(back["annotator"]) == ["bo", "ana"]
        assert pd.to_datetime(back["created_at"], utc=True).tolist() == table["created_at"].tolist()
    assert parquet["head"].isna().tolist() == [True, False]
    assert list(pd.read_csv(io.BytesIO(store.export_csv(annotator="bo")))["label"]) == ["other"]


def test_eight_annotators_at_once_lose_nothing(make_engine):
    """Eight threads, each with its own engine (its own connections, like separate app processes)."""
    stores = [AnnotationStore(make_engine()) for _ in range(8)]
    stores[0].ensure_schema()
    per_thread = 25
    barrier, errors = threading.Barrier(8), []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(per_thread):
                _add(stores[i], annotator=f"annotator{i}", text=f"{i}:{j}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    table = stores[0].list()
    assert sorted(table["text"]) == sorted(f"{i}:{j}" for i in range(8) for j in range(per_thread))
    assert table["id"].is_unique
    assert (table.groupby("annotator").size() == per_thread).all()


def test_shared_store_across_threads(store):
    """The app's case: one engine (st.connection's) shared by every session thread."""
    threads = [threading.Thread(target=lambda i=i: [_add(store, annotator=f"a{i}", text=str(j)) for j in range(10)])
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 80


def test_injection_shaped_text_is_stored_verbatim(store):
    labels = (*DEFAULT_LABELS, INJECTION)
    _add(store, annotator=INJECTION, label=INJECTION, text=INJECTION, example_id=INJECTION, view=f"ex={INJECTION}",
         labels=labels)
    _add(store, text="plain")
    assert sa.inspect(store.engine).has_table("annotations")
    assert store.count() == 2
    row = store.list(annotator=INJECTION)
    assert len(row) == 1
    assert row.iloc[0][["annotator", "label", "text", "example_id"]].tolist() == [INJECTION] * 4
    assert row.iloc[0]["view"] == f"ex={INJECTION}"
    assert store.list(label=INJECTION)["text"].tolist() == [INJECTION]


def test_schema_version_recorded(store):
    assert store.schema_version() == SCHEMA_VERSION
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).scalars().all() == [SCHEMA_VERSION]
    names = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("annotations")}
    assert {"ix_annotations_example", "ix_annotations_annotator", "ix_annotations_label"} <= names


def test_migration_from_version_1(make_engine):
    """A version-1 database (the table without indexes) with a row in it is migrated on open."""
    engine = make_engine()
    old = sa.MetaData()  # the version-1 schema, as it was
    table = sa.Table(
        "annotations", old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("annotator", sa.String(100), nullable=False), sa.Column("page", sa.String(100), nullable=False),
        sa.Column("example_id", sa.String(500)), sa.Column("model", sa.String(300)), sa.Column("layer", sa.Integer),
        sa.Column("head", sa.Integer), sa.Column("token", sa.Integer), sa.Column("view", sa.Text, nullable=False),
        sa.Column("label", sa.String(200), nullable=False), sa.Column("text", sa.Text, nullable=False),
    )
    version = sa.Table("schema_version", old, sa.Column("version", sa.Integer, nullable=False))
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(sa.insert(version).values(version=1))
        conn.execute(sa.insert(table).values(created_at=pd.Timestamp("2026-01-02", tz="UTC").to_pydatetime(),
                                             annotator="old", page="heatmaps", view="", label="plausible", text="v1"))
    assert not sa.inspect(engine).get_indexes("annotations")
    store = AnnotationStore(engine)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.list()["text"].tolist() == ["v1"]
    assert len(sa.inspect(engine).get_indexes("annotations")) == 3
    _add(store, text="v2")
    assert store.count() == 2


def test_newer_schema_is_refused(make_engine):
    engine = make_engine()
    AnnotationStore(engine).ensure_schema()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 1})
    with pytest.raises(AnnotationError, match="newer than this VLScope"):
        AnnotationStore(engine).list()


@pytest.mark.parametrize(("change", "message"), [
    ({"annotator": ""}, "annotator name is empty"),
    ({"annotator": "   "}, "annotator name is empty"),
    ({"label": "brilliant"}, "not in the label set"),
    ({"label": ""}, "label is empty"),
    ({"page": ""}, "page is empty"),
    ({"head": -1}, "head must be a whole number"),
    ({"layer": "3"}, "layer must be a whole number"),
    ({"token": True}, "token must be a whole number"),
    ({"text": "x" * 10_001}, "limit is 10,000"),
])
def test_invalid_input_is_refused_clearly(store, change, message):
    with pytest.raises(AnnotationError, match=message) as info:
        _add(store, **change)
    assert isinstance(info.value, VLScopeError)
    assert store.count() == 0


def test_label_set_can_be_extended_per_call(store):
    with pytest.raises(AnnotationError):
        _add(store, label="head tracks colour")
    _add(store, label="head tracks colour", labels=(*store.labels, "head tracks colour"))
    assert store.labels_used() == ["head tracks colour"]


def test_sqlite_is_wal_with_busy_timeout(tmp_path):
    store = AnnotationStore(f"sqlite:///{tmp_path / 'a.sqlite'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_an_engine_made_elsewhere_gets_the_pragmas(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'b.sqlite'}")
    with engine.connect() as conn:  # a pooled connection opened before the store saw the engine
        conn.exec_driver_sql("SELECT 1")
    store = AnnotationStore(engine)
    AnnotationStore(engine)  # a second wrapper does not add the listener twice
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_default_database_lives_under_the_store_root(tmp_path, monkeypatch):
    monkeypatch.delenv("VLSCOPE_ANNOTATIONS_URL", raising=False)
    monkeypatch.setenv("VLSCOPE_CACHE", str(tmp_path / "root"))
    assert default_url() == f"sqlite:///{(tmp_path / 'root' / 'annotations.sqlite').resolve()}"
    _add(AnnotationStore())
    assert (tmp_path / "root" / "annotations.sqlite").is_file()
    monkeypatch.setenv("VLSCOPE_ANNOTATIONS_URL", "sqlite:///elsewhere.sqlite")
    assert default_url() == "sqlite:///elsewhere.sqlite"


def test_label_set_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("VLSCOPE_LABELS", raising=False)
    assert load_label_set() == DEFAULT_LABELS
    file = tmp_path / "labels.toml"
    file.write_text('labels = ["good", "bad", "good"]\n')
    assert load_label_set(file=file) == ("good", "bad")
    monkeypatch.setenv("VLSCOPE_LABELS", "env one; env two")
    assert load_label_set(file=file) == ("env one", "env two")
    assert load_label_set(["secret"], file=file) == ("secret",)
    monkeypatch.delenv("VLSCOPE_LABELS")
    file.write_text("labels = 3\n")
    with pytest.raises(AnnotationError, match="expected `labels"):
        load_label_set(file=file)
    file.write_text("labels = [\n")
    with pytest.raises(AnnotationError, match="not valid TOML"):
        load_label_set(file=file)
    assert parse_labels(" a ;b;; a") == ("a", "b")


def test_unreachable_database_is_a_clear_error():
    store = AnnotationStore("postgresql+psycopg://someone:secret@127.0.0.1:1/none")
    with pytest.raises(AnnotationError, match="could not open the annotations database") as info:
        store.list()
    assert "secret" not in str(info.value).replace("secrets.toml", "")  # the password is hidden


def test_the_mean_over_heads_is_stored_as_mean_not_as_no_head(store):
    _add(store, head="mean", text="mean view")
    _add(store, head=None, layer=None, text="no heads in this view")
    _add(store, head=2, text="head 2")
    table = store.list().set_index("text")
    assert bool(table.at["mean view", "head_mean"]) and pd.isna(table.at["mean view", "head"])
    assert not table.at["no heads in this view", "head_mean"] and not table.at["head 2", "head_mean"]
    assert store.list(head="mean")["text"].tolist() == ["mean view"]
    from vlcore.storage.annotations import head_labels

    assert head_labels(store.list()).tolist() == ["2", "", "mean"]
    back = pd.read_csv(io.BytesIO(store.export_csv()))
    assert back["head_mean"].tolist() == [False, False, True]


def test_migration_from_version_2_keeps_rows_and_adds_head_mean(make_engine):
    """A version-2 database (no head_mean column) with rows in it is migrated on open; old rows say unknown."""
    engine = make_engine()
    old = sa.MetaData()
    sa.Table(
        "annotations", old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("annotator", sa.String(100), nullable=False), sa.Column("page", sa.String(100), nullable=False),
        sa.Column("example_id", sa.String(500)), sa.Column("model", sa.String(300)), sa.Column("layer", sa.Integer),
        sa.Column("head", sa.Integer), sa.Column("token", sa.Integer), sa.Column("view", sa.Text, nullable=False),
        sa.Column("label", sa.String(200), nullable=False), sa.Column("text", sa.Text, nullable=False),
    )
    version = sa.Table("schema_version", old, sa.Column("version", sa.Integer, nullable=False))
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(sa.insert(version).values(version=2))
        conn.execute(sa.insert(old.tables["annotations"]).values(
            created_at=pd.Timestamp("2026-01-02", tz="UTC").to_pydatetime(), annotator="old", page="heatmaps",
            view="head=mean", label="plausible", text="v2", layer=3))
    store = AnnotationStore(engine)
    assert store.schema_version() == SCHEMA_VERSION == 3
    row = store.list().iloc[0]
    assert row["text"] == "v2" and pd.isna(row["head_mean"])
    _add(store, head="mean", text="v3")
    assert store.list(head="mean")["text"].tolist() == ["v3"]
