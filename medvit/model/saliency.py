"""Where a ViT looked: attention rollout and a Grad-CAM-style map for one finding, plus an overlay helper.

Both maps are computed on the patch-token grid of a timm VisionTransformer (any number of prefix
tokens: class and register tokens are `model.num_prefix_tokens`), then mapped back onto the
original image, undoing the letterbox (longest side + centre padding) of `medvit.data.transforms`.

* Rollout (Abnar & Zuidema 2020): multiply the head-averaged attention matrices of all blocks, each
  mixed 50/50 with the identity for the residual path; the class token's row is the relevance of each
  patch. It is class-agnostic. timm's fused attention (`F.scaled_dot_product_attention`) never
  materialises the weights, so `capture_attention` switches it off and hooks `attn_drop`'s input
  (the softmax output) for the duration, restoring the flags afterwards.
* Grad-CAM (Selvaraju et al. 2017) on the tokens entering the last block's attention
  (`blocks[-1].norm1`): the head reads only the class token after the last block, so patch tokens
  *after* it have zero gradient; before its attention they still feed the class token.
* transformers encoders (`medvit.model.hf_backbone`): rollout over the attentions the encoder returns
  (eager attention for the call; Swin attends within windows, so it has no rollout), Grad-CAM on the
  tokens entering the last block (for Swin, the last stage's coarser grid).

Maps are for orientation, not evidence: they explain this model's output, not the anatomy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvit.data.transforms import letterbox_box
from medvit.model.hf_backbone import HFBackbone

_log = logging.getLogger(__name__)

HeadFusion = Literal["mean", "max", "min"]


def _attention_modules(model: nn.Module) -> list[Any]:
    return [
        m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
    ]


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect every block's softmax attention (B, heads, N, N), in forward order, while the context is open.

    Fused attention is switched off inside the context and each module's flag is restored on exit,
    even if the forward pass raises.
    """
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no timm attention modules (fused_attn + attn_drop)")
    captured: list[torch.Tensor] = []
    saved = [m.fused_attn for m in modules]
    handles = []
    try:
        for m in modules:
            m.fused_attn = False
            handles.append(
                m.attn_drop.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
            )
        yield captured
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(modules, saved, strict=True):
            m.fused_attn = flag


def rollout(attentions: Sequence[torch.Tensor], head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """Attention rollout: the (B, N, N) product of residual-mixed, row-normalised attention, last block first."""
    if not attentions:
        raise ValueError("rollout needs at least one attention matrix")
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion]
    first = attentions[0]
    eye = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device)
    result = eye.expand(first.shape[0], -1, -1)
    for attn in attentions:
        a = 0.5 * fuse(attn.float()) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def vit_backbone(model: nn.Module) -> Any:
    """The timm ViT inside `model`: the model itself, or its `.backbone` (medvit.model.Classifier)."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and all(hasattr(candidate, a) for a in ("patch_embed", "blocks", "num_prefix_tokens")):
            return candidate
    raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (nor wraps one as .backbone)")


def _grid(vit: Any, x: torch.Tensor, n_patches: int) -> tuple[int, int]:
    patch = vit.patch_embed.patch_size
    grid = (int(x.shape[-2]) // patch[0], int(x.shape[-1]) // patch[1])
    if grid[0] * grid[1] != n_patches:
        raise ValueError(f"{n_patches} patch tokens do not form the {grid} grid of a {tuple(x.shape[-2:])} input")
    return grid


def _query_rows(vit: Any, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance of each token to the pooled output: the class token's row, or the mean over patches (avg pool)."""
    prefix = vit.num_prefix_tokens
    if getattr(vit, "cls_token", None) is not None and getattr(vit, "global_pool", "token") == "token":
        return relevance[:, 0, prefix:]
    return relevance[:, prefix:, prefix:].mean(dim=1)


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """Per-patch rollout relevance on the token grid, (B, gh, gw), unnormalised.

    `model` is a timm ViT or a module wrapping one (or a transformers encoder) as `.backbone`; for a fold
    ensemble (`.members`), the mean of its members' maps.
    """
    if isinstance(members := getattr(model, "members", None), nn.ModuleList):
        return torch.stack([attention_rollout(m, x, head_fusion) for m in members]).mean(dim=0)
    hf = _hf_backbone(model)
    if hf is not None:
        with _eval(model):
            relevance = rollout(hf.attentions(x), head_fusion)
        prefix, grid = hf.token_grid(relevance.shape[-1], (int(x.shape[-2]), int(x.shape[-1])))
        rows = relevance[:, 0, prefix:] if hf.pool == "cls" else relevance[:, prefix:, prefix:].mean(dim=1)
        return rows.reshape(x.shape[0], *grid)
    vit = vit_backbone(model)
    with _eval(model), capture_attention(vit) as attentions:
        vit(x)
    rel = _query_rows(vit, rollout(attentions, head_fusion))
    return rel.reshape(x.shape[0], *_grid(vit, x, rel.shape[-1]))


