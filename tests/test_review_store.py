"""review_store: round trip, validation, audit-safety, migrations, CSV export and concurrent writers.

Every test runs on SQLite and, when ``MEDVIT_TEST_PG_URL`` points at a server (``eval "$(.ci/postgres.sh)"``),
on PostgreSQL too, each test in its own throw-away schema.
"""

from __future__ import annotations

import csv
import inspect
import io
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from conftest import stored_reviews
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from medvit.errors import MedvitError
from medvit.review.store import (
    CSV_COLUMNS,
    NOTE_MAX,
    ReviewStore,
    ShownFinding,
    default_db_url,
    migrate,
    schema_revision,
)
from medvit.review.tables import Base

PG_URL = os.environ.get("MEDVIT_TEST_PG_URL", "")
SHOWN = {
    "Effusion": ShownFinding(prob=0.62, threshold=0.40, prob_raw=0.71),
    "Cardiomegaly": ShownFinding(prob=0.08, threshold=0.30, prob_raw=0.12),
    "Pneumothorax": ShownFinding(prob=0.01, threshold=0.20),
}
UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194732126.13032.0.1"
WEIGHTS = "0f" * 32


def _review(store: ReviewStore, **over) -> int:
    kwargs = dict(
        reviewer="Dr Reviewer", image_uid=UID, image_uid_kind="sop_instance_uid", model_name="deit3-demo",
        weights_sha256=WEIGHTS, shown=SHOWN, verdicts={"Effusion": "agree", "Cardiomegaly": "disagree"},
        note="small left effusion",
    )  # fmt: skip
    kwargs.update(over)
    return store.add_review(**kwargs)


@pytest.fixture
def store(db_url):
    s = ReviewStore(db_url)
    yield s
    s.close()


def test_round_trip_keeps_what_was_shown(store, db_url):
    before = datetime.now(UTC)
    rid = _review(store)
    store.close()
    [r] = stored_reviews(db_url)
    assert r.id == rid
    assert (r.reviewer, r.image_uid, r.image_uid_kind) == ("Dr Reviewer", UID, "sop_instance_uid")
    assert (r.model_name, r.weights_sha256, r.note) == ("deit3-demo", WEIGHTS, "small left effusion")
    assert r.verdicts == {"Effusion": "agree", "Cardiomegaly": "disagree"}
    assert r.shown == SHOWN
    assert r.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= r.created_at <= datetime.now(UTC) + timedelta(seconds=1)


def test_schema_is_versioned_and_matches_the_models(store):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    import medvit.review.scoring  # noqa: F401 - the PACS queue's table (migration 0002) is part of the schema

    assert schema_revision(store.engine) == "0003"
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"migration and ORM models disagree: {diff}"


def test_downgrade_and_upgrade(store):
    migrate(store.engine, "base", downgrade=True)
    assert schema_revision(store.engine) is None
    assert "reviews" not in sa_inspect(store.engine).get_table_names()
    migrate(store.engine)
    assert schema_revision(store.engine) == "0003"
    assert _review(store) > 0


def test_no_patient_identifiers_can_be_stored(store):
    cols = {t: {c["name"] for c in sa_inspect(store.engine).get_columns(t)} for t in ("reviews", "review_verdicts")}
    everything = set().union(*cols.values())
    assert not {c for c in everything if "patient" in c or "birth" in c}
    assert cols["reviews"] == {
        "id", "created_at", "reviewer", "note", "image_uid", "image_uid_kind", "model_name", "weights_sha256", "shown",
        "user_id", "calibration_version", "updated_at", "source",
    }  # fmt: skip
    params = set(inspect.signature(ReviewStore.add_review).parameters)
    assert not {p for p in params if "patient" in p or "birth" in p}
    with pytest.raises(TypeError):
        _review(store, patient_name="DOE^JANE")
    with pytest.raises(MedvitError, match="not a DICOM SOP Instance UID"):
        _review(store, image_uid="DOE^JANE")  # a name smuggled in as the image key is refused
    assert store.count() == 0


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"reviewer": "  "}, "reviewer name is empty"),
        ({"note": "x" * (NOTE_MAX + 1)}, f"at most {NOTE_MAX}"),
        ({"verdicts": {}}, "at least one finding"),
        ({"verdicts": {"Effusion": "maybe"}}, "not one of agree, disagree, uncertain"),
        ({"verdicts": {"Mass": "agree"}}, "Mass was not among the findings shown"),
        ({"shown": {"Effusion": ShownFinding(prob=1.5, threshold=0.4)}}, "not a probability"),
        ({"shown": {"Effusion": ShownFinding(prob=float("nan"), threshold=0.4)}}, "not a probability"),
        ({"image_uid": "abc", "image_uid_kind": "sha256"}, "SHA-256"),
        ({"image_uid_kind": "filename"}, "image_uid_kind"),
        ({"weights_sha256": "not-hex"}, "weights hash"),
    ],
)
def test_invalid_reviews_are_refused_and_nothing_is_written(store, over, message):
    with pytest.raises(MedvitError, match=message):
        _review(store, **over)
    assert store.count() == 0


