"""One claimed batch of PACS instances: retrieved concurrently, scored in one forward, their SRs stored in one STOW.

The watcher (`medvit.pacs.watch`) claims a few rows in one transaction and hands them here; each row comes
back with its own outcome, and the watcher commits them together:

- WADO-RS retrieval, decoding and preprocessing run in threads (HTTP waits; pydicom, numpy and OpenCV release
  the GIL for most of the decoding), and `Fetcher.ahead` starts them for the next batches' rows before they are
  claimed. `read_dataset` decodes the retrieved dataset where it is (no second parse) at the model's input
  size, as `medvit predict` does (JPEG 2000 at a reduced wavelet level), unless the caller needs the full picture
  (the Secondary Capture).
- Each batch goes through the model in one forward (`Predictor.predict_inputs`, as batch prediction does). Given
  a `scorer` (one thread), `ahead` queues that forward too, so the next batch is scored while this one's SRs are
  built and stored: the model never waits for the PACS. Both are read-only: a row that another watcher claims
  first only costs a wasted download and forward. Without a scorer (the Secondary Capture's saliency uses the
  model's hooks in the calling thread) the forward runs when the batch is taken.
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
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, replace

import torch
from pydicom.dataset import Dataset

from medvit.data.dicom import XrayImage, read_dataset
from medvit.errors import MedvitError, PacsError, PacsRequestError
from medvit.evaluate.ood import needs_check
from medvit.inference.predictor import Prediction, Predictor
from medvit.pacs.client import InstanceRef, PacsClient
from medvit.pacs.sr import ResultProvenance, build_sr
from medvit.review.scoring import PacsInstanceRow

_log = logging.getLogger(__name__)


@dataclass
class Result:
    """One claimed row on its way through the batch: "pending" until it is "scored", "refused" or "failed"."""

    row: PacsInstanceRow
    status: str = "pending"
    reason: str | None = None
    source: Dataset | None = None  # the retrieved instance's header (it heads the SR)
    image: XrayImage | None = None  # kept only for a Secondary Capture
    x: torch.Tensor | None = None  # the model input, until it is scored
    check: bool = False  # whether the image gets the out-of-distribution check (no body-part tag)
    pred: Prediction | None = None
    sr: Dataset | None = None

    @property
    def name(self) -> str:
        return f"instance {self.row.sop_instance_uid}"

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason


class Fetcher:
    """Retrieves and decodes rows in worker threads, keyed by SOP Instance UID, ahead of their claim when asked;
    with a `scorer`, it also scores them ahead, one forward per group of rows that `ahead` was given."""

    def __init__(self, client: PacsClient, predictor: Predictor, pool: Executor, *, full_resolution: bool = False,
                 scorer: Executor | None = None) -> None:
        """
        Args:
            full_resolution: decode at full size (for a Secondary Capture) instead of the model's input size.
            scorer: a single-thread executor for the forwards (None: the batch is scored when it is taken).
        """
        self.client, self.predictor, self.pool, self.scorer = client, predictor, pool, scorer
        self.min_side = None if full_resolution else predictor.input_side
        self.keep_image = full_resolution
        self._started: dict[str, Future[Result]] = {}
        self._scored: dict[str, Future[None]] = {}

    def ahead(self, rows: Sequence[PacsInstanceRow]) -> None:
        """Start retrieving (and, with a scorer, scoring) `rows`, not claimed yet; results nobody takes are
        dropped by `forget_others`."""
        new = [row for row in rows if row.sop_instance_uid not in self._started]
        for row in new:
            self._started[row.sop_instance_uid] = self.pool.submit(_fetch, row, self)
        if self.scorer is not None and new:
            scored = self.scorer.submit(_forward_fetched, self.predictor,
                                        [self._started[row.sop_instance_uid] for row in new])
            self._scored.update((row.sop_instance_uid, scored) for row in new)

    def take(self, rows: Sequence[PacsInstanceRow]) -> list[Result]:
        """The fetched (and scored, with a scorer) `rows`, claimed now, waiting for those still in flight.

        Raises:
            PacsError: the PACS went away or refuses the credentials.
        """
        self.ahead(rows)
        fetched = [self._started.pop(row.sop_instance_uid).result() for row in rows]
        for row in rows:
            scored = self._scored.pop(row.sop_instance_uid, None)
            if scored is not None:
                scored.result()
        return [replace(result, row=row) for result, row in zip(fetched, rows, strict=True)]

    def forget_others(self, keep: Sequence[PacsInstanceRow]) -> None:
        """Drop what was fetched ahead for rows not in `keep` (another watcher claimed them, or they are gone)."""
        wanted = {row.sop_instance_uid for row in keep}
        for uid in [uid for uid in self._started if uid not in wanted]:
            self._started.pop(uid).cancel()
            self._scored.pop(uid, None)


def score_batch(results: list[Result], client: PacsClient, predictor: Predictor,
                provenance: Callable[[Prediction], ResultProvenance]) -> list[Result]:
    """Score the fetched rows in one forward, build their SRs and STOW them; every result leaves scored,
    refused or failed.

    Args:
        provenance: what the SR names for a prediction (model, weights, calibration in force, engine).

    Raises:
        PacsError: the PACS went away or refuses the credentials (nothing here is final: the batch stays pending).
    """
    _score(predictor, provenance, [r for r in results if r.status == "pending"])
    built = [r for r in results if r.status == "pending"]
    if built:
        _store(client, built)
    return results


def _fetch(row: PacsInstanceRow, fetcher: Fetcher) -> Result:
    """WADO-retrieve, decode and preprocess one row (in a worker thread); PacsError propagates (outage)."""
    result = Result(row)
    ref = InstanceRef(row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid, row.modality)
    try:
        source = fetcher.client.retrieve_dataset(ref)
        try:
            image = read_dataset(source, name=result.name, min_side=fetcher.min_side)
            result.x, result.check = fetcher.predictor.preprocess(image), needs_check(image.meta)
            result.image = image if fetcher.keep_image else None
        except MedvitError as exc:  # unreadable or unsuitable: refused for good, no SR
            result.status, result.reason = "refused", str(exc)
            _log.info("%s refused: %s", result.name, exc)
        if "PixelData" in source:  # only the header is needed from here on (the SR's and the SC's patient, study)
            del source.PixelData
        result.source = source
    except PacsRequestError as exc:
        result.fail(str(exc))
    except PacsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug on one instance must not stop the service
        _log.exception("%s failed", result.name)
        result.fail(f"{type(exc).__name__}: {exc}")
    return result


def _forward_fetched(predictor: Predictor, fetches: list[Future[Result]]) -> None:
    """Score a group of rows fetched ahead, in the scorer thread. A fetch that failed or was cancelled is left
    out: `take` raises its outage, and a dropped row is not wanted."""
    results = []
    for fetch in fetches:
        try:
            results.append(fetch.result())
        except (CancelledError, PacsError):
            continue
    _forward(predictor, [r for r in results if r.status == "pending"])


def _forward(predictor: Predictor, results: list[Result]) -> None:
    """One forward for decoded rows: each gets its prediction, or fails (a bug fails the rows, not the service)."""
    if not results:
        return
    try:
        preds = predictor.predict_inputs(torch.stack([r.x for r in results if r.x is not None]),
                                         [r.check for r in results])
    except Exception as exc:  # noqa: BLE001 - a bug on one batch must not stop the service
        _log.exception("scoring a batch of %d failed", len(results))
        for r in results:
            r.fail(f"{type(exc).__name__}: {exc}")
        return
    for r, pred in zip(results, preds, strict=True):
        r.pred, r.x = pred, None


def _score(predictor: Predictor, provenance: Callable[[Prediction], ResultProvenance], results: list[Result]) -> None:
    """Score the rows not scored ahead, then build one SR each (a failure fails the rows it touches)."""
    _forward(predictor, [r for r in results if r.pred is None])
    for r in results:
        if r.status != "pending":
            continue
        try:
            assert r.source is not None and r.pred is not None  # retrieved and scored, or it would not be pending
            r.sr = build_sr(r.source, r.pred.table, provenance(r.pred), r.pred.warnings)
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
