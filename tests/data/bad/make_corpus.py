"""The bad-input corpus: broken, hostile and unsupported files, each with the error medvit must give.

Most inputs are generated here (from pydicom-data's real RG1_UNCI.dcm chest CR, from synthetic PNG/JPEG
pixels, or from scratch), the rest are pydicom-data's own broken and non-radiograph files. Nothing here
comes from the NIH images. The tests build the corpus in a temp dir; to look at the files, run

    python tests/data/bad/make_corpus.py            # writes tests/data/bad/generated/ (git-ignored)

Each `Case` names the interface it goes through ("image": `read_image` + `check_chest_frontal`, as the
predictor calls them; "labels": `load_labels`), the typed error expected (None: the input is documented as
accepted, e.g. a PNG named .dcm) and a fragment the message (or, for accepted inputs, a warning) must contain.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from medvit.errors import (
    DatasetError,
    ImageReadError,
    ImageTooLargeError,
    MedvitError,
    MissingDecoderError,
    UnsupportedImageError,
)

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, which interface reads it and what that must say."""

    name: str  # file name in the corpus (also the test id)
    kind: str  # "image" | "labels"
    expect: type[MedvitError] | None  # None: documented as accepted (then `fragment` is in a warning)
    fragment: str  # case-insensitive part of the error message (or warning)
    make: Callable[[Path], Path]  # writes the input under the folder, returns the path to pass
    why: str = ""
    cli_exit: int | None = None  # exit code of the CLI when not the default (2 for errors, 0 when accepted)
    kwargs: dict = field(default_factory=dict)  # extra arguments for the library call (labels: findings=...)
    cli_fragment: str | None = None  # when the CLI words it differently (it sees a folder, not a file)

    @property
    def exit_code(self) -> int:
        if self.cli_exit is not None:
            return self.cli_exit
        return 0 if self.expect is None else 2


# ---------------------------------------------------------------- helpers: real DICOM and synthetic rasters


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name}: pydicom-data is not installed (`pip install -e .[dev]`)")
    return Path(path)


