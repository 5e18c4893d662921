"""The scoring service: new CR/DX instances in the PACS -> Predictor -> a DICOM SR stored back, each exactly once.

One pass: QIDO-find CR/DX instances and enqueue the unseen ones (`medvit.pacs.queue`); then, one transaction
per instance, claim a row (FOR UPDATE SKIP LOCKED), WADO-retrieve it, score it and STOW the SR, and record
the outcome in the same transaction:

- **scored**, with the SR's SOP Instance UID;
- **refused**, with the reason (lateral, non-chest, uniform, corrupt...): no SR, never retried;
- **failed**, with the attempt count (the PACS rejected one request, or a bug): retried on later passes.

An outage (PACS unreachable or refusing the credentials) raises `PacsError` out of the pass: the claim
transaction rolls back, so the instance stays pending and nothing is lost; `serve` backs off and goes on.
The SR's UIDs are derived from the source instance and the weights, so even a crash between STOW and the
commit cannot put a second SR in the PACS.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BytesIO

import pydicom
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from medvit._io import sha256_file
from medvit.data.dicom import XrayImage, read_image
from medvit.errors import MedvitError, PacsError, PacsRequestError
from medvit.evaluate.versions import version_path
from medvit.inference.predictor import Prediction, Predictor
from medvit.pacs.client import InstanceRef, PacsClient
from medvit.pacs.queue import claim_next, enqueue
from medvit.pacs.sc import build_sc, saliency_overlay
from medvit.pacs.sr import ResultProvenance, build_sr
from medvit.review.scoring import REASON_MAX, PacsInstanceRow

_log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
MAX_BACKOFF_S = 300.0


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
    ) -> None:
        """
        Args:
            client: the PACS.
            predictor: the model that scores (its run's calibration and thresholds are used).
            engine: the review database (`ReviewStore(url).engine`, already migrated).
            since: only studies on or after this date (YYYYMMDD).
            max_attempts: a failed instance is retried until it has failed this often.
            worker: the name recorded on the rows this watcher handles (default host:pid).
            after_instance: called after each committed row (tests use it to stop the PACS mid-run).
            secondary_capture: also store the saliency overlay as a Secondary Capture in the SR's series.
        """
        self.client, self.predictor, self.engine = client, predictor, engine
        self.since, self.max_attempts = since, max_attempts
        self.worker = (worker or f"{socket.gethostname()}:{os.getpid()}")[:120]
        self.after_instance = after_instance
        self.secondary_capture = secondary_capture
        self.provenance = ResultProvenance(
            model_name=predictor.info.model_name, weights_sha256=predictor.info.weights_sha256,
            calibration_version=calibration_version(predictor), engine=predictor.backend.name,
        )

    def _provenance(self, pred: Prediction) -> ResultProvenance:
        """The provenance of `pred`: the predictor follows `medvit calibrate --activate`, so does what the SR names."""
        if not self.provenance.calibration_version.startswith(f"{pred.calibration_version} "):
            self.provenance = replace(self.provenance, calibration_version=calibration_version(self.predictor))
        return self.provenance

    def run_pass(self) -> PassSummary:
        """Discover, then handle every claimable row once.

        Raises:
            PacsError: the PACS went away or refuses the credentials (the current row stays pending).
        """
        summary = PassSummary()
        refs = self.client.search_radiographs(self.since)
        with Session(self.engine) as session, session.begin():
            summary.discovered = enqueue(session, refs)
        tried: set[int] = set()
        while True:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                row = claim_next(session, self.max_attempts, tried)
                if row is None:
                    break
                tried.add(row.id)
                self._handle(row)
                setattr(summary, row.status, getattr(summary, row.status) + 1)
            if self.after_instance is not None:
                self.after_instance(row)
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

    def _handle(self, row: PacsInstanceRow) -> None:
        """Retrieve, score and store one claimed row, setting its outcome (PacsError propagates: outage)."""
        ref = InstanceRef(row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid, row.modality)
        name = f"instance {row.sop_instance_uid}"
        try:
            data = self.client.retrieve(ref)
            try:
                image = read_image(data, name=name)
                pred = self.predictor.predict(image)
            except MedvitError as exc:  # unreadable or unsuitable: refused for good, no SR
                _finish(row, "refused", str(exc), self.worker)
                _log.info("%s refused: %s", name, exc)
                return
            source = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            sr = build_sr(source, pred.table, self._provenance(pred), pred.warnings)
            self.client.store(sr)
            if self.secondary_capture:
                self._store_sc(source, image, name)
        except PacsRequestError as exc:
            _fail(row, str(exc), self.worker)
            return
        except PacsError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug on one instance must not stop the service
            _log.exception("%s failed", name)
            _fail(row, f"{type(exc).__name__}: {exc}", self.worker)
            return
        row.sr_sop_instance_uid = str(sr.SOPInstanceUID)
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
