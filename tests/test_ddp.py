"""DDP: two gloo CPU processes under torchrun train the same weights as one process on the same global batches."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medvit._io import load_tensors, read_json
from medvit.train.resume import LAST

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
# Per-rank randomness (augmentation, MixUp pairing, dropout, drop-path) cannot match a single process: off.
SAME = ["data.augment.enabled=false", "model.drop_path_rate=0.0", "model.head_dropout=0.0",
        "train.mixup.mixup_alpha=0.0",
        "train.epochs=2", "train.batch_size=8"]


def _train(out: Path, overrides: list[str], launcher: list[str], env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """`medvit train` on the smoke config in its own process(es), as a user runs it."""
    cmd = [*launcher, "-m", "medvit", "train", "-c", str(SMOKE), "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(dev_subset_csv: Path, dev_images: Path, tmp_path: Path) -> None:
    overrides = [f"data.labels_csv={dev_subset_csv}", f"data.images_root={dev_images}", *SAME]
    single = tmp_path / "single"
    _train(single, overrides, [sys.executable])

    ddp = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = _train(ddp, overrides, torchrun, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert "world size 2" in proc.stderr
    assert read_json(ddp / "train_summary.json")["world_size"] == 2

    a, b = load_tensors(single / LAST), load_tensors(ddp / LAST)
    compared = 0
    for k in a:
        if k.startswith(("model.", "ema.", "optim.")):
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
            compared += 1
    assert compared > 50
    # training really moved the weights, so the match is not trivially the initialisation
    init = tmp_path / "init"
    _train(init, overrides + ["train.epochs=1", "train.lr=1e-12"], [sys.executable])
    moved = load_tensors(init / LAST)
    assert not torch.allclose(moved["model.head.fc2.weight"], a["model.head.fc2.weight"], atol=1e-4)
    with (single / "metrics.csv").open() as f1, (ddp / "metrics.csv").open() as f2:
        rows_single, rows_ddp = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert len(rows_single) == len(rows_ddp) == 2
    for r1, r2 in zip(rows_single, rows_ddp, strict=True):  # the logged train loss is averaged over ranks
        assert float(r2["train_loss"]) == pytest.approx(float(r1["train_loss"]), rel=1e-4)
        assert float(r2["val_mean_auroc"]) == pytest.approx(float(r1["val_mean_auroc"]), abs=1e-3)
