"""`medvit reviews import` / `export` on real dev images with the demo model, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pandas as pd
import pytest
from _site import copy_demo_run, dev_frame, reviews_csv
from conftest import stored_reviews
from sqlalchemy import text

from medvit.cli import main
from medvit.data.dicom import read_image
from medvit.errors import MedvitError
from medvit.inference.predictor import Predictor
from medvit.review.checks import ShownFinding
from medvit.review.imports import CSV_COLUMNS, export_reviews, import_reviews
from medvit.review.store import ReviewStore


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return copy_demo_run(tmp_path_factory.mktemp("import") / "run")


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    return Predictor.from_dir(run, backend="torch")


@pytest.fixture
def store(db_url):
    s = ReviewStore(db_url)
    yield s
    s.close()


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(path, index=False)
    return path


def _rows(names: list[str]) -> list[dict]:
    rows = [
        (names[0], "Effusion", "1", "dr a", "2024-03-01T09:00"),
        (names[0], "pleural thickening", "", "dr a", "2024-03-01T09:00"),
        (names[0], "Mass", "0", "dr b", "2024-03-02T10:00+01:00"),
        (names[1], "Cardiomegaly", "0", "dr a", "2024-03-03T11:30:00Z"),
    ]
    return [dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows]


def test_import_scores_each_image_and_keeps_the_reviewers_labels(store, db_url, predictor, dev_data, tmp_path):
    names = list(dev_frame(dev_data)["Image Index"][:2])
    summary = import_reviews(_csv(tmp_path / "in.csv", _rows(names)), dev_data / "images", predictor, store)
    assert (summary.n_rows, summary.n_reviews, summary.n_images, summary.calibration_version) == (4, 3, 2, "v1")
    reviews = sorted(stored_reviews(db_url), key=lambda r: r.created_at)
    assert [str(r.created_at) for r in reviews] == [
        "2024-03-01 09:00:00+00:00", "2024-03-02 09:00:00+00:00", "2024-03-03 11:30:00+00:00"]  # fmt: skip
    first = reviews[0]
    assert first.reviewer == "dr a" and first.labels == {"Effusion": "present", "Pleural_Thickening": None}
    table = predictor.predict(read_image(dev_data / "images" / names[0])).table.set_index("finding")
    for finding in ("Effusion", "Pleural_Thickening"):
        shown = first.shown[finding]
        assert shown.prob_raw == pytest.approx(float(table.at[finding, "prob_raw"]), abs=1e-6)
        assert shown.prob == pytest.approx(float(table.at[finding, "prob"]), abs=1e-6)
        assert shown.threshold == pytest.approx(float(table.at[finding, "threshold"]))
    # the verdict says the label against the flag the model would have shown
    assert first.verdicts["Effusion"] == ("agree" if first.shown["Effusion"].flagged else "disagree")
    assert first.verdicts["Pleural_Thickening"] == "uncertain"
    with store.engine.connect() as conn:
        assert set(conn.execute(text("SELECT source, calibration_version FROM reviews"))) == {("import", "v1")}


def test_export_gives_the_same_columns_back_and_imports_again(store, predictor, dev_data, tmp_path, capsys):
    names = list(dev_frame(dev_data)["Image Index"][:2])
    import_reviews(_csv(tmp_path / "in.csv", _rows(names)), dev_data / "images", predictor, store)
    assert main(["reviews", "export", "--db", store.url]) == 0
    exported = capsys.readouterr().out
    df = pd.read_csv(io.StringIO(exported), dtype=str, keep_default_na=False)
    assert tuple(df.columns) == CSV_COLUMNS and len(df) == 4
    assert list(df["present"]) == ["1", "", "0", "0"] and list(df["finding"])[1] == "Pleural_Thickening"
    assert pd.Timestamp(df["reviewed_at"][2]) == pd.Timestamp("2024-03-02T09:00Z")
    again = ReviewStore(f"sqlite:///{tmp_path / 'again.sqlite3'}")
    try:  # the image column holds the image key (no file names are stored): found again under --images
        import_reviews(_csv(tmp_path / "out.csv", df.to_dict("records")), dev_data / "images", predictor, again)
        assert export_reviews(again) == exported
    finally:
        again.close()


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"finding": "Fracturez"}, "unknown finding 'Fracturez'"),
        ({"finding": "Fracture"}, "finding Fracture is not predicted by this model"),
        ({"present": "yes"}, "present 'yes' must be 1, 0 or empty"),
        ({"reviewed_at": "03/01/2024"}, "reviewed_at '03/01/2024' is not an ISO 8601 date-time"),
        ({"reviewed_at": "2999-01-01T00:00Z"}, "is in the future"),
        ({"image": "missing.png"}, "image 'missing.png' not found"),
        ({"image": "../labels.csv"}, "is outside the images folder"),
        ({"reviewer": " "}, "reviewer name is empty"),
        ({"image": "__bad__"}, "not a DICOM, PNG or JPEG file"),
    ],
)
def test_a_bad_row_is_named_and_nothing_is_imported(row, problem, store, predictor, dev_data, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    names = list(dev_frame(dev_data)["Image Index"][:2])
    for name in names:
        (images / name).write_bytes((dev_data / "images" / name).read_bytes())
    (images / "__bad__").write_text("not an image")
    rows = _rows(names)
    rows[2] = {**rows[2], **row}
    with pytest.raises(MedvitError, match=r"CSV row 3 \(line 4\): ") as e:
        import_reviews(_csv(tmp_path / "bad.csv", rows), images, predictor, store)
    assert problem in str(e.value) and "\n" not in str(e.value)
    assert store.count() == 0


def test_the_command_fails_with_one_line_and_exit_2(run, dev_data, tmp_path, capsys):
    rows = _rows(list(dev_frame(dev_data)["Image Index"][:2]))
    rows.append({**rows[0]})  # the same review twice
    url = f"sqlite:///{tmp_path / 'r.sqlite3'}"
    code = main(["reviews", "import", "--run", str(run), "--backend", "torch", "--images", str(dev_data / "images"),
                 "--db", url, str(_csv(tmp_path / "dup.csv", rows))])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "CSV row 5 (line 6): repeats row 1" in err[-1]
    assert stored_reviews(url) == []


def test_a_write_failing_midway_leaves_nothing(predictor, dev_data, tmp_path):
    """A real database refusal at the third review (a trigger): the whole import is rolled back."""
    url = f"sqlite:///{tmp_path / 'r.sqlite3'}"
    store = ReviewStore(url)
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER third BEFORE INSERT ON reviews WHEN (SELECT count(*) FROM reviews) >= 2 "
                          "BEGIN SELECT RAISE(ABORT, 'disk full'); END"))  # fmt: skip
    site = dev_frame(dev_data).head(5)
    try:
        with pytest.raises(MedvitError, match="nothing imported"):
            import_reviews(reviews_csv(site, tmp_path / "s.csv", findings=("Mass",)), dev_data / "images", predictor,
                           store)  # fmt: skip
        assert store.count() == 0
    finally:
        store.close()


def test_concurrent_imports_and_app_reviews_lose_nothing(store, db_url, run, dev_data, tmp_path):
    frame = dev_frame(dev_data)
    csvs = [reviews_csv(frame.iloc[i * 6 : i * 6 + 6].reset_index(drop=True), tmp_path / f"c{i}.csv",
                        findings=("Effusion", "Mass"), start=pd.Timestamp(f"2024-0{i + 1}-01T00:00Z"))
            for i in range(3)]  # fmt: skip
    errors: list[BaseException] = []
    shown = {"Effusion": ShownFinding(0.4, 0.2, 0.3)}

    def importer(csv: Path) -> None:
        try:  # each importer has its own model, as separate `medvit reviews import` processes would
            import_reviews(csv, dev_data / "images", Predictor.from_dir(run, backend="torch"), store)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    def reviewer(k: int) -> None:
        try:
            for i in range(15):
                store.add_review(
                    reviewer=f"app{k}",
                    image_uid=f"{k:02d}{i:02d}".ljust(64, "a"),
                    image_uid_kind="sha256",
                    model_name="m",
                    weights_sha256="ab" * 32,
                    shown=shown,
                    verdicts={"Effusion": "agree"},
                )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=importer, args=(c,)) for c in csvs]
    threads += [threading.Thread(target=reviewer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    reviews = stored_reviews(db_url)
    assert len(reviews) == 3 * 6 + 3 * 15
    assert sum(len(r.verdicts) for r in reviews) == 3 * 6 * 2 + 3 * 15
