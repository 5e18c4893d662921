"""Batch prediction over files and folders: parallel decoding, error rows, incremental CSV and resume.

Decoding (DICOM decompression, VOI, resize) runs in DataLoader worker processes while the main
process runs the model, so a folder goes through at close to model-only speed. A file that cannot be
read or is not a frontal chest radiograph becomes one error row and the run continues. Rows are
appended and flushed after every batch, so an interrupted run keeps its work and `resume` skips the
files already in the CSV.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from medvit.data.dicom import check_chest_frontal, read_image
from medvit.data.transforms import build_transforms
from medvit.errors import MedvitError
from medvit.evaluate.ood import needs_check

_log = logging.getLogger(__name__)

CSV_COLUMNS = ("file", "finding", "prob_raw", "prob", "threshold", "flag", "margin", "backend", "error", "warning")
Item = tuple[int, torch.Tensor | None, str, bool]  # index, input (None: error), error message, OOD check wanted
class _DecodeDataset(torch.utils.data.Dataset):
    """read_image + chest/frontal check + eval transform, in a worker; failures come back as messages.

    Each item also says whether the image needs the out-of-distribution check (no body-part tag)."""

    def __init__(self, paths: Sequence[Path], preprocessing: dict[str, Any]) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self._transform: Callable | None = None  # built lazily inside each worker

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        if self._transform is None:
            self._transform = build_transforms(self.preprocessing, train=False)
        try:
            image = read_image(self.paths[i], min_side=int(max(self.preprocessing["input_size"][1:])))
            check_chest_frontal(image.meta)
            return i, self._transform(image.pixels), "", needs_check(image.meta)
        except MedvitError as e:
            return i, None, str(e), False
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop a 10,000-file run
            _log.warning("unexpected %s on %s", type(e).__name__, self.paths[i], exc_info=True)
            return i, None, f"{type(e).__name__}: {e}", False


def _collate(batch: list[Item]) -> list[Item]:
    return batch


def done_files(csv: Path) -> set[str]:
    """Files that already have rows in an existing predictions CSV."""
    try:
        return set(pd.read_csv(csv, usecols=["file"])["file"].astype(str))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return set()
    except ValueError as e:
        raise MedvitError(f"{csv} is not a medvit predictions CSV ({e}); choose another --out") from None


class CsvSink:
    """Appends rows to a CSV and flushes after each batch, writing the header once."""

    def __init__(self, path: Path, *, append: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and path.is_file() and path.stat().st_size > 0)
        self._f = open(path, "a" if append else "w", newline="")  # noqa: SIM115 - closed in close()
        if new:
            pd.DataFrame(columns=list(CSV_COLUMNS)).to_csv(self._f, index=False)

    def __call__(self, rows: pd.DataFrame) -> None:
        rows.to_csv(self._f, header=False, index=False)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


@dataclass(frozen=True)
class BatchSummary:
    n_files: int
    n_predicted: int
    n_errors: int
    n_skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return (self.n_predicted + self.n_errors) / self.seconds if self.seconds > 0 else 0.0


def _batches(paths: Sequence[Path], preprocessing: dict[str, Any], batch_size: int, workers: int
             ) -> Iterator[list[Item]]:
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(paths, preprocessing), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        prefetch_factor=2 if workers else None, persistent_workers=False,
    )
    yield from loader


def predict_files(predictor: Any, paths: Sequence[Path], sink: Callable[[pd.DataFrame], None], *,
                  skip: set[str] | frozenset[str] = frozenset(), batch_size: int = 8, workers: int | None = None,
                  progress: bool = True) -> BatchSummary:
    """Run `predictor` (a medvit.inference.Predictor) over `paths`, handing each batch's rows to `sink`.

    Args:
        skip: files (as written in the CSV) to leave out, for resume.
        workers: decoding processes (default: min(2, CPUs); 0 decodes in the main process).
    """
    todo = [p for p in paths if str(p) not in skip]
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    n_ok = n_err = 0
    t0 = time.perf_counter()
    with tqdm(total=len(todo), unit="img", disable=not progress, desc="predict") as bar:
        for batch in _batches(todo, predictor.info.preprocessing, batch_size, workers):
            good = [(i, x, check) for i, x, _, check in batch if x is not None]
            preds = predictor.predict_inputs(torch.stack([x for _, x, _ in good]),
                                             [check for _, _, check in good]) if good else []
            by_index = {i: pred for (i, _, _), pred in zip(good, preds, strict=True)}
            frames = []
            for i, _, message, _ in batch:
                if i in by_index:
                    pred = by_index[i]
                    frames.append(pred.table.assign(file=str(todo[i]), backend=pred.backend, error="",
                                                    warning="; ".join(pred.warnings)))
                else:
                    frames.append(pd.DataFrame({"file": [str(todo[i])], "backend": [predictor.backend.name],
                                                "error": [message]}))
                    _log.debug("error row for %s: %s", todo[i], message)
            sink(pd.concat(frames, ignore_index=True).reindex(columns=list(CSV_COLUMNS)))
            n_ok += len(good)
            n_err += len(batch) - len(good)
            bar.update(len(batch))
    return BatchSummary(len(paths), n_ok, n_err, len(paths) - len(todo), time.perf_counter() - t0)
