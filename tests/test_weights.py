"""Strict, reported loading of starting weights: timm files, medvit run folders, wrong files, shape mismatches,
and the record of what was loaded in config.json, train_summary.json and the model card."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from medvit.cli import main
from medvit.config import ModelConfig, load_config
from medvit.errors import CheckpointError, WeightsNotFoundError
from medvit.evaluate.modelcard import write_model_card
from medvit.model.classifier import build_model
from medvit.model.weights import starting_weights
from medvit.runs import CONFIG, SUMMARY, save_weights, write_run_config
from medvit.train.engine import Engine
from medvit.train.supervised import fit

TINY = {"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 64}
FAMILY = "deit3_small_patch16_384"
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def cfg(**kw) -> ModelConfig:
    base = {"name": FAMILY, "pretrained": True, "model_kwargs": dict(TINY), "drop_path_rate": 0.0,
            "freeze_blocks": 0, "freeze_stem": False}
    return ModelConfig(**{**base, **kw})


@pytest.fixture
def timm_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random-init timm checkpoint of the real family, with its 1000-class head, as timm's hub ships it."""
    torch.manual_seed(3)
    source = timm.create_model(FAMILY, pretrained=False, **TINY)
    path = tmp_path / "pretrained" / "model.safetensors"
    path.parent.mkdir()
    save_file(source.state_dict(), str(path))
    return path, source.state_dict()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_timm_file_loads_every_backbone_tensor_and_reports_it(timm_file, caplog) -> None:
    path, source = timm_file
    with caplog.at_level(logging.INFO, logger="medvit.model.weights"):
        model = build_model(cfg(weights_file=path), 3)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, source[k]), k
    record = starting_weights(model)
    assert record is not None
    n_backbone = len(model.backbone.state_dict())
    assert record["loaded"] == n_backbone and record["missing"] == 0
    assert record["unexpected_head"] == 2  # timm's 1000-class head.weight / head.bias, dropped on purpose
    assert record["sha256"] == _sha(path) and record["file"] == str(path.resolve())
    assert f"{n_backbone} tensors loaded, 0 missing, 2 head tensors left out" in caplog.text


def test_weights_file_implies_pretrained(timm_file) -> None:
    path, source = timm_file
    config = cfg(pretrained=False, weights_file=path)
    assert config.pretrained is True
    model = build_model(config, 2)
    assert torch.equal(model.backbone.pos_embed, source["pos_embed"])
    assert starting_weights(build_model(cfg(pretrained=False), 2)) is None


def test_an_unrelated_safetensors_file_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError) as e:
        build_model(cfg(weights_file=path), 2)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "0 of " in msg and "missing cls_token, pos_embed, patch_embed.proj.weight (+" in msg
    unexpected = msg.split("; unexpected ")[1]
    assert "encoder.layer.0.weight" in unexpected and "decoder.bias" in unexpected


def test_a_missing_backbone_tensor_is_refused(timm_file, tmp_path: Path) -> None:
    path, source = timm_file
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in source.items() if k != "blocks.2.norm1.weight"}, str(partial))
    with pytest.raises(CheckpointError, match=r"missing blocks\.2\.norm1\.weight$|missing blocks\.2\.norm1\.weight;"):
        build_model(cfg(weights_file=partial), 2)


def test_another_embed_dim_is_one_complete_line_without_hub_advice(timm_file) -> None:
    path, _ = timm_file
    with pytest.raises(CheckpointError) as e:
        build_model(cfg(weights_file=path, model_kwargs={**TINY, "embed_dim": 32}), 2)
    msg = str(e.value)
    assert "\n" not in msg and "huggingface" not in msg and "download" not in msg
    assert "first cls_token is 1x1x64 in the file but 1x1x32 in the model" in msg
    assert "model.model_kwargs" in msg


def test_a_medvit_run_folder_or_its_weights_start_another_run(tmp_path: Path) -> None:
    torch.manual_seed(4)
    trained = build_model(cfg(pretrained=False), 5)
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / "model.safetensors", trained)
    write_run_config(run, {}, ["Effusion"] * 5, {}, {"name": FAMILY})
    for source, kind in ((run, "run folder"), (run / "model.safetensors", "file")):
        model = build_model(cfg(weights_file=source), 3)
        for k, v in trained.backbone.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[k], v), k
        record = starting_weights(model)
        assert record is not None and record["source"] == kind
        assert record["unexpected_head"] == 2  # the run's own head (head.weight, head.bias) is not the backbone's
        assert record["sha256"] == _sha(run / "model.safetensors")


def test_a_folder_without_weights_and_a_missing_file_say_so(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="is a folder without model.safetensors"):
        build_model(cfg(weights_file=tmp_path), 2)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_model(cfg(weights_file=tmp_path / "nope.safetensors"), 2)


def test_a_truncated_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="is not a readable weights file") as e:
        build_model(cfg(weights_file=path), 2)
    assert "\n" not in str(e.value)


def test_training_records_the_starting_weights_and_an_interrupted_run_says_how_to_resume(
        timm_file, dev_subset_csv: Path, dev_images: Path, tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    path, _ = timm_file
    config = load_config(SMOKE, [f"data.labels_csv={dev_subset_csv}", f"data.images_root={dev_images}",
                                 f"model.weights_file={path}", "model.pretrained=false", "train.epochs=3"])
    run = tmp_path / "run"
    real_epoch = Engine._train_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Engine, "_train_epoch", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt, match=f"1 of 3 epochs done.*medvit train --resume {run}"):
        fit(config, out_dir=run)
    saved = json.loads((run / CONFIG).read_text())
    assert saved["starting_weights"]["sha256"] == _sha(path) and saved["config"]["model"]["pretrained"] is True
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["complete"] is False and summary["interrupted"] is True and summary["epochs_run"] == 1
    assert summary["resume"] == f"medvit train --resume {run}"
    card = write_model_card(run).read_text()
    assert _sha(path) in card and "Incomplete run:** 1 of 3" in card

    with caplog.at_level(logging.WARNING, logger="medvit.runs"):
        assert main(["export", "--run", str(run), "--format", "torchscript"]) == 0
    assert "incomplete run (1 of 3 epochs, interrupted)" in caplog.text

    monkeypatch.setattr(Engine, "_train_epoch", real_epoch)
    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["complete"] is True and "resume" not in summary and summary["epochs_run"] == 3
    capsys.readouterr()