def grad_cam(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM for output `target` (a finding's logit) on the token grid, (B, gh, gw), ReLU'd and unnormalised.

    `model` maps images to per-finding logits: a timm ViT or a module wrapping one (or a transformers
    encoder) as `.backbone`; for a fold ensemble (`.members`), the mean of its members' maps.
    """
    if isinstance(members := getattr(model, "members", None), nn.ModuleList):
        return torch.stack([grad_cam(m, x, target) for m in members]).mean(dim=0)
    hf = _hf_backbone(model)
    if hf is not None:
        tokens, grads = _token_grads(model, x, target, hf.last_block, block_input=True)
        prefix, grid = hf.token_grid(tokens.shape[1], (int(x.shape[-2]), int(x.shape[-1])))
    else:
        vit = vit_backbone(model)
        tokens, grads = _token_grads(model, x, target, vit.blocks[-1].norm1, block_input=False)
        prefix, grid = vit.num_prefix_tokens, _grid(vit, x, tokens.shape[1] - vit.num_prefix_tokens)
    tokens, grads = tokens[:, prefix:], grads[:, prefix:]
    cam = F.relu((tokens * grads.mean(dim=1, keepdim=True)).sum(dim=-1))
    return cam.reshape(x.shape[0], *grid)


def _hf_backbone(model: nn.Module) -> HFBackbone | None:
    backbone = getattr(model, "backbone", model)
    return backbone if isinstance(backbone, HFBackbone) else None


def _token_grads(model: nn.Module, x: torch.Tensor, target: int, layer: nn.Module, *, block_input: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens (B, N, C) at `layer` (its output, or with `block_input` the hidden states entering it) and the
    gradient of logit `target` with respect to them."""
    acts: list[torch.Tensor] = []
    if block_input:
        handle = layer.register_forward_pre_hook(
            lambda _m, args, kwargs: acts.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    else:
        handle = layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        with _eval(model), torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            if not 0 <= target < logits.shape[-1]:
                raise ValueError(f"target {target} outside the model's {logits.shape[-1]} outputs")
            (grads,) = torch.autograd.grad(logits[:, target].sum(), acts[0])
    finally:
        handle.remove()
    return acts[0].detach(), grads


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def to_image(grid_map: torch.Tensor, input_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """One (gh, gw) map -> the original image's (H, W), in [0, 1].

    The map covers the model input, which is the letterboxed image (`medvit.data.transforms.letterbox_box`),
    so the padding is cropped off before resizing back. A constant map (nothing stands out, up to rounding)
    becomes all zeros.
    """
    h, w = image_hw
    up = F.interpolate(grid_map[None, None].float(), size=tuple(input_hw), mode="bilinear", align_corners=False)[0, 0]
    top, left, nh, nw = letterbox_box(h, w, input_hw)
    content = up[top : top + nh, left : left + nw]
    out = F.interpolate(content[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = out.min(), out.max()
    if float(hi - lo) <= 1e-4 * float(max(hi.abs(), lo.abs())) + 1e-12:  # flat up to float32 rounding
        return np.zeros((h, w), dtype=np.float32)
    return ((out - lo) / (hi - lo)).clamp(0, 1).cpu().numpy().astype(np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a [0,1] heat map over a grey [0,1] image as uint8 RGB; `alpha` is the heat map's opacity."""
    from matplotlib import colormaps

    if image.shape[:2] != heat.shape:
        raise ValueError(f"image {image.shape[:2]} and heat map {heat.shape} differ in size")
    alpha = float(np.clip(alpha, 0.0, 1.0))
    grey = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    return np.round(255 * ((1 - alpha) * grey + alpha * colour)).astype(np.uint8)