def small_cr() -> Dataset:
    """RG1_UNCI.dcm (a real MONOCHROME1 PA chest CR) with its pixels subsampled 8x: the full real header, small."""
    ds = pydicom.dcmread(_testfile("RG1_UNCI.dcm"))
    arr = np.ascontiguousarray(ds.pixel_array[::8, ::8])
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def gradient(h: int = 256, w: int = 256) -> np.ndarray:
    """A synthetic 8-bit grey image (not a radiograph, but a valid raster of a plausible size)."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x + y) * 255 // (h + w - 2)).astype(np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_header(side: int) -> bytes:
    """PNG signature + IHDR of a side x side 8-bit grey image."""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))


def _png_bomb(side: int) -> bytes:
    """A real PNG of side x side zero pixels: tiny on disk, `side**2` bytes once decoded."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one byte per pixel
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return _png_header(side) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _write(data: bytes, name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return make


def _lazy(fn: Callable[[], bytes], name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(fn())
        return path

    return make


def _cr(name: str, **changes: object) -> Callable[[Path], Path]:
    """The small real CR with header elements changed (None deletes the element)."""

    def build() -> bytes:
        ds = small_cr()
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return dicom_bytes(ds)

    return _lazy(build, name)


def _relabelled(name: str, syntax: str) -> Callable[[Path], Path]:
    """The small CR, its pixels native (explicit VR little endian), its file meta claiming another syntax.

    pydicom refuses to write such a file, so the meta and the dataset are written separately.
    """

    def build() -> bytes:
        ds = small_cr()
        body = DicomBytesIO()
        body.is_little_endian, body.is_implicit_VR = True, False
        write_dataset(body, ds)
        meta = FileMetaDataset(ds.file_meta)
        meta.TransferSyntaxUID = syntax
        head = DicomBytesIO()
        write_file_meta_info(head, meta)
        return b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue()

    return _lazy(build, name)


def _copy(testfile: str, name: str | None = None) -> Callable[[Path], Path]:
    return _lazy(lambda: _testfile(testfile).read_bytes(), name or testfile)


def _truncated(testfile: str, name: str, keep: float) -> Callable[[Path], Path]:
    """A real file cut at `keep` of the way through its pixel data (as an interrupted copy leaves it)."""

    def build() -> bytes:
        data = _testfile(testfile).read_bytes()
        start = data.rfind(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) Pixel Data tag
        return data[: start + int((len(data) - start) * keep)]

    return _lazy(build, name)


def _nested_zip() -> bytes:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("study/image.dcm", dicom_bytes(small_cr()))
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as z:
        z.writestr("inner.zip", inner.getvalue())
    return outer.getvalue()


def _multiframe() -> bytes:
    ds = small_cr()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return dicom_bytes(ds)


def _short_pixel_element() -> bytes:
    """The Pixel Data element itself (not the file) holds half the bytes Rows x Columns needs."""
    ds = small_cr()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return dicom_bytes(ds)


def _one_pixel_dicom() -> bytes:
    ds = small_cr()
    ds.Rows = ds.Columns = 1
    ds.PixelData = b"\x00\x00"
    return dicom_bytes(ds)


def _huge_header() -> bytes:
    """A decompression bomb by header: 65535 x 65535 claimed, a few bytes present."""
    ds = small_cr()
    ds.Rows = ds.Columns = 65535
    return dicom_bytes(ds)


def _bad_vr() -> bytes:
    """Modality's VR bytes corrupted ("CS" -> "C\\x7f"): pydicom parses the file and fails on first access."""
    data = dicom_bytes(small_cr())
    tag = b"\x08\x00\x60\x00CS"
    assert tag in data
    return data.replace(tag, b"\x08\x00\x60\x00C\x7f", 1)


def _fifo(folder: Path) -> Path:
    """A named pipe with no writer: naive readers block forever on it."""
    path = folder / "named_pipe.dcm"
    os.mkfifo(path)
    return path


def _directory(folder: Path) -> Path:
    path = folder / "a_folder.dcm"
    path.mkdir()
    return path


def _pil_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient()).save(buf, format=fmt)
    return buf.getvalue()


def _bad_crc_png() -> bytes:
    data = bytearray(png_bytes(gradient()))
    i = data.find(b"IDAT") + 40
    data[i : i + 8] = bytes(8)  # corrupt the compressed stream inside IDAT
    return bytes(data)


def _lazy_csv(name: str, fn: Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        _images(folder)
        path = folder / name
        path.write_bytes(fn())
        return path

    return make


# ---------------------------------------------------------------- labels CSVs

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,split"


def _images(folder: Path) -> Path:
    """The image root for CSV cases: three small synthetic PNGs."""
    root = folder / "images"
    root.mkdir(exist_ok=True)
    for i in range(3):
        (root / f"img{i}.png").write_bytes(png_bytes(gradient(64, 64)))
    return root


def _csv(name: str, text: str | bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        _images(folder)
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    return make


def _nih(*rows: str) -> str:
    return "\n".join([NIH_HEADER, *rows]) + "\n"


def _wide(*rows: str, header: str = "Path,Patient ID,Effusion,Cardiomegaly") -> str:
    return "\n".join([header, *rows]) + "\n"


def _escaping_symlink(folder: Path) -> Path:
    """A CSV naming a symlink inside the image root that points outside it."""
    root = _images(folder)
    outside = folder / "outside.png"
    outside.write_bytes(png_bytes(gradient(64, 64)))
    link = root / "link.png"
    if not link.exists():
        link.symlink_to(outside)
    path = folder / "symlink_escape.csv"
    path.write_text(_wide("link.png,p1,1,0"))
    return path


GOOD_NIH_ROWS = ("img0.png,Effusion,0,1,60,M,PA,train", "img1.png,No Finding,0,2,50,F,PA,val")

# ---------------------------------------------------------------- the corpus

RADIOGRAPH_ONLY = "not a chest radiograph"

# fmt: off
CASES: tuple[Case, ...] = (
    # --- not an image at all
    Case("empty.dcm", "image", ImageReadError, "empty (0 bytes)", _write(b"", "empty.dcm"), "0-byte file"),
    Case("random.dcm", "image", ImageReadError, "not a DICOM, PNG or JPEG",
         _write(np.random.default_rng(7).bytes(4096), "random.dcm"), "random bytes named .dcm"),
    Case("notes.txt", "image", ImageReadError, "not a DICOM, PNG or JPEG",
         _write(b"Patient looks fine.\nCXR tomorrow.\n", "notes.txt"), "a text file"),
    Case("report.dcm", "image", ImageReadError, "not a DICOM, PNG or JPEG",
         _write(b"DICOM report: see PACS\n" * 20, "report.dcm"), "a text file named .dcm"),
    Case("study.zip", "image", ImageReadError, "not a DICOM, PNG or JPEG", _lazy(_nested_zip, "study.zip"),
         "a zip inside a zip holding a DICOM"),
    Case("image.dcm.gz", "image", ImageReadError, "not a DICOM, PNG or JPEG",
         _lazy(lambda: gzip.compress(dicom_bytes(small_cr())), "image.dcm.gz"), "a gzipped DICOM"),
    Case("scan.pdf", "image", ImageReadError, "not a DICOM, PNG or JPEG",
         _write(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "scan.pdf"), "a PDF"),
    Case("image.gif", "image", ImageReadError, "not a DICOM, PNG or JPEG",
         _lazy(lambda: _pil_bytes("GIF"), "image.gif"), "a GIF (unsupported raster format)"),
    Case("image.tiff", "image", ImageReadError, "not a DICOM, PNG or JPEG",
         _lazy(lambda: _pil_bytes("TIFF"), "image.tiff"), "a TIFF (unsupported raster format)"),
    Case("preamble_only.dcm", "image", ImageReadError, "truncated or corrupt",
         _write(b"\x00" * 128 + b"DICM", "preamble_only.dcm"),
         "a DICOM preamble and nothing else"),
    Case("a_folder.dcm", "image", ImageReadError, "is a directory", _directory, "a directory named .dcm",
         cli_fragment="no DICOM/PNG/JPEG files found"),
    Case("named_pipe.dcm", "image", ImageReadError, "not a regular file", _fifo,
         "a FIFO with no writer: must be refused, not read forever"),
    # --- broken DICOM
    Case("truncated_pixels.dcm", "image", ImageReadError, "truncated",
         _truncated("RG1_UNCI.dcm", "truncated_pixels.dcm", 0.5), "real CR cut half-way through its pixel data"),
    Case("truncated_j2k.dcm", "image", ImageReadError, "truncated",
         _truncated("RG1_J2KR.dcm", "truncated_j2k.dcm", 0.5), "JPEG 2000 CR cut half-way through its codestream"),
    Case("truncated_header.dcm", "image", ImageReadError, "truncated or corrupt",
         _lazy(lambda: _testfile("RG1_UNCI.dcm").read_bytes()[:700], "truncated_header.dcm"),
         "real CR cut inside its header"),
    Case("short_pixel_element.dcm", "image", ImageReadError, "cannot be decoded",
         _lazy(_short_pixel_element, "short_pixel_element.dcm"),
         "Pixel Data element shorter than Rows x Columns"),
    Case("no_pixel_data.dcm", "image", ImageReadError, "without pixel data", _cr("no_pixel_data.dcm", PixelData=None),
         "CR image header with the pixel data removed"),
    Case("test-SR.dcm", "image", UnsupportedImageError, "no pixel data", _copy("test-SR.dcm"),
         "pydicom-data: a structured report, no pixels"),
    Case("waveform_ecg.dcm", "image", UnsupportedImageError, "no pixel data", _copy("waveform_ecg.dcm"),
         "pydicom-data: an ECG waveform"),
    Case("rtplan_truncated.dcm", "image", UnsupportedImageError, "no pixel data", _copy("rtplan_truncated.dcm"),
         "pydicom-data: a truncated RT plan"),
    Case("emri_small_jpeg_2k_lossless_too_short.dcm", "image", ImageReadError, "truncated or corrupt",
         _copy("emri_small_jpeg_2k_lossless_too_short.dcm"), "pydicom-data: file ends early"),
    Case("UN_sequence.dcm", "image", ImageReadError, "without pixel data", _copy("UN_sequence.dcm"),
         "pydicom-data: a CT header fragment with an UN sequence"),
    Case("meta_missing_tsyntax.dcm", "image", ImageReadError, "no Rows/Columns", _copy("meta_missing_tsyntax.dcm"),
         "pydicom-data: file meta without a transfer syntax"),
    Case("wrong_syntax_jpeg.dcm", "image", ImageReadError, "cannot be decoded",
         _relabelled("wrong_syntax_jpeg.dcm", "1.2.840.10008.1.2.4.50"),
         "native pixels labelled JPEG Baseline"),
    Case("wrong_syntax_unknown.dcm", "image", ImageReadError, "unknown transfer syntax",
         _relabelled("wrong_syntax_unknown.dcm", "1.2.3.4.5.6.7"), "a transfer syntax UID that is not one"),
    Case("wrong_syntax_mpeg2.dcm", "image", MissingDecoderError, "no installed decoder",
         _relabelled("wrong_syntax_mpeg2.dcm", "1.2.840.10008.1.2.4.100"),
         "MPEG-2 video syntax: no decoder exists, must name the syntax and the medvit[dicom] extra"),
    Case("bad_bits_allocated.dcm", "image", ImageReadError, "Bits Allocated",
         _cr("bad_bits_allocated.dcm", BitsAllocated=12),
         "BitsAllocated 12 (invalid)"),
    Case("no_photometric.dcm", "image", UnsupportedImageError, "Photometric Interpretation",
         _cr("no_photometric.dcm", PhotometricInterpretation=None), "no Photometric Interpretation"),
    Case("bad_vr.dcm", "image", ImageReadError, "corrupt DICOM header", _lazy(_bad_vr, "bad_vr.dcm"),
         "an unknown Value Representation in the header (found by benchmarks/fuzz.py)"),
    Case("OT-PAL-8-face.dcm", "image", UnsupportedImageError, "PALETTE COLOR", _copy("OT-PAL-8-face.dcm"),
         "pydicom-data: a palette-colour secondary capture"),
    # --- valid DICOM, but not what medvit reads
    Case("multiframe_cr.dcm", "image", UnsupportedImageError, "2 frames", _lazy(_multiframe, "multiframe_cr.dcm"),
         "a two-frame CR"),
    Case("SC_rgb_2frame.dcm", "image", UnsupportedImageError, "2 frames", _copy("SC_rgb_2frame.dcm"),
         "pydicom-data: a two-frame RGB capture"),
    Case("CT_small.dcm", "image", UnsupportedImageError, "Modality CT", _copy("CT_small.dcm"), "pydicom-data: CT"),
    Case("MR_small.dcm", "image", UnsupportedImageError, "Modality MR", _copy("MR_small.dcm"), "pydicom-data: MR"),
    Case("US1_UNCR.dcm", "image", UnsupportedImageError, "Modality US", _copy("US1_UNCR.dcm"),
         "pydicom-data: ultrasound"),
    Case("mammogram.dcm", "image", UnsupportedImageError, "Modality MG",
         _cr("mammogram.dcm", Modality="MG", BodyPartExamined="BREAST"), "the CR relabelled as a mammogram"),
    Case("lateral.dcm", "image", UnsupportedImageError, "lateral", _cr("lateral.dcm", ViewPosition="LL"),
         "a left-lateral chest view"),
    Case("skull_cr.dcm", "image", UnsupportedImageError, RADIOGRAPH_ONLY,
         _cr("skull_cr.dcm", BodyPartExamined="SKULL"), "a CR of the skull"),
    Case("huge_header.dcm", "image", ImageTooLargeError, "decompression bomb", _lazy(_huge_header, "huge_header.dcm"),
         "header claims 65535 x 65535"),
    Case("one_pixel.dcm", "image", UnsupportedImageError, "too small", _lazy(_one_pixel_dicom, "one_pixel.dcm"),
         "a 1 x 1 DICOM"),
    Case("SC_rgb_small_odd.dcm", "image", UnsupportedImageError, "too small", _copy("SC_rgb_small_odd.dcm"),
         "pydicom-data: a 3 x 3 RGB capture"),
    # --- rasters
    Case("one_pixel.png", "image", UnsupportedImageError, "too small",
         _write(png_bytes(np.zeros((1, 1), np.uint8)), "one_pixel.png"), "a 1 x 1 PNG"),
    Case("bomb.png", "image", ImageTooLargeError, "decompression bomb", _lazy(lambda: _png_bomb(8000), "bomb.png"),
         "a 64-megapixel PNG of zeros (about 60 kB on disk)"),
    Case("truncated.png", "image", ImageReadError, "truncated or corrupt",
         _lazy(lambda: png_bytes(gradient())[:300], "truncated.png"), "a PNG cut short"),
    Case("bad_crc.png", "image", ImageReadError, "truncated or corrupt", _lazy(_bad_crc_png, "bad_crc.png"),
         "a PNG whose image data fails its checksum"),
    Case("no_idat.png", "image", ImageReadError, "truncated or corrupt",
         _lazy(lambda: _png_header(64) + _png_chunk(b"IEND", b""), "no_idat.png"),
         "a PNG header and no image data (found by benchmarks/fuzz.py)"),
    Case("truncated.jpg", "image", ImageReadError, "truncated or corrupt",
         _lazy(lambda: jpeg_bytes(gradient())[:600], "truncated.jpg"), "a JPEG cut short"),
    # --- documented as accepted (with a warning where the image is unusual)
    Case("png_named.dcm", "image", None, "", _write(png_bytes(gradient()), "png_named.dcm"),
         "a PNG with a .dcm name: read by content"),
    Case("dicom_named.png", "image", None, "", _lazy(lambda: dicom_bytes(small_cr()), "dicom_named.png"),
         "a DICOM with a .png name: read by content"),
    Case("SC_rgb.dcm", "image", None, "converted to grayscale", _copy("SC_rgb.dcm"), "RGB secondary capture"),
    Case("SC_ybr_full_uncompressed.dcm", "image", None, "converted to grayscale",
         _copy("SC_ybr_full_uncompressed.dcm"), "YBR_FULL secondary capture"),
    # --- labels CSVs
    Case("missing_columns.csv", "labels", DatasetError, "lacks column(s) Patient ID",
         _csv("missing_columns.csv", "Image Index,Finding Labels\nimg0.png,Effusion\n"), "NIH CSV without Patient ID"),
    Case("no_path_column.csv", "labels", DatasetError, "neither NIH format",
         _csv("no_path_column.csv", "name,Effusion\nimg0.png,1\n"), "wide CSV without a path column"),
    Case("unknown_finding.csv", "labels", DatasetError, "Pneumonitis",
         _csv("unknown_finding.csv", _nih("img0.png,Pneumonitis|Effusion,0,1,60,M,PA,train")),
         "a finding name no dataset uses"),
    Case("unknown_requested_finding.csv", "labels", DatasetError, "Lung Nodule Thing",
         _csv("unknown_requested_finding.csv", _nih(*GOOD_NIH_ROWS)), "asking for a finding that does not exist",
         kwargs={"findings": ["Effusion", "Lung Nodule Thing"]}),
    Case("duplicate_ids.csv", "labels", DatasetError, "duplicate image id",
         _csv("duplicate_ids.csv", _nih(GOOD_NIH_ROWS[0], GOOD_NIH_ROWS[0].replace(",1,60", ",3,60"))),
         "the same image listed twice"),
    Case("dotdot_path.csv", "labels", DatasetError, "escapes the image root",
         _csv("dotdot_path.csv", _wide("../../../etc/passwd,p1,1,0")), "a path climbing out of the image root"),
    Case("absolute_path.csv", "labels", DatasetError, "escapes the image root",
         _csv("absolute_path.csv", _wide("/etc/passwd,p1,1,0")), "an absolute path outside the image root"),
    Case("symlink_escape.csv", "labels", DatasetError, "escapes the image root", _escaping_symlink,
         "a symlink inside the root pointing outside it"),
    Case("empty.csv", "labels", DatasetError, "not a readable CSV", _csv("empty.csv", b""), "a 0-byte CSV"),
    Case("header_only.csv", "labels", DatasetError, "has no rows", _csv("header_only.csv", NIH_HEADER + "\n"),
         "a header and no rows"),
    Case("ragged.csv", "labels", DatasetError, "not a readable CSV",
         _csv("ragged.csv", _wide("img0.png,p1,1,0", "img1.png,p2,1,0,1,1,1")), "a row with extra fields"),
    Case("binary.csv", "labels", DatasetError, "not a readable CSV",
         _csv("binary.csv", np.random.default_rng(3).bytes(2048)),
         "random bytes named .csv"),
    Case("dicom_as.csv", "labels", DatasetError, "not a readable CSV",
         _lazy_csv("dicom_as.csv", lambda: dicom_bytes(small_cr())),
         "a DICOM passed as the labels file"),
    Case("unknown_split.csv", "labels", DatasetError, "unknown split",
         _csv("unknown_split.csv", _nih(GOOD_NIH_ROWS[0].replace(",train", ",training"))), "split 'training'"),
    Case("empty_labels_cell.csv", "labels", DatasetError, "empty 'Finding Labels' cell",
         _csv("empty_labels_cell.csv", _nih("img0.png,,0,1,60,M,PA,train")), "a blank Finding Labels cell"),
    Case("label_value_2.csv", "labels", DatasetError, "1, 0 or blank",
         _csv("label_value_2.csv", _wide("img0.png,p1,2,0")), "a label of 2"),
    Case("label_value_text.csv", "labels", DatasetError, "yes",
         _csv("label_value_text.csv", _wide("img0.png,p1,yes,0", "img1.png,p2,no,1")),
         "labels written as yes/no: must be refused, not silently read as unknown"),
    Case("nul_in_path.csv", "labels", DatasetError, "", _csv("nul_in_path.csv", _wide("img0\x00.png,p1,1,0")),
         "a NUL byte inside an image path (found by benchmarks/fuzz.py)"),
    Case("empty_path.csv", "labels", DatasetError, "empty image path", _csv("empty_path.csv", _wide(",p1,1,0")),
         "a blank image path"),
    Case("missing_images.csv", "labels", DatasetError, "image files are missing",
         _csv("missing_images.csv", _nih(*GOOD_NIH_ROWS, "gone.png,Mass,0,4,40,F,PA,train")),
         "a listed image that is not on disk", cli_exit=1),  # `data check` reports missing files, exit 1
    Case("no_such_labels.csv", "labels", DatasetError, "labels CSV not found",
         lambda folder: _images(folder).parent / "no_such_labels.csv",
         "a labels path that does not exist"),
)
# fmt: on


def build(folder: Path) -> dict[str, Path]:
    """Write every case under `folder` (one sub-folder per case) and return {case name: input path}."""
    out = {}
    for case in CASES:
        sub = folder / case.name.replace(".", "_")
        sub.mkdir(parents=True, exist_ok=True)
        out[case.name] = case.make(sub)
    return out


def images_root(path: Path) -> Path:
    """The image folder that goes with a labels case."""
    return path.parent / "images"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "generated"
    paths = build(target)
    for case in CASES:
        outcome = case.expect.__name__ if case.expect else "accepted"
        print(f"{case.kind:6s} {case.name:42s} {outcome:22s} {case.why}")
    print(f"{len(paths)} inputs written under {target}")
