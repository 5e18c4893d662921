"""build_model: weight sources, freezing (frozen and under no_grad), heads, layer-decay groups, other timm families."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

from medvit.config import ModelConfig
from medvit.errors import CheckpointError, ConfigError, WeightsNotFoundError
from medvit.model.classifier import Classifier, MlpHead, build_model

TINY = {"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 64}
FAMILY = "deit3_small_patch16_384"


def tiny_cfg(**kw) -> ModelConfig:
    base = {"name": FAMILY, "pretrained": False, "model_kwargs": dict(TINY), "drop_path_rate": 0.0, "freeze_blocks": 2}
    return ModelConfig(**{**base, **kw})


def test_local_safetensors_weights_load_through_pretrained_cfg_overlay(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model(FAMILY, pretrained=False, **TINY)  # a "pretrained" checkpoint of the real family
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model(tiny_cfg(pretrained=True, weights_file=path, freeze_blocks=0, freeze_stem=False), 5)
    loaded = model.backbone.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith("head"):
            assert torch.equal(loaded[k], v), k
    assert model.head.out_features == 5


def test_local_pth_weights_load_too(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = timm.create_model(FAMILY, pretrained=False, **TINY)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(tiny_cfg(pretrained=True, weights_file=path, freeze_blocks=2), 3)
    assert torch.equal(model.backbone.pos_embed, source.pos_embed)


def test_missing_local_file_says_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as e:
        build_model(tiny_cfg(name="deit3_base_patch16_384.fb_in22k_ft_in1k", pretrained=True,
                             weights_file=tmp_path / "nope.safetensors"), 14)
    msg = str(e.value)
    assert "timm/deit3_base_patch16_384.fb_in22k_ft_in1k" in msg and "model.safetensors" in msg
    assert str(tmp_path / "nope.safetensors") in msg


def test_offline_hub_says_what_to_download_and_which_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as e:
        build_model(tiny_cfg(name="deit3_base_patch16_384.fb_in22k_ft_in1k", pretrained=True, freeze_blocks=0), 14)
    msg = str(e.value)
    assert "https://huggingface.co/timm/deit3_base_patch16_384.fb_in22k_ft_in1k" in msg
    assert "model.weights_file" in msg


def test_unknown_model_name() -> None:
    with pytest.raises(CheckpointError, match="unknown timm model"):
        build_model(tiny_cfg(name="deit9_gigantic"), 2)


def _step(model: Classifier, n: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(n):
        loss = model(torch.randn(4, 3, 64, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_prefix_does_not_change_and_the_rest_does() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(freeze_blocks=2, head="mlp", head_hidden=16), 4)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _step(model)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed",
                                                  "backbone.blocks.0.", "backbone.blocks.1."))]
    trainable = [k for k in before if k.startswith(("backbone.blocks.2.", "backbone.blocks.3.", "head."))]
    assert frozen and trainable
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    changed = [k for k in trainable if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(trainable) - 2  # LayerScale gammas etc. all move; allow a couple of exact ties
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)


def test_frozen_prefix_runs_without_autograd() -> None:
    model = build_model(tiny_cfg(freeze_blocks=2), 3).train()
    seen: dict[str, bool] = {}
    for i, blk in enumerate(model.backbone.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"block{i}", torch.is_grad_enabled()))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert seen == {"block0": False, "block1": False, "block2": True, "block3": True}
    assert not model.backbone.blocks[0].training and model.backbone.blocks[3].training  # frozen part stays in eval


def test_split_forward_matches_plain_timm_forward() -> None:
    model = build_model(tiny_cfg(freeze_blocks=1), 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.enable_grad():
        split = model(x)  # the frozen/trainable split path
    with torch.no_grad():
        plain = model.head(model.backbone(x))  # timm's own forward
    torch.testing.assert_close(split, plain)


def test_mlp_head_shape_and_layers() -> None:
    model = build_model(tiny_cfg(head="mlp", head_hidden=32, head_dropout=0.2), 14)
    assert isinstance(model.head, MlpHead)
    assert [type(m).__name__ for m in model.head.children()] == ["LayerNorm", "Dropout", "Linear", "GELU", "Dropout",
                                                                 "Linear"]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 14)


def test_model_kwargs_pass_through_to_timm() -> None:
    model = build_model(tiny_cfg(model_kwargs={**TINY, "patch_size": 8, "depth": 3}, drop_path_rate=0.2), 2)
    b = model.backbone
    assert b.patch_embed.patch_size == (8, 8) and len(b.blocks) == 3 and b.embed_dim == 64
    assert b.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    a = build_model(tiny_cfg(freeze_blocks=1), 2)
    b = build_model(tiny_cfg(freeze_blocks=1, grad_checkpointing=True), 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (a, b):
        m.train()
        m(x).sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_layer_decay_groups() -> None:
    model = build_model(tiny_cfg(freeze_blocks=2), 3)  # stem + blocks 0,1 frozen; blocks 2,3 + norm + head train
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[name_of[id(p)]], decay[name_of[id(p)]] = g["lr_scale"], g["weight_decay"]
    assert not any(n.startswith(("backbone.patch_embed", "backbone.blocks.0.", "backbone.blocks.1.")) for n in scale)
    assert scale["head.weight"] == pytest.approx(1.0)
    assert scale["backbone.blocks.3.attn.qkv.weight"] == pytest.approx(0.5)  # one layer below the head
    assert scale["backbone.blocks.2.attn.qkv.weight"] == pytest.approx(0.25)
    assert scale["backbone.norm.weight"] == scale["backbone.blocks.3.attn.qkv.weight"]
    assert decay["backbone.blocks.2.attn.qkv.weight"] == pytest.approx(0.05)
    assert decay["backbone.blocks.2.attn.qkv.bias"] == 0.0 and decay["backbone.norm.weight"] == 0.0
    assert decay["head.bias"] == 0.0


def test_pos_and_cls_tokens_get_no_weight_decay_when_trained() -> None:
    model = build_model(tiny_cfg(freeze_stem=False, freeze_blocks=0), 3)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    name_of = {id(p): n for n, p in model.named_parameters()}
    no_decay = {name_of[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token"} <= no_decay
    assert max(g["lr_scale"] for g in opt.param_groups) == pytest.approx(1.0)
    assert min(g["lr_scale"] for g in opt.param_groups) == pytest.approx(0.75 ** 5)  # stem: 4 blocks+head above


@pytest.mark.parametrize(("name", "kwargs"), [
    ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}),
    ("convnext_atto", {}),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "depths": (1, 1, 1, 1), "embed_dim": 32,
                                      "num_heads": (1, 1, 2, 2), "window_size": 2}),
])
def test_other_timm_families_work_through_the_same_config(name: str, kwargs: dict) -> None:
    model = build_model(ModelConfig(name=name, pretrained=False, model_kwargs=kwargs, freeze_blocks=1), 5)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and any("head" in n for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in frozen)


def test_freezing_more_groups_than_exist_fails() -> None:
    with pytest.raises(ConfigError, match="freeze_blocks=10 but VisionTransformer has only 4 blocks"):
        build_model(tiny_cfg(freeze_blocks=10), 2)


def test_local_weights_of_another_shape_fail_with_a_checkpoint_error(tmp_path: Path) -> None:
    source = timm.create_model(FAMILY, pretrained=False, **TINY)
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    with pytest.raises(CheckpointError, match="model.safetensors does not fit deit3_small_patch16_384"):
        build_model(tiny_cfg(pretrained=True, weights_file=path, model_kwargs={**TINY, "embed_dim": 32}), 3)
