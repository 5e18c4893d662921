"""Build the classifier: a timm backbone (any name), a partially frozen prefix and a multi-label head.

The network is `Classifier(backbone, head)`: the backbone is created by `timm.create_model` with
`num_classes=0` (pooled features), the head maps features to one logit per finding. Freezing uses
the backbone's own `group_matcher` (the grouping timm uses for layer decay), so "stem + first N
blocks" means the same thing for ViT/DeiT (blocks), Swin and ConvNeXt (stages). For ViT-style
backbones the frozen prefix runs under `torch.no_grad`, so no activations are kept for it.
With `model.source: transformers` the backbone is a transformers vision encoder behind the same
interface (`medvit.model.hf_backbone`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medvit.config import ModelConfig
from medvit.errors import CheckpointError, ConfigError
from medvit.model.hf_backbone import create_hf_backbone
from medvit.model.weights import load_backbone

_log = logging.getLogger(__name__)


class MlpHead(nn.Module):
    """LayerNorm -> Dropout -> Linear -> GELU -> Dropout -> Linear, as in the reference MedicalViT head."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.drop1 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.drop2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop2(self.act(self.fc1(self.drop1(self.norm(x))))))


def _layer_map(backbone: Any) -> dict[str, int]:
    """Parameter name -> layer id (0 = stem, i+1 = block/stage i) from timm's own grouping."""
    from timm.models import group_parameters

    if not hasattr(backbone, "group_matcher"):
        return {}
    return group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)


class Classifier(nn.Module):
    """timm backbone + multi-label head, with an optional frozen prefix run without autograd."""

    backbone: Any  # a timm model; its attributes (blocks, patch_embed, ...) differ per family

    def __init__(self, backbone: nn.Module, head: nn.Module, *, frozen_layers: int = 0,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.grad_checkpointing = grad_checkpointing
        self._layers = _layer_map(backbone)
        self.frozen_layers = 0
        self._split_blocks = 0  # leading ViT blocks run under no_grad
        self.freeze(frozen_layers)
        if grad_checkpointing and not self._is_vit and hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(True)

    @property
    def _is_vit(self) -> bool:
        b = self.backbone
        return all(hasattr(b, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head"))

    def freeze(self, n_layers: int) -> None:
        """Freeze layer groups 0..n_layers-1 (group 0 is the stem: patch embedding, cls and pos tokens)."""
        n_groups = max(self._layers.values(), default=-1) + 1
        if n_layers > n_groups:
            raise ConfigError(f"model.freeze_blocks={n_layers - 1} but {type(self.backbone).__name__} has only "
                              f"{n_groups - 1} blocks/stages after the stem; lower model.freeze_blocks")
        for name, p in self.backbone.named_parameters():
            p.requires_grad = self._layers.get(name, math.inf) >= n_layers
        self.frozen_layers = n_layers
        self._split_blocks = max(0, n_layers - 1) if self._is_vit and n_layers > 0 else 0
        if n_layers and not self._is_vit:
            _log.debug("%s is not ViT-style: frozen params get no grads but the forward is not split",
                       type(self.backbone).__name__)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        if not (self._is_vit and self.frozen_layers):
            return []
        b = self.backbone
        return [b.patch_embed, b.patch_drop, b.norm_pre, *b.blocks[: self._split_blocks]]

    def train(self, mode: bool = True) -> Classifier:
        """Frozen modules stay in eval mode: no dropout/drop-path noise in a part that cannot adapt to it."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, tokens, width) after the stem and the frozen blocks; no autograd when any are frozen."""
        b = self.backbone
        with torch.no_grad() if self.frozen_layers else torch.enable_grad():
            x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))
            for blk in b.blocks[: self._split_blocks]:
                x = blk(x)
        return x

    def forward_suffix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled features from `forward_prefix` tokens: the trainable blocks (checkpointed if asked), norm, pool."""
        b, x = self.backbone, tokens
        for blk in b.blocks[self._split_blocks :]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return b.forward_head(b.norm(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, num_features) fed to the head."""
        if self._is_vit and torch.is_grad_enabled():
            return self.forward_suffix(self.forward_prefix(x))
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features) from one pass: the out-of-distribution check reads the features of the very
        forward that served the logits, on any engine, instead of a second backbone pass."""
        features = self.forward_features(x)
        return self.head(features), features

    def group_matcher(self, coarse: bool = False):
        """timm layer-decay grouping: the backbone's groups, with the head in the last group."""
        layers = self._layers

        def _group(name: str) -> float:
            return layers.get(name.removeprefix("backbone."), math.inf)

        return _group

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in (nwd() if nwd else ())}


def create_backbone(cfg: ModelConfig, kwargs: dict[str, Any]) -> Any:
    """The timm backbone with `cfg`'s starting weights (none, local file or run folder, or hub), loaded strictly
    (`medvit.model.weights`); `kwargs` go to timm.create_model."""
    return load_backbone(cfg, kwargs)


def build_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """Create the classifier described by `cfg` with `num_classes` outputs (one per finding).

    Raises:
        WeightsNotFoundError: pretrained weights requested but unavailable (message says what to download).
        CheckpointError: `cfg.name` is not a timm model (or, with source transformers, not a vision encoder).
    """
    if cfg.source == "transformers":
        backbone: Any = create_hf_backbone(cfg)
    else:
        if not timm.is_model(cfg.name.split(".")[0]):
            raise CheckpointError(f"unknown timm model {cfg.name!r}; see timm.list_models()")
        # drop_path_rate only when set: some timm models (efficientvit_m0) take no such argument
        drop_path = {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {}
        backbone = create_backbone(cfg, {**drop_path, **cfg.model_kwargs, "num_classes": 0})
    width = backbone.num_features
    if cfg.head == "mlp":
        head: nn.Module = MlpHead(width, cfg.head_hidden, num_classes, cfg.head_dropout)
    else:
        head = nn.Linear(width, num_classes)
    frozen = 1 + cfg.freeze_blocks if cfg.freeze_stem else 0
    model = Classifier(backbone, head, frozen_layers=frozen, grad_checkpointing=cfg.grad_checkpointing)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    _log.info("built %s: %.2fM params, %.2fM trainable (%d frozen layer groups)",
              cfg.name, n_all / 1e6, n_train / 1e6, frozen)
    return model
