"""Vision encoders from Hugging Face transformers as classifier backbones (`model.source: transformers`).

`HFBackbone` wraps any `AutoModel` vision encoder (ViT, DeiT, DINOv2 such as microsoft/rad-dino, Swin, ...)
in what `medvit.model.classifier.Classifier` expects of a timm backbone: `forward` gives pooled features
(the class token, else the model's own pooling), `num_features`, and a `group_matcher` that gives every
parameter a layer id (0 = embeddings, i+1 = encoder block i, last = the final norm), which drives both
partial freezing and timm's layer-wise LR decay. Preprocessing comes from the checkpoint's
`AutoImageProcessor`. A run saves the encoder's config and image processor (not its weights: those live in
model.safetensors with the head), so the run folder rebuilds without a network.

transformers is imported only when a backbone is built: it takes seconds, and timm runs never need it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvit.config import ModelConfig
from medvit.errors import CheckpointError, ConfigError, MedvitError, WeightsNotFoundError
from medvit.hub import unavailable_reason, use_local_files_only

_log = logging.getLogger(__name__)

# parameters that are positions or tokens, not weights: no weight decay (timm's ViTs say the same)
_NO_DECAY = (
    "cls_token",
    "distillation_token",
    "mask_token",
    "register_tokens",
    "position_embeddings",
    "relative_position_bias_table",
)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's resample codes, as processors store them
_MAX_PREFIX_TOKENS = 8  # class + distillation + register tokens in front of the patch tokens


class HFBackbone(nn.Module):
    """A transformers vision encoder with the timm-backbone interface the Classifier uses."""

    def __init__(self, model: Any, preprocessing: dict[str, Any], processor: Any = None) -> None:
        super().__init__()
        self.model: Any = model  # a transformers PreTrainedModel (ViTModel, Dinov2Model, SwinModel, ...)
        self.preprocessing = preprocessing
        self._processor = processor
        embeddings: Any = getattr(model, "embeddings", None)
        self.pool = "cls" if getattr(embeddings, "cls_token", None) is not None else "pooler"
        if isinstance(getattr(embeddings, "mask_token", None), nn.Parameter):
            embeddings.mask_token = None  # only for masked-image pretraining: never used here (DDP needs no unused)
        config = model.config
        self.num_features = int(
            getattr(model, "num_features", 0) or getattr(config, "hidden_size", 0) or config.hidden_sizes[-1]
        )
        self.blocks_prefix, self.blocks = _blocks(model)
        size = tuple(preprocessing["input_size"][1:])
        native = getattr(config, "image_size", None)
        native = tuple(native) if isinstance(native, (list, tuple)) else (native, native)
        accepts = inspect.signature(model.forward).parameters
        self._kwargs = (
            {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts and (size != native) else {}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, num_features)."""
        out = self.model(pixel_values=x, **self._kwargs)
        if self.pool == "cls":
            return out.last_hidden_state[:, 0]
        pooled = out.pooler_output
        if pooled is None:
            return out.last_hidden_state.mean(dim=1)
        return pooled.flatten(1)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Parameter name -> layer id, for `timm.models.group_parameters` (freezing and layer decay).

        Parameters before the blocks (embeddings) are layer 0, block i is i+1, parameters of a stage that
        are in no block (Swin's patch merging) join the block before them, and the final norm is last.
        """
        ids: dict[str, int] = {}
        current, last = 0, len(self.blocks) + 1
        starts = {name: i + 1 for i, name in enumerate(self.blocks)}
        for name, _ in self.named_parameters():
            inner = name.removeprefix("model.")
            block = next((starts[b] for b in starts if inner.startswith(b + ".")), None)
            if block is not None:
                current = block
            elif not inner.startswith(self.blocks_prefix + "."):
                current = 0 if current == 0 else last
            ids[name] = current
        return lambda name: ids.get(name, last)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in _NO_DECAY}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            _log.warning("%s does not support gradient checkpointing; training without it", type(self.model).__name__)
        elif enable:  # transformers 5 renamed it; 4.x has only the old name
            enable_checkpointing = getattr(self.model, "activation_checkpointing_enable", None)
            (enable_checkpointing or self.model.gradient_checkpointing_enable)()

    @property
    def last_block(self) -> nn.Module:
        """The encoder's last block: Grad-CAM reads the tokens entering it."""
        return self.model.get_submodule(self.blocks[-1])

    def attentions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's softmax attention over all tokens (B, heads, N, N), for attention rollout.

        SDPA never materialises the weights, so the encoder runs with eager attention for this call.

        Raises:
            MedvitError: the model attends within windows (Swin) or returns no attentions: use Grad-CAM.
        """
        with _eager_attention(self.model):
            out = self.model(pixel_values=x, output_attentions=True, **self._kwargs)
        found = list(out.attentions or ())
        tokens = out.last_hidden_state.shape[1] if out.last_hidden_state.dim() == 3 else -1
        if not found or any(a.shape[-1] != tokens or a.shape[0] != x.shape[0] for a in found):
            raise MedvitError(
                f"{type(self.model).__name__} has no global attention over its tokens (windowed or "
                "none returned): attention rollout does not apply; use Grad-CAM"
            )
        return found

    def token_grid(self, n_tokens: int, input_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """(prefix tokens, (gh, gw)) of a token sequence: the patch grid at the patch size, or at a coarser
        stage of a hierarchical model (Swin's last stage is the patch grid / 2**(stages-1))."""
        patch = getattr(self.model.config, "patch_size", 16)
        patch = patch[0] if isinstance(patch, (list, tuple)) else int(patch)
        h, w = input_hw
        for k in range(6):
            gh, gw = h // (patch << k), w // (patch << k)
            if 0 < gh * gw <= n_tokens <= gh * gw + _MAX_PREFIX_TOKENS:
                return n_tokens - gh * gw, (gh, gw)
        raise ValueError(f"{n_tokens} tokens do not form a patch grid of a {input_hw} input (patch {patch})")

    def save_config(self, folder: Path) -> None:
        """The encoder's config.json and preprocessor_config.json (no weights): enough to rebuild it offline."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        if self._processor is not None:
            self._processor.save_pretrained(folder)


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    saved = model.config._attn_implementation
    if saved != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if saved != "eager":
            model.set_attn_implementation(saved)


def _blocks(model: nn.Module) -> tuple[str, list[str]]:
    """(the block list's name, the qualified names of the encoder's blocks in forward order).

    The blocks are the first ModuleList in the model; a list of stages that each hold a ModuleList of blocks
    (Swin's `layers.i.blocks`) is flattened to those blocks.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            blocks: list[str] = []
            for i, stage in enumerate(module):
                inner = next(((n, m) for n, m in stage.named_children() if isinstance(m, nn.ModuleList)), None)
                if inner is None:
                    blocks.append(f"{name}.{i}")
                else:
                    blocks += [f"{name}.{i}.{inner[0]}.{j}" for j in range(len(inner[1]))]
            return name, blocks
    raise ConfigError(f"{type(model).__name__} has no list of encoder blocks: not a transformer vision encoder")


def _is_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().is_dir()


def _download_hint(name: str, err: BaseException, local: bool) -> str:
    why = unavailable_reason() if local else f"the download failed: {(str(err).splitlines() or [''])[0][:160]}"
    return (
        f"transformers model {name} is not in the local Hugging Face cache ({why}): on a machine with internet "
        f"run `hf download {name} --local-dir DIR`, copy DIR here and set model.name: DIR (--set model.name=DIR)"
    )


def _source(name: str) -> str:
    """A hub id as is, or a checked save_pretrained folder."""
    if not _is_path(name):
        return name
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise WeightsNotFoundError(
            f"model.name {path} {what}: with model.source: transformers, model.name is a hub "
            "id or a folder written by save_pretrained (config.json, model.safetensors, "
            "preprocessor_config.json)"
        )
    return str(path)


def resolve_hf_preprocessing(processor: Any, config: Any) -> dict[str, Any]:
    """medvit's preprocessing (input size, mean/std, resize interpolation) from an `AutoImageProcessor`.

    The input is the processor's centre-crop size when it crops, else its resize size; medvit letterboxes
    to it instead of cropping, so the costophrenic angles stay in the image. Pixels are already in [0, 1]
    (the processor's 1/255 rescale), so only the normalisation is taken over.
    """
    size = processor.crop_size if getattr(processor, "do_center_crop", False) and processor.crop_size else None
    size = size or processor.size  # a dict or transformers' SizeDict: both have .get
    if size.get("height") and size.get("width"):
        hw = [int(size.get("height")), int(size.get("width"))]
    elif size.get("shortest_edge"):
        hw = [int(size.get("shortest_edge"))] * 2
    else:
        side = config.image_size
        hw = list(side) if isinstance(side, (list, tuple)) else [int(side)] * 2
    normalize = getattr(processor, "do_normalize", True)

    def three(v: Any, default: float) -> list[float]:
        v = default if v is None or not normalize else v
        return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3)]

    resample = getattr(processor, "resample", 3)
    interpolation = (
        _RESAMPLE.get(resample if isinstance(resample, int) else -1)
        or str(getattr(resample, "value", getattr(resample, "name", "bicubic"))).lower()
    )
    return {
        "input_size": [3, *hw],
        "mean": three(processor.image_mean, 0.0),
        "std": three(processor.image_std, 1.0),
        "interpolation": interpolation if interpolation in _RESAMPLE.values() else "bicubic",
        "antialias": True,  # the processors' PIL resize filters over the whole footprint when shrinking
    }


def create_hf_backbone(cfg: ModelConfig) -> HFBackbone:
    """The transformers encoder named by `cfg.name` (hub id or folder), pretrained or freshly initialised.

    Offline (`medvit --offline`, MEDVIT_OFFLINE) or when the hub does not answer, it reads local files only.
    `cfg.model_kwargs` override the encoder's config (existing keys only); `cfg.drop_path_rate` goes to encoders
    that have stochastic depth.

    Raises:
        WeightsNotFoundError: not available locally and not downloadable (the message says what to fetch).
        CheckpointError: the checkpoint does not fit the config, lacks weights, or is not a vision encoder.
        ConfigError: a model_kwargs key the encoder's config does not have.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    source = _source(cfg.name)
    local = not _is_path(cfg.name) and use_local_files_only()  # a folder never touches the hub
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except OSError as e:
        if _is_path(cfg.name):
            raise WeightsNotFoundError(
                f"{source} has no image processor (preprocessor_config.json): save the "
                "checkpoint's AutoImageProcessor there with save_pretrained"
            ) from None
        raise WeightsNotFoundError(_download_hint(cfg.name, e, local)) from None
    except ValueError as e:  # an unknown model_type, or a folder that is no transformers checkpoint
        cause = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{cfg.name} is not a transformers vision model: {cause}") from None
    unknown = sorted(k for k in cfg.model_kwargs if not hasattr(config, k))
    if unknown:
        raise ConfigError(f"model.model_kwargs {unknown} are not in the {config.model_type} config of {cfg.name}")
    for key, value in cfg.model_kwargs.items():
        setattr(config, key, value)
    if hasattr(config, "drop_path_rate"):
        config.drop_path_rate = cfg.drop_path_rate
    model = _load_model(AutoModel, cfg, source, config, local)
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise CheckpointError(
            f"{cfg.name} is a {config.model_type} model without pixel_values input: "
            "choose a vision encoder (ViT, DeiT, DINOv2, Swin, ...)"
        )
    backbone = HFBackbone(model, resolve_hf_preprocessing(processor, config), processor)
    _log.info(
        "transformers %s (%s): %d blocks, %d features, input %s",
        cfg.name,
        type(model).__name__,
        len(backbone.blocks),
        backbone.num_features,
        backbone.preprocessing["input_size"],
    )
    return backbone


def _load_model(auto: Any, cfg: ModelConfig, source: str, config: Any, local: bool) -> nn.Module:
    """Random init from the config, or the pretrained weights (safetensors only) with every key checked.

    Encoders that can leave out their pooler (ViT's dense+tanh, Swin's average pool) do: the class token is read
    directly, and a pooler a checkpoint lacks (ViTForImageClassification has none) would count as missing.
    """
    from transformers import MODEL_MAPPING

    model_class: Any = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
    init = inspect.signature(model_class).parameters if model_class is not None else {}
    extra = {"add_pooling_layer": False} if "add_pooling_layer" in init else {}
    if not cfg.pretrained:
        return auto.from_config(config, **extra)
    try:
        with _quiet_load():
            model, info = auto.from_pretrained(
                source,
                **extra,
                config=config,
                local_files_only=local,
                use_safetensors=True,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,  # reported below, in one line, with the missing keys
                output_loading_info=True,
            )
    except OSError as e:
        if _is_path(cfg.name):
            raise CheckpointError(
                f"{source} has no model.safetensors ({str(e).splitlines()[0][:160]}); "
                "or set model.pretrained: false to train from scratch"
            ) from None
        raise WeightsNotFoundError(_download_hint(cfg.name, e, local)) from None
    except RuntimeError as e:  # weights that cannot be converted to this architecture
        raise CheckpointError(f"{cfg.name} weights do not fit its config: {str(e).splitlines()[0][:200]}") from None
    missing, mismatched = sorted(info.get("missing_keys", ())), sorted(info.get("mismatched_keys", ()))
    if missing or mismatched:
        problems = [f"{len(missing)} missing (first {', '.join(missing[:3])})"] if missing else []
        if mismatched:  # (key, shape in the checkpoint, shape in the model)
            key, stored, wanted = mismatched[0]
            problems.append(
                f"{len(mismatched)} of another shape (first {key}: {list(stored)} stored, {list(wanted)} here)"
            )
        raise CheckpointError(
            f"{cfg.name} weights do not fill the {type(model).__name__}: {'; '.join(problems)}; check "
            "model.model_kwargs, or train from scratch with model.pretrained: false"
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    _log.info(
        "loaded %s weights: every encoder tensor filled; %d unused checkpoint keys ignored%s",
        cfg.name,
        len(unexpected),
        f" (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
    )
    return model


@contextmanager
def _quiet_load() -> Iterator[None]:
    """transformers' own load report and progress bar off: the outcome is checked and logged above, in one line."""
    from transformers.utils import logging as hf_logging

    library = logging.getLogger("transformers")
    level, bar = library.level, hf_logging.is_progress_bar_enabled()
    library.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        library.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()
