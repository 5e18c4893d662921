"""Typed training configuration: a YAML file validated by pydantic, plus dotted `--set` overrides.

Every model forbids unknown keys, so a typo such as `train.lrr` fails loudly (with a did-you-mean) instead of
silently training with a default. Relative data and weights paths are made absolute against the current working
directory when the config is read, so the run folder's `config.json` works from any directory.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medvit.errors import ConfigError
from medvit.findings import DEFAULT_FINDINGS
from medvit.rundir import CONFIG, read_run_config

_log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "deit3_base_patch16_384.fb_in22k_ft_in1k"


class AugmentConfig(BaseModel):
    """Training augmentation. Defaults are mild; horizontal flip is off because it moves the heart."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    hflip: float = Field(default=0.0, ge=0, le=1, description="probability; changes anatomy (dextrocardia), so off")
    crop_scale: tuple[float, float] = (0.85, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    rotate: float = Field(default=7.0, ge=0, le=45, description="max degrees")
    translate: float = Field(default=0.04, ge=0, le=0.3)
    scale: tuple[float, float] = (0.92, 1.08)
    affine_p: float = Field(default=0.7, ge=0, le=1)
    brightness: float = Field(default=0.15, ge=0, le=1)
    contrast: float = Field(default=0.15, ge=0, le=1)
    gamma: tuple[float, float] = (85.0, 115.0)
    photometric_p: float = Field(default=0.6, ge=0, le=1)
    noise_std: float = Field(default=0.0, ge=0, le=0.2, description="Gaussian noise std in [0,1] units; 0 disables")
    blur_p: float = Field(default=0.0, ge=0, le=1)


def _absolute(path: Path) -> Path:
    """Relative paths mean "from the current directory"; stored absolute, a run folder works from anywhere."""
    return Path(os.path.abspath(path.expanduser()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SplitConfig(_Strict):
    """How images are assigned to train / val / calib (always patient-wise)."""

    policy: Literal["column", "assign", "kfold"] = Field(
        default="column",
        description="'column': the CSV's 'split' column; 'assign': seeded patient-wise split (split_files' kept); "
        "'kfold': every row in one of `folds` patient-wise folds, fold `fold` is val (medvit train --folds)",
    )
    val: float = Field(default=0.15, ge=0, lt=1)
    calib: float = Field(default=0.15, ge=0, lt=1)
    seed: int = 0
    train_name: str = "train"
    val_name: str = "val"
    folds: int = Field(default=5, ge=2, description="kfold: number of patient-wise folds")
    fold: int = Field(default=0, ge=0, description="kfold: the fold held out as val")

    @model_validator(mode="after")
    def _check_fold(self) -> SplitConfig:
        if self.fold >= self.folds:
            raise ValueError(f"split.fold {self.fold} must be below split.folds {self.folds}")
        return self


class DataConfig(_Strict):
    labels_csv: Path
    images_root: Path
    split_files: dict[str, Path] | None = Field(
        default=None, description="optional official split lists, e.g. {test: test_list.txt}"
    )
    findings: list[str] = Field(default_factory=lambda: list(DEFAULT_FINDINGS))
    uncertainty: str = Field(default="ignore", description="how uncertain (-1) labels map (datasets.load_labels)")
    split: SplitConfig = Field(default_factory=lambda: SplitConfig())
    cache: bool = Field(default=False, description="keep decoded images in RAM (small datasets only)")
    num_workers: int = Field(default=0, ge=0)
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig())  # type: ignore[call-arg]

    @field_validator("labels_csv", "images_root")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return _absolute(path)

    @field_validator("split_files")
    @classmethod
    def _absolute_splits(cls, files: dict[str, Path] | None) -> dict[str, Path] | None:
        return None if files is None else {k: _absolute(v) for k, v in files.items()}


class ModelConfig(_Strict):
    name: str = Field(default=DEFAULT_BACKBONE, description="timm: any timm model name, pin the pretrained tag; "
                      "transformers: a hub id or a save_pretrained folder")
    source: Literal["timm", "transformers"] = Field(
        default="timm", description="the backbone's library: timm, or a transformers AutoModel vision encoder"
    )
    pretrained: bool = Field(default=True, description="load pretrained weights (from weights_file, else the HF hub)")
    weights_file: Path | None = Field(
        default=None, description="starting weights: .safetensors/.pth file or medvit run folder; implies pretrained"
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to timm.create_model, e.g. embed_dim, depth, num_heads, img_size"
    )
    freeze_stem: bool = True
    freeze_blocks: int = Field(default=6, ge=0, description="number of leading blocks/stages frozen (after the stem)")
    head: Literal["linear", "mlp"] = "linear"
    head_hidden: int = Field(default=512, ge=1)
    head_dropout: float = Field(default=0.1, ge=0, lt=1)
    drop_path_rate: float = Field(default=0.1, ge=0, lt=1)
    grad_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        bad = [k for k, v in self.model_kwargs.items() if not k.isidentifier() or v is None]
        if bad:  # timm silently drops None kwargs; "{img_size:64}" (no space) parses as key "img_size:64"
            raise ValueError(f"model_kwargs {bad}: keys must be argument names with values "
                             "(in YAML flow maps write 'img_size: 64' with a space)")
        if self.source == "transformers" and self.weights_file is not None:
            raise ValueError("weights_file is for timm backbones; with source: transformers, name is the hub id "
                             "or the local folder that holds the weights")
        if self.freeze_blocks and not self.freeze_stem:
            raise ValueError("freeze_blocks > 0 needs freeze_stem: true (frozen layers are a prefix)")
        if self.weights_file is not None:
            self.weights_file = _absolute(self.weights_file)
        if self.weights_file is not None and not self.pretrained:
            _log.info("model.weights_file is set: starting from it (model.pretrained is taken as true)")
            self.pretrained = True  # a named weights file is never silently ignored
        return self


class LossConfig(_Strict):
    name: Literal["bce", "asymmetric", "focal"] = "bce"
    pos_weight: bool = Field(default=True, description="per-finding pos_weight = negatives / positives (train split)")
    pos_weight_max: float = Field(default=20.0, ge=1)
    gamma_pos: float = Field(default=0.0, ge=0, description="asymmetric: focusing on positives")
    gamma_neg: float = Field(default=4.0, ge=0, description="asymmetric: focusing on negatives")
    clip: float = Field(default=0.05, ge=0, lt=1, description="asymmetric: probability margin for negatives")
    gamma: float = Field(default=2.0, ge=0, description="focal: focusing parameter")
    alpha: float = Field(default=0.25, gt=0, lt=1, description="focal: weight of positives")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)


class MixupConfig(_Strict):
    mixup_alpha: float = Field(default=0.0, ge=0)
    cutmix_alpha: float = Field(default=0.0, ge=0)
    prob: float = Field(default=1.0, ge=0, le=1)
    switch_prob: float = Field(default=0.5, ge=0, le=1)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class EmaConfig(_Strict):
    enabled: bool = False
    decay: float = Field(default=0.999, gt=0, lt=1)
    warmup: bool = True
    evaluate: bool = Field(default=True, description="validate and save the EMA weights instead of the raw ones")


class TrainConfig(_Strict):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1, description="global batch per optimizer step (over ranks and accum)")
    accum_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-4, gt=0, description="peak learning rate (scale ~ 5e-4 * batch_size / 256)")
    min_lr: float = Field(default=1e-6, ge=0)
    warmup_lr: float = Field(default=1e-6, ge=0)
    warmup_epochs: int = Field(default=1, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    layer_decay: float | None = Field(default=0.75, gt=0, le=1)
    opt: str = Field(default="adamw", description="timm optimizer name")
    clip_grad: float | None = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: AMP on CUDA; bf16 autocast on CPUs with AMX (slower than fp32 without)"
    )
    early_stopping_patience: int | None = Field(default=5, ge=1)
    select: Literal["best", "last"] = Field(
        default="best", description="model.safetensors = the best-val-AUROC epoch, or the last epoch (fixed schedule)"
    )
    eval_batch_size: int = Field(default=64, ge=1)
    loss: LossConfig = Field(default_factory=lambda: LossConfig())
    mixup: MixupConfig = Field(default_factory=lambda: MixupConfig())
    cache_frozen_features: bool = Field(
        default=False,
        description="compute the frozen stem + blocks once and train only the rest; needs model.freeze_blocks > 0, "
        "data.augment.enabled: false and no MixUp (the prefix output must not change between epochs)")
    ema: EmaConfig = Field(default_factory=lambda: EmaConfig())
    deterministic: bool = True
    num_threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads per process (1 is much faster on an oversubscribed CPU)"
    )


