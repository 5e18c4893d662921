"""Zero-shot CLIP scoring: tiny random-init models of both backends saved and loaded through the real local paths."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medvit.errors import ConfigError, WeightsNotFoundError
from medvit.zeroshot.clip import load_clip
from medvit.zeroshot.prompts import PromptConfig, load_prompt_config
from medvit.zeroshot.scorer import ZeroShotScorer, ensemble, pair_probability
from medvit.zeroshot.spec import ModelSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

# A real open_clip CLIP (ViT image tower + causal text transformer), shrunk: ~1.8M parameters, 64 px input.
TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


def make_open_clip_dir(path: Path, seed: int = 0) -> Path:
    """Random-init tiny open_clip saved as open_clip_config.json + safetensors (what `local-dir:` loads)."""
    arch = path / "arch"
    arch.mkdir(parents=True)
    (arch / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    backend = load_clip(f"open_clip:local-dir:{arch}", allow_random_init=True, seed=seed)
    backend.save(path / "model")
    return path / "model"


def make_hf_dir(path: Path, seed: int = 0) -> Path:
    """Tiny transformers CLIPModel + CLIPProcessor with a byte-level BPE tokenizer written from a tiny vocab."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = ["n o</w>", "e f", "ef f", "c h", "ch e"]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    out = path / "model"
    CLIPModel(cfg).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory) -> Path:
    return make_open_clip_dir(tmp_path_factory.mktemp("oc"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def prompts() -> PromptConfig:
    return load_prompt_config(ROOT / "medvit" / "resources" / "prompts.yaml")


@pytest.fixture(scope="module")
def xrays(dev_labels, dev_images):
    from medvit.data.dicom import read_image

    names = pd.read_csv(dev_labels)["Image Index"].head(3)
    return [read_image(dev_images / n) for n in names]


@pytest.fixture()
def scorer(open_clip_dir, prompts) -> ZeroShotScorer:
    return ZeroShotScorer(load_clip(str(open_clip_dir)), prompts)


# ------------------------------------------------------------------------------------------------ backends / specs
def test_parse_spec_forms(open_clip_dir, hf_dir):
    assert parse_spec("open_clip:ViT-B-32/laion2b_s34b_b79k") == ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec("open_clip:ViT-B-32@/m/ckpt.safetensors") == ModelSpec("open_clip", "ViT-B-32",
                                                                              "/m/ckpt.safetensors")
    assert parse_spec("hf-hub:microsoft/BiomedCLIP") == ModelSpec("open_clip", "hf-hub:microsoft/BiomedCLIP")
    assert parse_spec("local-dir:/x") == ModelSpec("open_clip", "local-dir:/x")
    assert parse_spec("transformers:openai/clip-vit-base-patch32").backend == "transformers"
    assert parse_spec(str(open_clip_dir)) == ModelSpec("open_clip", f"local-dir:{open_clip_dir}")
    assert parse_spec(str(hf_dir)) == ModelSpec("transformers", str(hf_dir))
    assert str(parse_spec("open_clip:ViT-B-32@/m/c.pt")) == "open_clip:ViT-B-32@/m/c.pt"
    for bad in ("", "clip:foo", "open_clip:", "/no/such/folder"):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_open_clip_local_dir_roundtrip(open_clip_dir, tmp_path, xrays):
    first = load_clip(f"open_clip:local-dir:{open_clip_dir}")
    again = load_clip(first.save(tmp_path / "copy"))
    for (k, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = first.preprocess(xrays[0].pixels)[None]
    assert x.shape == (1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(first.image_features(x), again.image_features(x))
        tokens = first.tokenize(["pleural effusion"])
        assert torch.allclose(first.text_features(tokens), again.text_features(tokens))


def test_transformers_local_dir_roundtrip(hf_dir, tmp_path, xrays):
    from transformers import CLIPModel

    backend = load_clip(f"transformers:{hf_dir}", offline=True)
    reference = CLIPModel.from_pretrained(hf_dir).eval()
    tokens = backend.tokenize(["no effusion", "pleural effusion on a chest radiograph"])
    assert tokens["input_ids"].shape[0] == 2 and (tokens["attention_mask"].sum(1) > 2).all()
    x = backend.preprocess(xrays[0].pixels)[None]
    with torch.no_grad():
        img = backend.image_features(x)
        assert img.shape == (1, 32)
        assert torch.allclose(img, reference.get_image_features(pixel_values=x).pooler_output)
    again = load_clip(backend.save(tmp_path / "copy"), offline=True)
    with torch.no_grad():
        assert torch.allclose(again.text_features(tokens), backend.text_features(tokens))


def test_bf16_weights_are_used_and_close_to_fp32(open_clip_dir, prompts, xrays):
    fp32 = ZeroShotScorer(load_clip(str(open_clip_dir)), prompts)
    bf16 = ZeroShotScorer(load_clip(str(open_clip_dir), dtype="bf16"), prompts)
    assert {p.dtype for p in bf16.backend.model.parameters()} == {torch.bfloat16}
    assert fp32.backend.model_id != bf16.backend.model_id  # separate text-cache entries
    a, b = fp32.image_embeddings(xrays), bf16.image_embeddings(xrays)
    assert b.dtype == torch.float32
    assert (a * b).sum(-1).min() > 0.98


def test_chexzero_normalisation_letterboxes_and_uses_mimic_stats(scorer):
    grey = np.full((40, 80), 101.48761 / 255.0, np.float32)  # CheXzero's mean grey, wide image
    x = scorer.backend.preprocess(grey, "chexzero")
    assert x.shape == (3, 64, 64)
    centre = x[:, 28:36, :]
    assert torch.allclose(centre, torch.zeros_like(centre), atol=1e-3)  # mean -> 0
    assert torch.allclose(x[:, 0, :], torch.full_like(x[:, 0, :], -101.48761 / 83.43944), atol=1e-3)  # black pad
    model_x = scorer.backend.preprocess(grey, "model")
    assert model_x.shape == (3, 64, 64) and not torch.allclose(model_x, x)
    with pytest.raises(ConfigError):
        scorer.backend.preprocess(grey, "imagenet")


def test_scores_a_real_monochrome1_dicom_through_read_image(scorer, prompts, cxr_dicom):
    from medvit.data.dicom import read_image

    image = read_image(cxr_dicom)
    assert image.meta.inverted  # MONOCHROME1 handled by the shared reader before CLIP preprocessing
    table = scorer.score_pairs(image, [prompts.finding_pair("Pneumothorax")])
    assert 0 < table["prob"].iloc[0] < 1
    assert torch.equal(scorer.image_embeddings([image]), scorer.image_embeddings([image.pixels]))


# ------------------------------------------------------------------------------------------------------- maths
def test_pair_probability_matches_hand_computation():
    s_pos, s_neg, t = 0.30, 0.25, 0.01
    hand = math.exp(s_pos / t) / (math.exp(s_pos / t) + math.exp(s_neg / t))  # softmax([s_pos, s_neg] / T)[0]
    assert pair_probability(np.array([s_pos]), np.array([s_neg]), t)[0] == pytest.approx(hand, rel=1e-12)
    assert hand == pytest.approx(1 / (1 + math.exp(-5)))
    assert pair_probability(np.array([0.2]), np.array([0.2]), 0.05)[0] == pytest.approx(0.5)
    assert np.isfinite(pair_probability(np.array([1.0]), np.array([-1.0]), 1e-4)).all()  # no overflow


def test_scorer_pair_probability_matches_manual_embeddings(scorer, prompts, xrays):
    pair = prompts.finding_pair("Effusion")
    table = scorer.score_pairs(xrays[0], [pair])
    be = scorer.backend
    with torch.no_grad():
        img = be.image_features(be.preprocess(xrays[0].pixels)[None])[0]
        pos = be.text_features(be.tokenize(list(pair.positive)))
        neg = be.text_features(be.tokenize(list(pair.negative)))
        scale = float(be.logit_scale())

    def unit(v):
        return v / v.norm(dim=-1, keepdim=True)

    s_pos = float(unit(img) @ unit(unit(pos).mean(0)))
    s_neg = float(unit(img) @ unit(unit(neg).mean(0)))
    hand = math.exp(scale * s_pos) / (math.exp(scale * s_pos) + math.exp(scale * s_neg))
    row = table.iloc[0]
    assert row["s_pos"] == pytest.approx(s_pos, abs=1e-5) and row["s_neg"] == pytest.approx(s_neg, abs=1e-5)
    assert row["prob"] == pytest.approx(hand, abs=1e-5)
    assert row["temperature"] == pytest.approx(1 / scale) and row["calibration"] == "uncalibrated"


def test_ensemble_averages_normalised_embeddings_and_renormalises(scorer):
    e = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    out = ensemble(e)
    assert torch.allclose(out, torch.tensor([1.0, 1.0]) / math.sqrt(2))  # not pulled towards the longer vector
    assert out.norm() == pytest.approx(1.0)
    texts = ["pleural effusion", "chest x-ray showing pleural effusion"]
    single = scorer.text_embeddings(texts)
    assert torch.allclose(single.norm(dim=-1), torch.ones(2), atol=1e-5)
    combined = scorer.prompt_embedding(texts)
    assert combined.norm() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(combined, (single.mean(0) / single.mean(0).norm()), atol=1e-6)


def test_multiclass_and_raw_similarity(scorer, xrays):
    texts = ["pleural effusion", "pneumothorax", "a pacemaker"]
    sims = scorer.similarity(xrays, texts)
    assert sims.shape == (3, 3) and (np.abs(sims) <= 1 + 1e-5).all()
    probs = scorer.multiclass(xrays, [[t] for t in texts])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    manual = torch.softmax(torch.from_numpy(sims) * scorer.logit_scale, dim=-1).numpy()
    assert np.allclose(probs, manual, atol=1e-5)


def test_score_table_joins_pairs_and_prompts(scorer, xrays):
    """The one table behind `medvit zeroshot` and the app: pair rows then prompt rows, numbers from the modes."""
    from medvit.review.service import zero_shot_table

    image = xrays[0]
    typed = [scorer.prompts.parse_pair(t) for t in ("large heart | normal heart size", "pneumothorax", "  ")]
    assert typed[1] == scorer.prompts.custom_pair("pneumothorax") and typed[2] is None
    pairs = [scorer.prompts.finding_pair("Effusion"), typed[0]]
    table = scorer.score_table(image, ["a pacemaker", " ", "pleural effusion"], pairs, multiclass=True)
    assert list(table.columns) == ["mode", "prompt", "prob", "similarity", "s_pos", "s_neg", "temperature",
                                   "calibration"]
    assert table["prompt"].tolist() == ["Effusion", "large heart", "a pacemaker", "pleural effusion"]
    assert table["mode"].tolist() == ["pair", "pair", "multiclass", "multiclass"]
    s_pos, s_neg = scorer.pair_similarities([image], pairs)
    assert np.allclose(table["prob"][:2], scorer.pair_probabilities([image], pairs)[0])
    assert np.allclose(table["similarity"][:2], s_pos[0] - s_neg[0], atol=1e-6)
    assert np.allclose(table["prob"][2:], scorer.multiclass([image], [["a pacemaker"], ["pleural effusion"]])[0])
    assert np.allclose(table["similarity"][2:], scorer.similarity([image], ["a pacemaker", "pleural effusion"])[0])
    assert set(table["calibration"]) == {"uncalibrated"}

    single = scorer.score_table(image, ["a pacemaker"], [])
    assert single["mode"].tolist() == ["similarity"] and single["prob"].isna().all()
    assert scorer.score_table(image, [" "], []).empty

    app = zero_shot_table(scorer, image, ["a pacemaker", "pleural effusion"], ["large heart | normal heart size", ""])
    assert list(app.columns) == ["mode", "prompt", "prob", "similarity", "calibration"]
    assert app["prompt"].tolist() == ["a pacemaker", "pleural effusion", "large heart | normal heart size"]
    assert app["prob"].tolist() == pytest.approx(table["prob"][[2, 3, 1]].tolist())


# ------------------------------------------------------------------------------------------------------- caching
def test_text_and_image_caches_count_encoder_calls(scorer, prompts, xrays):
    be = scorer.backend
    calls = {"texts": 0, "text_batches": 0, "images": 0}
    text_features, image_features = be.text_features, be.image_features

    def counted_text(tokens):
        calls["text_batches"] += 1
        calls["texts"] += len(next(iter(tokens.values())))
        return text_features(tokens)

    def counted_image(images):
        calls["images"] += len(images)
        return image_features(images)

    be.text_features, be.image_features = counted_text, counted_image
    pair = prompts.finding_pair("Cardiomegaly")
    scorer.score_pairs(xrays[0], [pair])
    assert calls["texts"] == len(pair.positive) + len(pair.negative) and calls["images"] == 1
    scorer.score_pairs(xrays[0], [pair])
    scorer.score_pairs(xrays[0].pixels.copy(), [pair])  # same content, different array: still cached
    assert calls["texts"] == len(pair.positive) + len(pair.negative) and calls["images"] == 1
    before = calls["texts"]
    scorer.similarity([xrays[0]], ["cardiomegaly", "a pacemaker"])  # one new prompt -> one text encoding
    assert calls["texts"] == before + 1
    scorer.image_embeddings(xrays)  # two new images, encoded in one batch
    assert calls["images"] == 3
    shared = ZeroShotScorer(be, prompts, text_cache=scorer.text_cache)
    batches = calls["text_batches"]
    shared.prompt_embedding(list(pair.positive))
    assert calls["text_batches"] == batches  # cache keyed by (model id, prompt) is shared across scorers


# ---------------------------------------------------------------------------------------------------- No Finding
def test_no_finding_pair_is_normal_vs_abnormal(prompts):
    pair = prompts.finding_pair("No Finding")
    text = " ".join(pair.positive + pair.negative).lower()
    assert "normal chest x-ray" in pair.positive and "abnormal chest x-ray" in pair.negative
    assert "no no finding" not in text and "no finding" not in text
    assert not any(n.startswith("no ") for n in pair.negative)
    effusion = prompts.finding_pair("pleural effusion")  # alias -> Effusion
    assert effusion.name == "Effusion" and "no pleural effusion" in effusion.negative
    for already_negative in ("No Finding", "normal chest x-ray", "no effusion"):
        with pytest.raises(ConfigError, match="invert"):
            prompts.custom_pair(already_negative)


def test_no_finding_requires_explicit_pair(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("templates: ['{}']\nnegation: 'no {}'\n")
    with pytest.raises(ConfigError, match="No Finding"):
        load_prompt_config(cfg).finding_pair("No Finding")


def test_no_finding_probability_is_inverse_of_abnormal_question(scorer, prompts, xrays):
    pair = prompts.finding_pair("No Finding")
    swapped = type(pair)("abnormal", pair.negative, pair.positive)
    p = scorer.score_pairs(xrays[1], [pair, swapped])["prob"].to_numpy()
    assert p[0] == pytest.approx(1 - p[1], abs=1e-6)


def test_prompts_config_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("templates: ['chest x-ray']\n")
    with pytest.raises(ConfigError, match="placeholder"):
        load_prompt_config(bad)
    bad.write_text("findings: {Bogus: [x]}\n")
    with pytest.raises(ConfigError, match="unknown finding"):
        load_prompt_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_prompt_config(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------ missing weights
def test_offline_cli_sets_hub_env_first_and_names_download_and_target(dev_images, tmp_path):
    """One fresh interpreter: the hub libraries are not imported before --offline takes effect, and the missing
    open_clip weights give one actionable line (repo to download, where to point MEDVIT_CLIP)."""
    image = next(dev_images.glob("*.png"))
    code = (
        "import sys\n"
        "import medvit.zeroshot.scorer, medvit.zeroshot.finetune, medvit.commands.zeroshot\n"
        "assert 'huggingface_hub' not in sys.modules and 'open_clip' not in sys.modules, 'imported too early'\n"
        "from medvit.cli import main\n"
        "rc = main(['zeroshot', '--offline', '--model', 'open_clip:ViT-B-32/laion2b_s34b_b79k', '--image', "
        f"{str(image)!r}])\n"
        "import os, huggingface_hub.constants as c\n"
        "print(rc, os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'], c.HF_HUB_OFFLINE)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MEDVIT_CLIP")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.stdout.split() == ["2", "1", "1", "True"], proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CLIP weights for open_clip:ViT-B-32/laion2b_s34b_b79k are not in the local cache")
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K --local-dir DIR" in last
    assert "MEDVIT_CLIP" in last and "open_clip:local-dir:DIR" in last


def test_offline_missing_transformers_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match=r"hf download openai/clip-vit-base-patch32 .*transformers:DIR"):
        load_clip("transformers:openai/clip-vit-base-patch32", offline=True)
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        load_clip(f"transformers:{tmp_path}", offline=True)


def test_a_transformers_folder_without_its_processor_names_the_missing_files(tmp_path):
    """A folder holding only CLIPModel.save_pretrained's output: downloading cannot help, so no `hf download` advice."""
    folder = make_hf_dir(tmp_path / "hf")
    for name in ("preprocessor_config.json", "processor_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(WeightsNotFoundError, match=r"preprocessor_config\.json and the tokenizer files") as err:
        load_clip(f"transformers:{folder}", offline=True)
    assert "hf download" not in str(err.value)


def _refuse_hub_downloads(monkeypatch) -> list:
    """Replace every hub download entry point; returns the list of attempted downloads (open_clip swallows errors)."""
    import huggingface_hub
    import huggingface_hub.file_download
    import open_clip.pretrained

    attempts: list = []

    def no_network(*args, **kwargs):
        attempts.append((args, kwargs))
        raise OSError("network download attempted")

    for module in (open_clip.pretrained, huggingface_hub, huggingface_hub.file_download):
        monkeypatch.setattr(module, "hf_hub_download", no_network)
    return attempts


def test_offline_hf_hub_spec_not_cached_fails_without_network(monkeypatch, tmp_path):
    import huggingface_hub.constants

    attempts = _refuse_hub_downloads(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", offline=True)
    assert attempts == []
    msg = str(err.value)
    assert msg.startswith("CLIP weights for open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
                          "are not in the local cache")
    assert "not in the Hugging Face cache" in msg
    assert "hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --local-dir DIR" in msg
    assert "open_clip:local-dir:DIR" in msg


def test_offline_hf_hub_spec_loads_from_the_cache_snapshot(monkeypatch, tmp_path):
    """A repo in the Hugging Face cache layout (refs/main -> snapshots/<sha>/) loads offline with no download."""
    import huggingface_hub.constants

    model_dir = make_open_clip_dir(tmp_path / "src")
    repo_cache = tmp_path / "hub" / "models--org--tiny-clip"
    snapshot = repo_cache / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text("a" * 40)
    (snapshot / "open_clip_config.json").write_text("{}")  # weights missing: refused with the download hint
    attempts = _refuse_hub_downloads(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError, match="weights of org/tiny-clip is not in the Hugging Face cache"):
        load_clip("hf-hub:org/tiny-clip", offline=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    cached = load_clip("hf-hub:org/tiny-clip", offline=True)
    local = load_clip(f"local-dir:{model_dir}")
    assert str(cached.spec) == "open_clip:hf-hub:org/tiny-clip"
    tokens = cached.tokenize(["effusion"])
    torch.testing.assert_close(cached.text_features(tokens), local.text_features(local.tokenize(["effusion"])))
    assert attempts == []


def test_architecture_without_weights_is_refused_unless_random_init_asked(tmp_path):
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    with pytest.raises(WeightsNotFoundError, match="no weights"):
        load_clip(f"local-dir:{arch}")
    a, b, c = (load_clip(f"local-dir:{arch}", allow_random_init=True, seed=s).model.state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed rebuilds the same weights in every command
    assert not torch.equal(a["visual.proj"], c["visual.proj"])
    with pytest.raises(WeightsNotFoundError, match="checkpoint file not found"):
        load_clip(f"open_clip:ViT-B-32@{tmp_path}/missing.safetensors")
    with pytest.raises(ConfigError, match="unknown open_clip pretrained tag"):
        load_clip("open_clip:ViT-B-32/no_such_tag")


# ------------------------------------------------------------------------------------------------- calibration
def test_fit_temperatures_per_pair(scorer, prompts, xrays, tmp_path):
    pairs = [prompts.finding_pair("Effusion"), prompts.finding_pair("Mass")]
    labels = np.array([[1, 0], [0, 0], [1, np.nan]], dtype=np.float32)  # Mass has one class only
    fitted = scorer.fit_temperatures(pairs, *scorer.pair_similarities(xrays, pairs), labels)
    assert set(fitted) == {"Effusion"} and fitted["Effusion"] > 0
    assert scorer.temperature("Effusion") == (fitted["Effusion"], "temperature")
    assert scorer.temperature("Mass")[1] == "uncalibrated"
    s_pos, s_neg = scorer.pair_similarities(xrays, pairs)
    calibrated = scorer.pair_probabilities(xrays, pairs)
    assert calibrated[:, 0] == pytest.approx(pair_probability(s_pos[:, 0], s_neg[:, 0], fitted["Effusion"]))
    raw = scorer.pair_probabilities(xrays, pairs, calibrated=False)
    assert raw[:, 0] == pytest.approx(pair_probability(s_pos[:, 0], s_neg[:, 0], 1 / scorer.logit_scale))
    assert calibrated[:, 1] == pytest.approx(raw[:, 1])  # Mass keeps the model's own temperature
    path = tmp_path / "t.json"
    scorer.save_temperatures(path)
    other = ZeroShotScorer(scorer.backend, prompts)
    other.load_temperatures(path)
    assert other.temperatures == {"Effusion": pytest.approx(fitted["Effusion"])}
    chexzero = ZeroShotScorer(scorer.backend, prompts, normalization="chexzero")
    with pytest.raises(ConfigError, match="normalization"):
        chexzero.load_temperatures(path)
    doc = json.loads(path.read_text())
    doc["model"] = "open_clip:ViT-B-32/openai#float32"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="fitted for"):
        other.load_temperatures(path)


# ----------------------------------------------------------------------------------------------------------- CLI
def test_zeroshot_cli_table(open_clip_dir, dev_images, capsys):
    from medvit.cli import main

    image = sorted(dev_images.glob("*.png"))[0]
    rc = main(["zeroshot", "--model", str(open_clip_dir), "--image", str(image), "--findings", "Effusion",
               "No Finding", "--pair", "large heart|normal heart size", "--prompt", "a pacemaker", "--prompt",
               "pleural effusion", "--multiclass", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["Effusion", "No Finding", "large heart", "a pacemaker", "pleural effusion"]
    assert all(0 <= r["prob"] <= 1 for r in rows)
    assert sum(r["prob"] for r in rows if r["mode"] == "multiclass") == pytest.approx(1.0, abs=1e-4)
    assert {r["calibration"] for r in rows if r["mode"] == "pair"} == {"uncalibrated"}


def test_zeroshot_eval_metrics_schema(open_clip_dir, dev_subset_csv, dev_images, tmp_path, capsys):
    import jsonschema

    from medvit.cli import main
    from medvit.evaluate.report import METRICS_SCHEMA

    out = tmp_path / "eval"
    rc = main(["zeroshot-eval", "--model", str(open_clip_dir), "--labels", str(dev_subset_csv), "--images",
               str(dev_images), "--out", str(out), "--split", "val", "--fit-split", "train", "--n-boot", "20",
               "--no-plots"])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    jsonschema.validate(report, METRICS_SCHEMA)
    assert report["n_images"] == 12
    evaluate_keys = {"auroc", "auprc", "auroc_ci", "ece", "ece_uncalibrated", "brier", "n_pos", "n_neg", "threshold"}
    for name, m in report["findings"].items():
        assert evaluate_keys <= set(m), name
    assert "No Finding" in report["findings"]
    zs = report["zeroshot"]
    assert zs["mode"] == "pair" and zs["split"] == "val"
    assert zs["prompts"]["Effusion"]["negative"][0] == "no pleural effusion"
    temps = json.loads((out / "temperatures.json").read_text())["temperatures"]
    assert {zs["calibration"][f] for f in temps} == {"temperature"}
    assert len(pd.read_csv(out / "predictions.csv")) == 12
    assert "mean AUROC" in capsys.readouterr().out

    rc = main(["zeroshot-eval", "--model", str(open_clip_dir), "--labels", str(dev_subset_csv), "--images",
               str(dev_images), "--out", str(tmp_path / "raw"), "--split", "val", "--n-boot", "0", "--findings",
               "Effusion", "Infiltration"])
    assert rc == 0
    raw = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    jsonschema.validate(raw, METRICS_SCHEMA)
    assert set(raw["zeroshot"]["calibration"].values()) == {"uncalibrated"}
    assert raw["calibration"]["method"] == "none" and (tmp_path / "raw" / "roc.png").is_file()
    # the same model and prompts give the same ranking whether or not temperatures were fitted
    assert raw["findings"]["Effusion"]["auroc"] == pytest.approx(report["findings"]["Effusion"]["auroc"])
