"""Contrastive site alignment: loss maths, label captions, and real fine-tuning of tiny CLIPs on dev images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_zeroshot import make_hf_dir, make_open_clip_dir

from medvit.errors import DatasetError
from medvit.zeroshot.clip import load_clip
from medvit.zeroshot.finetune import AlignConfig, align, contrastive_loss, evaluate_loss, load_pairs, preprocess_images
from medvit.zeroshot.prompts import load_prompt_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts():
    return load_prompt_config(ROOT / "medvit" / "resources" / "prompts.yaml")


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory) -> Path:
    return make_open_clip_dir(tmp_path_factory.mktemp("oc"), seed=1)


@pytest.fixture(scope="module")
def train_pairs(dev_labels, dev_images, prompts) -> pd.DataFrame:
    return load_pairs(dev_labels, dev_images, prompts, split="train")


def test_contrastive_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    scale = torch.tensor(10.0)
    texts = ["a", "b", "a"]  # rows 0 and 2 share a caption: both are positives for each other
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    targets = torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    assert float(contrastive_loss(img, txt, scale, texts)) == pytest.approx(float((i2t + t2i) / 2), rel=1e-6)
    # with distinct captions it is CLIP's symmetric InfoNCE with the diagonal as targets
    distinct = contrastive_loss(img, txt, scale, ["a", "b", "c"])
    diag = torch.arange(3)
    expected = (F.cross_entropy(logits, diag) + F.cross_entropy(logits.T, diag)) / 2
    assert float(distinct) == pytest.approx(float(expected), rel=1e-6)


def test_label_captions_from_nih_csv(train_pairs, dev_labels):
    raw = pd.read_csv(dev_labels)
    raw = raw[raw["split"] == "train"].set_index("Image Index")
    assert len(train_pairs) == len(raw) == 286
    texts = dict(zip(train_pairs["path"].map(lambda p: Path(p).name), train_pairs["text"], strict=True))
    for name, labels in raw["Finding Labels"].items():
        if labels == "No Finding":
            assert texts[name] == "no acute cardiopulmonary findings"
        else:
            assert texts[name].startswith("chest x-ray with ") and "no finding" not in texts[name].lower()
    variants = dict(zip(train_pairs["text"], train_pairs["variants"], strict=False))
    assert variants["no acute cardiopulmonary findings"] == (
        "no acute cardiopulmonary findings", "normal chest x-ray", "no acute cardiopulmonary abnormality")
    assert variants["chest x-ray with cardiomegaly"] == (
        "chest x-ray with cardiomegaly", "cardiomegaly", "chest x-ray showing cardiomegaly",
        "cardiomegaly on a chest radiograph")  # the zero-shot templates


def test_multi_finding_caption(prompts):
    assert prompts.caption(["Effusion", "Infiltration", "Nodule"]) == (
        "chest x-ray with pleural effusion, infiltration and lung nodule")
    assert prompts.caption(["No Finding"]) == prompts.caption([]) == "no acute cardiopulmonary findings"


def test_report_sentence_pairs_csv(tmp_path, dev_images, prompts):
    names = sorted(p.name for p in dev_images.glob("*.png"))[:3]
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"image": names, "text": ["Small left effusion.", "Clear lungs.", ""]}).to_csv(csv, index=False)
    pairs = load_pairs(csv, dev_images, prompts)
    assert list(pairs["text"]) == ["Small left effusion.", "Clear lungs."]  # empty text dropped
    pd.DataFrame({"image": ["nope.png"], "text": ["x"]}).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match="not found"):
        load_pairs(csv, dev_images, prompts)
    pd.DataFrame({"file": names, "caption": ["x"] * 3}).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match="'text'"):
        load_pairs(csv, dev_images, prompts)


def test_align_lowers_contrastive_loss_on_real_batch(open_clip_dir, train_pairs):
    batch = train_pairs.head(16)
    backend = load_clip(str(open_clip_dir))
    images = preprocess_images(backend, list(batch["path"]), "model")
    texts = list(batch["text"])
    stem_before = backend.model.visual.conv1.weight.detach().clone()
    proj_before = backend.model.visual.proj.detach().clone()
    before = evaluate_loss(backend, images, texts, batch_size=8)
    history = align(backend, images, texts, AlignConfig(epochs=8, batch_size=8, lr=1e-3, warmup_steps=2,
                                                        trainable_image_blocks=1))
    after = evaluate_loss(backend, images, texts, batch_size=8)
    assert history[0]["train_loss"] == pytest.approx(before)
    assert history[-1]["train_loss"] == pytest.approx(after)
    assert after < before - 0.3, (before, after)
    assert torch.equal(backend.model.visual.conv1.weight, stem_before)  # frozen stem
    assert not torch.equal(backend.model.visual.proj, proj_before)  # top of the image tower adapts
    assert all(math.isfinite(r["step_loss"]) for r in history[1:])


def test_align_cli_saves_a_model_the_scorer_loads(open_clip_dir, dev_subset_csv, dev_images, tmp_path, capsys):
    from medvit.cli import main
    from medvit.zeroshot.scorer import ZeroShotScorer

    out = tmp_path / "aligned"
    rc = main(["align", "--model", str(open_clip_dir), "--pairs", str(dev_subset_csv), "--images", str(dev_images),
               "--out", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1"])
    assert rc == 0
    assert "saved: open_clip:local-dir:" in capsys.readouterr().out
    meta = json.loads((out / "align.json").read_text())
    assert meta["n_train"] == 24 and meta["n_val"] == 12 and len(meta["history"]) == 3
    assert "val_loss" in pd.read_csv(out / "metrics.csv").columns
    scorer = ZeroShotScorer.load(str(out), prompts=ROOT / "medvit" / "resources" / "prompts.yaml")
    source = load_clip(str(open_clip_dir))
    changed = [k for k, v in scorer.backend.model.state_dict().items()
               if not torch.equal(v, source.model.state_dict()[k])]
    assert "visual.proj" in changed and "text_projection" in changed
    assert not any(k.startswith("visual.conv1") for k in changed)  # default: image tower partly frozen


def test_align_transformers_backend_roundtrip(tmp_path, train_pairs):
    src = make_hf_dir(tmp_path / "hf", seed=2)
    backend = load_clip(f"transformers:{src}", offline=True)
    batch = train_pairs.head(8)
    images = preprocess_images(backend, list(batch["path"]), "model")
    history = align(backend, images, list(batch["text"]), AlignConfig(epochs=3, batch_size=8, lr=1e-3,
                                                                       warmup_steps=1, trainable_image_blocks=0))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert not any(p.requires_grad for p in backend.model.vision_model.encoder.layers.parameters())
    again = load_clip(backend.save(tmp_path / "aligned"), offline=True)
    tokens = backend.tokenize(["no acute cardiopulmonary findings"])
    with torch.no_grad():
        assert torch.allclose(again.text_features(tokens), backend.text_features(tokens), atol=1e-6)


@pytest.mark.parametrize("escape", ["../../etc/passwd", "/etc/passwd"])
def test_pair_paths_outside_the_image_root_are_refused(tmp_path, dev_images, prompts, escape):
    csv = tmp_path / "pairs.csv"
    name = sorted(p.name for p in dev_images.glob("*.png"))[0]
    pd.DataFrame({"image": [name, escape], "text": ["Clear lungs.", "x"]}).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match="escapes the image root"):
        load_pairs(csv, dev_images, prompts)
