"""A fold ensemble served as one model: K networks of one architecture whose logits are averaged.

`medvit train --folds K --ensemble` trains one model per patient-wise fold; together they are one run folder
(`config.json` says `"ensemble": K`, `model.safetensors` holds `members.<i>.*`), so `load_run`, every inference
engine, export, `medvit predict` and the app serve it like a single model: it is one `nn.Module` whose forward
maps images to per-finding logits, which ONNX/TorchScript/OpenVINO trace as one graph. Averaging logits rather
than probabilities keeps one logit per finding, which is what calibration and thresholds act on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Ensemble(nn.Module):
    """The mean of its members' logits; saliency maps (`medvit.model.saliency`) average over members too."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The members' pooled features side by side (B, K*D): what the out-of-distribution check measures."""
        return torch.cat([m.forward_features(x) for m in self.members], dim=1)  # type: ignore[operator]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean logits, features side by side) from one pass per member (`Classifier.forward_with_features`)."""
        outs = [m.forward_with_features(x) for m in self.members]  # type: ignore[operator]
        return torch.stack([o[0] for o in outs]).mean(dim=0), torch.cat([o[1] for o in outs], dim=1)
