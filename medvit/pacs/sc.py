"""The saliency overlay as a DICOM Secondary Capture, for PACS viewers that cannot render an SR (`--secondary-capture`).

The picture is the radiograph with the model's attention rollout blended over it (`medvit.model.saliency`),
written with highdicom's `SCImage` into the SR's own series (instance 2 beside the SR's instance 1), so a
viewer shows the two together. Like the SR's, its UID is derived from the source instance and the weights:
storing it again replaces it. The map explains the model's output, not the anatomy; the series description
and the image comments say it is not for diagnostic use.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medvit.data.dicom import XrayImage
from medvit.inference.predictor import Predictor
from medvit.model.saliency import attention_rollout, overlay, to_image
from medvit.pacs.sr import sr_uids

MAX_SIDE = 1024  # a token-grid heat map upsampled: a larger picture adds bytes, not information
INSTANCE_NUMBER = 2
COMMENT = "medvit attention rollout over the image: where the model looked, not evidence. Not for diagnostic use."


def sc_uid(source_sop_uid: str, weights_sha256: str) -> str:
    """The Secondary Capture's SOP Instance UID for this source image and these weights: deterministic."""
    return generate_uid(entropy_srcs=["medvit-sc", source_sop_uid, weights_sha256])


def saliency_overlay(predictor: Predictor, image: XrayImage) -> np.ndarray:
    """The image (longest side at most `MAX_SIDE`) as uint8 RGB with the attention rollout blended over it.

    Raises:
        ValueError: the model has no attention to roll out (not a ViT).
    """
    pixels = image.pixels
    scale = MAX_SIDE / max(pixels.shape)
    if scale < 1:
        size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    x = predictor.transform(image.pixels).unsqueeze(0)
    grid = attention_rollout(predictor.model, x)[0]
    _, h_in, w_in = predictor.info.preprocessing["input_size"]
    heat = to_image(grid, (int(h_in), int(w_in)), (pixels.shape[0], pixels.shape[1]))
    return overlay(pixels, heat)


def build_sc(source: Dataset, rgb: np.ndarray, weights_sha256: str) -> Dataset:
    """A `highdicom.sc.SCImage` of `rgb` (H, W, 3 uint8) in the source's study and its SR's series."""
    from highdicom.sc import SCImage

    from medvit.pacs.sr import SERIES_DESCRIPTION, SERIES_NUMBER

    series_uid, _ = sr_uids(source.SOPInstanceUID, weights_sha256)
    sc = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sc_uid(source.SOPInstanceUID, weights_sha256),
        instance_number=INSTANCE_NUMBER,
        manufacturer="medvit",
        patient_orientation=("L", "F"),
        series_description=SERIES_DESCRIPTION,
        # DICOMweb's default transfer syntax: a viewer that asks WADO-RS without one gets the stored bytes. Stored in
        # highdicom's default (implicit VR), Orthanc had to transcode it, and its GDCM plugin crashed doing so.
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.ImageComments = COMMENT
    sc.BurnedInAnnotation = "NO"
    return sc