def test_non_dicom_images_are_keyed_by_sha256(store):
    digest = "AB" * 32
    _review(store, image_uid=digest, image_uid_kind="sha256")
    [r] = store.history()
    assert (r.image_uid, r.image_uid_kind) == (digest.lower(), "sha256")


def test_a_failed_write_leaves_no_partial_review(tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    with store.engine.begin() as conn:  # make the second INSERT of the transaction (the verdicts) fail
        conn.execute(text(
            "CREATE TRIGGER no_verdicts BEFORE INSERT ON review_verdicts BEGIN SELECT RAISE(ABORT, 'boom'); END"
        ))  # fmt: skip
    with pytest.raises(MedvitError, match="nothing was stored"):
        _review(store)
    assert store.count() == 0
    store.close()


def test_history_filters_and_order(store):
    first = _review(store, reviewer="A")
    second = _review(store, reviewer="B", image_uid="1.2.3")
    assert [r.id for r in store.history()] == [second, first]
    assert [r.id for r in store.history(reviewer="A")] == [first]
    assert [r.id for r in store.history(image_uid="1.2.3")] == [second]
    assert [r.id for r in store.history(limit=1)] == [second]


def test_csv_export_has_one_row_per_verdict(store):
    _review(store, note='comma, "quotes"\nand a newline')
    _review(store, verdicts={"Pneumothorax": "uncertain"}, reviewer="Dr Two")
    rows = list(csv.DictReader(io.StringIO(store.export_csv())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 3
    assert rows[0]["reviewer"] == "Dr Two" and rows[0]["finding"] == "Pneumothorax"
    assert rows[0]["prob_raw"] == ""
    effusion = next(r for r in rows if r["finding"] == "Effusion")
    assert (effusion["verdict"], float(effusion["prob"]), float(effusion["threshold"])) == ("agree", 0.62, 0.40)
    assert effusion["note"] == 'comma, "quotes"\nand a newline'


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    store.close()


def test_default_database_lives_in_the_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVIT_DB_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    url = default_db_url()
    assert url == f"sqlite:///{tmp_path / 'xdg' / 'medvit' / 'reviews.sqlite3'}"
    ReviewStore().close()
    assert (tmp_path / "xdg" / "medvit" / "reviews.sqlite3").is_file()
    monkeypatch.setenv("MEDVIT_DB_URL", f"sqlite:///{tmp_path / 'other.sqlite3'}")
    assert default_db_url() == f"sqlite:///{tmp_path / 'other.sqlite3'}"


def test_unreachable_database_is_a_clear_error():
    with pytest.raises(MedvitError, match="cannot open the review database .*MEDVIT_DB_URL") as e:
        ReviewStore("postgresql+psycopg2://u:secret@127.0.0.1:1/none?connect_timeout=2")
    assert "secret" not in str(e.value)


def test_concurrent_writers_lose_nothing(store):
    threads, per_thread = 8, 200
    ids: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        try:
            mine = [_review(store, reviewer=f"reader-{t}", note=f"{t}/{i}") for i in range(per_thread)]
            with lock:
                ids.extend(mine)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[:3]
    assert len(set(ids)) == threads * per_thread
    assert store.count() == threads * per_thread
    history = store.history(limit=None)
    assert {r.note for r in history} == {f"{t}/{i}" for t in range(threads) for i in range(per_thread)}
    assert all(len(r.verdicts) == 2 for r in history)


def _open_concurrently(url: str, n: int, then=lambda s: None) -> tuple[list[ReviewStore], list[BaseException]]:
    """Open `n` stores on `url` from `n` threads at once (each then runs `then`); the stores and any errors."""
    stores: list[ReviewStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            s = ReviewStore(url)
            then(s)
            stores.append(s)
        except BaseException as e:  # noqa: BLE001 - surfaced by the caller
            errors.append(e)

    workers = [threading.Thread(target=open_one) for _ in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return stores, errors


def test_stores_opened_concurrently_on_a_fresh_database_all_work(db_url):
    """Several app processes starting at once: one migrates, the others wait and find the schema at head."""
    stores, errors = _open_concurrently(db_url, 4, then=_review)
    assert not errors, errors
    assert stores[0].count() == 4 and schema_revision(stores[0].engine) == "0003"
    for s in stores:
        s.close()


def test_many_processes_switching_a_new_sqlite_file_to_wal_at_once_all_succeed(tmp_path):
    """SQLite refuses a racing journal-mode change at once (busy_timeout does not apply): the store must retry.

    The race is rare per attempt (about 1 in 30 rounds of 8 openers without the retry), so run many fresh files.
    """
    for round_ in range(40):
        url = f"sqlite:///{tmp_path / f'fresh{round_}.sqlite3'}"
        stores, errors = _open_concurrently(url, 8)
        assert not errors, (round_, errors)
        for s in stores:
            s.close()
        store = ReviewStore(url)
        assert schema_revision(store.engine) == "0003"
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        store.close()


def _save(store: ReviewStore, **over) -> tuple[int, bool]:
    kwargs = dict(
        reviewer="Dr Reviewer", image_uid=UID, image_uid_kind="sop_instance_uid", model_name="deit3-demo",
        weights_sha256=WEIGHTS, shown=SHOWN, verdicts={"Effusion": "agree"}, note="first look",
    )  # fmt: skip
    kwargs.update(over)
    return store.save_review(**kwargs)


def test_saving_again_edits_the_same_review_and_keeps_every_edit(store):
    from medvit.review.audit import events

    first, edited = _save(store)
    assert not edited
    second, edited = _save(store, verdicts={"Effusion": "disagree", "Cardiomegaly": "uncertain"}, note="second look")
    third, _ = _save(store, verdicts={"Pneumothorax": "agree"}, note="third look", calibration_version="v2")
    assert first == second == third and edited
    [review] = store.history(limit=None)
    assert review.verdicts == {"Pneumothorax": "agree"} and review.note == "third look"
    assert review.calibration_version == "v2"  # the calibration in force at the last save
    assert review.updated_at is not None and review.updated_at >= review.created_at
    assert [(e.verdicts, e.note) for e in review.edits] == [
        ({"Effusion": "agree"}, "first look"),
        ({"Cardiomegaly": "uncertain", "Effusion": "disagree"}, "second look"),
    ]
    audit = events(store.engine, event="review_edit")
    assert len(audit) == 2 and {e.target for e in audit} == {UID}
    assert audit[0].detail["after"] == {"Pneumothorax": "agree"}  # newest first

    # another reader, or other weights, get a review of their own
    assert _save(store, reviewer="Dr Other")[0] != first
    assert _save(store, weights_sha256="1f" * 32)[0] != first
    assert store.count() == 3


def test_verdict_labels_follow_the_flag_the_reader_saw(store):
    shown = {
        "Effusion": ShownFinding(prob=0.62, threshold=0.40),  # flagged
        "Cardiomegaly": ShownFinding(prob=0.08, threshold=0.30),  # below its threshold
        "Mass": ShownFinding(prob=0.5, threshold=0.1, flag=False),  # not reported: shown unflagged
        "Nodule": ShownFinding(prob=0.3004, threshold=0.2996),  # equal at the shown rounding: flagged
    }
    verdicts = {"Effusion": "agree", "Cardiomegaly": "disagree", "Mass": "agree", "Nodule": "uncertain"}
    _save(store, shown=shown, verdicts=verdicts)
    [review] = store.history()
    assert review.labels == {"Effusion": "present", "Cardiomegaly": "present", "Mass": "absent", "Nodule": None}
    assert review.shown["Mass"].flag is False and review.shown["Effusion"].flag is None
    assert shown["Nodule"].flagged


def test_reviewed_images_for_the_worklist_status(store):
    _save(store)
    _save(store, image_uid="1.2.3", reviewer="Dr Other")
    assert store.reviewed_images([UID, "1.2.3", "9.9"]) == {UID, "1.2.3"}
    assert store.reviewed_images([UID, "1.2.3"], reviewer="Dr Other") == {"1.2.3"}
    assert store.reviewed_images([]) == set()
