"""Backbones from transformers (`model.source: transformers`): tiny random-init ViT, DINOv2 and Swin encoders
written with save_pretrained and loaded through the real path (model.name = the folder). They train on real dev
images, calibrate, export, predict and serve the app from a run folder that reloads without network; freezing
by encoder blocks, layer decay, saliency and the offline errors are checked on the same models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    SwinConfig,
    SwinModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from medvit.cli import main
from medvit.config import ModelConfig, load_config
from medvit.data.transforms import build_transforms, resolve_preprocessing
from medvit.errors import CheckpointError, ConfigError, MedvitError
from medvit.model.classifier import build_model
from medvit.model.saliency import attention_rollout, grad_cam

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
KINDS = ("vit", "dinov2", "swin")
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
K = 3


def _encoder(kind: str) -> tuple[torch.nn.Module, object]:
    """A tiny random-init encoder of the real family (hidden 32, 2 blocks, 64 px) and its image processor."""
    torch.manual_seed(0)
    if kind == "vit":
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=64,
            patch_size=16,
        )
        return ViTModel(config), ViTImageProcessor(size={"height": 64, "width": 64})  # mean/std 0.5, bilinear
    if kind == "dinov2":
        config = Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64, patch_size=16
        )
        return Dinov2Model(config), BitImageProcessor(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64})
    config = SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=64, patch_size=4, window_size=4)
    return SwinModel(config), ViTImageProcessor(
        size={"height": 64, "width": 64}, image_mean=IMAGENET[0], image_std=IMAGENET[1], resample=3
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """kind -> a save_pretrained folder (config.json, model.safetensors, preprocessor_config.json)."""
    root = tmp_path_factory.mktemp("hf")
    for kind in KINDS:
        model, processor = _encoder(kind)
        model.save_pretrained(root / kind)
        processor.save_pretrained(root / kind)  # type: ignore[attr-defined]
    return {kind: root / kind for kind in KINDS}


def _go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode as `medvit --offline` sets it, every variable restored after the test."""
    for var in ("MEDVIT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")


def _cfg(folder: Path, **kw) -> ModelConfig:
    args = {"name": str(folder), "source": "transformers", "freeze_blocks": 0, "drop_path_rate": 0.0} | kw
    return ModelConfig(**args)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_preprocessing_comes_from_the_image_processor(hf_dirs):
    expected = {
        "vit": {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"},
        # DINOv2's processor resizes to 72 and centre-crops 64: the crop is the model input (letterboxed to it)
        "dinov2": {
            "input_size": [3, 64, 64],
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
        },
        "swin": {"input_size": [3, 64, 64], "mean": IMAGENET[0], "std": IMAGENET[1], "interpolation": "bicubic"},
    }
    for kind, folder in hf_dirs.items():
        net = build_model(_cfg(folder), K)
        pre = resolve_preprocessing(net)
        assert pre["input_size"] == expected[kind]["input_size"], kind
        assert pre["interpolation"] == expected[kind]["interpolation"], kind
        assert np.allclose(pre["mean"], expected[kind]["mean"]) and np.allclose(pre["std"], expected[kind]["std"]), kind
        grey = np.full((80, 100), 0.5, np.float32)
        out = build_transforms(pre, train=False)(grey)
        assert out.shape == (3, 64, 64)
        # the centre pixel is the grey level normalised with the processor's own mean/std
        assert torch.allclose(out[:, 32, 32], (0.5 - torch.tensor(pre["mean"])) / torch.tensor(pre["std"]), atol=1e-5)


def test_pretrained_weights_load_strictly(hf_dirs):
    saved = _encoder("dinov2")[0].state_dict()  # the weights the fixture wrote (same seed)
    net = build_model(_cfg(hf_dirs["dinov2"]), K)
    got = net.backbone.model.state_dict()
    assert set(got) == set(saved) - {"embeddings.mask_token"}  # masked-image pretraining only: dropped
    assert all(torch.equal(got[k], saved[k]) for k in got)
    fresh = build_model(_cfg(hf_dirs["dinov2"], pretrained=False), K).backbone.model.state_dict()
    assert not torch.equal(fresh["encoder.layer.0.mlp.fc1.weight"], saved["encoder.layer.0.mlp.fc1.weight"])

    with pytest.raises(CheckpointError, match=r"do not fill the Dinov2Model: \d+ missing") as info:  # a 3rd block
        build_model(_cfg(hf_dirs["dinov2"], model_kwargs={"num_hidden_layers": 3}), K)
    assert "encoder.layer.2" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(
        CheckpointError,
        match=r"Dinov2Model: 6 of another shape \(first encoder.layer.0.mlp.fc1.bias: \[64\] stored, \[128\] here\)",
    ) as info:  # wider MLPs
        build_model(_cfg(hf_dirs["dinov2"], model_kwargs={"mlp_ratio": 4}), K)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"\['embed_dim'\] are not in the dinov2 config"):
        build_model(_cfg(hf_dirs["dinov2"], model_kwargs={"embed_dim": 64}), K)
    with pytest.raises(ValueError, match="weights_file is for timm backbones"):
        _cfg(hf_dirs["vit"], weights_file=hf_dirs["vit"] / "model.safetensors")


