"""A tiny random-init DeiT3 run folder written through the real checkpoint code, for the inference tests.

Random init gives near-constant outputs (DeiT3's LayerScale starts at 1e-6), which would make every
backend "agree" trivially; the LayerScale gains are set to 1 so the logits depend on the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medvit.config import ModelConfig
from medvit.data.transforms import resolve_preprocessing
from medvit.evaluate.calibration import Calibration, Temperature
from medvit.findings import DEFAULT_FINDINGS
from medvit.model.classifier import build_model
from medvit.runs import model_build_args, save_weights, write_run_config

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64}


def make_tiny_run(run_dir: Path, data_dir: Path | None = None, *, seed: int = 0, calibrated: bool = True) -> Path:
    """Write config.json + model.safetensors (+ calibration.json) for a tiny deit3 into `run_dir`."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name="deit3_small_patch16_384", pretrained=False, model_kwargs=TINY, freeze_stem=False,
                      freeze_blocks=0, drop_path_rate=0.0)
    model = build_model(cfg, len(DEFAULT_FINDINGS)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {}
    if data_dir is not None:
        data = {"labels_csv": str(data_dir / "labels.csv"), "images_root": str(data_dir / "images"),
                "findings": list(DEFAULT_FINDINGS)}
    write_run_config(run_dir, {"data": data}, list(DEFAULT_FINDINGS), resolve_preprocessing(model.backbone),
                     model_build_args(cfg, len(DEFAULT_FINDINGS)))
    save_weights(run_dir / "model.safetensors", model)
    if calibrated:
        k = len(DEFAULT_FINDINGS)
        Calibration(tuple(DEFAULT_FINDINGS), tuple(Temperature(2.0) for _ in range(k)), np.full(k, 0.45),
                    "temperature").save(run_dir / "calibration.json")
    return run_dir
