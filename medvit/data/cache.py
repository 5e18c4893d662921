"""`medvit prepare`: decode every image of a labels CSV once into a resized 8-bit PNG cache + manifest.

Decoding a full-size CR (DICOM parse, modality LUT, VOI, resize) costs ~0.2 s here and a JPEG 2000
one 1-2 s; training reads every image every epoch. The cache stores the display-ready pixels of
`read_image` (after VOI and MONOCHROME1 inversion) as uint8, longest side `size`, so later epochs
decode a small PNG instead. The manifest is the original labels CSV with only its image column
rewritten to the cached files, so `load_labels(manifest, cache_dir)` reads it exactly as before.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from medvit._io import atomic_path
from medvit.data.datasets import WIDE_PATH_COLUMNS, load_labels
from medvit.data.dicom import read_image
from medvit.errors import DatasetError, MedvitError

_log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
ERRORS = "errors.csv"
SOURCE = "decoded_from"  # manifest column: the original file (NIH's CSV already has a "source_path")
DEFAULT_SIZE = 512  # >= the 384 model input, with room for crop augmentation


def to_uint8(pixels: np.ndarray, size: int) -> np.ndarray:
    """[0,1] float pixels -> uint8, longest side shrunk to `size` (never enlarged), aspect kept."""
    h, w = pixels.shape
    scale = size / max(h, w)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def _write_png(path: Path, image: np.ndarray) -> None:
    """Atomic PNG write: an interrupted run never leaves a half file that a re-run would trust."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image, mode="L").save(tmp, format="PNG")


def _cache_one(job: tuple[str, str, int]) -> tuple[str, str]:
    """(source, target, size) -> (target, error message or "")."""
    src, dst, size = job
    try:
        _write_png(Path(dst), to_uint8(read_image(src).pixels, size))
        return dst, ""
    except MedvitError as e:
        return dst, str(e)


def _image_column(raw: pd.DataFrame) -> str:
    if "Image Index" in raw.columns:
        return "Image Index"
    return next(c for c in WIDE_PATH_COLUMNS if c in raw.columns)


@dataclass(frozen=True)
class PrepareResult:
    manifest: Path
    n_images: int
    n_decoded: int
    n_reused: int
    n_errors: int


def prepare_cache(labels_csv: str | os.PathLike, images_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                  size: int = DEFAULT_SIZE, workers: int | None = None, progress: bool = True) -> PrepareResult:
    """Decode all images of `labels_csv` into `out_dir` (same relative layout, .png) + `out_dir/manifest.csv`.

    Re-running reuses the PNGs already there (an interrupted run resumes). Unreadable images are
    listed with their error in `out_dir/errors.csv` and left out of the manifest.

    Raises:
        DatasetError: the labels CSV is malformed (same checks as `load_labels`).
    """
    from tqdm import tqdm

    if size < 32:
        raise DatasetError(f"cache size must be at least 32 px, got {size}")
    out = Path(out_dir).resolve()
    if out == Path(images_root).resolve():
        raise DatasetError("the cache folder must differ from the image folder")
    frame = load_labels(labels_csv, images_root, check_files=False)  # validates and resolves every path safely
    raw = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    column = _image_column(raw)
    rel = raw[column].map(lambda p: str(Path(p).with_suffix(".png")))  # same layout, so NIH ids stay the same
    targets = [out / r for r in rel]
    jobs = [(src, str(dst), size) for src, dst in zip(frame["path"], targets, strict=True) if not dst.is_file()]
    n_reused = len(targets) - len(jobs)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    errors: dict[str, str] = {}
    with tqdm(total=len(jobs), unit="img", desc="prepare", disable=not progress) as bar:
        if workers > 0 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = pool.map(_cache_one, jobs, chunksize=4)
                for dst, err in results:
                    errors.update({dst: err} if err else {})
                    bar.update()
        else:
            for job in jobs:
                dst, err = _cache_one(job)
                errors.update({dst: err} if err else {})
                bar.update()
    keep = [str(t) not in errors for t in targets]
    manifest = raw.assign(**{column: rel, SOURCE: frame["path"]})[keep]
    manifest.to_csv(out / MANIFEST, index=False)
    if errors:
        pd.DataFrame({SOURCE: [s for s, d, _ in jobs if d in errors],
                      "error": [errors[d] for _, d, _ in jobs if d in errors]}).to_csv(out / ERRORS, index=False)
        _log.warning("%d image(s) could not be decoded; see %s", len(errors), out / ERRORS)
    _log.info("cache %s: %d decoded, %d reused, %d errors", out, len(jobs) - len(errors), n_reused, len(errors))
    return PrepareResult(out / MANIFEST, len(targets), len(jobs) - len(errors), n_reused, len(errors))