@pytest.mark.parametrize("kind", KINDS)
def test_freezing_by_encoder_blocks_and_layer_decay(hf_dirs, kind, x):
    from timm.optim import create_optimizer_v2

    net = build_model(_cfg(hf_dirs[kind], freeze_blocks=1), K)
    blocks = net.backbone.blocks
    assert len(blocks) == 2
    layer = {n.removeprefix("backbone.model."): net.group_matcher()(n) for n, _ in net.named_parameters()}
    for name, lid in layer.items():
        if name.startswith("embeddings."):
            assert lid == 0, name
        elif name.startswith(blocks[0] + "."):
            assert lid == 1, name
        elif name.startswith(blocks[1] + "."):
            assert lid == 2, name
        elif name.startswith("layernorm."):
            assert lid == 3, name
    if kind == "swin":  # the patch merging after stage 0 belongs to that stage
        assert layer["encoder.layers.0.downsample.reduction.weight"] == 1
    frozen = {n.removeprefix("backbone.model.") for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, lid in layer.items() if lid in (0, 1)}
    assert any(n.startswith(blocks[1]) for n in layer) and not (frozen & {n for n in layer if n.startswith(blocks[1])})

    # one real optimizer step moves the trainable parameters only
    opt = create_optimizer_v2(net, opt="adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.75)
    scales = {round(g["lr_scale"], 4) for g in opt.param_groups}
    assert scales == {round(0.75**2, 4), 0.75, 1.0}  # block 1, final norm, head (frozen groups have no params)
    head_group = next(g for g in opt.param_groups if any(p is net.head.weight for p in g["params"]))
    assert head_group["lr_scale"] == 1.0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    net(x).sum().backward()
    opt.step()
    moved = {n.removeprefix("backbone.model.") for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not moved & frozen
    with pytest.raises(ConfigError, match="model.freeze_blocks=4 but .* has only 3 blocks"):  # 2 blocks + norm
        build_model(_cfg(hf_dirs[kind], freeze_blocks=4), K)


@pytest.mark.parametrize("kind", KINDS)
def test_saliency_rollout_where_attention_is_global_grad_cam_everywhere(hf_dirs, kind, x):
    net = build_model(_cfg(hf_dirs[kind]), K).eval()
    encoder = net.backbone.model
    assert encoder.config._attn_implementation == "sdpa"
    grid = (8, 8) if kind == "swin" else (4, 4)  # Swin's last stage is the 4-px patch grid merged once
    cams = [grad_cam(net, x, k) for k in range(K)]
    assert all(c.shape == (2, *grid) and (c >= 0).all() for c in cams)
    assert any(c.abs().sum() > 0 for c in cams) and not torch.allclose(cams[0], cams[1])
    if kind == "swin":
        with pytest.raises(MedvitError, match="no global attention.*use Grad-CAM"):
            attention_rollout(net, x)
    else:
        rel = attention_rollout(net, x)
        assert rel.shape == (2, *grid) and torch.isfinite(rel).all() and (rel > 0).all()
    assert encoder.config._attn_implementation == "sdpa"  # eager only for the rollout's forward
    assert not net.training


def _train(folder: Path, run: Path, csv: Path, images: Path, *extra: str) -> int:
    sets = [
        f"data.labels_csv={csv}",
        f"data.images_root={images}",
        "model.source=transformers",
        f"model.name={folder}",
        "model.pretrained=true",
        "model.model_kwargs={}",
        "train.epochs=1",
        "model.drop_path_rate=0.1",
        *extra,
    ]
    return main(["train", "-c", str(SMOKE), "--out", str(run), *(a for s in sets for a in ("--set", s))])


@pytest.mark.parametrize("kind", KINDS)
def test_train_calibrate_export_predict_and_serve_without_the_source_folder(
    kind, hf_dirs, dev_subset_csv, dev_images, cxr_dicom, tmp_path, monkeypatch, capsys
):
    from medvit.inference.predictor import Predictor
    from medvit.review.service import ReviewService
    from medvit.runs import HF_BACKBONE, load_run

    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "encoder"
    shutil.copytree(hf_dirs[kind], source)
    run = tmp_path / "run"
    assert _train(source, run, dev_subset_csv, dev_images) == 0
    meta = json.loads((run / "config.json").read_text())
    assert meta["model"]["source"] == "transformers" and meta["model"]["name"] == str(source)
    assert meta["preprocessing"]["input_size"] == [3, 64, 64]
    assert (run / HF_BACKBONE / "config.json").is_file() and (run / HF_BACKBONE / "preprocessor_config.json").is_file()
    assert not (run / HF_BACKBONE / "model.safetensors").exists() and not (run / "timm_backbone.safetensors").exists()
    trained, _ = load_run(run)

    # the run is self-contained: no source folder, no hub
    shutil.rmtree(source)
    _go_offline(monkeypatch)
    model, info = load_run(run)
    xs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(xs), trained(xs))
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), "--engine", "torch", "--n-boot", "0"]) == 0
    card = (run / "README.md").read_text()
    assert f"transformers `{source}`" in card and "library_name: timm" not in card

    assert main(["export", "--run", str(run), "--format", "onnx"]) == 0
    assert main(["export", "--run", str(run), "--format", "onnx", "--int8"]) == 0
    assert main(["export", "--run", str(run), "--format", "torchscript"]) == 0
    exports = json.loads((run / "exports.json").read_text())
    assert {"model.onnx", "model.int8.onnx", "model.torchscript.pt"} <= set(exports)
    assert all(e["weights_sha256"] == info.weights_sha256 for e in exports.values())

    capsys.readouterr()
    assert main(["predict", cxr_dicom, "--run", str(run), "--backend", "onnx"]) == 0
    assert "Effusion" in capsys.readouterr().out
    image_bytes = Path(cxr_dicom).read_bytes()
    reference = ReviewService(Predictor.from_dir(run, backend="torch"))
    served = ReviewService(Predictor.from_dir(run, backend="openvino" if kind == "vit" else "onnx-int8"))
    ref, got = reference.analyze(image_bytes, "cxr.dcm"), served.analyze(image_bytes, "cxr.dcm")
    assert np.allclose(ref.prediction.table["prob_raw"], got.prediction.table["prob_raw"], atol=0.02)
    method = "gradcam" if kind == "swin" else "rollout"
    heat = reference.saliency(ref, method, "Effusion", (120, 100))
    assert heat.shape == (120, 100) and heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0


