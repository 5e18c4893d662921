"""The review app's image viewer: full-resolution lossless pixels in a Cornerstone3D viewer, with the saliency map.

The viewer itself is a Streamlit component built from npm (`viewer_frontend/`, Cornerstone3D's StackViewport with
its Zoom, Pan and WindowLevel tools); its built bundle ships in the wheel, so running the app needs no npm.
Windowing, zoom and pan happen in the browser and never rerun the page. The findings rows choose which finding's
map is shown through `select_saliency_finding`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import streamlit.components.v1 as components
from streamlit.components.v1.custom_component import CustomComponent

from medvit.data.dicom import XrayImage
from medvit.review.display import (
    PixelPayload,
    Preset,
    colour_scale,
    encode_pixels,
    heat_layer,
    metadata_rows,
    modality_values,
    overlay_size,
    window_presets,
)
from medvit.review.panels import _rows_height, reported
from medvit.review.service import Analysis, ReviewService, SaliencyMethod

FRONTEND = Path(__file__).with_name("viewer_frontend") / "build"

VIEWER_KEY = "medvit_viewer"  # the component's value: {"image": key} once the browser's viewer holds that image
_SENT = "_medvit_viewer_sent"  # session_state: (image key, asked by a new frame?) of the pixels last sent
SALIENCY_METHOD = "saliency_method"  # session_state keys: the overlay shown ...
SALIENCY_FINDING = "saliency_finding"  # ... and the finding whose Grad-CAM map it is
_SALIENCY_IMAGE = "_saliency_image"  # the image the finding was chosen for: a new image starts on its top finding
OFF, GRADCAM, ROLLOUT = "Off", "Grad-CAM (one finding)", "Attention rollout (all findings)"
SALIENCY: dict[str, SaliencyMethod | None] = {OFF: None, GRADCAM: "gradcam", ROLLOUT: "rollout"}
_RESERVED_PX = 230  # page header, saliency controls and caption: the viewer takes the rest of the window's height
# sticky on the viewer container's wrapper, whose parent (the column) is as tall as the findings beside it
_STICKY_CSS = """<style>
div[data-testid="stLayoutWrapper"]:has(> .st-key-medvit-viewer) {
  position: sticky; top: 3.75rem; z-index: 5; background: var(--background-color, #fff);
}
</style>"""


def _viewer_component() -> CustomComponent:
    """The viewer component, declared during a page run: Streamlit registers (and then serves) a component only
    when it is declared by a running page, and the server's warm-up thread (`medvit.review.launch`) imports this
    module before any session, where a module-level declaration was lost (the viewer's files gave 404)."""
    return components.declare_component("medvit_viewer", path=str(FRONTEND))


def select_saliency_finding(finding: str) -> None:
    """Show `finding`'s Grad-CAM map: what clicking a finding's row does (call it from the row's callback)."""
    st.session_state[SALIENCY_FINDING] = finding
    st.session_state[SALIENCY_METHOD] = GRADCAM


def top_finding(table: pd.DataFrame) -> str:
    """The finding to explain first: the most probable flagged one, else the most probable reported one."""
    reported_rows = table["reported"] if "reported" in table else pd.Series(True, index=table.index)
    for rows in (table[table["flag"] & reported_rows], table[reported_rows], table):
        if len(rows):
            return str(rows.loc[rows["prob"].idxmax(), "finding"])
    raise ValueError("the findings table is empty")


@st.cache_resource(max_entries=4, show_spinner=False)
def _pixels(sha256: str, _image: XrayImage) -> tuple[PixelPayload, list[Preset]]:
    """The lossless payload and presets of one image, built once per file (`sha256` is the cache key)."""
    values = modality_values(_image)
    return encode_pixels(values), window_presets(_image, values)


def image_panel(service: ReviewService, analysis: Analysis) -> None:
    """Reader notes and the image metadata, then the sticky viewer with its saliency controls.

    The viewer comes last in its column: it sticks to the top while the findings beside it scroll, so anything
    drawn after it in the same column would scroll under it and be hidden.
    """
    image = service.display_image(analysis)
    for note in analysis.notes:
        st.caption(f"ℹ️ {note}")
    with st.expander("Image metadata", expanded=False):
        rows = metadata_rows(image.meta)
        st.dataframe(pd.DataFrame({"field": list(rows), "value": list(rows.values())}), hide_index=True,
                     width="stretch", height=_rows_height(len(rows)))  # fmt: skip
    st.html(_STICKY_CSS)
    with st.container(key="medvit-viewer"):
        payload, presets = _pixels(analysis.sha256, image)
        overlay, legend = _saliency(service, analysis, (payload.rows, payload.columns))
        meta = image.meta
        image_key = analysis.sha256[:16]
        _viewer_component()(
            pixels=payload.data if _send_pixels(image_key) else None, dtype=payload.dtype, rows=payload.rows,
            columns=payload.columns, image_key=image_key,
            spacing=list(meta.pixel_spacing) if meta.pixel_spacing else None,
            invert=meta.inverted, modality=meta.modality or meta.source.upper(), lossy=meta.lossy,
            presets=[dataclasses.asdict(p) for p in presets],
            overlay=overlay, overlay_key=str(hash(overlay)) if overlay else "", legend=legend,
            reserve=_RESERVED_PX, key=VIEWER_KEY, default=None,
        )  # fmt: skip
        first = presets[0]
        st.caption(
            f"{analysis.name} — window C {first.center:g} / W {first.width:g} ({first.label.lower()}) at "
            f"{payload.columns} × {payload.rows} px, {payload.dtype} lossless; drag on the image to change it"
        )


def _send_pixels(image_key: str) -> bool:
    """Whether this page run sends the image's pixels: once per image and session, and again only when a viewer
    frame asks for them.

    Streamlit re-sends a component's arguments whole when any of them changes, and a page often runs again before
    the viewer has loaded the image (the rerun at the engine check's end, the value change itself): sending pixels
    until the browser said it held them put 7.2 MB on the wire twice when the page opened. The viewer reports
    `{"image": key}` once it shows them, and a frame that lost them (remounted) answers `{"image": null, "need": key}`,
    which is answered once.
    """
    value = st.session_state.get(VIEWER_KEY)
    value = value if isinstance(value, dict) else {}
    if value.get("image") == image_key:
        st.session_state.pop(_SENT, None)  # held: a later request from a new frame is answered
        return False
    request = (image_key, value.get("need") == image_key)
    if st.session_state.get(_SENT) == request:
        return False  # sent already for this request; the viewer is still loading them
    st.session_state[_SENT] = request
    return True


def _saliency(service: ReviewService, analysis: Analysis, shape: tuple[int, int]) -> tuple[bytes | None, dict | None]:
    """The saliency controls, and the overlay PNG and legend they ask for (None, None when off)."""
    prediction = analysis.prediction
    if prediction is None:
        return None, None
    ranked = prediction.table.sort_values("prob", ascending=False, kind="stable")
    if st.session_state.get(_SALIENCY_IMAGE) != analysis.sha256:
        st.session_state[_SALIENCY_IMAGE] = analysis.sha256
        st.session_state[SALIENCY_FINDING] = top_finding(prediction.table)
    probs = dict(zip(ranked["finding"], ranked["prob"], strict=True))
    c1, c2, c3, c4 = st.columns([3, 3, 2, 2])
    method = SALIENCY[c1.selectbox("Saliency", list(SALIENCY), key=SALIENCY_METHOD)]
    finding = c2.selectbox("Map for finding", list(ranked["finding"]), key=SALIENCY_FINDING,
                           format_func=lambda f: f"{f} ({probs[f]:.2f})", disabled=method != "gradcam",
                           help="A finding row's click shows its map; starts on the top-ranked one.")  # fmt: skip
    cutoff = c3.slider("Show above", 0.0, 0.95, 0.5, 0.05, key="saliency_cutoff", disabled=method is None,
                       help="Map values below this are transparent (the map is scaled to 0-1 per image).")  # fmt: skip
    opacity = c4.slider("Opacity", 0.1, 1.0, 0.6, 0.05, key="saliency_opacity", disabled=method is None)
    if method is None:
        return None, None
    heat = None
    with reported("Saliency"), st.spinner("Computing saliency…"):
        heat = service.saliency(analysis, method, finding, overlay_size(*shape))
    if heat is None:
        return None, None
    if not np.any(heat >= max(cutoff, 1e-6)):
        st.info(
            f"Blank map: no region raises the {finding} score (Grad-CAM shows positive evidence only)."
            if method == "gradcam" else "Blank map: the attention is spread evenly over the image."
        )  # fmt: skip
    title = f"Grad-CAM · {finding}" if method == "gradcam" else "Attention rollout · all findings"
    legend = {"title": title, "low": f"{cutoff:.2f}", "high": "1.00 (strongest)", "colorbar": colour_scale()}
    return heat_layer(heat, cutoff, opacity), legend
