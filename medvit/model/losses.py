"""Masked multi-label losses: NaN targets (finding not labelled by this dataset) contribute nothing.

Targets may be soft (MixUp, label smoothing). The loss is the mean over *known* entries, so an
image that is only labelled for some findings still teaches the model about those.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvit.config import LossConfig


def pos_weight_from_labels(labels: np.ndarray, max_weight: float = 20.0) -> torch.Tensor:
    """Per-finding negatives/positives on the training labels (NaN ignored), clipped to [1, max_weight].

    A finding with no positives gets `max_weight`; the clip keeps rare findings from dominating the loss.
    """
    known = ~np.isnan(labels)
    pos = np.where(known, labels, 0).sum(axis=0)
    neg = known.sum(axis=0) - pos
    ratio = np.divide(neg, pos, out=np.full(pos.shape, max_weight, dtype=np.float64), where=pos > 0)
    return torch.tensor(np.clip(ratio, 1.0, max_weight), dtype=torch.float32)


def _bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")


def _asymmetric(logits: torch.Tensor, y: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021): focus on positives, down-weight and margin-shift easy negatives."""
    p = torch.sigmoid(logits)
    p_neg = (p - cfg.clip).clamp(min=0) if cfg.clip > 0 else p
    log_p = F.logsigmoid(logits)
    log_1mp = torch.log((1 - p_neg).clamp(min=1e-8))
    loss_pos = y * (1 - p).pow(cfg.gamma_pos) * log_p
    loss_neg = (1 - y) * p_neg.pow(cfg.gamma_neg) * log_1mp
    return -(loss_pos + loss_neg)


def _focal(logits: torch.Tensor, y: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) with soft-target support: alpha-weighted, (1 - p_t)^gamma modulated."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = cfg.alpha * y + (1 - cfg.alpha) * (1 - y)
    return alpha_t * (1 - p_t).pow(cfg.gamma) * ce


class MaskedMultiLabelLoss(nn.Module):
    """BCE / asymmetric / focal loss averaged over the known (non-NaN) label entries."""

    pos_weight: torch.Tensor | None

    def __init__(self, cfg: LossConfig, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pos_weight", pos_weight if cfg.pos_weight else None, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        mask = ~torch.isnan(targets)
        y = torch.where(mask, targets, torch.zeros_like(targets))
        if self.cfg.label_smoothing:
            y = y * (1 - self.cfg.label_smoothing) + 0.5 * self.cfg.label_smoothing
        if self.cfg.name == "asymmetric":
            per = _asymmetric(logits, y, self.cfg)
        elif self.cfg.name == "focal":
            per = _focal(logits, y, self.cfg)
        else:
            per = _bce(logits, y, self.pos_weight)
        per = per * mask
        return per.sum() / mask.sum().clamp(min=1)
