"""Patient identifiers never leave the DICOM: a full run on a real chest CR carrying fake identifiers in every
PS3.15 basic-profile patient/staff/institution tag, then every output is scanned for them.

Outputs scanned: the predictions CSV and the console/log output of `medvit predict`, `medvit evaluate` and
`medvit calibrate` (stderr with -v debug logging, and the log records), every file they write (metrics.json,
calibration.json, the model card...), the review app's page, its logs, and the feedback database's raw
files after a review is saved through the app. Each marker carries the prefix "ZQX", so a truncated or
re-cased leak is still found. StudyDate and the SOP Instance UID are deliberately not markers: the reader
needs the date and the review database keys images by UID (docs/reliability.md).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from medvit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "review.py"

# PS3.15 Annex E basic profile attributes that identify the patient, staff or institution (fake values).
IDENTIFIERS = {
    "PatientName": "ZQXNAME^ALPHA",
    "PatientID": "ZQXPID4411",
    "PatientBirthDate": "18930417",
    "OtherPatientIDs": "ZQXOTHERID",
    "OtherPatientNames": "ZQXOTHER^NAME",
    "PatientMotherBirthName": "ZQXMOTHER^M",
    "PatientAddress": "ZQXADDR 1 Test Street",
    "PatientTelephoneNumbers": "ZQXTEL5550101",
    "MedicalRecordLocator": "ZQXMRN77",
    "Occupation": "ZQXJOB",
    "AdditionalPatientHistory": "ZQXHISTORY smoker",
    "PatientComments": "ZQXCOMMENTS",
    "AccessionNumber": "ZQXACC9090",
    "StudyID": "ZQXSTUDYID",
    "StudyDescription": "ZQXSTUDYDESC",
    "SeriesDescription": "ZQXSERIESDESC",
    "InstitutionName": "ZQXINSTITUTE",
    "InstitutionAddress": "ZQXINSTADDR",
    "InstitutionalDepartmentName": "ZQXDEPT",
    "ReferringPhysicianName": "ZQXREFDOC^A",
    "PerformingPhysicianName": "ZQXPERFDOC^B",
    "NameOfPhysiciansReadingStudy": "ZQXREADDOC^C",
    "RequestingPhysician": "ZQXREQDOC^D",
    "OperatorsName": "ZQXOPERATOR^E",
    "StationName": "ZQXSTATION",
    "DeviceSerialNumber": "ZQXSERIAL",
}
_LEAK = re.compile(rb"zqx|18930417|1893-04-17|1893/04/17|17/04/1893", re.IGNORECASE)


def leaks(data: bytes | str) -> list[str]:
    """The marker fragments found in `data` (text or raw bytes of any output file)."""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    return sorted({m.group().decode("ascii", "replace") for m in _LEAK.finditer(raw)})


def scan_folder(folder: Path) -> dict[str, list[str]]:
    """{file: markers} for every file under `folder` that holds any."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        hits = leaks(path.read_bytes())
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found


@pytest.fixture(scope="module")
def marked_dicom(tmp_path_factory, cxr_dicom) -> Path:
    """RG1_UNCI.dcm (a real PA chest CR) carrying a fake identifier in every basic-profile tag."""
    ds = pydicom.dcmread(cxr_dicom)
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    path = tmp_path_factory.mktemp("phi") / "study.dcm"
    ds.save_as(path)
    assert leaks(path.read_bytes()), "the markers must be in the input"
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from _inference_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("run") / "run")


