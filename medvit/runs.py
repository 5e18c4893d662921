"""The run folder: every file name in it, `config.json`'s schema, and `load_run`.

A run folder is self-describing: `config.json` holds everything needed to rebuild the network
(timm name + kwargs + head), the findings and the preprocessing, so `load_run` needs no YAML.
Nothing here unpickles: weights are safetensors, the rest is JSON. Other modules name run files
only through the constants below.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvit._io import PICKLE_SUFFIXES, load_tensors, read_json, save_tensors, sha256_file, write_json
from medvit.config import ModelConfig
from medvit.errors import CheckpointError
from medvit.model.classifier import build_model
from medvit.model.ensemble import Ensemble
from medvit.model.hf_backbone import HFBackbone
from medvit.rundir import CONFIG, resolve_run_data

_log = logging.getLogger(__name__)

# ---- the files of a run folder (the only place their names are spelled) ----
WEIGHTS = "model.safetensors"  # the weights inference serves
TIMM_BACKBONE = "timm_backbone.safetensors"  # the backbone alone, as timm.create_model(num_classes=0) names it
HF_BACKBONE = "hf_backbone"  # transformers runs: the encoder's config.json + preprocessor_config.json (no weights)
CALIBRATION = "calibration.json"  # per-finding calibrators + thresholds (medvit.evaluate.calibration)
CALIBRATIONS = "calibrations"  # later calibration versions vN.json + vN.meta.json (medvit.evaluate.versions)
CALIBRATION_ACTIVE = "calibrations/active"  # the name of the version in use (absent: v1 = calibration.json)
METRICS = "metrics.json"  # evaluation report (medvit.evaluate.report)
METRICS_CSV = "metrics.csv"  # one row per epoch, appended during training
SUMMARY = "train_summary.json"  # how training ended: epochs, best metric, interruption
CARD = "README.md"  # the model card (medvit.evaluate.modelcard)
CARD_NOTES = "card_notes.md"  # optional text shown under "About this model" in the card
EXPORTS = "exports.json"  # verified ONNX/TorchScript exports and their checksums
PRETRAIN_ENCODER = "encoder.safetensors"  # the MAE stage's encoder, handed to fine-tuning
PRETRAIN_SUMMARY = "pretrain.json"  # how the MAE stage ended
OOD = "ood.safetensors"  # training-feature statistics of the out-of-distribution check (medvit.evaluate.ood)
CV_SUMMARY = "cv.json"  # `train --folds`: per-fold and pooled out-of-fold metrics, the pixel baseline beside them
OOF = "oof.csv"  # `train --folds`: every image's logits from the fold model that never saw it
FOLD_DIR = "fold_{}"  # `train --folds`: one ordinary run folder per fold

_MODEL_BUILD_KEYS = ("name", "source", "model_kwargs", "head", "head_hidden", "head_dropout", "drop_path_rate")


def save_weights(path: str | os.PathLike, model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Save a model's state dict (optionally in fp16/bf16 to halve the file; `load_run` casts back)."""
    save_tensors(path, model.state_dict(), metadata={"format": "pt"}, dtype=dtype)


def save_timm_backbone(run_dir: str | os.PathLike, model: nn.Module) -> None:
    """Save the classifier's backbone under timm's own key names, so the model card's `library_name: timm` holds:
    `timm.create_model(name, num_classes=0, **model_kwargs).load_state_dict(...)` accepts it strictly."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(model).__name__} has no timm backbone to save")
    if isinstance(backbone, HFBackbone):
        return  # a transformers encoder: its config is in HF_BACKBONE, its weights in WEIGHTS
    save_tensors(Path(run_dir) / TIMM_BACKBONE, backbone.state_dict(), metadata={"format": "pt"})


def save_backbone_config(run_dir: str | os.PathLike, model: nn.Module) -> None:
    """A transformers backbone's config and image processor into HF_BACKBONE, so `load_run` needs no hub
    (nothing for timm backbones, which timm builds from their name)."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, HFBackbone):
        backbone.save_config(Path(run_dir) / HF_BACKBONE)


def model_build_args(model_cfg: Any, num_classes: int) -> dict[str, Any]:
    """The subset of a ModelConfig needed to rebuild the network (no pretrained source, no freezing)."""
    dumped = model_cfg.model_dump(mode="json")
    return {**{k: dumped[k] for k in _MODEL_BUILD_KEYS}, "num_classes": num_classes}


