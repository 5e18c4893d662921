"""The review app's image viewer: the windowed image with its saliency overlay, reader notes and metadata."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from medvit.model.saliency import overlay
from medvit.review.display import display_pixels, metadata_rows, window_defaults
from medvit.review.panels import _rows_height, reported
from medvit.review.service import Analysis, ReviewService, SaliencyMethod

SALIENCY: dict[str, SaliencyMethod | None] = {
    "None": None,
    "Attention rollout": "rollout",
    "Grad-CAM (one finding)": "gradcam",
}


def image_panel(service: ReviewService, analysis: Analysis) -> None:
    """Windowed image with optional saliency overlay, reader notes, metadata and (masked) patient identifiers."""
    key = analysis.sha256[:12]
    image = service.display_image(analysis)
    d = window_defaults(image)
    step = 1.0 if d.high - d.low > 50 else 0.5
    span = max(d.high - d.low, 2.0)
    c1, c2, c3 = st.columns([3, 3, 1])
    fmt = "%.0f" if step >= 1 else "%.1f"
    center = c1.slider("Window centre", min(d.low, d.center), max(d.high, d.center), d.center, step, fmt,
                       key=f"wc_{key}")  # fmt: skip
    width = c2.slider("Window width", 1.0, max(2 * span, d.width), max(d.width, 1.0), step, fmt, key=f"ww_{key}")
    invert = c3.toggle("Invert", key=f"inv_{key}")
    pixels = display_pixels(image, center, width, invert, d)

    s1, s2, s3 = st.columns([2, 2, 2])
    method = SALIENCY[s1.selectbox("Saliency overlay", list(SALIENCY), key=f"sal_{key}")]
    finding = None
    if method == "gradcam":
        finding = s2.selectbox("Finding", list(service.findings), key=f"salf_{key}")
    alpha = s3.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key=f"alpha_{key}", disabled=method is None)
    shown = pixels
    if method is not None:
        if analysis.prediction is None:
            st.info("No saliency for an image the model did not score.")
        else:
            with reported("Saliency"), st.spinner("Computing saliency…"):
                heat = service.saliency(analysis, method, finding, pixels.shape)
                shown = overlay(pixels, heat, alpha)
                if not heat.any():
                    st.info(
                        f"Blank map: no region raises the {finding} score (Grad-CAM shows positive evidence only)."
                        if method == "gradcam" else "Blank map: the attention is spread evenly over the image."
                    )  # fmt: skip
    caption = f"{analysis.name} — window C {center:g} / W {width:g}" + (" (inverted)" if invert else "")
    st.image(shown, caption=caption, clamp=True, width="stretch")
    for note in analysis.notes:
        st.caption(f"ℹ️ {note}")
    with st.expander("Image metadata", expanded=True):
        rows = metadata_rows(image.meta)
        st.dataframe(pd.DataFrame({"field": list(rows), "value": list(rows.values())}), hide_index=True,
                     width="stretch", height=_rows_height(len(rows)))  # fmt: skip
