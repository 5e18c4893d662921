"""Self-supervised MAE pretraining of the ViT backbone on the training images, before supervised training.

Without downloadable pretrained weights, a ViT trained from scratch on a few hundred radiographs learns
little. Masked autoencoding (He et al., 2022) needs no labels: the encoder sees a random 25 % of the
patches and a small decoder reconstructs the rest, so the encoder must learn anatomy. Only the `train`
split is used (never val or calib patients). The output is the encoder's timm state dict
(`encoder.safetensors`), which `medvit train` then loads through the ordinary pretrained-weights path
(`model.weights_file`), exactly like downloaded weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from medvit._io import save_tensors, write_json
from medvit.config import Config, PretrainConfig
from medvit.data.datasets import XrayDataset
from medvit.data.splits import load_splits
from medvit.data.transforms import build_transforms, resolve_preprocessing
from medvit.errors import ConfigError
from medvit.model.classifier import create_backbone
from medvit.runs import PRETRAIN_ENCODER, PRETRAIN_SUMMARY
from medvit.train.engine import Engine, LoopConfig, seed_everything
from medvit.train.resume import STATE
from medvit.train.task import Task

_log = logging.getLogger(__name__)

ENCODER, SUMMARY = PRETRAIN_ENCODER, PRETRAIN_SUMMARY


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder (cls token + absolute position embeddings) with an MAE decoder around it."""

    def __init__(self, encoder: Any, cfg: PretrainConfig) -> None:
        super().__init__()
        if not all(hasattr(encoder, a) for a in ("patch_embed", "pos_embed", "cls_token", "blocks", "norm")) or \
                encoder.pos_embed is None or encoder.cls_token is None or encoder.num_prefix_tokens != 1 or \
                getattr(encoder, "dynamic_img_size", False):
            raise ConfigError(f"MAE pretraining needs a ViT/DeiT-style timm model with a cls token and absolute "
                              f"position embeddings; {type(encoder).__name__} is not one (set pretrain: null)")
        self.encoder = encoder
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.patch = tuple(encoder.patch_embed.patch_size)
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        width, d = encoder.embed_dim, cfg.decoder_dim
        self.decoder_embed = nn.Linear(width, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        pos = build_sincos2d_pos_embed(list(self.grid), dim=d)  # fixed, as in the MAE paper
        self.decoder_pos: torch.Tensor
        self.register_buffer("decoder_pos", torch.cat([torch.zeros(1, d), pos]).unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(d, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, self.patch[0] * self.patch[1] * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", *(f"encoder.{n}" for n in self.encoder.no_weight_decay())}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, ph*pw*C), patches in the encoder's token order (row-major)."""
        b, c = imgs.shape[:2]
        (gh, gw), (ph, pw) = self.grid, self.patch
        x = imgs.reshape(b, c, gh, ph, gw, pw)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, ph * pw * c)

    def _patch_pos(self) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.encoder.pos_embed
        if self.encoder.no_embed_class:  # DeiT3: no position for the cls token
            return pos, torch.zeros_like(pos[:, :1])
        return pos[:, 1:], pos[:, :1]

    def encode(self, imgs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, 1 + kept, D) for the kept patch indices `keep` (B, kept)."""
        e = self.encoder
        x = e.patch_embed(imgs)
        patch_pos, cls_pos = self._patch_pos()
        x = x + patch_pos
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (e.cls_token + cls_pos).expand(x.shape[0], -1, -1)
        x = e.norm_pre(torch.cat([cls, x], dim=1))
        return e.norm(e.blocks(x))

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predicted patches (B, N, ph*pw*C) from the encoded kept tokens; `restore` undoes the shuffle."""
        x = self.decoder_embed(latent)
        b, n = restore.shape
        masks = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error over the masked patches (per-patch normalised targets)."""
        b, n = imgs.shape[0], self.grid[0] * self.grid[1]
        n_keep = max(1, int(round(n * (1 - self.mask_ratio))))
        shuffle = torch.argsort(torch.rand(b, n, device=imgs.device), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        mask = torch.ones(b, n, device=imgs.device)
        mask[:, :n_keep] = 0
        mask = torch.gather(mask, 1, restore)  # 1 = masked, in original patch order
        pred = self.decode(self.encode(imgs, shuffle[:, :n_keep]), restore)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()


class _MaeTask(Task):
    """The reconstruction loss of a batch of training images (labels unused)."""

    def loss(self, batch: Any) -> torch.Tensor:
        return self.model(batch[0])


def pretrain(cfg: Config, out_dir: str | Path) -> Path:
    """Run MAE pretraining per `cfg.pretrain` on the train split; write `encoder.safetensors` into `out_dir`.

    Returns the encoder file. Loss, learning rate and time per epoch go to `out_dir/metrics.csv`; each epoch
    leaves a resume state there, and an interrupted pretraining in `out_dir` continues exactly where it stopped.

    Raises:
        ConfigError: no `pretrain` section, or the backbone is not a ViT with a cls token.
        NonFiniteLossError: the reconstruction loss diverged (no encoder is written).
        CheckpointError: the resume state in `out_dir` does not match this config.
    """
    p = cfg.pretrain
    if p is None:
        raise ConfigError("the config has no 'pretrain' section (method, epochs, mask_ratio, ...)")
    out = Path(out_dir)
    threads = p.num_threads or cfg.train.num_threads
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed, cfg.train.deterministic)
    train = load_splits(cfg).train
    encoder = create_backbone(cfg.model, {**cfg.model.model_kwargs, "num_classes": 0})
    mae = MaskedAutoencoder(encoder, p)
    tf = build_transforms(resolve_preprocessing(encoder), train=True, aug=cfg.data.augment)
    ds = XrayDataset(train, list(cfg.data.findings), tf, cache=cfg.data.cache, seed=cfg.seed)
    # per-epoch permutations of (seed, epoch): what an exact resume needs
    sampler: DistributedSampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True,  # type: ignore[arg-type]
                                                     seed=cfg.seed)
    loader: DataLoader = DataLoader(ds, batch_size=p.batch_size, sampler=sampler,  # type: ignore[arg-type]
                                    drop_last=len(ds) > p.batch_size, num_workers=cfg.data.num_workers)
    optimizer = create_optimizer_v2(mae, opt="adamw", lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.95))
    loop = LoopConfig(epochs=p.epochs, clip_grad=p.clip_grad, warmup_epochs=p.warmup_epochs, warmup_lr=p.min_lr,
                      min_lr=p.min_lr, progress=cfg.log.progress, desc="MAE epoch", loss_name="MAE loss",
                      hint="lower pretrain.lr or set pretrain.clip_grad")
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(_MaeTask(mae), optimizer, loader, loop, out)
    if (out / STATE).is_file():
        engine.resume()
    _log.info("MAE pretraining %s on %d train images / %d patients: %d epochs, mask ratio %.2f",
              cfg.model.name, len(train), train["patient_id"].nunique(), p.epochs, p.mask_ratio)
    history = engine.run()
    loss_avg, elapsed = history[-1]["train_loss"], engine.state["elapsed_s"]
    path = out / ENCODER
    digest = save_tensors(path, encoder.state_dict(), metadata={"format": "pt"})
    write_json(out / SUMMARY, {
        "method": p.method, "model": cfg.model.name, "model_kwargs": cfg.model.model_kwargs,
        "train_images": len(train), "train_patients": int(train["patient_id"].nunique()),
        "epochs": p.epochs, "final_loss": loss_avg, "seconds": round(elapsed, 1),
        "pretrain": p.model_dump(mode="json"), "encoder_sha256": digest,
    })
    _log.info("MAE pretraining done in %.0f s (final loss %.4f): %s", elapsed, loss_avg, path)
    return path
