"""Everything the review app does that is not drawing: file bytes -> image + findings + saliency, cached by hash.

The Streamlit app (apps/review.py) only lays these results out; the benchmark (benchmarks/app_latency.py)
times the same `ReviewService.analyze` call, so the number it reports is the app's upload -> table latency.
One `ReviewService` is shared by all browser sessions (st.cache_resource), hence the locks: the model is
not re-entrant while saliency hooks are attached to it.

Cold start: with the `auto` backend the service answers at once with eager fp32 torch, while the Predictor's own
`auto` choice (the fp32 self-check of `medvit.inference.choice`, or its cached result) runs in a background thread
on a second copy of the run; its predictor replaces the first when it picks a faster engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import pandas as pd
import torch

from medvit.data.dicom import XrayImage, check_chest_frontal, read_image
from medvit.errors import ImageReadError, ImageTooLargeError, MedvitError, UnsupportedImageError
from medvit.inference import AUTO
from medvit.inference.predictor import BACKEND_ENV, Prediction, Predictor
from medvit.model.saliency import attention_rollout, grad_cam, to_image
from medvit.resources import DEMO_RUN
from medvit.review.checks import is_dicom_uid
from medvit.review.settings import CLIP_TEMPERATURES_ENV, DEFAULT_MAX_UPLOAD_MB
from medvit.review.store import ShownFinding
from medvit.rundir import resolve_run_dir

if TYPE_CHECKING:
    from medvit.zeroshot.scorer import ZeroShotScorer  # imported lazily: the app works without a CLIP

_log = logging.getLogger(__name__)

SaliencyMethod = Literal["rollout", "gradcam"]
_T = TypeVar("_T")


def check_upload(data: bytes, name: str, max_bytes: int) -> None:
    """Refuse empty and oversized uploads before decoding them.

    Raises:
        ImageReadError: the file is empty.
        ImageTooLargeError: the file exceeds `max_bytes`.
    """
    if not data:
        raise ImageReadError(f"{name}: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"{name}: {len(data) / 2**20:.1f} MB exceeds the upload limit of {max_bytes / 2**20:.0f} MB "
            "(raise it with `medvit review --max-upload-mb N`)"
        )


@dataclass(frozen=True)
class Analysis:
    """One file, read and (unless refused) scored; what the app shows for it."""

    name: str
    sha256: str
    image: XrayImage
    image_uid: str  # SOP Instance UID, or the SHA-256 of the bytes for PNG/JPEG: the review database key
    image_uid_kind: Literal["sop_instance_uid", "sha256"]
    prediction: Prediction | None
    refusal: str | None  # why there are no numbers (lateral view, not a chest...)
    notes: tuple[str, ...]  # reader warnings and caveats to show beside the image
    timings_ms: dict[str, float] = field(default_factory=dict)
    source: bytes | None = None  # kept only when `image` is a reduced JPEG 2000 decode, for the full one

    def shown(self) -> dict[str, ShownFinding]:
        """The numbers on screen, in the form the review database stores them."""
        if self.prediction is None:
            return {}
        return {
            r.finding: ShownFinding(
                prob=float(r.prob), threshold=float(r.threshold), prob_raw=float(r.prob_raw), flag=bool(r.flag)
            )
            for r in self.prediction.table.itertuples()
        }


def findings_table(prediction: Prediction) -> pd.DataFrame:
    """The findings in reading order: flagged first (furthest past the threshold first), then the other reported
    findings, then those the run does not report (`medvit.evaluate.reporting`)."""
    table = prediction.table
    rank = (~table["flag"]).astype(int) + (~table["reported"]).astype(int)
    order = table.assign(_rank=rank).sort_values(["_rank", "margin"], ascending=[True, False], kind="stable")
    return order.drop(columns="_rank").reset_index(drop=True)


class _Lru:
    """A small thread-safe LRU of computed results (errors are not cached)."""

    def __init__(self, size: int) -> None:
        self.size, self._items, self._lock = size, OrderedDict[Any, Any](), threading.Lock()

    def get_or_compute(self, key: Any, compute: Callable[[], _T]) -> _T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class ReviewService:
    """One loaded model plus the per-file caches the app reads from."""

    def __init__(self, predictor: Predictor, *, cache_size: int = 32) -> None:
        self.predictor = predictor
        self.run_dir = predictor.info.run_dir
        self.model_card = predictor.card  # the run's evaluation (None: never evaluated)
        self.is_demo = self.run_dir.resolve() == DEMO_RUN.resolve()
        self._model_lock = threading.Lock()
        self._analyses = _Lru(cache_size)
        self._saliency = _Lru(4 * cache_size)
        self._display = _Lru(4)  # full-resolution decodes are large: keep only the last few
        self.engine_check: EngineCheck | None = None  # the background `auto` choice, when one was started
        self.first_table = threading.Event()  # set once an image was analysed: the engine check waits for it

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str] | None = None) -> ReviewService:
        """Load the run (`run_dir`, else $MEDVIT_RUN, else the demo model) once for the app's lifetime.

        With backend `auto` ($MEDVIT_BACKEND unset or "auto") the first tables come from eager torch at once and
        the engine choice runs in the background (`EngineCheck`); a named backend is built (and checked) first.
        """
        run = resolve_run_dir(run_dir)
        requested = os.environ.get(BACKEND_ENV) or AUTO
        if requested != AUTO:
            return cls(Predictor.from_dir(run, backend=requested))
        service = cls(Predictor.from_dir(run, backend="torch"))
        service.engine_check = EngineCheck(service, run)
        return service

    @property
    def findings(self) -> tuple[str, ...]:
        return self.predictor.findings

    def analyze(self, data: bytes, name: str, *, max_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20) -> Analysis:
        """Decode and score one file; a second call with the same bytes returns the cached result.

        Raises:
            MedvitError: empty, oversized, corrupt or unsupported file (the message names the problem).
        """
        check_upload(data, name, max_bytes)
        digest = hashlib.sha256(data).hexdigest()
        return self._analyses.get_or_compute(digest, lambda: self._analyze(data, name, digest))

    def _analyze(self, data: bytes, name: str, digest: str) -> Analysis:
        t0 = time.perf_counter()
        # errors name the file the user chose; JPEG 2000 is decoded only down to the model's input size here,
        # so the table comes before the full-resolution decode that `display_image` does for the viewer
        image = read_image(data, name=name, min_side=self.predictor.input_side)
        decode_ms = (time.perf_counter() - t0) * 1e3
        meta = image.meta
        notes = list(meta.warnings)
        if meta.source != "dicom":
            notes.append(
                f"{meta.source.upper()} has no DICOM header: view and body part cannot be checked; "
                "the model reads frontal (PA/AP) chest radiographs only"
            )
        prediction, refusal = None, None
        try:
            check_chest_frontal(meta)
            with self._model_lock:
                prediction = self.predictor.predict(image)
        except UnsupportedImageError as e:
            refusal = str(e)
        timings = {"decode": decode_ms, **(prediction.timings_ms if prediction else {})}
        timings["total"] = (time.perf_counter() - t0) * 1e3
        timings["overhead"] = timings["total"] - sum(v for k, v in timings.items() if k != "total")
        uid = meta.sop_instance_uid
        use_uid = meta.source == "dicom" and uid is not None and is_dicom_uid(uid)
        _log.info("analyzed %s in %.0f ms%s", name, timings["total"], f" (refused: {refusal})" if refusal else "")
        self.first_table.set()
        return Analysis(
            name=name, sha256=digest, image=image, image_uid=uid if uid and use_uid else digest,
            image_uid_kind="sop_instance_uid" if use_uid else "sha256", prediction=prediction, refusal=refusal,
            notes=tuple(notes), timings_ms=timings, source=data if meta.decode_level else None,
        )  # fmt: skip

    def display_image(self, analysis: Analysis) -> XrayImage:
        """Full-resolution pixels for the viewer: the analysed image, or its full JPEG 2000 decode (cached)."""
        source = analysis.source
        if source is None:
            return analysis.image
        return self._display.get_or_compute(analysis.sha256, lambda: read_image(source, name=analysis.name))

    def saliency(
        self, analysis: Analysis, method: SaliencyMethod, finding: str | None, size: tuple[int, int]
    ) -> np.ndarray:
        """An (H, W) map in [0, 1] of where the model looked: rollout, or Grad-CAM for `finding`."""
        target = self.findings.index(finding) if finding in self.findings else -1
        if method == "gradcam" and target < 0:
            raise MedvitError(f"choose one of the model's findings for Grad-CAM (got {finding!r})")
        key = (analysis.sha256, method, finding if method == "gradcam" else None)

        def compute() -> torch.Tensor:
            x = self.predictor.transform(analysis.image.pixels).unsqueeze(0)
            model = self.predictor.model
            with self._model_lock:
                if method == "rollout":
                    return attention_rollout(model, x)[0]
                return grad_cam(model, x, target)[0]

        grid = self._saliency.get_or_compute(key, compute)
        _, h_in, w_in = self.predictor.info.preprocessing["input_size"]
        return to_image(grid, (int(h_in), int(w_in)), size)


FIRST_TABLE_WAIT_S = 60.0  # how long the engine check lets the first table go first when nobody opens an image


class EngineCheck:
    """The `auto` engine choice for a running service, in a background thread: `Predictor.from_dir(run, "auto")`
    (the one self-check, cached per weights and machine) on its own copy of the model, so it never races the
    served model's saliency hooks, and after the first table. When it picks an engine other than torch, its
    predictor replaces the service's; until then, or if it fails, the service keeps answering with eager torch."""

    def __init__(self, service: ReviewService, run_dir: Path) -> None:
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(service, run_dir), name="medvit-engine-check",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, service: ReviewService, run_dir: Path) -> None:
        # the first table gets the 2 cores of a small machine to itself; the check starts after it (or a minute)
        service.first_table.wait(FIRST_TABLE_WAIT_S)
        try:
            chosen = Predictor.from_dir(run_dir, backend=AUTO)
        except Exception as e:  # noqa: BLE001 - the service stays on eager torch, which is always right
            _log.warning("engine self-check failed, staying on eager torch: %s", e, exc_info=True)
            self.error = f"{type(e).__name__}: {e}"
            return
        if chosen.backend.name != service.predictor.backend.name:
            with service._model_lock:
                service.predictor = chosen
        _log.info("engine check done: serving with %s", chosen.backend.name)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def status(self) -> str:
        """One line for the sidebar: the backend serving now and what the check is doing."""
        return (
            "checking the faster engines against fp32…"
            if self.running
            else (f"self-check failed ({self.error}); staying on eager torch" if self.error else "self-check done")
        )


