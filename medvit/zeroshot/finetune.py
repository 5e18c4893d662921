"""Site alignment: contrastive fine-tuning of a CLIP on local image-text pairs (symmetric InfoNCE).

Texts are report sentences (a pairs CSV with `image` + `text` columns) or captions generated from labels through
the prompt templates (an NIH-format labels CSV: "chest x-ray with cardiomegaly and pleural effusion",
"no acute cardiopulmonary findings"). Label captions repeat, so every in-batch pair with the *same* text counts as a
positive (soft targets) instead of being pushed apart as a false negative. The image tower is partly frozen: only
its last blocks (and projection) adapt, which is what a few hundred local images can support.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medvit.errors import DatasetError
from medvit.findings import ALL_FINDINGS
from medvit.zeroshot.clip import ClipBackend
from medvit.zeroshot.prompts import PromptConfig

_log = logging.getLogger(__name__)

_MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: temperature never below 0.01


@dataclass(frozen=True)
class AlignConfig:
    """Fine-tuning hyper-parameters; `trainable_image_blocks=None` trains the whole image tower."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_steps: int = 10
    trainable_image_blocks: int | None = 2
    normalization: str = "model"
    seed: int = 0


def load_pairs(
    csv_path: str | os.PathLike[str], images_root: str | os.PathLike[str], prompts: PromptConfig,
    split: str | None = None,
) -> pd.DataFrame:
    """Image-text pairs as a frame with `path`, `text` and `variants` (alternative texts sampled in training).

    An NIH-format labels CSV (`Finding Labels`) becomes label captions (variants: the caption through every prompt
    template); otherwise the CSV needs an `image` (or `path`) column relative to `images_root` and a `text` column
    (one variant: the text itself). `split` keeps only rows of that split (see `select_pairs`).
    """
    return select_pairs(read_pairs(csv_path, images_root, prompts), split, csv_path)