def test_offline_a_hub_id_loads_from_the_cache_or_fails_in_one_line(
    hf_dirs, dev_subset_csv, dev_images, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    _go_offline(monkeypatch)
    cache = tmp_path / "hub"  # the hub cache layout: refs/main names the snapshot that holds the files
    repo, commit = cache / "models--medvit-test--tiny-vit", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(hf_dirs["vit"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at call time

    net = build_model(_cfg(Path("medvit-test/tiny-vit")), K)  # a hub id, read with local_files_only
    saved = _encoder("vit")[0].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in net.backbone.model.state_dict().items())

    rc = _train(Path("medvit-test-no-such-org/no-such-encoder"), tmp_path / "run", dev_subset_csv, dev_images)
    err = capsys.readouterr().err
    assert rc == 2
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "medvit-test-no-such-org/no-such-encoder is not in the local Hugging Face cache (offline mode is on" in line
    assert "hf download medvit-test-no-such-org/no-such-encoder --local-dir DIR" in line
    assert "Traceback" not in err and not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_folders_and_configs_fail_with_one_line(hf_dirs, tmp_path):
    with pytest.raises(CheckpointError, match=r"model.name .*/nowhere does not exist: with model.source: transformers"):
        build_model(_cfg(tmp_path / "nowhere"), K)
    bare = tmp_path / "bare"
    shutil.copytree(hf_dirs["vit"], bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no image processor \(preprocessor_config.json\)"):
        build_model(_cfg(bare), K)
    (bare / "model.safetensors").unlink()
    ViTImageProcessor().save_pretrained(bare)
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        build_model(_cfg(bare), K)
    assert build_model(_cfg(bare, pretrained=False), K).backbone.num_features == 32  # from scratch needs no weights
    with pytest.raises(ConfigError, match="pretrain \\(MAE\\) builds on a timm ViT"):
        load_config(SMOKE, ["model.source=transformers", f"model.name={bare}", "pretrain.epochs=1"])
