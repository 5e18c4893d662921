"""What a training loop plugs into the shared engine (`medvit.train.engine`): its model, batch loss and metrics.

Kept apart from the engine, which imports timm (and with it huggingface_hub), so a task module can be imported
before `--offline` is applied.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Task(ABC):
    """What a training loop plugs into the `Engine`.

    Attributes:
        model: the weights that train: clipped, averaged by EMA, saved in the resume state.
        step_model: what `loss` calls (default `model`; e.g. a trainable suffix on cached features). Under
            torchrun the engine replaces it by its DDP wrapper, so `loss` must read it from `self`.
        state: JSON-able task state (e.g. the best score so far), saved in and restored from the resume state.
        evaluate_before: also evaluate (and log epoch 0) before the first update of a new run.
    """

    model: nn.Module
    step_model: nn.Module
    state: dict[str, Any]
    evaluate_before: bool = False

    def __init__(self, model: nn.Module) -> None:
        self.model = self.step_model = model
        self.state = {}

    @abstractmethod
    def loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss of one micro-batch (a mean, so accumulation can average it)."""

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Metrics logged after `epoch` (1-based; 0 = before training), on rank 0 only."""
        return {}

    def should_stop(self) -> bool:
        """Whether to end training after this epoch (e.g. early stopping), decided on rank 0."""
        return False
