"""Training on real dev images with configs/smoke.yaml: end to end, exact resume, divergence, losses, MixUp, CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medvit._io import load_tensors, read_json
from medvit.cli import main
from medvit.config import LossConfig, MixupConfig, load_config
from medvit.errors import ConfigError, NonFiniteLossError
from medvit.evaluate.metrics import mean_auroc
from medvit.findings import NIH_FINDINGS
from medvit.model.classifier import build_model
from medvit.model.losses import MaskedMultiLabelLoss, pos_weight_from_labels
from medvit.runs import CONFIG, load_run
from medvit.train.resume import LAST, STATE
from medvit.train.supervised import fit, mix_batch

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
# Exactly reproducible with augmentation, MixUp and drop path on: the dataset reseeds albumentations per sample.
EXACT = ["data.augment.enabled=true", "train.mixup.mixup_alpha=0.4", "model.drop_path_rate=0.1"]


def data_overrides(csv_path: Path, images: Path) -> list[str]:
    return [f"data.labels_csv={csv_path}", f"data.images_root={images}"]


def _read_metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_smoke_config_trains_end_to_end(dev_subset_csv: Path, dev_images: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["train", "-c", str(SMOKE), "--out", str(run), "--set", "log.tensorboard=true"]
    for o in data_overrides(dev_subset_csv, dev_images):
        args += ["--set", o]
    assert main(args) == 0
    assert '"train_images": 24' in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "last.safetensors", "state.json", "metrics.csv",
                 "train_summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = _read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["train_loss"])) and 0 <= float(r["val_mean_auroc"]) <= 1 for r in rows)
    meta = read_json(run / CONFIG)
    assert meta["findings"] == list(NIH_FINDINGS)
    assert meta["preprocessing"]["input_size"] == [3, 64, 64]
    assert meta["model"]["name"] == "deit3_small_patch16_384" and meta["model"]["num_classes"] == 14
    assert meta["config"]["train"]["epochs"] == 2
    summary = read_json(run / "train_summary.json")
    best = max(rows, key=lambda r: float(r["val_mean_auroc"]))
    assert summary["best_epoch"] == int(best["epoch"]) == summary["saved_epoch"]
    assert summary["train_patients"] == 24 and summary["val_images"] == 12

    # the run folder alone rebuilds the model; it scores a real image like the EMA weights it saved
    from medvit.data.datasets import XrayDataset, load_labels
    from medvit.data.transforms import build_transforms

    model, info = load_run(run)
    df = load_labels(dev_subset_csv, dev_images)
    x, _ = XrayDataset(df.head(2), info.findings, build_transforms(info.preprocessing, train=False))[0]
    with torch.no_grad():
        p = torch.sigmoid(model(x[None]))
    assert p.shape == (1, 14) and torch.all((p > 0) & (p < 1))

    # an existing run is not overwritten
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_continues_exactly(dev_subset_csv: Path, dev_images: Path, tmp_path: Path) -> None:
    cfg = load_config(SMOKE, data_overrides(dev_subset_csv, dev_images) + EXACT)
    straight = fit(cfg, out_dir=tmp_path / "straight")
    split = fit(cfg, out_dir=tmp_path / "split", stop_after=1)
    assert read_json(split / STATE)["epoch"] == 1
    fit(cfg, resume=split)
    for name in ("last.safetensors", "model.safetensors"):
        a, b = load_tensors(straight / name), load_tensors(split / name)
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("rng."):
                torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=f"{name}:{k}")
    ra, rb = _read_metrics(straight), _read_metrics(split)
    assert [r["epoch"] for r in rb] == ["1", "2"]
    assert [r["val_mean_auroc"] for r in ra] == [r["val_mean_auroc"] for r in rb]
    # resuming a finished run trains nothing more
    fit(cfg, resume=split)
    assert len(_read_metrics(split)) == 2


def test_resume_through_the_cli_uses_the_saved_config(dev_subset_csv: Path, dev_images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [a for o in data_overrides(dev_subset_csv, dev_images) + EXACT for a in ("--set", o)]
    assert main(["train", "-c", str(SMOKE), "--out", str(run), "--stop-after", "1", *sets]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in _read_metrics(run)] == ["1", "2"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        dev_subset_csv: Path, dev_images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real_forward = MaskedMultiLabelLoss.forward
    calls = {"n": 0}

    def flaky(self, logits, targets):
        calls["n"] += 1
        loss = real_forward(self, logits, targets)
        return loss * float("nan") if calls["n"] > 5 else loss  # epoch 1 = 3 train batches + 1 val call

    monkeypatch.setattr(MaskedMultiLabelLoss, "forward", flaky)
    cfg = load_config(SMOKE, data_overrides(dev_subset_csv, dev_images) + ["train.epochs=3"])
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 2.*last good checkpoint"):
        fit(cfg, out_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert read_json(run / STATE)["epoch"] == 1
    model, _ = load_run(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(_read_metrics(run)) == 1

    calls["n"] = 0
    sets = [a for o in data_overrides(dev_subset_csv, dev_images) for a in ("--set", o)]
    assert main(["train", "-c", str(SMOKE), "--out", str(tmp_path / "cli"), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss became nan")


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "train.lrr=1"], "train.lrr"),
    (["--set", "data.labels_csv=/nonexistent/labels.csv"], "labels CSV not found"),
    (["--set", "data.split.train_name=calib"], "need both 'calib' and 'val' rows"),
])
def test_user_errors_exit_2_with_one_line(dev_subset_csv: Path, dev_images: Path, tmp_path: Path, capsys,
                                          args: list[str], message: str) -> None:
    sets = [a for o in data_overrides(dev_subset_csv, dev_images) for a in ("--set", o)]
    assert main(["train", "-c", str(SMOKE), "--out", str(tmp_path / "r"), *sets, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_train_without_config_or_resume_is_a_usage_error(capsys) -> None:
    assert main(["train"]) == 2
    assert "needs -c CONFIG" in capsys.readouterr().err


# ---- losses, MixUp, metric: hand-computed examples ----

def test_masked_bce_ignores_nan_labels_hand_computed() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, -3.0, 0.5]])
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 1.0]])
    pos_weight = torch.tensor([2.0, 3.0, 1.5])
    loss = MaskedMultiLabelLoss(LossConfig(pos_weight=True), pos_weight)(logits, targets)

    def sp(z: float) -> float:  # softplus(z) = -log(sigmoid(-z))
        return math.log1p(math.exp(z))

    terms = [2.0 * sp(-0.0),      # (0,0): positive, pos_weight 2
             sp(-1.0),            # (0,2): negative -> log(1 + e^-1)... = softplus(-1)
             3.0 * sp(3.0),       # (1,1): positive with logit -3, pos_weight 3
             1.5 * sp(-0.5)]      # (1,2): positive, pos_weight 1.5
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    no_weight = MaskedMultiLabelLoss(LossConfig(pos_weight=False))(logits, targets)
    assert no_weight.item() == pytest.approx((sp(-0.0) + sp(-1.0) + sp(3.0) + sp(-0.5)) / 4, rel=1e-6)
    all_nan = MaskedMultiLabelLoss(LossConfig())(logits, torch.full_like(targets, float("nan")))
    assert all_nan.item() == 0.0


def test_focal_and_asymmetric_losses_reduce_to_bce_and_stay_masked() -> None:
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    targets = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])
    bce = MaskedMultiLabelLoss(LossConfig(pos_weight=False))(logits, targets)
    asl0 = MaskedMultiLabelLoss(LossConfig(name="asymmetric", gamma_pos=0, gamma_neg=0, clip=0))(logits, targets)
    assert asl0.item() == pytest.approx(bce.item(), rel=1e-5)
    focal0 = MaskedMultiLabelLoss(LossConfig(name="focal", gamma=0.0, alpha=0.5))(logits, targets)
    assert focal0.item() == pytest.approx(0.5 * bce.item(), rel=1e-5)
    focal2 = MaskedMultiLabelLoss(LossConfig(name="focal", gamma=2.0, alpha=0.5))(logits, targets)
    assert focal2.item() < focal0.item()  # well-classified entries are down-weighted
    for cfg in (LossConfig(name="asymmetric"), LossConfig(name="focal")):
        assert torch.isfinite(MaskedMultiLabelLoss(cfg)(logits, targets))


def test_label_smoothing_moves_targets_towards_one_half() -> None:
    logits = torch.zeros(1, 2)
    smooth = MaskedMultiLabelLoss(LossConfig(pos_weight=False, label_smoothing=0.2))
    # at logit 0 BCE is log 2 whatever the target; check a non-zero logit instead
    z = torch.tensor([[4.0, -4.0]])
    y = torch.tensor([[1.0, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor([[0.9, 0.1]]))
    assert smooth(z, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert smooth(logits, y).item() == pytest.approx(math.log(2), rel=1e-6)


def test_pos_weight_from_training_counts() -> None:
    labels = np.array([[1, 0, np.nan], [0, 0, 1], [0, 0, 1], [0, np.nan, 0]], dtype=np.float32)
    w = pos_weight_from_labels(labels, max_weight=5.0)
    assert w.tolist() == pytest.approx([3.0, 5.0, 1.0])  # 3 neg / 1 pos; no positives -> max; 1/2 -> clipped to 1


def test_mixup_mixes_label_vectors_with_the_pixel_lambda_and_keeps_nan_masked() -> None:
    np.random.seed(0)
    x = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 0.0, 1.0]])
    xm, ym = mix_batch(x, y, MixupConfig(mixup_alpha=1.0, prob=1.0))
    lam = 1 - xm[0, 0, 0, 0].item()  # image 0 (zeros) mixed with image 1 (ones): pixel = 1 - lam
    assert 0 < lam < 1
    assert ym[0, 0].item() == pytest.approx(lam) and ym[1, 0].item() == pytest.approx(1 - lam)
    assert ym[0, 1].item() == 0.0
    assert torch.isnan(ym[:, 2]).all()  # unknown in one of the two images -> unknown after mixing
    xc, yc = mix_batch(x, y, MixupConfig(cutmix_alpha=1.0, prob=1.0))
    area = xc[0, 0].mean().item()  # fraction of image 0 replaced by the ones of image 1
    assert yc[0, 0].item() == pytest.approx(1 - area)
    same_x, same_y = mix_batch(x, y, MixupConfig())
    assert same_x is x and same_y is y


def test_mean_auroc_skips_findings_without_both_classes() -> None:
    labels = np.array([[1, 0, np.nan], [0, 0, 1], [1, 0, 0], [0, 0, np.nan]], dtype=np.float32)
    scores = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.25, 0.2, 0.1], [0.3, 0.5, 0.9]])
    mean, per = mean_auroc(labels, scores, ["a", "b", "c"])
    assert per == {"a": pytest.approx(0.75), "c": pytest.approx(1.0)}
    assert mean == pytest.approx(0.875)
    assert math.isnan(mean_auroc(labels[:, 1:2], scores[:, 1:2], ["b"])[0])


def test_gradient_accumulation_matches_the_full_batch(dev_subset_csv: Path, dev_images: Path, tmp_path: Path) -> None:
    base = data_overrides(dev_subset_csv, dev_images) + [
        "data.augment.enabled=false", "model.drop_path_rate=0.0", "model.head_dropout=0.0", "train.epochs=1"]
    full = fit(load_config(SMOKE, base), out_dir=tmp_path / "full")
    accum = fit(load_config(SMOKE, base + ["train.accum_steps=2"]), out_dir=tmp_path / "accum")
    a, b = load_tensors(full / LAST), load_tensors(accum / LAST)
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    assert read_json(full / STATE)["global_step"] == read_json(accum / STATE)["global_step"] == 3


def test_patient_wise_assigned_split(dev_labels: Path, dev_images: Path) -> None:
    from medvit.data.splits import load_splits

    cfg = load_config(SMOKE, data_overrides(dev_labels, dev_images) + [
        "data.split.policy=assign", "data.split.val=0.2", "data.split.calib=0.1", "data.split.seed=3"])
    splits = load_splits(cfg)
    assert not set(splits.train["patient_id"]) & set(splits.val["patient_id"])
    n = len(splits.train) + len(splits.val)
    assert 0.15 < len(splits.val) / 337 < 0.25 and n < 337  # the calib share is held out of both


def test_cached_frozen_features_train_like_the_naive_loop(dev_subset_csv: Path, dev_images: Path,
                                                          tmp_path: Path) -> None:
    # no dropout: building the cache draws from the global RNG, so dropout masks would differ, not the maths
    base = data_overrides(dev_subset_csv, dev_images) + ["data.augment.enabled=false", "train.epochs=1",
                                                         "model.head_dropout=0.0"]
    naive = fit(load_config(SMOKE, base), out_dir=tmp_path / "naive")
    cached = fit(load_config(SMOKE, base + ["train.cache_frozen_features=true"]), out_dir=tmp_path / "cached")
    a, b = load_tensors(naive / "last.safetensors"), load_tensors(cached / "last.safetensors")
    for k in a:
        if not k.startswith("rng."):
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)
    # the same weights, and they trained: the trainable suffix moved away from its initialisation, the prefix did not
    cfg = load_config(SMOKE, base)
    torch.manual_seed(cfg.seed)
    init = {f"model.{k}": v for k, v in build_model(cfg.model, len(cfg.data.findings)).state_dict().items()}
    changed = {k for k in init if not torch.equal(init[k], a[k])}
    frozen = {k for k in init if k.startswith(("model.backbone.patch_embed", "model.backbone.blocks.0."))}
    assert frozen and not changed & frozen
    assert len(changed) >= 0.9 * len(set(init) - frozen), sorted(set(init) - frozen - changed)
    with pytest.raises(ConfigError, match="augment.enabled: false"):
        fit(load_config(SMOKE, data_overrides(dev_subset_csv, dev_images) + ["train.cache_frozen_features=true"]),
            out_dir=tmp_path / "refused")
