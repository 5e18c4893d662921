"""One claimed batch of PACS instances: retrieved concurrently, scored in one forward, their SRs stored in one STOW.

The watcher (`medvit.pacs.watch`) claims a few rows in one transaction and hands them here; each row comes
back with its own outcome, and the watcher commits them together:

- WADO-RS retrieval, decoding and preprocessing run in threads (HTTP waits; pydicom, numpy and OpenCV release
  the GIL for most of the decoding). `read_image` decodes at the model's input size, as `medvit predict` does
  (JPEG 2000 at a reduced wavelet level), unless the caller needs the full picture (the Secondary Capture).
- The batch goes through the model in one forward (`Predictor.predict_inputs`, as batch prediction does).
- The SRs go back in one STOW-RS request. The response's FailedSOPSequence fails only the SRs it names; a
  request the PACS refuses as a whole (or a response that does not say which SR failed) is sent again one SR
  per request, so that each row still gets its own outcome.

A `PacsError` (outage) propagates: the watcher's transaction rolls back and the whole batch stays pending.
SRs already stored by then carry deterministic UIDs (`medvit.pacs.sr.sr_uids`), so the next pass stores the
same objects again instead of adding new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch
from pydicom.dataset import Dataset

from medvit.data.dicom import XrayImage, read_image
from medvit.errors import MedvitError, PacsError, PacsRequestError
from medvit.evaluate.ood import needs_check
from medvit.inference.predictor import Prediction, Predictor
from medvit.pacs.client import InstanceRef, PacsClient, file_bytes
from medvit.pacs.sr import ResultProvenance, build_sr
from medvit.review.scoring import PacsInstanceRow

_log = logging.getLogger(__name__)


@dataclass
class Result:
    """One claimed row on its way through the batch: "pending" until it is "scored", "refused" or "failed"."""

    row: PacsInstanceRow
    status: str = "pending"
    reason: str | None = None
    source: Dataset | None = None  # the retrieved instance (its header heads the SR)
    image: XrayImage | None = None
    x: torch.Tensor | None = None  # the model input
    sr: Dataset | None = None

    @property
    def name(self) -> str:
        return f"instance {self.row.sop_instance_uid}"

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason


def score_batch(rows: Sequence[PacsInstanceRow], client: PacsClient, predictor: Predictor,
                provenance: Callable[[Prediction], ResultProvenance], pool: Executor, *, full_resolution: bool = False
                ) -> list[Result]:
    """Retrieve, score and STOW the SRs of `rows`; every result leaves scored, refused or failed.

    Args:
        provenance: what the SR names for a prediction (model, weights, calibration in force, engine).
        pool: the threads that retrieve and decode.
        full_resolution: decode at full size (for a Secondary Capture) instead of the model's input size.

    Raises:
        PacsError: the PACS went away or refuses the credentials (nothing here is final: the batch stays pending).
    """
    min_side = None if full_resolution else predictor.input_side
    results = list(pool.map(lambda row: _fetch(row, client, predictor, min_side), rows))
    _score(predictor, provenance, [r for r in results if r.status == "pending"])
    built = [r for r in results if r.status == "pending"]
    if built:
        _store(client, built)
    return results


def _fetch(row: PacsInstanceRow, client: PacsClient, predictor: Predictor, min_side: int | None) -> Result:
    """WADO-retrieve, decode and preprocess one row (in a worker thread); PacsError propagates (outage)."""
    result = Result(row)
    ref = InstanceRef(row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid, row.modality)
    try:
        result.source = client.retrieve_dataset(ref)
        try:
            result.image = read_image(file_bytes(result.source), name=result.name, min_side=min_side)
            result.x = predictor.preprocess(result.image)
        except MedvitError as exc:  # unreadable or unsuitable: refused for good, no SR
            result.status, result.reason = "refused", str(exc)
            _log.info("%s refused: %s", result.name, exc)
    except PacsRequestError as exc:
        result.fail(str(exc))
    except PacsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug on one instance must not stop the service
        _log.exception("%s failed", result.name)
        result.fail(f"{type(exc).__name__}: {exc}")
    return result


def _score(predictor: Predictor, provenance: Callable[[Prediction], ResultProvenance], results: list[Result]) -> None:
    """One forward for the decoded rows, then one SR each (a failure fails the rows it touches, not the batch)."""
    if not results:
        return
    try:
        preds = predictor.predict_inputs(torch.stack([r.x for r in results if r.x is not None]),
                                         [needs_check(r.image.meta) for r in results if r.image is not None])
    except Exception as exc:  # noqa: BLE001 - a bug on one batch must not stop the service
        _log.exception("scoring a batch of %d failed", len(results))
        for r in results:
            r.fail(f"{type(exc).__name__}: {exc}")
        return
    for r, pred in zip(results, preds, strict=True):
        try:
            assert r.source is not None  # retrieved, or it would not be pending
            r.sr = build_sr(r.source, pred.table, provenance(pred), pred.warnings)
        except Exception as exc:  # noqa: BLE001
            _log.exception("%s failed", r.name)
            r.fail(f"{type(exc).__name__}: {exc}")


def _store(client: PacsClient, results: list[Result]) -> None:
    """STOW the SRs in one request and read each row's outcome from the response; the SRs it neither
    acknowledges nor rejects (or all, when the PACS refuses the whole request) are sent again one per request."""
    srs = {str(r.sr.SOPInstanceUID): r for r in results if r.sr is not None}
    try:
        missing = client.store_many([r.sr for r in srs.values() if r.sr is not None])
    except PacsError as exc:
        if not isinstance(exc, PacsRequestError):
            raise
        missing = {uid: None if len(srs) > 1 else str(exc) for uid in srs}
    except Exception as exc:  # noqa: BLE001 - e.g. an SR that cannot be encoded
        _log.exception("storing %d SR(s) failed", len(srs))
        missing = {uid: None if len(srs) > 1 else f"{type(exc).__name__}: {exc}" for uid in srs}
    if len(srs) > 1 and None in missing.values():  # which SR is at fault is not known: one request each
        for uid, r in srs.items():
            if missing.get(uid, "") is None:
                _store(client, [r])
            elif uid in missing:
                r.fail(missing[uid] or "")
            else:
                r.status = "scored"
        return
    for uid, r in srs.items():
        if uid in missing:
            r.fail(missing[uid] or f"PACS {client.url} did not acknowledge the stored SR")
        else:
            r.status = "scored"
