"""saliency: rollout and Grad-CAM on tiny random-init timm ViTs of the real families, and the image mapping."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from medvit.data.dicom import read_image
from medvit.data.transforms import build_transforms, resolve_preprocessing
from medvit.model.saliency import attention_rollout, capture_attention, grad_cam, overlay, rollout, to_image

K = 3


def _tiny(name: str = "deit3_small_patch16_224", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=64, embed_dim=64, depth=3, num_heads=2, num_classes=K) | kw
    return timm.create_model(name, **args).eval()


@pytest.fixture(scope="module")
def deit():
    return _tiny()


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _fused(model):
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


def test_capture_gives_softmax_rows_and_restores_fused_attention(deit, x):
    before = _fused(deit)
    assert any(before), "timm should default to fused attention; the test would prove nothing otherwise"
    with capture_attention(deit) as attns:
        out = deit(x)
    assert _fused(deit) == before
    assert len(attns) == 3 and attns[0].shape == (1, 2, 17, 17)
    for a in attns:
        torch.testing.assert_close(a.sum(-1), torch.ones(1, 2, 17))
    torch.testing.assert_close(out, deit(x), rtol=1e-4, atol=1e-5)  # unfused and fused paths agree
    assert not any(m.attn_drop._forward_pre_hooks for m in deit.modules() if hasattr(m, "fused_attn"))


def test_fused_attention_restored_when_forward_fails(deit):
    before = _fused(deit)
    with pytest.raises(RuntimeError), capture_attention(deit):
        deit(torch.randn(1, 1, 64, 64))  # wrong channel count
    assert _fused(deit) == before
    assert not any(m.attn_drop._forward_pre_hooks for m in deit.modules() if hasattr(m, "fused_attn"))


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 4, 5, 5)
    torch.testing.assert_close(rollout([eye, eye, eye]), torch.eye(5).expand(2, 5, 5))


def test_rollout_of_uniform_attention_matches_closed_form():
    # A = U (all 1/N): each layer is 0.5 U + 0.5 I, and (0.5 U + 0.5 I)^L = 0.5^L I + (1 - 0.5^L) U.
    n, layers = 6, 3
    u = torch.full((1, 2, n, n), 1 / n)
    expected = 0.5**layers * torch.eye(n) + (1 - 0.5**layers) * torch.full((n, n), 1 / n)
    torch.testing.assert_close(rollout([u] * layers)[0], expected)


def test_uniform_attention_model_gives_flat_rollout(x):
    model = _tiny()
    for blk in model.blocks:  # q = k = 0 -> every softmax row is exactly uniform
        torch.nn.init.zeros_(blk.attn.qkv.weight)
        torch.nn.init.zeros_(blk.attn.qkv.bias)
    rel = attention_rollout(model, x)
    assert rel.shape == (1, 4, 4)
    torch.testing.assert_close(rel, torch.full((1, 4, 4), (1 - 0.5**3) / 17))
    assert not to_image(rel[0], (64, 64), (64, 64)).any()  # nothing stands out -> blank map


def test_rollout_handles_register_tokens_and_avg_pool(x):
    reg = _tiny("vit_small_patch16_224", reg_tokens=4)
    assert reg.num_prefix_tokens == 5
    assert attention_rollout(reg, x).shape == (1, 4, 4)
    avg = _tiny("vit_small_patch16_224", class_token=False, global_pool="avg")
    assert avg.num_prefix_tokens == 0
    rel = attention_rollout(avg, x)
    assert rel.shape == (1, 4, 4) and torch.all(rel > 0)


def test_grad_cam_differs_per_finding_and_leaves_model_clean(deit, x):
    for p in deit.parameters():
        p.requires_grad_(False)  # frozen backbones (as in inference) must still give gradients to activations
    cams = [grad_cam(deit, x, k) for k in range(K)]
    assert all(c.shape == (1, 4, 4) and torch.all(c >= 0) for c in cams)
    assert all(c.abs().sum() > 0 for c in cams)
    assert not torch.allclose(cams[0], cams[1]) and not torch.allclose(cams[1], cams[2])
    assert not deit.blocks[-1].norm1._forward_hooks
    assert not deit.training
    with pytest.raises(ValueError, match="outside"):
        grad_cam(deit, x, K)


def test_grad_cam_follows_the_head(deit, x):
    """Negating a finding's head weights flips which patches push its logit up: the map must change."""
    model = _tiny()
    cam = grad_cam(model, x, 0)
    with torch.no_grad():
        model.head.weight[0].neg_()
        model.head.bias[0].neg_()
    flipped = grad_cam(model, x, 0)
    assert not torch.allclose(cam, flipped)


def test_to_image_undoes_the_letterbox_of_the_real_transform(cxr_dicom):
    """A map equal to the transformed image itself must map back onto the original image."""
    image = read_image(cxr_dicom).pixels[::8, ::4]  # non-square, so there is padding to remove
    model = _tiny(img_size=128)
    pre = resolve_preprocessing(model)
    tensor = build_transforms(pre, train=False)(image)
    grey = tensor[0] * pre["std"][0] + pre["mean"][0]
    back = to_image(grey, (128, 128), image.shape)
    assert back.shape == image.shape
    norm = (image - image.min()) / (image.max() - image.min())
    assert np.corrcoef(back.ravel(), norm.ravel())[0, 1] > 0.97
    assert abs(back.mean() - norm.mean()) < 0.03


def test_saliency_maps_on_real_image_are_in_range(cxr_dicom):
    image = read_image(cxr_dicom).pixels
    model = _tiny(img_size=128)
    x = build_transforms(resolve_preprocessing(model), train=False)(image)[None]
    for grid in (attention_rollout(model, x)[0], grad_cam(model, x, 1)[0]):
        heat = to_image(grid, (128, 128), image.shape)
        assert heat.shape == image.shape and heat.dtype == np.float32
        assert heat.min() == 0.0 and heat.max() == 1.0


def test_overlay_blends_with_opacity():
    image = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    heat = np.ones((3, 4), dtype=np.float32)
    assert np.array_equal(overlay(image, heat, alpha=0.0)[..., 0], np.round(image * 255).astype(np.uint8))
    full = overlay(image, heat, alpha=1.0, cmap="jet")
    assert full.dtype == np.uint8 and full.shape == (3, 4, 3)
    assert np.all(full == full[0, 0]) and tuple(full[0, 0]) != (255, 255, 255)  # jet(1.0) is dark red
    half = overlay(image, heat, alpha=0.5).astype(int)
    assert np.all(np.abs(half - (overlay(image, heat, 0.0).astype(int) + full) / 2) <= 1)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, heat[:2])


def test_maps_work_on_the_medvit_classifier(x):
    """The app passes medvit's Classifier (timm backbone + MLP head), as rebuilt by load_run."""
    from medvit.config import ModelConfig
    from medvit.model.classifier import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        name="deit3_small_patch16_384", pretrained=False, freeze_stem=False, freeze_blocks=0, head="mlp",
        head_hidden=32, model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64},
    )  # fmt: skip
    model = build_model(cfg, K).eval()
    before = _fused(model)
    assert attention_rollout(model, x).shape == (1, 4, 4)
    cams = [grad_cam(model, x, k) for k in range(K)]
    assert all(c.abs().sum() > 0 for c in cams) and not torch.allclose(cams[0], cams[2])
    assert _fused(model) == before
