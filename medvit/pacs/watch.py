"""The scoring service: new CR/DX instances in the PACS -> Predictor -> a DICOM SR stored back, each exactly once.

One pass: QIDO-find CR/DX instances and enqueue the unseen ones (`medvit.pacs.queue`); then, one transaction
per batch, claim up to `batch_size` rows (FOR UPDATE SKIP LOCKED), retrieve them concurrently, score them in one
forward and STOW their SRs in one request (`medvit.pacs.batch`), and record each row's outcome in the same
transaction. The next two batches' rows are retrieved and scored ahead of their claim in background threads
(with a Secondary Capture, only the next batch is retrieved ahead), so the model works on batch k+1 while batch k's
SRs are built and stored (read-only work: another watcher may claim some of those rows first, which only wastes
it). Each row ends:

- **scored**, with the SR's SOP Instance UID;
- **refused**, with the reason (lateral, non-chest, uniform, corrupt...): no SR, never retried;
- **failed**, with the attempt count (the PACS rejected one request, or a bug): retried on later passes.

An outage (PACS unreachable or refusing the credentials) raises `PacsError` out of the pass: the claim
transaction rolls back, so the whole batch stays pending and nothing is lost; `serve` backs off and goes on.
The SR's UIDs are derived from the source instance and the weights, so even a crash between STOW and the
commit cannot put a second SR in the PACS.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pydicom
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from medvit._io import sha256_file
from medvit.data.dicom import XrayImage
from medvit.errors import ConfigError, PacsError, PacsRequestError
from medvit.evaluate.versions import version_path
from medvit.inference.predictor import Prediction, Predictor
from medvit.pacs.batch import Fetcher, Result, score_batch
from medvit.pacs.client import PacsClient
from medvit.pacs.queue import claim_batch, enqueue, peek_batch
from medvit.pacs.sc import build_sc, saliency_overlay
from medvit.pacs.sr import ResultProvenance
from medvit.review.scoring import REASON_MAX, PacsInstanceRow

_log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
MAX_BACKOFF_S = 300.0
BATCH_SIZE = 8  # rows per claim, forward and STOW (medvit predict's default batch)


@dataclass
class PassSummary:
    """What one pass did: rows discovered, and this watcher's outcomes."""

    discovered: int = 0
    scored: int = 0
    refused: int = 0
    failed: int = 0


def calibration_version(predictor: Predictor) -> str:
    """The active calibration version (medvit.evaluate.versions), its method and the SHA-256 of its write-once
    file: version names are per run, the hash identifies the numbers anywhere."""
    if not predictor.calibrated:
        return "none (uncalibrated sigmoid, thresholds 0.5)"
    path = version_path(predictor.info.run_dir, predictor.calibration_version)
    return f"{predictor.calibration_version} {predictor.calibration.method} sha256:{sha256_file(path)}"


