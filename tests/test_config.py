"""Config schema: the shipped YAMLs validate, unknown keys and bad values fail naming the key, overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest

from medvit.config import DEFAULT_BACKBONE, load_config, validate_config
from medvit.errors import ConfigError
from medvit.findings import NIH_FINDINGS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["smoke.yaml", "demo.yaml", "deit3_384_nih.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.data.findings == list(NIH_FINDINGS)
    assert cfg.data.augment.hflip == 0.0  # anatomy-safe everywhere


def test_real_recipe_pins_the_in22k_tag() -> None:
    cfg = load_config(CONFIGS / "deit3_384_nih.yaml")
    assert cfg.model.name == DEFAULT_BACKBONE == "deit3_base_patch16_384.fb_in22k_ft_in1k"
    assert cfg.model.pretrained and cfg.model.freeze_blocks == 6
    assert cfg.train.layer_decay == pytest.approx(0.75)


def test_dotted_overrides_are_parsed_as_yaml_scalars() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", [
        "train.lr=3e-4", "train.epochs=7", "train.ema.enabled=false", "model.model_kwargs.depth=2",
        "data.findings=[Effusion, Cardiomegaly]", "train.clip_grad=null",
    ])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7
    assert cfg.train.ema.enabled is False
    assert cfg.model.model_kwargs["depth"] == 2
    assert cfg.data.findings == ["Effusion", "Cardiomegaly"]
    assert cfg.train.clip_grad is None


@pytest.mark.parametrize(("override", "key"), [
    ("train.lrr=1e-3", "train.lrr"),                     # typo: unknown key
    ("model.head=transformer", "model.head"),            # not one of the choices
    ("train.epochs=0", "train.epochs"),                  # out of range
    ("data.augment.flip=0.5", "data.augment.flip"),      # unknown nested key
    ("train.loss.name=hinge", "train.loss.name"),
])
def test_invalid_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "smoke.yaml", [override])


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "train.lr.x=1"])
def test_malformed_overrides(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_config(CONFIGS / "smoke.yaml", [bad])


def test_unknown_top_level_key_in_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text((CONFIGS / "smoke.yaml").read_text() + "\noptimiser: sgd\n")
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_data_section_is_required() -> None:
    with pytest.raises(ConfigError, match="data"):
        load_config(None, ["train.epochs=1"])


def test_model_kwargs_typo_in_a_flow_map_is_caught() -> None:
    with pytest.raises(ConfigError, match="img_size: 64"):
        load_config(CONFIGS / "smoke.yaml", ["model.model_kwargs={img_size:64,depth:2}"])


def test_frozen_blocks_need_frozen_stem() -> None:
    with pytest.raises(ConfigError, match="freeze_stem"):
        load_config(CONFIGS / "smoke.yaml", ["model.freeze_stem=false", "model.freeze_blocks=2"])


def test_batch_must_split_into_accumulation_steps() -> None:
    with pytest.raises(ConfigError, match="accum_steps"):
        load_config(CONFIGS / "smoke.yaml", ["train.batch_size=10", "train.accum_steps=3"])


def test_unknown_keys_get_a_did_you_mean_and_blame_set_or_the_file(tmp_path: Path) -> None:
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(smoke, ["train.lrr=1e-3"])
    assert str(e.value) == "--set train.lrr: unknown key; did you mean train.lr?"
    with pytest.raises(ConfigError, match=r"^--set train\.ema\.decy: unknown key; did you mean train\.ema\.decay\?$"):
        load_config(smoke, ["train.ema.decy=0.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(smoke.read_text().replace("  lr: 1.0e-3", "  lrr: 1.0e-3"))
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["train.epochs=1"])  # an unrelated --set: the file is still to blame
    assert str(e.value) == f"{bad}: train.lrr: unknown key; did you mean train.lr?"
    with pytest.raises(ConfigError, match=r"--set train\.lr: Input should be greater than 0"):
        load_config(smoke, ["train.lr=-1"])


def test_paths_become_absolute_and_weights_file_implies_pretrained(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = validate_config({"data": {"labels_csv": "d/labels.csv", "images_root": "d/img",
                                    "split_files": {"test": "d/test.txt"}},
                           "model": {"pretrained": False, "weights_file": "w/model.safetensors"}})
    assert cfg.data.labels_csv == tmp_path / "d" / "labels.csv" and cfg.data.images_root == tmp_path / "d" / "img"
    assert cfg.data.split_files == {"test": tmp_path / "d" / "test.txt"}
    assert cfg.model.weights_file == tmp_path / "w" / "model.safetensors" and cfg.model.pretrained is True
