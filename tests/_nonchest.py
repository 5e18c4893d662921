"""Non-chest radiographs for the out-of-distribution check, made from pydicom-data's other images.

Every decodable image in pydicom's test data that is not the chest CR (RG1): CT, MR, US, NM, secondary
captures, and the extremity CR (RG3) itself. Each becomes what a PACS would hand medvit when the tags do not
help: a MONOCHROME2 16-bit CR with no BodyPartExamined and no ViewPosition, rendered from the original pixels
(first, middle and last frame of multi-frame files; colour as luminance). Copies of one image (several
transfer syntaxes, lossy and lossless) count once: a 32x32 thumbnail correlating > 0.98 with one already kept.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from PIL import Image
from pydicom.data.data_manager import external_data_sources
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CHEST = ("RG1_",)
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _local_files() -> list[Path]:
    """pydicom's own test files and pydicom-data's, as installed (get_testdata_files would try to download)."""
    roots = [
        Path(pydicom.data.__file__).parent / "test_files",
        *(source.data_path for source in external_data_sources().values()),
    ]
    return sorted({p for root in roots if root.is_dir() for p in root.rglob("*.dcm")}, key=lambda p: p.name)


def _frames(ds: Dataset) -> list[np.ndarray]:
    arr = np.asarray(ds.pixel_array, dtype=np.float64)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = [arr] if n == 1 else [arr[i] for i in sorted({0, n // 2, n - 1})]
    if spp == 3:
        frames = [f.mean(-1) for f in frames]
    return [f for f in frames if f.ndim == 2 and min(f.shape) >= 32]


def _thumbnail(frame: np.ndarray) -> np.ndarray:
    """32x32, zero-mean, unit-norm: the dot product of two is their correlation."""
    small = Image.fromarray(frame.astype(np.float32)).resize((32, 32), Image.Resampling.BILINEAR)
    t = np.asarray(small, dtype=np.float64)
    t -= t.mean()
    return t.ravel() / max(float(np.linalg.norm(t)), 1e-12)


def _as_cr(pixels: np.ndarray, monochrome1: bool) -> Dataset:
    """A header-minimal CR: 12-bit MONOCHROME2, no body part, no view, a fresh study."""
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    scaled = np.clip((pixels - lo) / max(hi - lo, 1e-9), 0, 1)
    if monochrome1:
        scaled = 1 - scaled
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName, ds.StudyDate = "CR", "NONCHEST", "Test^Nonchest", "20260101"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyTime, ds.AccessionNumber = "", "O", "120000", ""
    ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", 1, 1
    ds.Rows, ds.Columns = scaled.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.round(scaled * 4095).astype(np.uint16).tobytes()
    return ds


def nonchest_crs() -> list[tuple[str, Dataset]]:
    """(source file name, CR dataset) for every distinct non-chest image of pydicom's test data."""
    out: list[tuple[str, Dataset]] = []
    kept: list[np.ndarray] = []
    for path in _local_files():
        name = Path(path).name
        if name.startswith(CHEST):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                frames = _frames(ds)
            except Exception:  # noqa: BLE001 - pydicom's data holds deliberately broken files: not images
                continue
        for frame in frames:
            if np.ptp(frame) == 0:
                continue
            thumb = _thumbnail(frame)
            if any(float(np.dot(thumb, t)) > 0.98 for t in kept):
                continue
            kept.append(thumb)
            out.append((name, _as_cr(frame, str(ds.get("PhotometricInterpretation")) == "MONOCHROME1")))
    return out


def write_nonchest(folder: Path) -> list[Path]:
    """The non-chest CRs as files in `folder` (one per image, named after its source)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, ds) in enumerate(nonchest_crs()):
        path = folder / f"{i:03d}_{Path(name).stem}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
