"""Site alignment: contrastive fine-tuning of a CLIP on local image-text pairs (symmetric InfoNCE).

Texts are report sentences (a pairs CSV with `image` + `text` columns) or captions generated from labels through
the prompt templates (an NIH-format labels CSV: "chest x-ray with cardiomegaly and pleural effusion",
"no acute cardiopulmonary findings"). Label captions repeat, so every in-batch pair with the *same* text counts as a
positive (soft targets) instead of being pushed apart as a false negative. The image tower is partly frozen: only
its last blocks (and projection) adapt, which is what a few hundred local images can support.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medvit._io import write_json
from medvit.data.datasets import load_labels, safe_path
from medvit.data.dicom import read_image
from medvit.errors import ConfigError, DatasetError
from medvit.findings import ALL_FINDINGS
from medvit.train.resume import STATE
from medvit.train.task import Task
from medvit.zeroshot.clip import ClipBackend
from medvit.zeroshot.prompts import PromptConfig

_log = logging.getLogger(__name__)

_MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: temperature never below 0.01

ALIGN_META = "align.json"


@dataclass(frozen=True)
class AlignConfig:
    """Fine-tuning hyper-parameters; `trainable_image_blocks=None` trains the whole image tower.

    `batch_size` pairs form one contrastive batch (in-batch negatives); `accum_steps` such batches make one
    optimizer update.
    """

    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-5
    min_lr: float = 0.0
    weight_decay: float = 0.1
    warmup_steps: int = 10
    accum_steps: int = 1
    clip_grad: float | None = None
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
        df["path"] = [safe_path(root, p) for p in df[col]]
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


class _PairBatches:
    """Shuffled batches of pair indices (batches of one pair are dropped: a contrastive loss needs two).

    The order of an epoch, and the text variant drawn for each pair, come from (seed, epoch) alone, so a
    resumed alignment sees exactly the batches an uninterrupted one would have.
    """

    def __init__(self, n: int, batch_size: int, variants: Sequence[Sequence[str]], seed: int) -> None:
        self.n, self.batch_size, self.variants, self.seed = n, batch_size, variants, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size + int(self.n % self.batch_size >= 2)

    def __iter__(self) -> Iterator[tuple[list[int], list[str]]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(self.n))
        rng.shuffle(order)
        for s in range(0, self.n, self.batch_size):
            idx = order[s:s + self.batch_size]
            if len(idx) >= 2:
                yield idx, [rng.choice(self.variants[i]) for i in idx]


class _AlignTask(Task):
    """The contrastive loss of a batch of pairs; evaluated in eval mode on fixed batches (comparable numbers)."""

    evaluate_before = True

    def __init__(self, backend: ClipBackend, images: torch.Tensor, texts: list[str], cfg: AlignConfig,
                 val: tuple[torch.Tensor, list[str]] | None) -> None:
        super().__init__(backend.model)
        self.backend, self.images, self.texts, self.cfg, self.val = backend, images, texts, cfg, val

    def loss(self, batch: tuple[list[int], list[str]]) -> torch.Tensor:
        # a sampled variant is encoded; positives are decided by the image's caption, not by the variant
        idx, batch_texts = batch
        return _batch_loss(self.backend, self.images[idx], batch_texts, [self.texts[i] for i in idx])

    def evaluate(self, epoch: int) -> dict[str, float]:
        row: dict[str, float] = {}
        if epoch in (0, self.cfg.epochs):  # before any update and at the end
            row["train_loss"] = evaluate_loss(self.backend, self.images, self.texts, self.cfg.batch_size)
        if self.val is not None:
            row["val_loss"] = evaluate_loss(self.backend, *self.val, self.cfg.batch_size)
        _log.info("align epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        return row


def align(
    backend: ClipBackend,
    images: torch.Tensor,
    texts: list[str],
    cfg: AlignConfig,
    *,
    variants: Sequence[Sequence[str]] | None = None,
    val: tuple[torch.Tensor, list[str]] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> list[dict[str, float]]:
    """Fine-tune `backend.model` in place on the shared training engine; returns the metrics rows.

    Rows: {epoch, step, lr, step_loss, val_loss, seconds}, plus `train_loss` (eval-mode loss on fixed batches)
    at epoch 0 (before any update) and at the last epoch. AdamW with linear warm-up then cosine decay (timm);
    fp32 weights. With `variants`, each training step uses a random variant of each image's text; losses are
    reported on `texts`. With `run_dir`, metrics.csv and an exact resume state are written every epoch, and
    `resume` continues from them.

    Raises:
        NonFiniteLossError: the contrastive loss became NaN/Inf (lower `lr`, or set `clip_grad`).
        CheckpointError: `resume` without a matching resume state in `run_dir`.
    """
    # the engine imports timm, which loads huggingface_hub: only once `--offline` has been applied
    from medvit.train.engine import Engine, LoopConfig

    torch.manual_seed(cfg.seed)
    backend.lock_image_tower(cfg.trainable_image_blocks)
    params = [p for p in backend.model.parameters() if p.requires_grad]
    _log.info("align: %d image-text pairs, %d trainable / %d parameters", len(texts), sum(p.numel() for p in params),
              sum(p.numel() for p in backend.model.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = _PairBatches(len(texts), cfg.batch_size, variants or [(t,) for t in texts], cfg.seed)
    loop = LoopConfig(epochs=cfg.epochs, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
                      warmup_steps=cfg.warmup_steps, warmup_lr=cfg.lr / max(1, cfg.warmup_steps), min_lr=cfg.min_lr,
                      desc="align epoch", loss_name="contrastive loss", loss_column="step_loss",
                      hint="lower --lr or set --clip-grad")
    engine = Engine(_AlignTask(backend, images, texts, cfg, val), opt, batches, loop, run_dir)
    if resume:
        engine.resume()
    history = engine.run(stop_after)
    backend.model.eval()
    return history


def load_alignment_pairs(csv_path: str | os.PathLike[str], images_root: str | os.PathLike[str], prompts: PromptConfig,
                         split: str | None, val_split: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Train pairs of `split` and validation pairs of `val_split` (None when absent), reading the CSV once."""
    pairs = read_pairs(csv_path, images_root, prompts)
    train = select_pairs(pairs, split, csv_path)
    if not val_split:
        return train, None
    try:
        return train, select_pairs(pairs, val_split, csv_path)
    except DatasetError as e:  # no split column, or fewer than 2 pairs in it: align without validation
        _log.warning("no validation pairs: %s", e)
        return train, None