class Watcher:
    """Scores the PACS's CR/DX instances into the queue table of one database."""

    def __init__(
        self, client: PacsClient, predictor: Predictor, engine: Engine, *, since: str | None = None,
        max_attempts: int = MAX_ATTEMPTS, worker: str | None = None,
        after_instance: Callable[[PacsInstanceRow], None] | None = None, secondary_capture: bool = False,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        """
        Args:
            client: the PACS.
            predictor: the model that scores (its run's calibration and thresholds are used).
            engine: the review database (`ReviewStore(url).engine`, already migrated).
            since: only studies on or after this date (YYYYMMDD).
            max_attempts: a failed instance is retried until it has failed this often.
            worker: the name recorded on the rows this watcher handles (default host:pid).
            after_instance: called for each row once its batch is committed (tests stop the PACS mid-run with it).
            secondary_capture: also store the saliency overlay as a Secondary Capture in the SR's series.
            batch_size: rows claimed, retrieved concurrently, scored and stored together in one transaction.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.client, self.predictor, self.engine = client, predictor, engine
        self.since, self.max_attempts = since, max_attempts
        self.worker = (worker or f"{socket.gethostname()}:{os.getpid()}")[:120]
        self.after_instance = after_instance
        self.secondary_capture, self.batch_size = secondary_capture, batch_size
        self.provenance = ResultProvenance(
            model_name=predictor.info.model_name, weights_sha256=predictor.info.weights_sha256,
            calibration_version=calibration_version(predictor), engine=predictor.backend.name,
        )

    def _provenance(self, pred: Prediction) -> ResultProvenance:
        """The provenance of `pred`: the predictor follows `medvit calibrate --activate`, so does what the SR names;
        and the engine is the one that scored this image (an untagged one may go through the fp32 graph)."""
        if not self.provenance.calibration_version.startswith(f"{pred.calibration_version} "):
            self.provenance = replace(self.provenance, calibration_version=calibration_version(self.predictor))
        return self.provenance if pred.backend == self.provenance.engine else replace(self.provenance,
                                                                                    engine=pred.backend)

    def run_pass(self) -> PassSummary:
        """Discover, then handle every claimable row once, a batch per transaction.

        Raises:
            PacsError: the PACS went away or refuses the credentials (the current batch stays pending).
        """
        summary = PassSummary()
        refs = self.client.search_radiographs(self.since)
        with Session(self.engine) as session, session.begin():
            summary.discovered = enqueue(session, refs)
        tried: set[int] = set()
        pool = ThreadPoolExecutor(max_workers=min(self.batch_size, 4), thread_name_prefix="medvit-wado")
        # the Secondary Capture's saliency runs the model with hooks in this thread: no forward beside it then
        scorer = None if self.secondary_capture else ThreadPoolExecutor(1, thread_name_prefix="medvit-forward")
        fetcher = Fetcher(self.client, self.predictor, pool, full_resolution=self.secondary_capture, scorer=scorer)
        ahead = self.batch_size * (1 if scorer is None else 2)  # scored ahead: the next batch's fetch overlaps too
        try:
            while True:
                with Session(self.engine, expire_on_commit=False) as session, session.begin():
                    rows = claim_batch(session, self.max_attempts, tried, self.batch_size)
                    tried.update(row.id for row in rows)
                    upcoming = peek_batch(session, self.max_attempts, tried, ahead) if rows else []
                    fetcher.forget_others([*rows, *upcoming])
                    if not rows:
                        break
                    fetched = fetcher.take(rows)
                    fetcher.ahead(upcoming)
                    for result in score_batch(fetched, self.client, self.predictor, self._provenance):
                        self._record(result)
                        setattr(summary, result.row.status, getattr(summary, result.row.status) + 1)
                if self.after_instance is not None:
                    for row in rows:
                        self.after_instance(row)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if scorer is not None:
                scorer.shutdown(wait=True, cancel_futures=True)
        _log.info("pass: %d new instance(s); %d scored, %d refused, %d failed",
                  summary.discovered, summary.scored, summary.refused, summary.failed)
        return summary

    def serve(self, interval: float, stop: threading.Event | None = None) -> None:
        """Pass after pass every `interval` seconds until `stop` is set; outages back off (1 s doubling, capped)."""
        stop = stop or threading.Event()
        backoff = 1.0
        while not stop.is_set():
            try:
                self.run_pass()
                wait, backoff = interval, 1.0
            except (PacsError, SQLAlchemyError) as exc:
                detail = str(exc) if isinstance(exc, PacsError) else f"database error ({type(exc).__name__})"
                _log.warning("%s; retrying in %.0f s", detail, backoff)
                wait, backoff = backoff, min(backoff * 2, max(MAX_BACKOFF_S, interval))
            stop.wait(wait)

    def _record(self, result: Result) -> None:
        """Set the row's outcome (storing the Secondary Capture first when asked; PacsError propagates: outage)."""
        row, name = result.row, result.name
        if result.status == "scored" and self.secondary_capture and result.source is not None \
                and result.image is not None:
            try:
                self._store_sc(result.source, result.image, name)
            except PacsRequestError as exc:
                result.fail(str(exc))
            except PacsError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug on one instance must not stop the service
                _log.exception("%s failed", name)
                result.fail(f"{type(exc).__name__}: {exc}")
        if result.status == "failed":
            _fail(row, result.reason or "unknown", self.worker)
        elif result.status == "refused":
            _finish(row, "refused", result.reason, self.worker)
        else:
            row.sr_sop_instance_uid = str(result.sr.SOPInstanceUID) if result.sr is not None else None
            _finish(row, "scored", None, self.worker)
            _log.info("%s scored: SR %s", name, row.sr_sop_instance_uid)

    def _store_sc(self, source: pydicom.Dataset, image: XrayImage, name: str) -> None:
        """STOW the saliency overlay beside the SR (a model without attention gets the SR alone, logged)."""
        try:
            rgb = saliency_overlay(self.predictor, image)
        except ValueError as exc:
            _log.warning("%s: no secondary capture (%s)", name, exc)
            return
        self.client.store(build_sc(source, rgb, self.provenance.weights_sha256))


def _finish(row: PacsInstanceRow, status: str, reason: str | None, worker: str) -> None:
    row.status, row.worker, row.updated_at = status, worker, datetime.now(UTC)
    row.reason = None if reason is None else reason[:REASON_MAX]


def _fail(row: PacsInstanceRow, reason: str, worker: str) -> None:
    row.attempts += 1
    _finish(row, "failed", reason, worker)
    _log.warning("instance %s failed (attempt %d): %s", row.sop_instance_uid, row.attempts, reason)
