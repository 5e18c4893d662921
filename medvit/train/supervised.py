"""The training loop: `fit(cfg)` trains a multi-label classifier and leaves a self-describing run folder.

One explicit loop (nanoGPT-style): masked multi-label loss, AdamW with layer-wise LR decay and
warmup + cosine (both from timm), gradient accumulation and clipping, autocast, MixUp/CutMix, EMA.
Each epoch validates (mean AUROC drives early stopping and the best checkpoint) and writes an
exact resume state. Under torchrun the same loop runs with DDP; rank 0 validates and writes files.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from medvit._io import read_json, write_json
from medvit.config import Config
from medvit.data.splits import load_splits
from medvit.errors import ConfigError, NonFiniteLossError
from medvit.evaluate.metrics import mean_auroc
from medvit.runs import SUMMARY, WEIGHTS, model_build_args, save_weights, write_run_config
from medvit.train.distributed import (
    DistInfo,
    all_true,
    barrier,
    broadcast_flag,
    cleanup,
    init_distributed,
    mean_over_ranks,
)
from medvit.train.engine import MetricsLog, autocast, mix_batch, resolve_precision, seed_everything
from medvit.train.resume import STATE, load_resume_state, save_resume_state

_log = logging.getLogger(__name__)


def _loader(ds: Any, batch: int, info: DistInfo, seed: int, workers: int) -> tuple[DataLoader, DistributedSampler]:
    # A DistributedSampler even on one process: its permutation depends only on (seed, epoch), so a
    # single-process run and an N-rank run see the same global batches.
    sampler: DistributedSampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                                     seed=seed)
    # Not persistent: workers must pick up the dataset's epoch (its augmentation seed) each epoch.
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=False)
    return loader, sampler


@torch.no_grad()
def predict_probs(model: nn.Module, loader: DataLoader, device: torch.device,
                  dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities and labels over a loader, in loader order."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        with autocast(device, dtype):
            logits = model(x.to(device))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def _run_dir(cfg: Config, out_dir: str | Path | None, resume: str | Path | None) -> Path:
    if resume is not None:
        return Path(resume)
    run_dir = Path(out_dir) if out_dir is not None else cfg.out_dir
    if (run_dir / WEIGHTS).exists() or (run_dir / STATE).exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another --out or continue it with --resume {run_dir}")
    return run_dir


def fit(cfg: Config, *, out_dir: str | Path | None = None, resume: str | Path | None = None,
        stop_after: int | None = None) -> Path:
    """Train per `cfg` and return the run folder.

    Args:
        cfg: the validated config.
        out_dir: run folder (default `cfg.out_dir`); must not already hold a run.
        resume: continue the run in this folder exactly where its last epoch ended.
        stop_after: end this session after this many epochs (the run stays resumable), for time-sliced jobs.

    Raises:
        ConfigError, DatasetError, CheckpointError: user-fixable problems.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
    """
    info = init_distributed()
    try:
        run_dir = _run_dir(cfg, out_dir, resume)
        return _Trainer(_with_pretraining(cfg, run_dir, info), info, run_dir, resume is not None).run(stop_after)
    finally:
        cleanup(info)


def _with_pretraining(cfg: Config, run_dir: Path, info: DistInfo) -> Config:
    """Run the config's self-supervised stage once per run folder, then start the model from its encoder.

    The encoder is loaded through the ordinary `model.weights_file` path, so the saved config says exactly
    which weights training started from, and `--resume` finds the stage already done.
    """
    from medvit.train.mae import ENCODER, pretrain

    if cfg.pretrain is None:
        return cfg
    encoder = run_dir / "pretrain" / ENCODER
    if not encoder.is_file():
        if info.is_main:
            pretrain(cfg, encoder.parent)
        barrier(info)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": True, "weights_file": encoder})})


class _Trainer:
    """State of one training session; `run` is the loop."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, resuming: bool) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        from medvit.data.datasets import XrayDataset
        from medvit.data.transforms import build_transforms, resolve_preprocessing
        from medvit.model.classifier import build_model
        from medvit.model.losses import MaskedMultiLabelLoss, pos_weight_from_labels

        self.cfg, self.info, self.run_dir, self.resuming = cfg, info, run_dir, resuming
        t = cfg.train
        if t.batch_size % (info.world_size * t.accum_steps):
            raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by world size {info.world_size} "
                              f"x accum_steps {t.accum_steps}")
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        seed_everything(cfg.seed, t.deterministic)
        self.splits = load_splits(cfg)
        self.findings = list(cfg.data.findings)
        self.net = build_model(cfg.model, len(self.findings)).to(info.device)
        self.preprocessing = resolve_preprocessing(self.net.backbone)

        train_tf = build_transforms(self.preprocessing, train=True, aug=cfg.data.augment)
        eval_tf = build_transforms(self.preprocessing, train=False)
        train_ds = XrayDataset(self.splits.train, self.findings, train_tf, cache=cfg.data.cache, seed=cfg.seed)
        val_ds = XrayDataset(self.splits.val, self.findings, eval_tf, cache=cfg.data.cache)
        micro = t.batch_size // (info.world_size * t.accum_steps)
        self.dtype = resolve_precision(t.precision, info.device)
        labels = train_ds.labels
        if t.cache_frozen_features:
            train_ds = self._frozen_features(train_ds)
        workers = 0 if t.cache_frozen_features else cfg.data.num_workers
        self.train_loader, self.train_sampler = _loader(train_ds, micro, info, cfg.seed, workers)
        self.val_loader: DataLoader = DataLoader(val_ds, batch_size=t.eval_batch_size,  # type: ignore[arg-type]
                                                 num_workers=cfg.data.num_workers)

        pos_weight = pos_weight_from_labels(labels, t.loss.pos_weight_max)
        self.criterion = MaskedMultiLabelLoss(t.loss, pos_weight).to(info.device)
        self.optimizer = create_optimizer_v2(self.net, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay,
                                             layer_decay=t.layer_decay)
        self.updates_per_epoch = math.ceil(len(self.train_loader) / t.accum_steps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=t.epochs, warmup_epochs=t.warmup_epochs,
            warmup_lr=t.warmup_lr, min_lr=t.min_lr, step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)
        self.ema = ModelEmaV3(self.net, decay=t.ema.decay, use_warmup=t.ema.warmup) if t.ema.enabled else None
        # What the training step calls: the whole net, or only its trainable suffix on cached prefix tokens;
        # wrapped in DDP under torchrun. EMA, validation and checkpoints always use self.net.
        self.model: Any = self.net
        if t.cache_frozen_features:
            from medvit.train.frozen import TrainableSuffix

            self.model = TrainableSuffix(self.net)
        if info.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.state: dict[str, Any] = {"epoch": 0, "global_step": 0, "best_score": -math.inf, "best_epoch": -1,
                                      "best_val_mean_auroc": math.nan, "bad_epochs": 0,
                                      "saved_epoch": -1, "saved_val_mean_auroc": math.nan, "elapsed_s": 0.0}

    def _frozen_features(self, train_ds: Any) -> Any:
        """The train split as cached frozen-prefix tokens (`train.cache_frozen_features`)."""
        from medvit.train.frozen import FrozenFeatures

        t = self.cfg.train
        if self.cfg.data.augment.enabled or t.mixup.enabled:
            raise ConfigError("train.cache_frozen_features needs data.augment.enabled: false and no MixUp: "
                              "the frozen prefix output must be the same every epoch")
        return FrozenFeatures.build(self.net, train_ds, batch_size=t.eval_batch_size,
                                    num_workers=self.cfg.data.num_workers, device=self.info.device,
                                    autocast_dtype=self.dtype)

    # ---- setup / teardown ----

    def _start(self) -> None:
        if self.resuming:
            restored = load_resume_state(self.run_dir, self.net, self.optimizer, self.ema)
            self.state.update({k: restored[k] for k in self.state})
            self.scheduler.step_update(self.state["global_step"])
            _log.info("resuming %s at epoch %d (step %d)", self.run_dir, self.state["epoch"] + 1,
                      self.state["global_step"])
        elif self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(self.run_dir, self.cfg.model_dump(mode="json"), self.findings, self.preprocessing,
                                  model_build_args(self.cfg.model, len(self.findings)))
        barrier(self.info)
        sp = self.splits
        _log.info("train %d images / %d patients, val %d / %d; %d updates per epoch, precision %s, world size %d",
                  len(sp.train), sp.train["patient_id"].nunique(), len(sp.val), sp.val["patient_id"].nunique(),
                  self.updates_per_epoch, self.dtype or "fp32", self.info.world_size)

    # ---- one epoch ----

    def _train_epoch(self, epoch: int) -> float:
        t, dev = self.cfg.train, self.info.device
        self.train_sampler.set_epoch(epoch)
        if hasattr(self.train_loader.dataset, "set_epoch"):  # not for cached frozen features
            self.train_loader.dataset.set_epoch(epoch)
        self.model.train()
        n_batches, total, count = len(self.train_loader), 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                   disable=not (self.info.is_main and self.cfg.log.progress))
        for i, (x, y) in enumerate(bar):
            x, y = mix_batch(x.to(dev), y.to(dev), t.mixup)
            step_now = (i + 1) % t.accum_steps == 0 or i + 1 == n_batches
            sync = self.model.no_sync() if self.info.enabled and not step_now else nullcontext()
            with sync:
                with autocast(dev, self.dtype):
                    logits = self.model(x)
                loss = self.criterion(logits, y)
                if not all_true(self.info, bool(torch.isfinite(loss))):
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {self.state['global_step']}: training "
                        f"stopped; the last good checkpoint in {self.run_dir} is kept. Lower train.lr, keep "
                        f"train.clip_grad on, or use train.precision: fp32")
                self.scaler.scale(loss / t.accum_steps).backward()
            total, count = total + loss.item(), count + 1
            if step_now:
                self._optimizer_step()
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}")
        return mean_over_ranks(self.info, total, count)

    def _optimizer_step(self) -> None:
        t = self.cfg.train
        if t.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.requires_grad], t.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["global_step"] += 1
        self.scheduler.step_update(self.state["global_step"])
        if self.ema is not None:
            self.ema.update(self.net, step=self.state["global_step"])

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None and self.cfg.train.ema.evaluate else self.net

    def _validate(self) -> tuple[float, float, dict[str, float]]:
        probs, labels = predict_probs(self._eval_model(), self.val_loader, self.info.device, self.dtype)
        logits = torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6))
        val_loss = float(self.criterion(logits, torch.from_numpy(labels).to(logits.device)))
        auroc, per = mean_auroc(labels, probs, self.findings)
        return val_loss, auroc, per

    def _end_epoch(self, epoch: int, train_loss: float, seconds: float, log: MetricsLog | None) -> bool:
        """Validate, log, checkpoint (rank 0); returns whether to stop early (same answer on all ranks)."""
        stop = False
        if log is not None:  # rank 0
            val_loss, auroc, per = self._validate()
            score = auroc if math.isfinite(auroc) else -val_loss
            improved = score > self.state["best_score"]
            st = self.state
            st.update(epoch=epoch + 1, elapsed_s=st["elapsed_s"] + seconds)
            if improved:
                st.update(best_score=score, best_epoch=epoch + 1, best_val_mean_auroc=auroc, bad_epochs=0)
            else:
                st["bad_epochs"] += 1
            if improved or self.cfg.train.select == "last":
                save_weights(self.run_dir / WEIGHTS, self._eval_model())
                st["saved_epoch"], st["saved_val_mean_auroc"] = epoch + 1, auroc
            log.write({"epoch": epoch + 1, "step": st["global_step"], "lr": self.optimizer.param_groups[-1]["lr"],
                       "train_loss": train_loss, "val_loss": val_loss, "val_mean_auroc": auroc,
                       "best": int(improved), "seconds": round(seconds, 1),
                       **{f"auroc/{f}": per.get(f, math.nan) for f in self.findings}})
            save_resume_state(self.run_dir, self.net, self.optimizer, self.ema, st)
            _log.info("epoch %d: train loss %.4f, val loss %.4f, val mean AUROC %.4f%s (%.0fs)", epoch + 1,
                      train_loss, val_loss, auroc, " *best*" if improved else "", seconds)
            patience = self.cfg.train.early_stopping_patience
            stop = patience is not None and st["bad_epochs"] >= patience
            if stop:
                _log.info("early stopping: no improvement for %d epochs (best epoch %d)", patience, st["best_epoch"])
        return broadcast_flag(self.info, stop)

    def run(self, stop_after: int | None) -> Path:
        self._start()
        log = MetricsLog(self.run_dir, self.cfg.log.tensorboard) if self.info.is_main else None
        first = self.state["epoch"]
        last = self.cfg.train.epochs if stop_after is None else min(self.cfg.train.epochs, first + stop_after)
        try:
            for epoch in range(first, last):
                started = time.monotonic()
                train_loss = self._train_epoch(epoch)
                if self._end_epoch(epoch, train_loss, time.monotonic() - started, log):
                    break
        finally:
            if log is not None:
                log.close()
        barrier(self.info)
        if self.info.is_main:
            write_json(self.run_dir / SUMMARY, self._summary())
        return self.run_dir

    def _summary(self) -> dict[str, Any]:
        sp, st = self.splits, self.state
        return {
            "epochs_run": st["epoch"], "best_epoch": st["best_epoch"], "best_val_mean_auroc": st["best_val_mean_auroc"],
            "select": self.cfg.train.select, "saved_epoch": st["saved_epoch"],
            "saved_val_mean_auroc": st["saved_val_mean_auroc"],
            "weights": "ema" if self.ema is not None and self.cfg.train.ema.evaluate else "raw",
            "train_images": len(sp.train), "train_patients": int(sp.train["patient_id"].nunique()),
            "val_images": len(sp.val), "val_patients": int(sp.val["patient_id"].nunique()),
            "train_seconds": round(st["elapsed_s"], 1), "world_size": self.info.world_size,
            "device": str(self.info.device), "precision": str(self.dtype or "fp32"),
            "torch": torch.__version__,
            **self._pretrain_summary(),
        }

    def _pretrain_summary(self) -> dict[str, Any]:
        from medvit.train.mae import SUMMARY

        path = self.run_dir / "pretrain" / SUMMARY
        if self.cfg.pretrain is None or not path.is_file():
            return {}
        done = read_json(path)
        return {"pretrain": done["method"], "pretrain_epochs": done["epochs"], "pretrain_seconds": done["seconds"]}