def _medvit(*argv: str) -> subprocess.CompletedProcess:
    """The real console entry point, with debug logging on (the most a log can say)."""
    return subprocess.run([sys.executable, "-m", "medvit", "-v", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_marked_file_is_a_readable_chest_radiograph(marked_dicom):
    from medvit.data.dicom import check_chest_frontal, read_image

    image = read_image(marked_dicom)
    check_chest_frontal(image.meta)
    assert not leaks(str(image.meta.as_dict()))


@pytest.mark.timeout(600)
def test_predict_outputs_and_logs_carry_no_identifiers(marked_dicom, tiny_run, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    out.mkdir()
    done = _medvit("predict", "--run", str(tiny_run), "--backend", "torch", "--workers", "0",
                   "--out", str(out / "preds.csv"), str(marked_dicom))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "DEBUG" in done.stderr  # the verbose log really ran
    assert not leaks(done.stdout + done.stderr)

    caplog.set_level(logging.DEBUG)
    assert cli_main(["predict", "--run", str(tiny_run), "--backend", "torch", "--workers", "0", str(marked_dicom)]) == 0
    printed = capsys.readouterr()
    assert caplog.records
    assert not leaks(caplog.text + printed.out + printed.err)

    rows = pd.read_csv(out / "preds.csv", keep_default_na=False)
    assert (rows["error"] == "").all() and len(rows) >= 14  # it was really scored
    assert not scan_folder(out)


@pytest.fixture(scope="module")
def labelled_set(marked_dicom, dev_labels, dev_images, tmp_path_factory) -> tuple[Path, Path]:
    """The marked DICOM plus 23 real NIH images, in NIH Data_Entry format (temp copies, never in the project)."""
    folder = tmp_path_factory.mktemp("labelled")
    images = folder / "images"
    images.mkdir()
    df = pd.read_csv(dev_labels).head(23)
    for name in df["Image Index"]:
        shutil.copy(dev_images / name, images / name)
    shutil.copy(marked_dicom, images / "study.dcm")
    row = {**df.iloc[0].to_dict(), "Image Index": "study.dcm", "Finding Labels": "Effusion", "Patient ID": 999999}
    pd.concat([df, pd.DataFrame([row])]).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv", images


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluate_and_calibrate_outputs_and_logs_carry_no_identifiers(labelled_set, tiny_run, tmp_path):
    labels, images = labelled_set
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    calibrated = _medvit("calibrate", "--run", str(run), "--labels", str(labels), "--images", str(images),
                         "--method", "temperature", "--n-boot", "20")  # fmt: skip
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    evaluated = _medvit("evaluate", "--run", str(run), "--labels", str(labels), "--images", str(images),
                        "--out", str(tmp_path / "eval"), "--n-boot", "20")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()
    for done in (calibrated, evaluated):
        assert not leaks(done.stdout + done.stderr)
    assert not scan_folder(run)  # calibration.json, model card, metrics...
    assert not scan_folder(tmp_path / "eval")  # metrics.json, plots


# ------------------------------------------------------------------------------------------- the app


def _page_text(at) -> str:
    """Every value the app put on the page (main area and sidebar), as text."""
    parts = []
    kinds = ("title", "header", "subheader", "markdown", "caption", "text", "code", "latex", "error", "warning",
             "info", "success", "exception", "metric", "json", "table", "dataframe", "expander", "toast")
    for kind in kinds:
        for element in getattr(at, kind, []):
            value = getattr(element, "value", None)
            parts.append(value.to_csv() if isinstance(value, pd.DataFrame) else str(value))
            parts.append(str(getattr(element, "label", "") or ""))
    for kind in ("text_input", "text_area", "selectbox", "radio", "toggle", "slider"):
        for widget in getattr(at, kind, []):
            parts += [str(getattr(widget, "label", "")), str(getattr(widget, "value", ""))]
    return "\n".join(parts)


@pytest.mark.timeout(600)
def test_app_page_logs_and_feedback_database_carry_no_identifiers(marked_dicom, tiny_run, tmp_path, monkeypatch,
                                                                   caplog):  # fmt: skip
    from streamlit.testing.v1 import AppTest

    from medvit.review.store import ReviewStore

    db_file = tmp_path / "reviews.sqlite3"
    for name in ("MEDVIT_WORKLIST", "MEDVIT_CLIP", "MEDVIT_MAX_UPLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDVIT_RUN", str(tiny_run))
    monkeypatch.setenv("MEDVIT_BACKEND", "torch")
    monkeypatch.setenv("MEDVIT_DB_URL", f"sqlite:///{db_file}")
    monkeypatch.setenv("MEDVIT_FILE", str(marked_dicom))
    caplog.set_level(logging.DEBUG)

    at = AppTest.from_file(str(APP), default_timeout=300).run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    findings = [b.key for b in at.button_group if b.key and b.key.startswith("lab_")]
    assert findings, "no findings rows"
    assert not leaks(_page_text(at)), leaks(_page_text(at))

    # save a review through the form, as a reviewer would
    at.toggle(key=next(t.key for t in at.toggle if t.key and t.key.startswith("all_"))).set_value(True).run()
    key = next(b.key for b in at.button_group if b.key and b.key.startswith("lab_"))[: len("lab_") + 12]
    at.button_group(key=f"{key}_Effusion").set_value("present").run()
    at.text_input(key="reviewer").input("Dr Reader")
    at.text_area(key=f"note_{key[4:]}").input("small effusion")
    at = at.button(key=f"save_{key[4:]}").click().run()
    assert any("Saved review" in s.value for s in at.success), [e.value for e in at.error]
    assert not leaks(_page_text(at))

    store = ReviewStore(f"sqlite:///{db_file}")
    try:
        assert store.count() == 1
        assert not leaks(store.export_csv())
    finally:
        store.close()
    db_files = {p.name: leaks(p.read_bytes()) for p in tmp_path.glob("reviews.sqlite3*")}
    assert db_files and not any(db_files.values()), db_files  # the database file, its WAL and shm
    assert not leaks(caplog.text)

    # the scan is not vacuous: revealing the masked identifiers puts them on the page
    at.toggle(key=next(t.key for t in at.toggle if t.key and t.key.startswith("show_phi"))).set_value(True).run()
    assert "ZQX" in leaks(_page_text(at))
