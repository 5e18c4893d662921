"""medvit review: a clinician opens a chest X-ray and sees calibrated findings, saliency and zero-shot probes,
and records agreement. UI only — decoding, prediction, saliency and storage live in medvit.

This module is the page script `medvit review` runs (it ships in the wheel); `apps/review.py` is the same page
for `streamlit run` in a source checkout. Start with `medvit review` (settings arrive as MEDVIT_* environment
variables; see docs/app.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import streamlit as st

from medvit.review.panels import (
    BANNER,
    feedback_form,
    findings_panel,
    history_panel,
    patient_panel,
    reported,
    zero_shot_panel,
)
from medvit.review.service import ReviewService, load_zero_shot
from medvit.review.settings import AppSettings
from medvit.review.store import ReviewStore
from medvit.review.viewer import image_panel
from medvit.review.worklist import list_worklist, patient_identifiers

_log = logging.getLogger("medvit.app")


@st.cache_resource(show_spinner="Loading the model…")
def get_service(run_dir: str | None) -> ReviewService:
    return ReviewService.load(run_dir)


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


def choose_file(settings: AppSettings) -> tuple[bytes, str] | None:
    """The image to review: an upload, else the worklist selection, else the default example."""
    st.sidebar.header("Image")
    upload = st.sidebar.file_uploader(
        "Upload a DICOM, PNG or JPEG", key="upload", max_upload_size=settings.max_upload_mb,
        help=f"Up to {settings.max_upload_mb} MB; the format is recognised from the content.",
    )  # fmt: skip
    if upload is not None:
        return upload.getvalue(), upload.name
    if settings.worklist is not None:
        with reported("Worklist"):
            folder = settings.worklist
            listing = worklist_listing(str(folder), folder.stat().st_mtime_ns if folder.is_dir() else 0)
            st.sidebar.caption(f"Worklist: {settings.worklist} ({len(listing)} files)")
            st.sidebar.dataframe(listing, hide_index=True, key="worklist_table")
            names = ["—", *listing["file"]]
            choice = st.sidebar.selectbox("Open from worklist", names, key="worklist_choice")
            if choice != "—":
                path = settings.worklist / choice
                return path.read_bytes(), choice
    if settings.default_file is not None:
        path = Path(settings.default_file)
        with reported("Default image"):
            return path.read_bytes(), path.name
    st.info("Upload an image to start.")
    return None


def main() -> None:
    st.set_page_config(page_title="medvit review", layout="wide")
    st.warning(BANNER, icon="⚠️")
    st.title("Chest X-ray review")
    settings = service = store = analysis = None
    with reported("Settings"):
        settings = AppSettings.from_env()
    if settings is None:
        return
    with reported("Model"):
        service = get_service(settings.run_dir)
    with reported("Review database"):
        store = get_store(settings.db_url)
    if service is None:
        return
    info = service.predictor.info
    st.sidebar.caption(
        f"Model **{info.model_name}** · backend {service.predictor.backend.name} · "
        f"weights {info.weights_sha256[:12]} · {'calibrated' if service.predictor.calibrated else 'uncalibrated'}"
    )
    chosen = choose_file(settings)
    if chosen is None:
        return
    data, name = chosen
    with reported("Cannot read the file"):
        analysis = service.analyze(data, name, max_bytes=settings.max_upload_bytes)
    if analysis is None:
        return

    left, right = st.columns([1, 1], gap="large")
    with right:  # filled first: the findings reach the browser before a JPEG 2000 is decoded in full for display
        table = findings_panel(service, analysis)
        if table is not None and store is not None:
            feedback_form(store, analysis, table, info.model_name)
        if store is not None:
            history_panel(store, analysis)
    with left:
        with reported("Image"):
            image_panel(service, analysis)
        patient_panel(patient_identifiers(data))
    zero_shot_panel(get_zero_shot, analysis)


def run() -> None:
    """The page, with any failure shown as one line (apps/review.py and `medvit review` both call this)."""
    with reported("medvit review"):
        main()


if __name__ == "__main__":
    run()
