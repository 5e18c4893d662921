"""`medvit watch --secondary-capture` against a real Orthanc: the saliency overlay is stored as a Secondary
Capture in the SR's series, and an untagged non-chest CR's SR carries the out-of-distribution warning.

Uses tests/_orthanc.py's Orthanc (skips when Orthanc is not installed) and the shipped demo model.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from _nonchest import nonchest_crs
from _orthanc import Orthanc, running_orthanc
from conftest import testdata as dicom_path
from pydicom.uid import ExplicitVRLittleEndian

from medvit.cli import main
from medvit.pacs.client import AS_STORED, PacsClient
from medvit.pacs.sc import COMMENT, INSTANCE_NUMBER
from medvit.pacs.sr import SERIES_NUMBER, WARNING_MEANING, read_sr_findings, sr_texts
from medvit.resources import DEMO_RUN

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture
def orthanc(tmp_path, monkeypatch):
    yield from running_orthanc(tmp_path / "orthanc", monkeypatch)


def _result_series(server: Orthanc) -> dict[str, list[pydicom.Dataset]]:
    """{source SOP Instance UID: the instances of its result series}, read back over WADO-RS with pydicom, as stored."""
    client = PacsClient(server.dicomweb)._client
    out: dict[str, list[pydicom.Dataset]] = {}
    for item in client.search_for_series(search_filters={"SeriesNumber": str(SERIES_NUMBER)}):
        study, series = (item[t]["Value"][0] for t in ("0020000D", "0020000E"))
        instances = client.retrieve_series(study, series, media_types=AS_STORED)
        sr = next(ds for ds in instances if ds.SOPClassUID == SR_STORAGE)
        source = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        out[source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = instances
    return out


def test_watch_stores_the_saliency_secondary_capture_beside_the_sr(orthanc, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    chest = pydicom.dcmread(dicom_path("RG1_UNCI.dcm"))
    hand = next(ds for name, ds in nonchest_crs() if name.startswith("RG3"))  # untagged extremity CR
    for ds in (chest, hand):
        orthanc.upload(ds)
    db = f"sqlite:///{tmp_path / 'review.db'}"
    argv = [
        "watch",
        "--dicomweb",
        orthanc.dicomweb,
        "--once",
        "--run",
        str(DEMO_RUN),
        "--backend",
        "torch",
        "--db",
        db,
        "--secondary-capture",
    ]
    assert main(argv) == 0

    series = _result_series(orthanc)
    assert set(series) == {chest.SOPInstanceUID, hand.SOPInstanceUID}
    for source_uid, instances in series.items():
        assert sorted(ds.SOPClassUID for ds in instances) == sorted([SR_STORAGE, SC_STORAGE]), source_uid
        sr = next(ds for ds in instances if ds.SOPClassUID == SR_STORAGE)
        sc = next(ds for ds in instances if ds.SOPClassUID == SC_STORAGE)
        assert sc.SeriesInstanceUID == sr.SeriesInstanceUID and sc.StudyInstanceUID == sr.StudyInstanceUID
        assert int(sc.InstanceNumber) == INSTANCE_NUMBER and sc.ImageComments == COMMENT
        rgb = sc.pixel_array
        assert sc.PhotometricInterpretation == "RGB" and rgb.dtype == np.uint8 and rgb.shape[2] == 3
        assert max(rgb.shape[:2]) == 1024 and rgb.std() > 5  # a picture, not a blank
        assert len(read_sr_findings(sr)) == 14
    viewer = PacsClient(orthanc.dicomweb)._client  # what a viewer asks: WADO-RS without a transfer syntax
    for instances in series.values():  # stored in DICOMweb's default syntax: no transcoding (Orthanc's GDCM crashed)
        assert {str(ds.file_meta.TransferSyntaxUID) for ds in instances} == {ExplicitVRLittleEndian}
        assert len(viewer.retrieve_series(instances[0].StudyInstanceUID, instances[0].SeriesInstanceUID)) == 2
    # the chest is tagged CHEST: trusted, no warning; the untagged hand is out of distribution
    assert WARNING_MEANING not in sr_texts(
        next(ds for ds in series[chest.SOPInstanceUID] if ds.SOPClassUID == SR_STORAGE)
    )
    hand_sr = next(ds for ds in series[hand.SOPInstanceUID] if ds.SOPClassUID == SR_STORAGE)
    assert sr_texts(hand_sr)[WARNING_MEANING].startswith("out of distribution")

    assert main(argv) == 0  # idempotent: nothing new, SC included
    assert orthanc.count() == 2 + 4