class PretrainConfig(_Strict):
    """Self-supervised MAE pretraining of the backbone on the train split, run by `medvit train` first."""

    method: Literal["mae"] = "mae"
    epochs: int = Field(default=200, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1.5e-3, gt=0)
    min_lr: float = Field(default=1e-6, ge=0)
    warmup_epochs: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    clip_grad: float | None = Field(default=None, gt=0)
    mask_ratio: float = Field(default=0.75, gt=0, lt=1, description="fraction of patches hidden from the encoder")
    decoder_dim: int = Field(default=128, ge=8)
    decoder_depth: int = Field(default=2, ge=1)
    decoder_heads: int = Field(default=4, ge=1)
    norm_pix_loss: bool = Field(default=True, description="reconstruct per-patch normalised pixels (MAE default)")
    num_threads: int | None = Field(default=None, ge=1, description="default: train.num_threads")

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.decoder_dim % self.decoder_heads:
            raise ValueError("pretrain.decoder_dim must be divisible by pretrain.decoder_heads")
        return self


class LogConfig(_Strict):
    tensorboard: bool = False
    progress: bool = True


class Config(_Strict):
    """The whole run: `data`, `model`, `train`, `log`, plus where to write it."""

    seed: int = 0
    out_dir: Path = Path("runs/run")
    data: DataConfig
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    pretrain: PretrainConfig | None = Field(
        default=None, description="self-supervised pretraining on the train images before training (optional)")
    log: LogConfig = Field(default_factory=lambda: LogConfig())

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.train.batch_size % self.train.accum_steps:
            raise ValueError("train.batch_size must be divisible by train.accum_steps")
        if self.pretrain is not None and self.model.source != "timm":
            raise ValueError("pretrain (MAE) builds on a timm ViT: use model.source: timm, or drop pretrain")
        return self


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides in place; values are parsed as YAML scalars (`1e-4`, `true`, `[a, b]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
        _set_dotted(tree, key, value)
    return tree


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The config section (pydantic model) that a validation error's location points into."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        nested = [t for t in (field.annotation, *get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _suggestion(loc: tuple[str | int, ...]) -> str:
    """'; did you mean train.lr?' for an unknown key close to a real one (else '')."""
    section = _model_at(loc[:-1])
    if section is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""


def _format_error(err: ValidationError, source: str, overridden: Sequence[str] = ()) -> str:
    """One line: who is to blame (the YAML file, or the `--set` that introduced the key), the key, the problem."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "<root>"
    culprit = next((k for k in reversed(overridden) if k == key or f"{k}.".startswith(f"{key}.")
                    or key.startswith(f"{k}.")), None)
    where = f"{source}: {key}" if culprit is None else f"--set {culprit}" + (f": {key}" if culprit != key else "")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = f"unknown key{_suggestion(loc)}"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{extra}"


def validate_config(tree: dict[str, Any], source: str = "config", overridden: Sequence[str] = ()) -> Config:
    """Validate a raw mapping; raises ConfigError naming the first offending key and who set it.

    `overridden`: the dotted keys set by `--set`, so an error in one of them blames `--set`, not `source`.
    """
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source, overridden)) from None


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of `key=value` overrides, in order."""
    return [item.partition("=")[0].strip() for item in overrides]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, validate.

    Args:
        path: YAML file (None: start from an empty mapping, everything from overrides).
        overrides: `key.sub=value` strings, applied in order.

    Raises:
        ConfigError: unreadable YAML, bad override syntax, unknown keys or invalid values.
    """
    tree: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    apply_overrides(tree, list(overrides or []))
    cfg = validate_config(tree, source, override_keys(overrides or []))
    _log.debug("config %s resolved: %s", source, cfg.model_dump(mode="json"))
    return cfg


def resolve_config(config: Path | None, overrides: list[str], resume: Path | None) -> Config:
    """The config to train with: the YAML file, else (resuming) the run's own saved config; `--set` applies to both.

    Raises:
        ConfigError: neither a config nor a run to resume, or an invalid config.
        CheckpointError: `resume` is not a run folder.
    """
    if config is not None:
        return load_config(config, overrides)
    if resume is None:
        raise ConfigError("medvit train needs -c CONFIG (or --resume RUN_DIR to continue a run)")
    saved = read_run_config(resume)
    return validate_config(apply_overrides(saved, overrides), str(resume / CONFIG), override_keys(overrides))
