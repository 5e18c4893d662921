"""PACS in, results back: `medvit watch` against a real Orthanc (DICOMweb plugin), and the PACS input checks.

Each test starts its own Orthanc on 127.0.0.1 (`tests/_orthanc.py`: temporary storage, HTTP authentication on,
remote access off) and stops it by its PID; the tests skip, with the reason, when Orthanc is not installed.
The PostgreSQL test needs ``MEDVIT_TEST_PG_URL`` (``eval "$(.ci/postgres.sh)"``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _orthanc import Orthanc, running_orthanc
from conftest import PG_URL
from conftest import testdata as dicom_path
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from medvit.cli import main
from medvit.data.dicom import read_image
from medvit.errors import ImageReadError, PacsError, UnsupportedImageError
from medvit.findings import display_name
from medvit.inference.predictor import Predictor
from medvit.pacs.client import AS_STORED, PASSWORD_ENV, PacsClient
from medvit.pacs.sr import DISCLAIMER, LOCAL_SCHEME, read_sr_findings, sr_texts
from medvit.pacs.watch import Watcher
from medvit.review.scoring import PacsInstanceRow
from medvit.review.store import ReviewStore


@pytest.fixture
def orthanc(tmp_path, monkeypatch):
    yield from running_orthanc(tmp_path / "orthanc", monkeypatch)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from _inference_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return Predictor.from_dir(run_dir, backend="torch")


def _copy(name: str, **changes) -> pydicom.Dataset:
    """A pydicom-data file with new instance/series UIDs (same study) and the given header changes."""
    ds = pydicom.dcmread(dicom_path(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def _uniform_cr() -> pydicom.Dataset:
    """A CR that Orthanc stores happily, but every pixel has one value: medvit must refuse it."""
    ds = _copy("RG1_UNCI.dcm")
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1234, dtype=np.uint16).tobytes()
    return ds


def _rows(db_url: str) -> dict[str, PacsInstanceRow]:
    store = ReviewStore(db_url)
    try:
        with Session(store.engine) as session:
            return {r.sop_instance_uid: r for r in session.scalars(select(PacsInstanceRow))}
    finally:
        store.close()


def _srs(server: Orthanc) -> list[pydicom.Dataset]:
    """Every SR in the PACS, retrieved over WADO-RS and read with pydicom."""
    client = PacsClient(server.dicomweb)
    found = client._client.search_for_instances(search_filters={"Modality": "SR"}, get_remaining=True)
    out = []
    for item in found:
        study, series, sop = (item[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
        out.append(client._client.retrieve_instance(study, series, sop, media_types=AS_STORED))
    return out


def _watch(server: Orthanc, run_dir: Path, db_url: str, *extra: str) -> int:
    return main(["watch", "--dicomweb", server.dicomweb, "--once", "--run", str(run_dir), "--backend", "torch",
                 "--db", db_url, *extra])


def test_watch_once_scores_frontal_crs_refuses_the_rest_and_is_idempotent(orthanc, run_dir, predictor, tmp_path,
                                                                           capsys):
    unci, j2k = pydicom.dcmread(dicom_path("RG1_UNCI.dcm")), pydicom.dcmread(dicom_path("RG1_J2KR.dcm"))
    lateral, uniform = _copy("RG1_UNCI.dcm", ViewPosition="LL"), _uniform_cr()
    for ds in (unci, j2k, pydicom.dcmread(dicom_path("CT_small.dcm")), lateral, uniform):
        orthanc.upload(ds)
    db = f"sqlite:///{tmp_path / 'reviews.sqlite3'}"

    assert _watch(orthanc, run_dir, db) == 0, capsys.readouterr().err
    rows = _rows(db)
    assert {uid: r.status for uid, r in rows.items()} == {
        unci.SOPInstanceUID: "scored", j2k.SOPInstanceUID: "scored",
        lateral.SOPInstanceUID: "refused", uniform.SOPInstanceUID: "refused",
    }  # fmt: skip  (the CT is not a CR/DX instance: never a candidate)
    assert "lateral" in rows[lateral.SOPInstanceUID].reason and "uniform" in rows[uniform.SOPInstanceUID].reason
    assert all(r.sr_sop_instance_uid is None for r in rows.values() if r.status == "refused")

    srs = {sr.SOPInstanceUID: sr for sr in _srs(orthanc)}
    assert len(srs) == 2
    for source in (unci, j2k):
        sr = srs[rows[source.SOPInstanceUID].sr_sop_instance_uid]
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
        [evidence] = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
        expected = predictor.predict(read_image(dicom_path(  # as `medvit predict` reads it (J2K at a reduced level)
            "RG1_UNCI.dcm" if source is unci else "RG1_J2KR.dcm"), min_side=predictor.input_side)).table.set_index(
            "finding")
        got = read_sr_findings(sr)
        assert set(got) == set(expected.index)
        for finding, values in got.items():  # a batch of 4 vs a batch of 1 differ in float32 rounding (~1e-8)
            assert values["prob"] == pytest.approx(expected.loc[finding, "prob"], abs=1e-6)
            assert values["threshold"] == pytest.approx(expected.loc[finding, "threshold"], abs=1e-12)
            assert values["flag"] == bool(expected.loc[finding, "flag"])
        names = {i.ConceptNameCodeSequence[0].CodeMeaning for i in sr.ContentSequence if i.ValueType == "NUM"}
        assert names == {display_name(f) for f in expected.index}
        assert all(i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
                   for i in sr.ContentSequence if i.ValueType == "NUM")
        assert sr.ContentSequence[-1].ConceptNameCodeSequence[0].CodingSchemeDesignator == LOCAL_SCHEME
        texts = sr_texts(sr)
        assert texts["Disclaimer"] == DISCLAIMER and "not for diagnostic use" in DISCLAIMER.lower()
        assert texts["Model weights SHA-256"] == predictor.info.weights_sha256
        assert texts["Algorithm Name"] == predictor.info.model_name and texts["Inference engine"] == "torch"
        assert texts["Calibration version"].startswith("v1 temperature sha256:")

    before = {uid: (r.status, r.updated_at, r.sr_sop_instance_uid) for uid, r in rows.items()}
    total = orthanc.count()
    capsys.readouterr()
    assert _watch(orthanc, run_dir, db) == 0
    assert "0 scored, 0 refused, 0 failed this pass" in capsys.readouterr().err
    assert orthanc.count() == total and orthanc.count("SR") == 2  # no second SR
    assert {uid: (r.status, r.updated_at, r.sr_sop_instance_uid) for uid, r in _rows(db).items()} == before


def test_outage_mid_run_loses_nothing_and_duplicates_nothing(orthanc, predictor, tmp_path, caplog):
    sources = [pydicom.dcmread(dicom_path("RG1_UNCI.dcm"))] + [_copy("RG1_UNCI.dcm") for _ in range(4)]
    for ds in sources:
        orthanc.upload(ds)
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.sqlite3'}")

    def kill_after_first(row: PacsInstanceRow) -> None:
        if row.status == "scored":
            orthanc.stop()

    watcher = Watcher(PacsClient(orthanc.dicomweb, timeout=5), predictor, store.engine,
                      after_instance=kill_after_first, batch_size=2)
    with pytest.raises(PacsError, match="cannot be reached"):
        watcher.run_pass()
    statuses = [r.status for r in _rows(store.url).values()]
    assert sorted(statuses) == ["pending"] * 3 + ["scored"] * 2  # the first batch committed, the next rolled back

    # The service keeps polling through the outage (backing off), and finishes once the PACS is back.
    watcher.after_instance = None
    stop = threading.Event()
    thread = threading.Thread(target=watcher.serve, args=(0.2,), kwargs={"stop": stop})
    with caplog.at_level(logging.WARNING, logger="medvit"):
        thread.start()
        time.sleep(2.0)
        orthanc.start()  # same storage, same port
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(r.status != "scored" for r in _rows(store.url).values()):
            time.sleep(0.5)
        stop.set()
        thread.join(timeout=60)
    assert any("retrying in" in r.getMessage() for r in caplog.records), caplog.text
    rows = _rows(store.url)
    assert {r.status for r in rows.values()} == {"scored"} and set(rows) == {s.SOPInstanceUID for s in sources}
    srs = _srs(orthanc)
    assert len(srs) == len(sources) == orthanc.count("SR")
    referenced = [sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                  .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for sr in srs]
    assert sorted(referenced) == sorted(s.SOPInstanceUID for s in sources)
    assert sorted(sr.SOPInstanceUID for sr in srs) == sorted(r.sr_sop_instance_uid for r in rows.values())
    store.close()


def test_unreachable_pacs_and_refused_credentials_exit_2_with_one_line(orthanc, run_dir, tmp_path, monkeypatch,
                                                                        capsys, caplog):
    db = f"sqlite:///{tmp_path / 'reviews.sqlite3'}"
    monkeypatch.setenv(PASSWORD_ENV, "wrong-" + orthanc.password)
    assert _watch(orthanc, run_dir, db) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused the credentials" in err and "HTTP 401" in err
    assert orthanc.password not in err + caplog.text
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    orthanc.stop()
    assert _watch(orthanc, run_dir, db) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be reached" in err


# Orthanc fails to store any SR of one study. (A filter that returns false is no test: Orthanc 1.10 then reports
# the object as stored.) In a multi-object STOW this error makes Orthanc 1.10 acknowledge none of the objects.
_REJECT_SR_OF_STUDY = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == 'SR' and dicom.StudyInstanceUID == '{study}' then error('this test PACS refuses the SR') end
  return true
end
"""


