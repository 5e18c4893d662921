"""medvit review: a clinician opens a chest X-ray and sees calibrated findings, saliency and zero-shot probes,
and records agreement. UI only — decoding, prediction, saliency and storage live in medvit.

`medvit review` runs it through the page script `medvit/review/page.py` (it ships in the wheel; `apps/review.py` is
the same for `streamlit run` in a source checkout), so this is an imported module whose cached resources the server's
warm-up thread (`medvit.review.launch`) fills before the first session. Settings arrive as MEDVIT_* environment
variables; see docs/app.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from medvit.review.accounts import can
from medvit.review.findings import findings_list, review_form
from medvit.review.keys import keyboard_shortcuts
from medvit.review.panels import BANNER, history_panel, patient_panel, reported, zero_shot_panel
from medvit.review.queue import SOURCE, queue_panel
from medvit.review.service import Analysis, ReviewService, load_zero_shot
from medvit.review.settings import CLIP_ENV, AppSettings
from medvit.review.signin import current_user, mark_active, reveal_audit
from medvit.review.store import ReviewStore
from medvit.review.viewer import image_panel
from medvit.review.worklist import list_worklist, patient_identifiers

if TYPE_CHECKING:  # imported where used: the PACS (highdicom) and Monitoring (matplotlib) modules would slow the
    # cold start of every server, and most never open them
    from medvit.pacs.client import PacsClient
    from medvit.pacs.sr import ResultProvenance

_log = logging.getLogger("medvit.app")
# Streamlit's wide layout keeps 5 rem on each side; at 1280-1600 px beside the sidebar the viewer and the findings
# rows need that width more
_PAGE_CSS = '<style>[data-testid="stMainBlockContainer"] { padding-left: 2rem; padding-right: 2rem; }</style>'


@st.cache_resource(show_spinner="Loading the model…")
def get_service(run_dir: str | None) -> ReviewService:
    return ReviewService.load(run_dir)  # eager torch at once; the engine self-check runs in the background


@st.cache_resource(show_spinner=False)
def get_store(db_url: str | None) -> ReviewStore:
    return ReviewStore(db_url)


@st.cache_resource(show_spinner="Loading the CLIP model…")
def get_zero_shot():
    return load_zero_shot()


@st.cache_data(show_spinner=False, max_entries=4)
def worklist_listing(folder: str, mtime_ns: int) -> pd.DataFrame:
    """The worklist's header listing, read once per change of the folder instead of on every rerun (slider moves).

    Adding or removing files changes the folder's mtime, which is part of the cache key.
    """
    return list_worklist(folder)


@st.cache_resource(show_spinner=False)
def get_pacs(url: str) -> PacsClient:
    from medvit.pacs.client import PacsClient

    return PacsClient(url, timeout=10.0)


@st.cache_data(show_spinner="Reading the PACS worklist…", ttl=30, max_entries=4)
def pacs_rows(url: str, db_url: str | None, weights_sha256: str, refresh: int) -> pd.DataFrame:
    """The PACS worklist, read at most every 30 s (or on "Refresh"), not on every rerun."""
    from medvit.review.pacs_worklist import pacs_listing

    return pacs_listing(get_pacs(url), get_store(db_url).engine, weights_sha256)


def _upload_chosen() -> None:
    st.session_state[SOURCE] = "upload"


def choose_file(
    settings: AppSettings, service: ReviewService, store: ReviewStore | None, reviewer: str | None
) -> tuple[bytes, str, pd.Series | None] | None:  # fmt: skip
    """The image to review: the worklist's current row (folder or PACS), or an upload the reader just chose,
    else the default example. Returns the bytes, a name and the PACS row (None for other sources)."""
    st.sidebar.header("Image")
    upload = st.sidebar.file_uploader(
        "Upload a DICOM, PNG or JPEG", key="upload", max_upload_size=settings.max_upload_mb, on_change=_upload_chosen,
        help=f"Up to {settings.max_upload_mb} MB; the format is recognised from the content.",
    )  # fmt: skip
    row, kind = None, None
    if settings.dicomweb_url:
        with reported("PACS worklist"):
            refresh = st.session_state.get("_medvit_pacs_refresh", 0)
            listing = pacs_rows(settings.dicomweb_url, settings.db_url, service.predictor.info.weights_sha256, refresh)
            st.sidebar.caption(f"PACS worklist: {settings.dicomweb_url} ({len(listing)} CR/DX instances, most urgent "
                               "first)")  # fmt: skip
            if st.sidebar.button("Refresh", key="pacs_refresh"):
                st.session_state["_medvit_pacs_refresh"] = refresh + 1
                st.rerun()
            reviewed = store.reviewed_images(listing["uid"].tolist(), reviewer) if store else set()
            columns = ["date", "view", "status", "top_finding", "top_prob"]
            row, kind = queue_panel("pacs", listing, columns, reviewed), "pacs"
    elif settings.worklist is not None:
        with reported("Worklist"):
            folder = settings.worklist
            listing = worklist_listing(str(folder), folder.stat().st_mtime_ns if folder.is_dir() else 0)
            st.sidebar.caption(f"Worklist: {settings.worklist} ({len(listing)} files)")
            reviewed = store.reviewed_images(listing["uid"].dropna().tolist(), reviewer) if store else set()
            row, kind = queue_panel("folder", listing, ["file", "view", "date"], reviewed), "folder"
    if upload is not None and (row is None or st.session_state.get(SOURCE) == "upload"):
        return upload.getvalue(), upload.name, None
    if row is not None and kind == "pacs" and settings.dicomweb_url:
        from medvit.review.pacs_worklist import retrieve

        with reported("PACS"), st.spinner("Retrieving the image from the PACS…"):
            return retrieve(get_pacs(settings.dicomweb_url), row), f"PACS instance {row['uid']}", row
        return None
    if row is not None and settings.worklist is not None:
        with reported("Worklist"):
            return (settings.worklist / str(row["file"])).read_bytes(), str(row["file"]), None
        return None
    if settings.default_file is not None:
        path = Path(settings.default_file)
        with reported("Default image"):
            return path.read_bytes(), path.name, None
    st.info("Upload an image to start.")
    return None


def model_notes(service: ReviewService) -> None:
    """Sidebar model line, and the demo banner with its hold-out AUROC when the run is the packaged demo."""
    info, card = service.predictor.info, service.model_card
    auroc = ""
    if card is not None and card.mean_auroc is not None:
        ci = f" [{card.mean_auroc_ci[0]:.2f}–{card.mean_auroc_ci[1]:.2f}]" if card.mean_auroc_ci else ""
        auroc = f"hold-out mean AUROC {card.mean_auroc:.2f}{ci} on {card.n_images} images"
    demo = "**Demo model** · " if service.is_demo else ""
    st.sidebar.caption(
        f"{demo}Model **{info.model_name}** · backend {service.predictor.backend.name} · "
        f"weights {info.weights_sha256[:12]} · {'calibrated' if service.predictor.calibrated else 'uncalibrated'}"
        + (f" · {auroc}" if auroc else "")
    )
    check = service.engine_check
    if check is not None and check.running:
        with st.sidebar:
            engine_progress(service)
    elif check is not None and check.error:
        st.sidebar.caption(f"Engine: {check.status()}")
    if service.is_demo:
        st.info(
            "**This is the demo model**, three tiny ViTs trained from scratch on 337 NIH images to show medvit at work"
            + (f" ({auroc})" if auroc else "") + ". Its findings are illustrations, far from a clinical model.",
            icon="🧪",
        )  # fmt: skip


@st.fragment(run_every=2)
def engine_progress(service: ReviewService) -> None:
    """The sidebar's line while the background engine self-check runs; when it ends, one page run shows the
    engine it chose."""
    check = service.engine_check
    if check is None or not check.running:
        st.rerun()
    st.caption(f"⏳ engine: {service.predictor.backend.name} ({check.status()})")


def pacs_sr_option(settings: AppSettings, store: ReviewStore, analysis: Analysis, data: bytes,
                   review_id: int | None) -> None:  # fmt: skip
    """Optionally store the saved review's verdicts back into the PACS as an SR (PACS images only)."""
    send = st.checkbox("Also store my verdicts in the PACS as a DICOM SR", key="pacs_sr", value=False)
    if review_id is None or not send or analysis.prediction is None or not settings.dicomweb_url:
        return
    from medvit.review.pacs_worklist import store_review_sr

    with reported("Verdicts not stored in the PACS"):
        [review] = [r for r in store.history(image_uid=analysis.image_uid, limit=None) if r.id == review_id]
        uid = store_review_sr(
            get_pacs(settings.dicomweb_url), data, analysis.prediction.table, provenance(analysis), review.verdicts,
            f"{review.id}.{len(review.edits)}",
        )  # fmt: skip
        st.success(f"Stored your verdicts in the PACS (SR {uid}).")


