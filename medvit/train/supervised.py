"""Supervised training: `fit(cfg)` trains a multi-label classifier and leaves a self-describing run folder.

The task plugged into the shared engine (`medvit.train.engine`): masked multi-label loss on MixUp/CutMix
batches, AdamW with layer-wise LR decay (timm), EMA. Each epoch validates (mean AUROC drives early stopping
and the best checkpoint); the engine does the loop, resume state, metrics log and DDP.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from medvit._io import read_json, write_json
from medvit.config import Config, MixupConfig
from medvit.data.datasets import XrayDataset
from medvit.data.splits import load_splits
from medvit.data.transforms import build_transforms, resolve_preprocessing
from medvit.errors import ConfigError
from medvit.evaluate.metrics import mean_auroc
from medvit.model.classifier import build_model
from medvit.model.losses import MaskedMultiLabelLoss, pos_weight_from_labels
from medvit.model.weights import starting_weights
from medvit.runs import (
    PRETRAIN_SUMMARY,
    SUMMARY,
    WEIGHTS,
    model_build_args,
    save_backbone_config,
    save_timm_backbone,
    save_weights,
    write_run_config,
)
from medvit.train.distributed import DistInfo, barrier, cleanup, init_distributed
from medvit.train.engine import Engine, LoopConfig, autocast, resolve_precision, seed_everything
from medvit.train.frozen import FrozenFeatures, TrainableSuffix
from medvit.train.mae import ENCODER, pretrain
from medvit.train.resume import STATE
from medvit.train.task import Task

_log = logging.getLogger(__name__)


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: MixupConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp / CutMix for multi-label targets: mix the label vectors with the same lambda as the pixels.

    timm's `Mixup` one-hot encodes class indices, which is wrong for multi-hot targets, so only its
    box helper is reused. An entry unknown (NaN) in either image stays NaN, i.e. masked in the loss.
    Uses numpy's global RNG, which is seeded and saved in the resume state.
    """
    if not cfg.enabled or np.random.rand() >= cfg.prob:
        return x, y
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or np.random.rand() < cfg.switch_prob)
    lam = float(np.random.beta(cfg.cutmix_alpha, cfg.cutmix_alpha) if use_cutmix
                else np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    x_flip, y_flip = x.flip(0), y.flip(0)
    if use_cutmix:
        (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(x.shape, lam, correct_lam=True)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x_flip[:, :, y0:y1, x0:x1]
    else:
        x = x * lam + x_flip * (1 - lam)
    return x, y * lam + y_flip * (1 - lam)


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
        cfg = _with_pretraining(cfg, run_dir, info)
        task = _Supervised(cfg, info, run_dir)
        engine = task.engine()
        if resume is not None:
            engine.resume()
        elif info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(run_dir, cfg.model_dump(mode="json"), task.findings, task.preprocessing,
                             model_build_args(cfg.model, len(task.findings)), starting_weights(task.model))
            save_backbone_config(run_dir, task.model)  # a transformers encoder's config: the run reloads offline
        barrier(info)
        task.log_start(engine)
        try:
            engine.run(stop_after)
        except KeyboardInterrupt:
            if info.is_main:  # the last finished epoch's resume state is on disk: say so, and how to go on
                write_json(run_dir / SUMMARY, task.summary(engine, interrupted=True))
            raise KeyboardInterrupt(f"{run_dir} is incomplete ({engine.state['epoch']} of {cfg.train.epochs} epochs "
                                    f"done); continue it with: medvit train --resume {run_dir}") from None
        if info.is_main:
            write_json(run_dir / SUMMARY, task.summary(engine))
        return run_dir
    finally:
        cleanup(info)


def _with_pretraining(cfg: Config, run_dir: Path, info: DistInfo) -> Config:
    """Run the config's self-supervised stage once per run folder, then start the model from its encoder.

    The encoder is loaded through the ordinary `model.weights_file` path, so the saved config says exactly
    which weights training started from, and `--resume` finds the stage already done.
    """
    if cfg.pretrain is None:
        return cfg
    encoder = run_dir / "pretrain" / ENCODER
    if not encoder.is_file():
        if info.is_main:
            pretrain(cfg, encoder.parent)
        barrier(info)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": True, "weights_file": encoder})})


class _Supervised(Task):
    """Data, model, loss and validation of one supervised run; `engine()` wires them into the shared loop."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path) -> None:
        t = cfg.train
        if t.batch_size % (info.world_size * t.accum_steps):
            raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by world size {info.world_size} "
                              f"x accum_steps {t.accum_steps}")
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        seed_everything(cfg.seed, t.deterministic)
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.splits = load_splits(cfg)
        self.findings = list(cfg.data.findings)
        net = build_model(cfg.model, len(self.findings)).to(info.device)
        super().__init__(net)
        self.preprocessing = resolve_preprocessing(net.backbone)
        self.dtype = resolve_precision(t.precision, info.device)

        train_ds = XrayDataset(self.splits.train, self.findings, build_transforms(self.preprocessing, train=True,
                               aug=cfg.data.augment), cache=cfg.data.cache, seed=cfg.seed)
        val_ds = XrayDataset(self.splits.val, self.findings, build_transforms(self.preprocessing, train=False),
                             cache=cfg.data.cache)
        labels = train_ds.labels
        if t.cache_frozen_features:
            train_ds = self._frozen_features(train_ds)
        self.train_loader = self._train_loader(train_ds)
        self.val_loader: DataLoader = DataLoader(val_ds, batch_size=t.eval_batch_size,  # type: ignore[arg-type]
                                                 num_workers=cfg.data.num_workers)
        pos_weight = pos_weight_from_labels(labels, t.loss.pos_weight_max)
        self.criterion = MaskedMultiLabelLoss(t.loss, pos_weight).to(info.device)
        self.ema = ModelEmaV3(self.model, decay=t.ema.decay, use_warmup=t.ema.warmup) if t.ema.enabled else None
        if t.cache_frozen_features:  # the step runs only the trainable suffix, on cached prefix tokens
            self.step_model = TrainableSuffix(self.model)
        self.state = {"best_score": -math.inf, "best_epoch": -1, "best_val_mean_auroc": math.nan, "bad_epochs": 0,
                      "saved_epoch": -1, "saved_val_mean_auroc": math.nan}

    def _train_loader(self, ds: Any) -> DataLoader:
        # A DistributedSampler even on one process: its permutation depends only on (seed, epoch), so a
        # single-process run and an N-rank run see the same global batches.
        t, info = self.cfg.train, self.info
        sampler: DistributedSampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank,
                                                         shuffle=True, seed=self.cfg.seed)
        # Not persistent: workers must pick up the dataset's epoch (its augmentation seed) each epoch.
        return DataLoader(ds, batch_size=t.batch_size // (info.world_size * t.accum_steps), sampler=sampler,
                          num_workers=0 if t.cache_frozen_features else self.cfg.data.num_workers, drop_last=False)

    def _frozen_features(self, train_ds: Any) -> Any:
        """The train split as cached frozen-prefix tokens (`train.cache_frozen_features`)."""
        t = self.cfg.train
        if self.cfg.data.augment.enabled or t.mixup.enabled:
            raise ConfigError("train.cache_frozen_features needs data.augment.enabled: false and no MixUp: "
                              "the frozen prefix output must be the same every epoch")
        return FrozenFeatures.build(self.model, train_ds, batch_size=t.eval_batch_size,
                                    num_workers=self.cfg.data.num_workers, device=self.info.device,
                                    autocast_dtype=self.dtype)

    def engine(self) -> Engine:
        """The shared loop over this task, with the run's optimizer (layer-wise LR decay) and schedule."""
        t = self.cfg.train
        optimizer = create_optimizer_v2(self.model, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay,
                                        layer_decay=t.layer_decay)
        loop = LoopConfig(epochs=t.epochs, accum_steps=t.accum_steps, clip_grad=t.clip_grad,
                          warmup_epochs=t.warmup_epochs, warmup_lr=t.warmup_lr, min_lr=t.min_lr, dtype=self.dtype,
                          progress=self.cfg.log.progress, tensorboard=self.cfg.log.tensorboard,
                          hint="Lower train.lr, keep train.clip_grad on, or use train.precision: fp32")
        return Engine(self, optimizer, self.train_loader, loop, self.run_dir, info=self.info, ema=self.ema)

    def log_start(self, engine: Engine) -> None:
        sp = self.splits
        _log.info("train %d images / %d patients, val %d / %d; %d updates per epoch, precision %s, world size %d",
                  len(sp.train), sp.train["patient_id"].nunique(), len(sp.val), sp.val["patient_id"].nunique(),
                  engine.updates_per_epoch, self.dtype or "fp32", self.info.world_size)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        x, y = mix_batch(x.to(self.info.device), y.to(self.info.device), self.cfg.train.mixup)
        return self.criterion(self.step_model(x), y)

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None and self.cfg.train.ema.evaluate else self.model

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Validate; track the best epoch and save `model.safetensors` when it improved (or always, select=last)."""
        probs, labels = predict_probs(self._eval_model(), self.val_loader, self.info.device, self.dtype)
        logits = torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6))
        val_loss = float(self.criterion(logits, torch.from_numpy(labels).to(logits.device)))
        auroc, per = mean_auroc(labels, probs, self.findings)
        score = auroc if math.isfinite(auroc) else -val_loss
        st = self.state
        improved = score > st["best_score"]
        if improved:
            st.update(best_score=score, best_epoch=epoch, best_val_mean_auroc=auroc, bad_epochs=0)
        else:
            st["bad_epochs"] += 1
        if improved or self.cfg.train.select == "last":
            save_weights(self.run_dir / WEIGHTS, self._eval_model())
            save_timm_backbone(self.run_dir, self._eval_model())  # the model card's `library_name: timm`
            st["saved_epoch"], st["saved_val_mean_auroc"] = epoch, auroc
        _log.info("epoch %d: val loss %.4f, val mean AUROC %.4f%s", epoch, val_loss, auroc,
                  " *best*" if improved else "")
        return {"val_loss": val_loss, "val_mean_auroc": auroc, "best": int(improved),
                **{f"auroc/{f}": per.get(f, math.nan) for f in self.findings}}

    def should_stop(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        stop = patience is not None and self.state["bad_epochs"] >= patience
        if stop:
            _log.info("early stopping: no improvement for %d epochs (best epoch %d)", patience,
                      self.state["best_epoch"])
        return stop

    def summary(self, engine: Engine, interrupted: bool = False) -> dict[str, Any]:
        """train_summary.json: whether the run is complete (and how to resume it if not), what was trained on, the
        best and saved epochs, time and environment."""
        sp, st = self.splits, {**self.state, **engine.state}
        patience = self.cfg.train.early_stopping_patience
        stopped_early = patience is not None and st["bad_epochs"] >= patience
        complete = not interrupted and (st["epoch"] >= self.cfg.train.epochs or stopped_early)
        return {
            "complete": complete, "interrupted": interrupted, "epochs_planned": self.cfg.train.epochs,
            **({} if complete else {"resume": f"medvit train --resume {self.run_dir}"}),
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
        path = self.run_dir / "pretrain" / PRETRAIN_SUMMARY
        if self.cfg.pretrain is None or not path.is_file():
            return {}
        done = read_json(path)
        return {"pretrain": done["method"], "pretrain_epochs": done["epochs"], "pretrain_seconds": done["seconds"]}