def read_pairs(csv_path: str | os.PathLike[str], images_root: str | os.PathLike[str],
               prompts: PromptConfig) -> pd.DataFrame:
    """All pairs of the CSV (`load_pairs` without the split filter), with its `split` column when it has one."""
    from medvit.data.datasets import load_labels

    head = pd.read_csv(csv_path, nrows=0).columns
    if "Finding Labels" in head:
        df = load_labels(csv_path, images_root, ALL_FINDINGS)
        positives = df[list(ALL_FINDINGS)].to_numpy() == 1
        df["variants"] = [prompts.captions([f for f, p in zip(ALL_FINDINGS, row, strict=True) if p])
                          for row in positives]
        df["text"] = [v[0] for v in df["variants"]]
    else:
        df = pd.read_csv(csv_path)
        col = next((c for c in ("image", "path") if c in df.columns), None)
        if col is None or "text" not in df.columns:
            raise DatasetError(f"{csv_path}: a pairs CSV needs 'image' (or 'path') and 'text' columns, "
                               "or NIH 'Finding Labels' to caption from labels")
        root = Path(images_root).resolve()
        df["path"] = [str((root / str(p)).resolve()) for p in df[col]]
        missing = [p for p in df["path"] if not Path(p).is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of {csv_path} not found under {root}, e.g. {missing[0]}")
        df["text"] = df["text"].fillna("").astype(str).str.strip()
        df["variants"] = [(t,) for t in df["text"]]
    return df


def select_pairs(df: pd.DataFrame, split: str | None, csv_path: str | os.PathLike[str]) -> pd.DataFrame:
    """The non-empty pairs of `split` (all when None) as `path`, `text`, `variants`.

    Raises:
        DatasetError: `split` given but the CSV has no split column, or fewer than 2 pairs remain.
    """
    if split is not None:
        if "split" not in df.columns or df["split"].isna().all():
            raise DatasetError(f"{csv_path} has no 'split' column; drop --split or add one")
        df = df[df["split"] == split]
    df = df[df["text"] != ""].reset_index(drop=True)
    if len(df) < 2:
        raise DatasetError(f"{csv_path}: need at least 2 image-text pairs (split={split!r}), found {len(df)}")
    return df[["path", "text", "variants"]]


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, groups: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE on normalised embeddings; pairs of the same group (same caption) are all positives."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    ids = {t: i for i, t in enumerate(dict.fromkeys(groups))}
    code = torch.tensor([ids[t] for t in groups])
    same = (code[:, None] == code[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def preprocess_images(backend: ClipBackend, paths: list[str], normalization: str) -> torch.Tensor:
    """Decode each image once with read_image and apply the CLIP's preprocessing: (N, 3, H, W)."""
    from medvit.data.dicom import read_image

    return torch.stack([backend.preprocess(read_image(p).pixels, normalization)
                        for p in tqdm(paths, desc="images", leave=False)])


def _batch_loss(backend: ClipBackend, images: torch.Tensor, texts: list[str], groups: list[str]) -> torch.Tensor:
    img = backend.image_features(images)
    txt = backend.text_features(backend.tokenize(texts))
    return contrastive_loss(img, txt, backend.logit_scale().clamp(max=_MAX_LOGIT_SCALE), groups)


def evaluate_loss(backend: ClipBackend, images: torch.Tensor, texts: list[str], batch_size: int) -> float:
    """Mean contrastive loss over fixed (unshuffled) batches, without gradients: comparable before/after."""
    backend.model.eval()
    losses = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            if len(texts[s:s + batch_size]) >= 2:
                batch = texts[s:s + batch_size]
                losses.append(float(_batch_loss(backend, images[s:s + batch_size], batch, batch)))
    return float(np.mean(losses))


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def align(
    backend: ClipBackend,
    images: torch.Tensor,
    texts: list[str],
    cfg: AlignConfig,
    *,
    variants: Sequence[Sequence[str]] | None = None,
    val: tuple[torch.Tensor, list[str]] | None = None,
    log_csv: Path | None = None,
) -> list[dict[str, float]]:
    """Fine-tune `backend.model` in place; returns per-epoch {epoch, lr, train_loss, step_loss, val_loss}.

    Epoch 0 is the loss before any update. AdamW with linear warm-up then cosine decay; fp32 weights. With
    `variants`, each training step uses a random variant of each image's text; losses are reported on `texts`.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    backend.lock_image_tower(cfg.trainable_image_blocks)
    params = [p for p in backend.model.parameters() if p.requires_grad]
    _log.info("align: %d image-text pairs, %d trainable / %d parameters", len(texts), sum(p.numel() for p in params),
              sum(p.numel() for p in backend.model.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, cfg.warmup_steps, cfg.epochs * steps_per_epoch))

    def record(epoch: int, step_losses: list[float]) -> None:
        # train_loss: eval-mode loss on fixed batches, before any update and at the end (comparable numbers)
        row: dict[str, float] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
        if epoch in (0, cfg.epochs):
            row["train_loss"] = evaluate_loss(backend, images, texts, cfg.batch_size)
        if step_losses:
            row["step_loss"] = float(np.mean(step_losses))
        if val is not None:
            row["val_loss"] = evaluate_loss(backend, val[0], val[1], cfg.batch_size)
        _log.info("align epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        history.append(row)
        if log_csv is not None:
            _write_csv(log_csv, history)

    history: list[dict[str, float]] = []
    record(0, [])
    for epoch in range(1, cfg.epochs + 1):
        backend.model.train()
        order = list(range(len(texts)))
        rng.shuffle(order)
        batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        losses = []
        for idx in tqdm([b for b in batches if len(b) >= 2], desc=f"align epoch {epoch}", leave=False):
            # a sampled variant is encoded; positives are decided by the image's caption, not by the variant
            batch_texts = [rng.choice(variants[i]) if variants else texts[i] for i in idx]
            loss = _batch_loss(backend, images[idx], batch_texts, [texts[i] for i in idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        record(epoch, losses)
    backend.model.eval()
    return history


def _write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