def test_one_batch_gives_each_row_its_own_outcome(tmp_path, monkeypatch, predictor):
    """One batch: a scored CR, a refused lateral and a CR whose SR the PACS rejects; then a retry pass."""
    scored, lateral = _copy("RG1_UNCI.dcm"), _copy("RG1_UNCI.dcm", ViewPosition="LL")
    rejected = _copy("RG1_UNCI.dcm", StudyInstanceUID=generate_uid())
    server_gen = running_orthanc(tmp_path / "orthanc", monkeypatch,
                                 lua=_REJECT_SR_OF_STUDY.format(study=rejected.StudyInstanceUID))
    server = next(server_gen)
    try:
        for ds in (scored, lateral, rejected):
            server.upload(ds)
        store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.sqlite3'}")
        committed: list[list[str]] = []
        watcher = Watcher(PacsClient(server.dicomweb), predictor, store.engine, batch_size=8,
                          after_instance=lambda row: committed.append([row.sop_instance_uid, row.status]))
        summary = watcher.run_pass()
        assert (summary.scored, summary.refused, summary.failed) == (1, 1, 1)
        assert sorted(committed) == sorted([[scored.SOPInstanceUID, "scored"], [lateral.SOPInstanceUID, "refused"],
                                            [rejected.SOPInstanceUID, "failed"]])
        rows = _rows(store.url)
        assert rows[rejected.SOPInstanceUID].attempts == 1
        assert rows[rejected.SOPInstanceUID].reason.startswith(f"PACS {server.dicomweb}")  # why the STOW failed
        assert "lateral" in rows[lateral.SOPInstanceUID].reason and rows[lateral.SOPInstanceUID].attempts == 0
        [sr] = _srs(server)
        assert sr.SOPInstanceUID == rows[scored.SOPInstanceUID].sr_sop_instance_uid
        assert sr.StudyInstanceUID == scored.StudyInstanceUID

        summary = watcher.run_pass()  # the failed row is retried (and rejected again); the others are final
        assert (summary.scored, summary.refused, summary.failed) == (0, 0, 1)
        rows = _rows(store.url)
        assert rows[rejected.SOPInstanceUID].attempts == 2 and rows[rejected.SOPInstanceUID].status == "failed"
        assert server.count("SR") == 1
        store.close()
    finally:
        server_gen.close()


