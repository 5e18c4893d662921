"""Image transforms: eval preprocessing derived from the model, and mild, anatomy-safe training augmentation.

This is the only module that imports albumentations. Input is always the HxW float32 [0,1]
array from `read_image`; output is a normalised 3xHxW tensor (grey replicated to 3 channels,
because ImageNet-pretrained backbones expect RGB).
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from medvit.config import AugmentConfig

_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def resolve_preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    """Preprocessing derived from the model's timm data config, saved in every checkpoint.

    timm keeps the pretrained config's input size even when a ViT is built with another
    `img_size`; the patch embedding knows the size the model really takes, so it wins. A backbone that carries
    its own `preprocessing` (a transformers encoder: from its AutoImageProcessor) is taken at its word.
    New runs shrink with an area filter (`antialias`), as timm's and transformers' PIL resizes do.
    """
    from timm.data import resolve_model_data_config

    model = getattr(model, "backbone", model)  # a medvit Classifier: the timm model is its backbone
    own = getattr(model, "preprocessing", None)
    if isinstance(own, dict):
        return dict(own)
    cfg = resolve_model_data_config(model)
    size = list(cfg["input_size"])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = [size[0], int(img_size[0]), int(img_size[1])]
    return {
        "input_size": size,
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "antialias": True,
    }


def letterbox_box(h: int, w: int, input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an h x w image lands inside the model input: (top, left, height, width) of the content.

    The eval transform scales the image to fit (aspect ratio kept, no crop that would cut off the
    costophrenic angles) and centre-pads the rest; saliency maps are cropped to this box to line up
    with the original image. It is albumentations' own rule (round, then floor the top/left padding),
    and tests check it against the real transform.
    """
    h_in, w_in = input_hw
    scale = min(h_in / h, w_in / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (h_in - nh) // 2, (w_in - nw) // 2, nh, nw


def _resize(h: int, w: int, interpolation: int, antialias: bool) -> list[A.BasicTransform]:
    # The letterbox of `letterbox_box`: fit inside h x w keeping the aspect ratio, centre-pad the short side.
    # Shrinking with a plain bicubic kernel samples a 1955 px CR every 5 px (30 at 64 px): the model input then
    # depends on the source's resolution and its noise aliases. The area filter averages instead.
    return [
        A.LongestMaxSize(max_size_hw=(h, w), interpolation=interpolation,
                         area_for_downscale="image" if antialias else None),
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0),
    ]


def _spatial_augment(h: int, w: int, aug: AugmentConfig, interpolation: int) -> list[A.BasicTransform]:
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(h, w), scale=aug.crop_scale, ratio=aug.crop_ratio, interpolation=interpolation, p=1.0
        ),
        A.Affine(
            scale=aug.scale,
            translate_percent=(-aug.translate, aug.translate),
            rotate=(-aug.rotate, aug.rotate),
            interpolation=interpolation,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=aug.affine_p,
        ),
    ]
    if aug.hflip > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip))
    return ops


def _photometric_augment(aug: AugmentConfig) -> list[A.BasicTransform]:
    # Runs on pixels clipped to [0,1]: gamma of a negative value (bicubic overshoot) would be NaN.
    ops: list[A.BasicTransform] = [
        A.RandomGamma(gamma_limit=aug.gamma, p=aug.photometric_p),
        A.RandomBrightnessContrast(brightness_limit=aug.brightness, contrast_limit=aug.contrast, p=aug.photometric_p),
    ]
    if aug.noise_std > 0:
        ops.append(A.GaussNoise(std_range=(0.0, aug.noise_std), p=0.3))
    if aug.blur_p > 0:
        ops.append(A.GaussianBlur(blur_limit=(3, 5), p=aug.blur_p))
    return ops


class XrayTransform:
    """`read_image` pixels -> normalised 3xHxW tensor; `reseed` makes the augmentation reproducible.

    albumentations keeps its own random state (not torch's or numpy's global one), so exact resume and
    identical runs need the caller to seed it, e.g. per (seed, epoch, sample index) as `XrayDataset` does.
    """

    def __init__(self, spatial: list[A.BasicTransform], photometric: list[A.BasicTransform],
                 mean: list[float], std: list[float]) -> None:
        self._spatial = A.Compose(spatial)
        self._photometric = A.Compose(photometric) if photometric else None
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def reseed(self, seed: int) -> None:
        """Seed the augmentation's random state."""
        self._spatial.set_random_seed(seed)
        if self._photometric is not None:
            self._photometric.set_random_seed(seed + 1)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        if pixels.ndim != 2:
            raise ValueError(f"expected an HxW grey image, got shape {pixels.shape}")
        out = np.clip(self._spatial(image=np.ascontiguousarray(pixels, dtype=np.float32))["image"], 0.0, 1.0)
        if self._photometric is not None:
            out = np.clip(self._photometric(image=out)["image"], 0.0, 1.0)
        grey = torch.from_numpy(out).unsqueeze(0)
        return (grey.expand(3, -1, -1) - self._mean) / self._std


def build_transforms(preprocessing: dict[str, Any], train: bool, aug: AugmentConfig | None = None) -> XrayTransform:
    """The transform from `read_image` pixels to a model input tensor.

    Args:
        preprocessing: `resolve_preprocessing(model)` output, as stored in the run folder.
        train: add augmentation (when `aug` is given and enabled).
        aug: augmentation settings.
    """
    _, h, w = preprocessing["input_size"]
    interpolation = _INTERPOLATION.get(preprocessing.get("interpolation", "bicubic"), cv2.INTER_CUBIC)
    # Runs saved before `antialias` existed were trained without it, so they keep the plain kernel.
    spatial = _resize(h, w, interpolation, bool(preprocessing.get("antialias", False)))
    photometric: list[A.BasicTransform] = []
    if train and aug is not None and aug.enabled:
        spatial += _spatial_augment(h, w, aug, interpolation)
        photometric = _photometric_augment(aug)
    return XrayTransform(spatial, photometric, preprocessing["mean"], preprocessing["std"])
