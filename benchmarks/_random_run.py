"""A run folder of a real architecture with random weights, for benchmarks: its pretrained weights cannot be
downloaded here, and throughput does not depend on the weights' values. Written by medvit's own checkpoint code,
so `Predictor.from_dir` serves it like a trained run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def random_init_run(model_fields: dict[str, Any], out: Path, *, calibrated: bool = False) -> Path:
    """config.json + model.safetensors for `ModelConfig(**model_fields)` with `pretrained: false` (the name's
    pretrained tag is dropped: it names weights that are not loaded); `calibrated` adds a temperature-1 calibration
    with thresholds 0.5 (the same probabilities, through the calibrated path)."""
    import numpy as np
    import torch

    from medvit.config import ModelConfig
    from medvit.data.transforms import resolve_preprocessing
    from medvit.evaluate.calibration import Calibration, Temperature
    from medvit.findings import DEFAULT_FINDINGS
    from medvit.model.classifier import build_model
    from medvit.runs import model_build_args, save_weights, write_run_config

    k = len(DEFAULT_FINDINGS)
    cfg = ModelConfig(**(model_fields | {"name": model_fields["name"].split(".")[0], "pretrained": False,
                                         "weights_file": None}))
    torch.manual_seed(0)
    model = build_model(cfg, k).eval()
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, {"data": {}}, list(DEFAULT_FINDINGS), resolve_preprocessing(model.backbone),
                     model_build_args(cfg, k))
    save_weights(out / "model.safetensors", model)
    if calibrated:
        Calibration(tuple(DEFAULT_FINDINGS), tuple(Temperature(1.0) for _ in range(k)), np.full(k, 0.5),
                    "temperature").save(out / "calibration.json")
    return out
