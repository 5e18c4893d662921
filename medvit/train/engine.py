"""One training engine for every loop (supervised, MAE, CLIP alignment): a task plugs in its model and loss.

The engine owns what the loops share, so it cannot drift between them: warmup + cosine LR schedule (timm),
gradient accumulation and clipping, autocast, the NaN/Inf stop, EMA, the append-only `metrics.csv`, atomic
checkpoints with exact resume (`medvit.train.resume`), a tqdm bar, and DDP under torchrun (rank 0 evaluates,
logs and writes files). A task says what a batch and its loss are, and what to evaluate after each epoch.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from medvit._platform import bf16_supported
from medvit.errors import ConfigError, NonFiniteLossError
from medvit.runs import METRICS_CSV
from medvit.train.distributed import DistInfo, all_true, barrier, broadcast_flag, mean_over_ranks
from medvit.train.resume import load_resume_state, save_resume_state
from medvit.train.task import Task

_log = logging.getLogger(__name__)

SINGLE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): bf16 on CPUs with native bf16, bf16/fp16 AMP on CUDA."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if precision == "bf16" or bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to `dtype` on `device`, or nothing for fp32 (None)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


class MetricsLog:
    """metrics.csv (always, appended across resumes) and TensorBoard scalars (when enabled).

    The columns are fixed by the file's header (or the first row): a later row may leave some blank, so a
    task that reports a metric only at some epochs still writes one table.
    """

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / METRICS_CSV
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("log.tensorboard: true needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def _header(self) -> list[str] | None:
        if not self.path.is_file():
            return None
        with self.path.open(newline="") as f:
            return next(csv.reader(f), None)

    def write(self, row: dict[str, Any]) -> None:
        header = self._header()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header or list(row), restval="")
            if header is None:
                writer.writeheader()
            writer.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()

    def read(self) -> list[dict[str, float]]:
        """The rows written so far (all sessions), as numbers; blank cells are left out."""
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return [{k: int(v) if k in ("epoch", "step") else float(v) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(f)]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


@dataclass(frozen=True)
class LoopConfig:
    """What the engine needs to know beyond the task: schedule, accumulation, clipping, precision, logging.

    Warm-up is `warmup_epochs` epochs plus `warmup_steps` optimizer updates, rising linearly from `warmup_lr`;
    the cosine then decays to `min_lr` at the end of `epochs`. `loss_name` starts the NaN/Inf error message
    and `loss_column` names the epoch's mean step loss in metrics.csv; `hint` says what the user can change.
    """

    epochs: int
    accum_steps: int = 1
    clip_grad: float | None = None
    warmup_epochs: int = 0
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    dtype: torch.dtype | None = None
    progress: bool = True
    tensorboard: bool = False
    desc: str = "epoch"
    loss_name: str = "loss"
    loss_column: str = "train_loss"
    hint: str = "lower the learning rate or set clip_grad"


class Engine:
    """Runs a `Task` for `cfg.epochs` epochs over `loader`, one explicit loop (nanoGPT-style).

    `loader` is anything sized and iterable; it (or its sampler/dataset) may have `set_epoch(epoch)`, which is
    called before each epoch so shuffling and augmentation depend only on (seed, epoch): that is what makes a
    resumed run match an uninterrupted one. With `run_dir`, each epoch ends with an atomic resume state and a
    metrics.csv row; without it nothing is written (the history is still returned).
    """

    def __init__(self, task: Task, optimizer: torch.optim.Optimizer, loader: Any, cfg: LoopConfig,
                 run_dir: Path | None = None, *, info: DistInfo = SINGLE_PROCESS, ema: nn.Module | None = None) -> None:
        if len(loader) == 0:
            raise ConfigError("no training batches: the training set is empty or smaller than one batch")
        self.task, self.optimizer, self.loader, self.cfg = task, optimizer, loader, cfg
        self.run_dir, self.info, self.ema = run_dir, info, ema
        self.updates_per_epoch = math.ceil(len(loader) / cfg.accum_steps)
        self.scheduler = CosineLRScheduler(
            optimizer, t_initial=cfg.epochs * self.updates_per_epoch, lr_min=cfg.min_lr, t_in_epochs=False,
            warmup_t=cfg.warmup_epochs * self.updates_per_epoch + cfg.warmup_steps, warmup_lr_init=cfg.warmup_lr)
        if info.enabled:
            task.step_model = nn.parallel.DistributedDataParallel(
                task.step_model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(enabled=cfg.dtype == torch.float16)
        self.state: dict[str, Any] = {"epoch": 0, "global_step": 0, "elapsed_s": 0.0}
        self.history: list[dict[str, Any]] = []

    @property
    def lr(self) -> float:
        """The peak learning rate across parameter groups (layer decay scales the others down)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def resume(self) -> None:
        """Continue exactly after the last completed epoch in `run_dir` (weights, optimizer, EMA, RNG, schedule).

        Raises:
            CheckpointError: no or inconsistent resume state.
        """
        if self.run_dir is None:
            raise ConfigError("resuming needs the run folder of the interrupted run")
        restored = load_resume_state(self.run_dir, self.task.model, self.optimizer, self.ema)
        self.state.update({k: restored[k] for k in self.state})
        self.task.state.update({k: restored[k] for k in self.task.state if k in restored})
        self.scheduler.step_update(self.state["global_step"])
        self.history = MetricsLog(self.run_dir, tensorboard=False).read()
        _log.info("resuming %s at epoch %d (step %d)", self.run_dir, self.state["epoch"] + 1, self.state["global_step"])

    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train until `cfg.epochs` (or `stop_after` more epochs, or the task stops); returns metrics rows.

        Raises:
            NonFiniteLossError: the loss became NaN/Inf; the last completed epoch's checkpoint is kept.
        """
        log = None
        if self.info.is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log = MetricsLog(self.run_dir, self.cfg.tensorboard)
        first = self.state["epoch"]
        last = self.cfg.epochs if stop_after is None else min(self.cfg.epochs, first + stop_after)
        try:
            if self.task.evaluate_before and first == 0 and not self.history and self.info.is_main:
                self._record({"epoch": 0, "step": 0, "lr": self.lr, self.cfg.loss_column: None,
                              **self.task.evaluate(0), "seconds": None}, log)
            for epoch in range(first, last):
                started = time.monotonic()
                loss = self._train_epoch(epoch)
                if self._end_epoch(epoch, loss, time.monotonic() - started, log):
                    break
        finally:
            if log is not None:
                log.close()
        barrier(self.info)
        return self.history

    def _record(self, row: dict[str, Any], log: MetricsLog | None) -> None:
        if log is not None:
            log.write(row)
        self.history.append({k: v for k, v in row.items() if v is not None})

    def _set_epoch(self, epoch: int) -> None:
        # Shuffling (sampler) and augmentation (dataset) are functions of (seed, epoch): exact resume needs that.
        parts: list[Any] = [self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "dataset", None)]
        for part in parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def _train_epoch(self, epoch: int) -> float:
        cfg, task = self.cfg, self.task
        self._set_epoch(epoch)
        task.step_model.train()
        n_batches, total, count = len(self.loader), 0.0, 0
        bar = tqdm(self.loader, desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (self.info.is_main and cfg.progress))
        for i, batch in enumerate(bar):
            step_now = (i + 1) % cfg.accum_steps == 0 or i + 1 == n_batches
            ddp: Any = task.step_model
            with ddp.no_sync() if self.info.enabled and not step_now else nullcontext():
                with autocast(self.info.device, cfg.dtype):
                    loss = task.loss(batch)
                if not all_true(self.info, bool(torch.isfinite(loss))):
                    kept = f"the last good checkpoint in {self.run_dir} is kept. " if self.run_dir else ""
                    raise NonFiniteLossError(
                        f"{cfg.loss_name} became {loss.item()} at epoch {epoch + 1}, step {self.state['global_step']}: "
                        f"training stopped; {kept}{cfg.hint}")
                self.scaler.scale(loss / cfg.accum_steps).backward()
            total, count = total + loss.item(), count + 1
            if step_now:
                self._optimizer_step()
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{self.lr:.2e}")
        return mean_over_ranks(self.info, total, count)

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.task.model.parameters() if p.requires_grad], self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["global_step"] += 1
        self.scheduler.step_update(self.state["global_step"])
        if self.ema is not None:
            self.ema.update(self.task.model, step=self.state["global_step"])  # type: ignore[operator]

    def _end_epoch(self, epoch: int, train_loss: float, seconds: float, log: MetricsLog | None) -> bool:
        """Evaluate, log, checkpoint (rank 0); returns whether to stop (the same answer on every rank)."""
        stop = False
        if self.info.is_main:
            self.state.update(epoch=epoch + 1, elapsed_s=self.state["elapsed_s"] + seconds)
            metrics = self.task.evaluate(epoch + 1)
            self._record({"epoch": epoch + 1, "step": self.state["global_step"], "lr": self.lr,
                          self.cfg.loss_column: train_loss, **metrics, "seconds": round(seconds, 1)}, log)
            if self.run_dir is not None:
                save_resume_state(self.run_dir, self.task.model, self.optimizer, self.ema,
                                  {**self.task.state, **self.state})
            stop = self.task.should_stop()
        return broadcast_flag(self.info, stop)