def provenance(analysis: Analysis) -> ResultProvenance:
    """What produced the numbers the reader judged, for the SR that carries their verdicts."""
    pred = analysis.prediction
    assert pred is not None  # only scored images are reviewed
    from medvit.pacs.sr import ResultProvenance

    return ResultProvenance(model_name=pred.model_name, weights_sha256=pred.weights_sha256,
                            calibration_version=pred.calibration_version, engine=pred.backend)  # fmt: skip


def main() -> None:
    st.set_page_config(page_title="medvit review", layout="wide")
    st.warning(BANNER, icon="⚠️")
    st.title("Chest X-ray review")
    keyboard_shortcuts()  # drawn in the same place on every run, so the key listener stays
    settings = service = store = analysis = None
    with reported("Settings"):
        settings = AppSettings.from_env()
    if settings is None:
        return
    with reported("Review database"):
        store = get_store(settings.db_url)
    account = current_user(store, settings)  # site mode: nothing about a patient before sign-in
    if account is None:
        return
    with reported("Model"):
        service = get_service(settings.run_dir)
    if service is None:
        return
    if can(account, "see_monitoring") and store is not None:
        page = st.sidebar.radio("Page", ["Review", "Monitoring"], horizontal=True, key="page")
        if page == "Monitoring":
            from medvit.review.monitor_page import monitoring_page

            monitoring_page(store, service.run_dir)
            return
    info = service.predictor.info
    model_notes(service)
    chosen = choose_file(settings, service, store, None if account.is_local else account.name)
    if chosen is None:
        return
    data, name, pacs_row = chosen
    with reported("Cannot read the file"):
        analysis = service.analyze(data, name, max_bytes=settings.max_upload_bytes)
    if analysis is None:
        return

    st.html(_PAGE_CSS)
    left, right = st.columns([9, 11], gap="medium")  # the findings rows need ~650 px to sit on one line each
    with right:  # filled first: the findings reach the browser before a JPEG 2000 is decoded in full for display
        readings = findings_list(analysis, service.model_card, service.predictor.calibrated)
        if analysis.prediction is not None and store is not None:
            review_id = review_form(store, analysis, readings, info.model_name, account)
            if pacs_row is not None:
                pacs_sr_option(settings, store, analysis, data, review_id)
        if store is not None:
            history_panel(store, analysis, None if can(account, "see_all_history") else account.name)
    with left:  # identifiers above the image: the viewer sticks to the top and would cover what follows it
        patient_panel(patient_identifiers(data), image_key=analysis.sha256[:12],
                      may_reveal=can(account, "reveal_identifiers"),
                      on_reveal=reveal_audit(store, account, analysis.image_uid))  # fmt: skip
        with reported("Image"):
            image_panel(service, analysis)
    zero_shot_panel(get_zero_shot, analysis, configured=bool(os.environ.get(CLIP_ENV)))


def run() -> None:
    """The page, with any failure shown as one line (apps/review.py and `medvit review` both call this)."""
    with reported("medvit review"):
        main()
    mark_active()  # the idle clock restarts when a page run ends, however long the run took