def test_the_next_batch_is_scored_while_this_batchs_srs_are_stored(orthanc, predictor, tmp_path, monkeypatch):
    """The model does not wait for the PACS: batch 2's forward runs (in the scorer thread) during batch 1's STOW,
    and every row is scored once."""
    sources = [_copy("RG1_UNCI.dcm") for _ in range(4)]
    for ds in sources:
        orthanc.upload(ds)
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.sqlite3'}")
    client = PacsClient(orthanc.dicomweb)
    forwards: list[tuple[str, int]] = []
    second_forward = threading.Event()
    predict_inputs, store_many = predictor.predict_inputs, client.store_many

    def counted_forward(x, ood_mask=None):
        forwards.append((threading.current_thread().name, len(x)))
        out = predict_inputs(x, ood_mask)
        if len(forwards) == 2:
            second_forward.set()
        return out

    stow_waited: list[bool] = []

    def stow_after_next_forward(datasets):
        if not stow_waited:  # the first STOW returns only once batch 2 is scored (or never, without scoring ahead)
            stow_waited.append(second_forward.wait(timeout=60))
        return store_many(datasets)

    monkeypatch.setattr(predictor, "predict_inputs", counted_forward)
    client.store_many = stow_after_next_forward  # type: ignore[method-assign]
    summary = Watcher(client, predictor, store.engine, batch_size=2).run_pass()
    assert stow_waited == [True]
    assert summary.scored == 4 and orthanc.count("SR") == 4
    assert [n for _, n in forwards] == [2, 2] and all(name.startswith("medvit-forward") for name, _ in forwards)
    store.close()


