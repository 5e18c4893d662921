"""Cache the frozen prefix of a partially frozen ViT once, so later epochs run only the trainable blocks.

With the stem and the first k blocks frozen and augmentation off, the prefix output of an image is
the same every epoch: the frozen modules stay in eval mode (see `medvit.model.Classifier.train`), so
there is no dropout or drop-path noise in them. Computing it once and training `TrainableSuffix` on
the cached tokens gives the same losses and gradients as the naive loop, at the cost of the suffix
only. Memory: N x tokens x width floats (DeiT3-B/16-384: 1.8 MB per image in fp32).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sized
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medvit.errors import ConfigError
from medvit.train.engine import autocast

_log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 8 << 30  # beyond this, caching would swap: train the naive way or on fewer images


def _check_splittable(net: nn.Module) -> None:
    if not getattr(net, "_is_vit", False) or getattr(net, "_split_blocks", 0) == 0:
        raise ConfigError(
            "train.cache_frozen_features needs a ViT-style backbone with at least one frozen block "
            "(model.freeze_blocks > 0)"
        )


def prefix_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens after the frozen stem + blocks of a medvit Classifier (B, tokens, width), without autograd."""
    _check_splittable(net)
    return cast(Any, net).forward_prefix(x)


class TrainableSuffix(nn.Module):
    """The trainable part of a Classifier as a module (tokens -> logits), sharing its parameters.

    Wrap this instead of the Classifier in DistributedDataParallel when training on cached features.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        _check_splittable(net)
        self.net = net

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        net: Any = self.net
        return net.head(net.forward_suffix(tokens))


class FrozenFeatures(Dataset):
    """(prefix tokens, labels) for every item of an un-augmented dataset, computed once."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i], self.labels[i]

    @classmethod
    def build(cls, net: nn.Module, dataset: Dataset, *, batch_size: int = 32, num_workers: int = 0,
              device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> FrozenFeatures:
        """Run the frozen prefix over `dataset` (items: (image, labels)) in order.

        Args:
            autocast_dtype: the precision the training loop autocasts to, so cached tokens equal what the naive
                loop would compute (bf16 on CPU when train.precision resolves to bf16).

        Raises:
            ConfigError: no frozen ViT prefix, or the cache would exceed MAX_CACHE_BYTES.
        """
        _check_splittable(net)
        was_training = net.training
        net.train()  # frozen modules stay in eval inside Classifier.train: exactly the training-time prefix
        t0 = time.perf_counter()
        feats: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        with autocast(torch.device(device), autocast_dtype):
            for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
                f = prefix_forward(net, x.to(device))
                if not feats:
                    n = len(cast(Sized, dataset))
                    need = f[0].numel() * f.element_size() * n
                    if need > MAX_CACHE_BYTES:
                        raise ConfigError(
                            f"caching frozen features of {n} images needs {need / 2**30:.1f} GB "
                            f"(limit {MAX_CACHE_BYTES / 2**30:.0f} GB): set train.cache_frozen_features: false"
                        )
                feats.append(f)
                labels.append(y)
        net.train(was_training)
        out = cls(torch.cat(feats), torch.cat(labels))
        _log.info("cached frozen features of %d images (%s, %.0f MB) in %.1f s", len(out),
                  tuple(out.features.shape[1:]), out.features.numel() * out.features.element_size() / 2**20,
                  time.perf_counter() - t0)
        return out
