"""Frozen-feature cache: training on cached prefix tokens gives the naive loop's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from medvit.config import ModelConfig
from medvit.data.datasets import XrayDataset, load_labels
from medvit.data.transforms import build_transforms, resolve_preprocessing
from medvit.errors import ConfigError
from medvit.findings import DEFAULT_FINDINGS
from medvit.model.classifier import build_model
from medvit.train.frozen import FrozenFeatures, TrainableSuffix


def _model(freeze_blocks: int):
    torch.manual_seed(0)
    cfg = ModelConfig(name="deit3_small_patch16_384", pretrained=False, freeze_blocks=freeze_blocks,
                      model_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 64},
                      head="mlp", head_hidden=32, drop_path_rate=0.1)
    return build_model(cfg, len(DEFAULT_FINDINGS))


def _dataset(net, dev_subset_csv, dev_images):
    df = load_labels(dev_subset_csv, dev_images).head(6)
    return XrayDataset(df, DEFAULT_FINDINGS, build_transforms(resolve_preprocessing(net.backbone), train=False))


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_cached_suffix_matches_the_naive_partial_freeze_step(dev_subset_csv, dev_images):
    net = _model(freeze_blocks=2)
    ds = _dataset(net, dev_subset_csv, dev_images)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.nan_to_num(torch.stack([ds[i][1] for i in range(len(ds))]))
    loss_fn = torch.nn.BCEWithLogitsLoss()

    net.train()
    torch.manual_seed(1)  # drop-path in the trainable blocks draws the same noise in both runs
    naive = loss_fn(net(x), y)
    naive.backward()
    naive_grads = _grads(net)
    net.zero_grad(set_to_none=True)

    cache = FrozenFeatures.build(net, ds, batch_size=4)
    assert len(cache) == len(ds) and cache.features.shape[1:] == (1 + 16, 64)  # cls + 4x4 patches, width 64
    suffix = TrainableSuffix(net).train()
    torch.manual_seed(1)
    cached = loss_fn(suffix(cache.features), cache.labels.nan_to_num())
    cached.backward()
    cached_grads = _grads(net)

    assert cached.item() == pytest.approx(naive.item(), rel=1e-5)
    assert set(cached_grads) == set(naive_grads)
    assert not any(n.startswith(("backbone.patch_embed", "backbone.blocks.0.", "backbone.blocks.1."))
                   for n in cached_grads), "frozen parameters get no gradient"
    assert any(n.startswith("backbone.blocks.3.") for n in cached_grads) and "head.fc2.weight" in cached_grads
    for n, g in naive_grads.items():
        torch.testing.assert_close(cached_grads[n], g, rtol=1e-4, atol=1e-6)


def test_needs_a_frozen_vit_prefix(dev_subset_csv, dev_images):
    net = _model(freeze_blocks=0)
    with pytest.raises(ConfigError, match="freeze_blocks"):
        FrozenFeatures.build(net, _dataset(net, dev_subset_csv, dev_images))