class _Crash(BaseException):
    """The watcher process dying (not an error it handles)."""


def test_crash_between_stow_and_commit_leaves_the_batch_pending_and_stores_no_second_sr(orthanc, predictor,
                                                                                          tmp_path):
    sources = [_copy("RG1_UNCI.dcm") for _ in range(3)]
    for ds in sources:
        orthanc.upload(ds)
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.sqlite3'}")
    client = PacsClient(orthanc.dicomweb)
    store_many = client.store_many

    def stow_then_die(datasets):
        assert store_many(datasets) == {}  # the SRs reach the PACS...
        orthanc.stop()  # ...and the PACS goes away with the watcher, before the database commit
        raise _Crash

    client.store_many = stow_then_die  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        Watcher(client, predictor, store.engine, batch_size=8).run_pass()
    assert {r.status for r in _rows(store.url).values()} == {"pending"}  # the whole batch rolled back
    orthanc.start()
    assert orthanc.count("SR") == len(sources)  # stored before the crash

    summary = Watcher(PacsClient(orthanc.dicomweb), predictor, store.engine, batch_size=8).run_pass()
    assert summary.scored == len(sources)
    rows = _rows(store.url)
    srs = _srs(orthanc)
    assert len(srs) == orthanc.count("SR") == len(sources)  # stored again under the same UIDs: no duplicate
    assert sorted(sr.SOPInstanceUID for sr in srs) == sorted(r.sr_sop_instance_uid for r in rows.values())
    store.close()