def write_run_config(run_dir: str | os.PathLike, config: dict[str, Any], findings: list[str],
                     preprocessing: dict[str, Any], model_args: dict[str, Any],
                     starting_weights: dict[str, Any] | None = None) -> None:
    """Write `config.json`: the resolved config plus what inference needs without the YAML, and which weights
    training started from (file, SHA-256, tensors loaded; None = random initialisation)."""
    write_json(Path(run_dir) / CONFIG, {
        "findings": list(findings),
        "preprocessing": preprocessing,
        "model": model_args,
        "config": config,
        "starting_weights": starting_weights,
    })


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about its model."""

    run_dir: Path
    findings: tuple[str, ...]
    preprocessing: dict[str, Any]
    model_name: str
    model_args: dict[str, Any]
    config: dict[str, Any]
    weights_path: Path
    weights_sha256: str


def warn_if_incomplete(run_dir: Path) -> bool:
    """Log a warning when train_summary.json says the run stopped before its planned epochs; returns whether."""
    path = run_dir / SUMMARY
    summary = read_json(path) if path.is_file() else {}
    if summary.get("complete") is not False:
        return False
    _log.warning("%s is an incomplete run (%s of %s epochs%s): its weights are not the finished model; continue "
                 "it with: %s", run_dir, summary.get("epochs_run"), summary.get("epochs_planned"),
                 ", interrupted" if summary.get("interrupted") else "",
                 summary.get("resume") or f"medvit train --resume {run_dir}")
    return True


def _refuse_pickles(run_dir: Path) -> None:
    pickles = sorted(p.name for p in run_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    hint = f"; found pickle checkpoint(s) {', '.join(pickles)}, which medvit refuses to load" if pickles else ""
    raise CheckpointError(f"{run_dir} has no {WEIGHTS}{hint} (a run folder needs {CONFIG} + {WEIGHTS})")


def _local_build_config(model_cfg: ModelConfig, run_dir: Path) -> ModelConfig:
    """A transformers run rebuilds its encoder from the config saved in the run, never from the hub."""
    if model_cfg.source != "transformers":
        return model_cfg
    folder = run_dir / HF_BACKBONE
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is a transformers run without {HF_BACKBONE}/config.json (the encoder's "
                              "config, written at training): copy it from the training machine")
    return model_cfg.model_copy(update={"name": str(folder)})


def load_run(run_dir: str | os.PathLike, weights: str = WEIGHTS,
             data_root: str | os.PathLike | None = None) -> tuple[nn.Module, RunInfo]:
    """Rebuild the trained network from a run folder, in eval mode, with float32 weights.

    The training data paths in `RunInfo.config["data"]` come back absolute: as stored, relative to the run
    folder, or re-rooted under `data_root` / $MEDVIT_DATA_ROOT (`medvit.rundir.resolve_run_data`).

    Raises:
        CheckpointError: missing/invalid config.json or weights, pickle-only folders, mismatched weights.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    weights_path = run_dir / weights
    if not weights_path.is_file():
        _refuse_pickles(run_dir)
    meta = read_json(run_dir / CONFIG)
    try:
        args = dict(meta["model"])
        findings = tuple(meta["findings"])
        preprocessing = dict(meta["preprocessing"])
        num_classes = int(args.pop("num_classes"))
        members = int(args.pop("ensemble", 0))  # a fold ensemble (medvit.model.ensemble): K members
        model_cfg = ModelConfig(**args, pretrained=False, freeze_stem=False, freeze_blocks=0)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / CONFIG} is incomplete or invalid: {e}") from None
    if num_classes != len(findings):
        raise CheckpointError(f"{run_dir / CONFIG}: {num_classes} outputs but {len(findings)} findings")
    build_cfg = _local_build_config(model_cfg, run_dir)
    model: nn.Module = (Ensemble([build_model(build_cfg, num_classes) for _ in range(members)]) if members
                        else build_model(build_cfg, num_classes))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_tensors(weights_path).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_path} does not match the model in {CONFIG}: {str(e)[:300]}") from None
    model.eval()
    warn_if_incomplete(run_dir)
    config = dict(meta.get("config") or {})
    if isinstance(config.get("data"), dict):
        config["data"] = resolve_run_data(config["data"], run_dir, data_root)
    info = RunInfo(run_dir=run_dir, findings=findings, preprocessing=preprocessing, model_name=model_cfg.name,
                   model_args=meta["model"], config=config, weights_path=weights_path,
                   weights_sha256=sha256_file(weights_path))
    return model, info
