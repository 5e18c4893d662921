"""MAE self-supervised pretraining: token bookkeeping, loss on masked patches only, and the weights hand-off."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch

from medvit._io import load_tensors, read_json, sha256_file
from medvit.config import PretrainConfig, load_config
from medvit.errors import ConfigError
from medvit.model.classifier import build_model
from medvit.runs import CONFIG
from medvit.train.mae import ENCODER, SUMMARY, MaskedAutoencoder, pretrain
from medvit.train.supervised import fit

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
PRETRAIN = ["pretrain.epochs=3", "pretrain.batch_size=8", "pretrain.decoder_dim=32", "pretrain.decoder_heads=2",
            "pretrain.warmup_epochs=1"]


def _mae(name: str, **cfg: object) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = timm.create_model(name, pretrained=False, num_classes=0, **TINY)
    return MaskedAutoencoder(encoder, PretrainConfig(decoder_dim=32, decoder_heads=2, **cfg)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["deit3_small_patch16_384", "vit_tiny_patch16_224"])
def test_encoding_every_patch_in_order_equals_the_timm_forward(name: str) -> None:
    """Both position-embedding layouts (DeiT3: none on cls; ViT: cls has one) are applied as timm does."""
    mae = _mae(name)
    x = torch.randn(2, 3, 32, 32)
    everything = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(mae.encode(x, everything), mae.encoder.forward_features(x), atol=1e-5)


def test_kept_tokens_are_the_chosen_patches_with_their_positions() -> None:
    mae = _mae("deit3_small_patch16_384")
    x = torch.randn(1, 3, 32, 32)
    keep = torch.tensor([[5, 0, 12]])
    with torch.no_grad():
        full = mae.encoder.patch_embed(x) + mae.encoder.pos_embed
        picked = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        mae.encoder.blocks = torch.nn.Sequential()  # isolate the token bookkeeping from attention
        mae.encoder.norm = torch.nn.Identity()
        assert torch.allclose(mae.encode(x, keep)[:, 1:], picked, atol=1e-6)


def test_patchify_is_row_major_over_the_patch_grid() -> None:
    mae = _mae("deit3_small_patch16_384")
    x = torch.randn(1, 3, 32, 32)
    patches = mae.patchify(x)
    assert patches.shape == (1, 16, 8 * 8 * 3)
    row, col = divmod(6, 4)  # patch 6 of a 4 x 4 grid
    expected = x[0, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 6], expected)


def test_loss_counts_only_masked_patches() -> None:
    """A prediction equal to the target on the masked patches scores zero, whatever it says about visible ones."""
    mae = _mae("deit3_small_patch16_384", mask_ratio=0.75)
    x = torch.randn(1, 3, 32, 32)
    seen: dict[str, torch.Tensor] = {}
    encode = mae.encode

    def spy(imgs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        seen["keep"] = keep
        return encode(imgs, keep)

    mae.encode = spy  # type: ignore[method-assign]
    with torch.no_grad():
        torch.manual_seed(2)
        loss = mae(x)
    keep = seen["keep"][0].tolist()
    assert len(keep) == 4  # 25 % of 16 patches are visible
    masked = sorted(set(range(16)) - set(keep))

    target = mae.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    fake = torch.randn_like(target) * 10
    fake[:, masked] = target[:, masked]
    mae.decode = lambda latent, restore: fake  # type: ignore[method-assign]
    with torch.no_grad():
        torch.manual_seed(2)  # the same mask
        assert mae(x).item() == pytest.approx(0.0, abs=1e-10)
    assert loss.item() > 0.1


def test_non_vit_backbones_are_refused_with_a_clear_error() -> None:
    encoder = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    with pytest.raises(ConfigError, match="ViT/DeiT-style"):
        MaskedAutoencoder(encoder, PretrainConfig())


def test_pretraining_learns_and_its_encoder_loads_through_weights_file(dev_subset_csv: Path, dev_images: Path,
                                                                       tmp_path: Path) -> None:
    cfg = load_config(SMOKE, [f"data.labels_csv={dev_subset_csv}", f"data.images_root={dev_images}",
                              *PRETRAIN, "pretrain.epochs=12", "pretrain.lr=2e-3"])
    encoder = pretrain(cfg, tmp_path / "mae")
    with (tmp_path / "mae" / "metrics.csv").open() as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0]
    summary = read_json(tmp_path / "mae" / SUMMARY)
    assert summary["train_images"] == 24  # the train split only: no val patient is ever seen
    assert summary["encoder_sha256"] == sha256_file(encoder)

    saved = load_tensors(encoder)
    model_cfg = cfg.model.model_copy(update={"pretrained": True, "weights_file": encoder})
    net = build_model(model_cfg, num_classes=14)
    loaded = net.backbone.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_train_runs_the_pretraining_stage_first_and_resume_skips_it(dev_subset_csv: Path, dev_images: Path,
                                                                    tmp_path: Path) -> None:
    cfg = load_config(SMOKE, [f"data.labels_csv={dev_subset_csv}", f"data.images_root={dev_images}", *PRETRAIN,
                              "train.epochs=2"])
    run = fit(cfg, out_dir=tmp_path / "run", stop_after=1)
    encoder = run / "pretrain" / ENCODER
    assert encoder.is_file() and (run / "pretrain" / "metrics.csv").is_file()
    saved = read_json(run / CONFIG)["config"]["model"]
    assert saved["pretrained"] is True and Path(saved["weights_file"]) == encoder
    stamp = encoder.stat().st_mtime_ns
    fit(cfg, resume=run)
    assert encoder.stat().st_mtime_ns == stamp  # not pretrained again
    summary = read_json(run / "train_summary.json")
    assert summary["epochs_run"] == 2 and summary["pretrain"] == "mae" and summary["pretrain_epochs"] == 3


def test_pretrain_command(dev_subset_csv: Path, dev_images: Path, tmp_path: Path, capsys) -> None:
    from medvit.cli import main

    data = ["--set", f"data.labels_csv={dev_subset_csv}", "--set", f"data.images_root={dev_images}"]
    assert main(["pretrain", "-c", str(SMOKE), "--out", str(tmp_path / "none"), *data]) == 2
    assert "no 'pretrain' section" in capsys.readouterr().err
    args = ["pretrain", "-c", str(SMOKE), "--out", str(tmp_path / "mae"), *data]
    for o in PRETRAIN:
        args += ["--set", o]
    assert main(args) == 0
    assert f"model.weights_file={tmp_path / 'mae' / ENCODER}" in capsys.readouterr().out
    assert main(args) == 2
    assert "already holds a pretrained encoder" in capsys.readouterr().err