@pytest.mark.postgres
def test_two_watchers_on_postgres_split_the_work_exactly_once(orthanc, run_dir):
    if not PG_URL:
        pytest.skip('MEDVIT_TEST_PG_URL not set: run `eval "$(.ci/postgres.sh)"` to test against PostgreSQL')
    from sqlalchemy import create_engine, text

    sources = [_copy("RG1_UNCI.dcm") for _ in range(8)]
    for ds in sources:
        orthanc.upload(ds)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    stores = [ReviewStore(url) for _ in range(2)]
    try:
        handled: dict[str, list[str]] = {"w0": [], "w1": []}  # every row each watcher committed, in order
        watchers = [Watcher(PacsClient(orthanc.dicomweb), Predictor.from_dir(run_dir, backend="torch"), s.engine,
                            worker=w, after_instance=lambda row, w=w: handled[w].append(row.sop_instance_uid),
                            batch_size=2)  # batches of 2: the 8 rows are not all claimed by whoever comes first
                    for w, s in zip(handled, stores, strict=True)]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def work(w: Watcher) -> None:
            try:
                barrier.wait()
                w.run_pass()
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(w,)) for w in watchers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        rows = _rows(url)
        assert {r.status for r in rows.values()} == {"scored"} and len(rows) == len(sources)
        assert sorted(handled["w0"] + handled["w1"]) == sorted(rows), f"an instance was handled twice: {handled}"
        assert handled["w0"] and handled["w1"], "one watcher did all the work: rows were not claimed concurrently"
        assert {r.worker for u, r in rows.items() if u in handled["w1"]} == {"w1"}
        srs = _srs(orthanc)
        assert len(srs) == len(sources) and len({sr.SOPInstanceUID for sr in srs}) == len(sources)
    finally:
        for s in stores:
            s.close()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# ---- input checks a PACS stream needs (no Orthanc) ----

def _blank_png(tmp_path: Path) -> Path:
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(path)
    return path


def _cr_with(tmp_path: Path, name: str, **changes) -> Path:
    ds = _copy("RG1_UNCI.dcm")
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _zero_rgb_dicom(tmp_path: Path) -> Path:
    ds = _copy("RG1_UNCI.dcm", Modality="OT")
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    for key in ("WindowCenter", "WindowWidth"):
        if key in ds:
            delattr(ds, key)
    ds.PixelData = np.zeros((64, 64, 3), np.uint8).tobytes()
    path = tmp_path / "zero_rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("case", ["blank_png", "blank_png_named_dcm", "zero_rgb", "one_value_cr", "slope_0"])
def test_uniform_images_are_refused_after_the_pixel_chain(case, tmp_path, run_dir, capsys):
    if case.startswith("blank_png"):
        path = _blank_png(tmp_path)
        if case.endswith("dcm"):
            path = path.rename(tmp_path / "blank.dcm")
    elif case == "zero_rgb":
        path = _zero_rgb_dicom(tmp_path)
    elif case == "one_value_cr":
        ds = pydicom.dcmread(dicom_path("RG1_UNCI.dcm"))
        path = _cr_with(tmp_path, "flat.dcm", PixelData=np.full((ds.Rows, ds.Columns), 700, np.uint16).tobytes())
    else:
        path = _cr_with(tmp_path, "slope0.dcm", RescaleSlope=0, RescaleIntercept=0)
    with pytest.raises(UnsupportedImageError, match="uniform"):
        read_image(path)
    assert main(["predict", str(path), "--run", str(run_dir), "--backend", "torch"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "uniform (no anatomy)" in err


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm", "RG1_UNCR.dcm"])
def test_real_radiographs_are_not_uniform(name):
    assert read_image(dicom_path(name)).pixels.std() > 0.05


def test_corrupt_jpeg2000_logs_no_plugin_tracebacks(tmp_path, caplog):
    ds = pydicom.dcmread(dicom_path("RG1_J2KR.dcm"))
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 2]])  # codestream cut, DICOM framing intact
    path = tmp_path / "corrupt_j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG, logger="medvit"):  # medvit's own debug records are captured too
        with pytest.raises(ImageReadError, match="cannot be decoded"):
            read_image(path)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "plugin tracebacks reached ERROR"
    assert any(r.name == "medvit.data.pixels" and "pydicom decoder plugin" in r.getMessage() for r in caplog.records)
    assert not logging.getLogger("pydicom.pixels.decoders.base").filters  # the routing ends with the decode
