"""Run-folder I/O: atomic writes, load_run without YAML, pickle refusal, exact resume state."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.utils import ModelEmaV3

from medvit._io import PICKLE_SUFFIXES, load_tensors, read_json, sha256_file, write_json
from medvit.config import ModelConfig
from medvit.errors import CheckpointError
from medvit.model.classifier import build_model
from medvit.runs import CONFIG, WEIGHTS, load_run, model_build_args, save_weights, write_run_config
from medvit.train.resume import STATE, load_resume_state, save_resume_state

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion"]
PREP = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}


def tiny() -> ModelConfig:
    return ModelConfig(name="deit3_small_patch16_384", pretrained=False, freeze_blocks=1, head="mlp", head_hidden=16,
                       model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64})


def make_run(tmp_path: Path, dtype: torch.dtype | None = None) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg, len(FINDINGS)).eval()
    run = tmp_path / "run"
    write_run_config(run, {"seed": 0}, FINDINGS, PREP, model_build_args(cfg, len(FINDINGS)))
    save_weights(run / WEIGHTS, model, dtype=dtype)
    return run, model


def test_load_run_rebuilds_the_model_from_json_alone(tmp_path: Path) -> None:
    run, model = make_run(tmp_path)
    loaded, info = load_run(run)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training
    assert info.findings == tuple(FINDINGS) and info.preprocessing == PREP
    assert info.model_name == "deit3_small_patch16_384"
    assert info.weights_sha256 == sha256_file(run / WEIGHTS) and len(info.weights_sha256) == 64
    assert all(p.requires_grad for p in loaded.parameters())  # inference model: nothing frozen, nothing special


def test_half_precision_storage_loads_back_as_float32(tmp_path: Path) -> None:
    run, model = make_run(tmp_path, dtype=torch.float16)
    full = tmp_path / "full.safetensors"
    save_weights(full, model)
    assert (run / WEIGHTS).stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_run(run)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded.head.fc2.weight, model.head.fc2.weight, atol=1e-3, rtol=1e-3)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    run, model = make_run(tmp_path)
    (run / WEIGHTS).unlink()
    torch.save(model.state_dict(), run / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt.*refuses"):
        load_run(run)
    with pytest.raises(CheckpointError, match="pickle"):
        load_tensors(run / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_run(run, weights="model.pt")


def test_mismatched_or_broken_run_folders(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    (run / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_run(run)
    run2, _ = make_run(tmp_path / "b")
    meta = read_json(run2 / CONFIG)
    meta["model"]["model_kwargs"]["embed_dim"] = 32
    write_json(run2 / CONFIG, meta)
    with pytest.raises(CheckpointError, match="does not match"):
        load_run(run2)
    (run2 / CONFIG).write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_run(run2)
    with pytest.raises(CheckpointError, match="not found"):
        load_run(tmp_path / "nowhere")


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "calibration.json"
    write_json(target, {"v": 1})
    assert oct(target.stat().st_mode & 0o777) == "0o644"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError, match="disk full.*previous calibration.json is unchanged"):
        write_json(target, {"v": 2})
    assert read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]  # no temp file left behind


def _trained(seed: int):
    torch.manual_seed(seed)
    model = build_model(tiny(), len(FINDINGS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.8, 0.95))
    ema = ModelEmaV3(model, decay=0.9)
    for step in range(2):
        model(torch.randn(2, 3, 64, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, step=step + 1)
    return model, opt, ema


def test_resume_state_round_trip_restores_model_optimizer_ema_and_rng(tmp_path: Path) -> None:
    model, opt, ema = _trained(0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    save_resume_state(tmp_path, model, opt, ema, {"epoch": 3, "global_step": 6})
    expected = (torch.rand(3), np.random.rand(3), random.random())

    model2, opt2, ema2 = _trained(1)  # different weights and RNG state
    state = load_resume_state(tmp_path, model2, opt2, ema2)
    assert state["epoch"] == 3 and state["global_step"] == 6
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["betas"] == (0.8, 0.95)
    for idx in s1["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][idx][k], s2["state"][idx][k])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    assert not any(p.suffix in PICKLE_SUFFIXES for p in tmp_path.iterdir())


def test_resume_detects_a_torn_write(tmp_path: Path) -> None:
    model, opt, ema = _trained(0)
    save_resume_state(tmp_path, model, opt, ema, {"epoch": 1})
    state = read_json(tmp_path / STATE)
    save_resume_state(tmp_path, model, opt, None, {"epoch": 2})  # new tensors...
    write_json(tmp_path / STATE, state)  # ...but the old state.json (crash between the two writes)
    with pytest.raises(CheckpointError, match="interrupted"):
        load_resume_state(tmp_path, model, opt, ema)
    with pytest.raises(CheckpointError, match="no resume state"):
        load_resume_state(tmp_path / "empty", model, opt, ema)


def test_shipped_demo_run_loads_and_is_small() -> None:
    demo = Path(__file__).resolve().parents[1] / "medvit" / "resources" / "demo"
    files = list(demo.iterdir())
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    assert not any(p.suffix in PICKLE_SUFFIXES for p in files)
    model, info = load_run(demo)
    size = info.preprocessing["input_size"]
    with torch.no_grad():
        out = model(torch.zeros(1, *size))
    assert out.shape == (1, len(info.findings)) == (1, 14) and torch.isfinite(out).all()
    summary = read_json(demo / "train_summary.json")
    # the fold-ensemble demo (issue 15): each of 337 dev images held out by exactly one of 3 members
    assert summary["ensemble"] == 3 and summary["val_images"] == 337 and summary["select"] == "last"