def load_zero_shot() -> ZeroShotScorer:
    """The CLIP scorer named by $MEDVIT_CLIP, with $MEDVIT_CLIP_TEMPERATURES (`CLIP_TEMPERATURES_ENV`) applied.

    Always offline: a review session must not stall on (or depend on) a download, so the weights have to be
    a local folder or already in the Hugging Face cache.

    Raises:
        ConfigError: no CLIP model configured.
        WeightsNotFoundError: the configured weights are not available offline.
    """
    from medvit.zeroshot.scorer import ZeroShotScorer

    return ZeroShotScorer.load(offline=True, temperatures=os.environ.get(CLIP_TEMPERATURES_ENV) or None)


def zero_shot_table(scorer: ZeroShotScorer, image: XrayImage, prompts: list[str], pairs: list[str]) -> pd.DataFrame:
    """The app's zero-shot table from its two text boxes: free-text prompts (cosine similarity, and a softmax
    across them when there are several) and "positive | negative" pair lines (negative optional: the positive is
    negated). Columns: mode, prompt, prob, similarity, calibration ("uncalibrated" unless a fitted temperature
    exists for that pair)."""
    pair_objs = scorer.requested_pairs([], pairs)
    n_prompts = sum(bool(p.strip()) for p in prompts)
    table = scorer.score_table(image, prompts, pair_objs, multiclass=n_prompts > 1)
    # the reader typed both sides of a pair, so show both; the prompts they typed first come first
    table.loc[table["mode"] == "pair", "prompt"] = [f"{p.positive[0]} | {p.negative[0]}" for p in pair_objs]
    table = table.sort_values("mode", key=lambda mode: mode == "pair", kind="stable", ignore_index=True)
    return table[["mode", "prompt", "prob", "similarity", "calibration"]]
