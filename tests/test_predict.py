"""`medvit predict` over folders: error rows, incremental CSV, resume, and printing."""

from __future__ import annotations

import pandas as pd
import pytest
from _inference_run import make_tiny_run

from medvit.cli import main
from medvit.data.files import find_images
from medvit.findings import DEFAULT_FINDINGS
from medvit.inference.batch import CSV_COLUMNS

K = len(DEFAULT_FINDINGS)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny", dev_data)


@pytest.fixture
def folder(tmp_path, dev_images, cxr_dicom):
    """4 real PNGs + a real DICOM without extension in a subfolder + 2 bad files (links, not copies)."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for p in sorted(dev_images.iterdir())[:4]:
        (root / p.name).symlink_to(p)
    (root / "sub" / "IM0001").symlink_to(cxr_dicom)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "empty.dcm").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, not picked up")
    return root


def _predict(run, *args):
    return main(["predict", "--run", str(run), "--backend", "torch", "--batch-size", "2", *map(str, args)])


def test_folder_walk(folder):
    names = sorted(p.name for p in find_images([folder]))
    assert len(names) == 7 and "IM0001" in names and "notes.txt" not in names


def test_error_rows_and_the_rest_continue(run, folder, tmp_path):
    out = tmp_path / "preds.csv"
    assert _predict(run, folder, "--out", out, "--workers", "1") == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert tuple(df.columns) == CSV_COLUMNS
    errors = df[df["error"] != ""]
    assert sorted(errors["file"].map(lambda f: f.rsplit("/", 1)[-1])) == ["broken.png", "empty.dcm"]
    assert errors["error"].str.len().min() > 10
    good = df[df["error"] == ""]
    assert good["file"].nunique() == 5 and len(good) == 5 * K
    assert set(good["finding"]) == set(DEFAULT_FINDINGS)
    assert good["prob"].astype(float).between(0, 1).all()


def test_resume_skips_done_files_and_keeps_earlier_rows(run, folder, tmp_path):
    out = tmp_path / "preds.csv"
    pngs = sorted(folder.glob("*.png"))[:2]
    assert _predict(run, *pngs, "--out", out) == 0  # an "interrupted" run that got through two files
    before = pd.read_csv(out, keep_default_na=False)
    assert _predict(run, folder, "--out", out) == 2, "an existing CSV is not silently overwritten"
    assert _predict(run, folder, "--out", out, "--resume") == 0
    after = pd.read_csv(out, keep_default_na=False)
    assert after["file"].nunique() == 7
    assert (after.groupby("file").size().drop([str(p.absolute()) for p in pngs]) > 0).all()
    assert (after.groupby("file").size().loc[[str(p.absolute()) for p in pngs]] == K).all(), "no duplicates"
    head = after.head(len(before))
    assert list(head["file"]) == list(before["file"]), "earlier rows are kept, in place"
    assert (pd.to_numeric(head["prob"]) == before["prob"]).all()


def test_prints_tables_without_out(run, folder, capsys):
    assert _predict(run, folder / "sub" / "IM0001", folder / "empty.dcm", "--workers", "0") == 0
    text = capsys.readouterr().out
    assert "IM0001" in text and "Cardiomegaly" in text and "error:" in text