def align_and_save(backend: ClipBackend, train: pd.DataFrame, val: pd.DataFrame | None, out_dir: Path,
                   cfg: AlignConfig, *, resume: bool = False, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `medvit align` pipeline: preprocess, align, save the model and `align.json` into `out_dir`.

    `out_dir` then loads like any other model (`--model DIR`). Returns the align.json content, which also
    records `meta` (e.g. where the pairs came from).

    Raises:
        ConfigError: `out_dir` already holds an alignment and `resume` is not set.
    """
    if not resume and ((out_dir / STATE).exists() or (out_dir / ALIGN_META).exists()):
        raise ConfigError(f"{out_dir} already holds an alignment; choose another --out or continue it with --resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    images = preprocess_images(backend, list(train["path"]), cfg.normalization)
    val_data = None if val is None else (preprocess_images(backend, list(val["path"]), cfg.normalization),
                                         list(val["text"]))
    history = align(backend, images, list(train["text"]), cfg, variants=list(train["variants"]), val=val_data,
                    run_dir=out_dir, resume=resume)
    result = {"source_model": str(backend.spec), **(meta or {}), "saved_as": save_model(backend, out_dir),
              "n_train": len(train), "n_val": 0 if val is None else len(val), "config": asdict(cfg),
              "history": history, "captions": pd.Series(train["text"]).value_counts().head(20).to_dict()}
    write_json(out_dir / ALIGN_META, result)
    return result


def save_model(backend: ClipBackend, out_dir: Path) -> str:
    """Save the backend's model into `out_dir` so that a reader never sees a half-written model; returns its spec.

    The backend writes into a staging folder first; each finished file is then renamed into `out_dir`.
    """
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=out_dir))
    try:
        spec = backend.save(staging)
        for item in staging.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return spec.replace(str(staging), str(out_dir))
