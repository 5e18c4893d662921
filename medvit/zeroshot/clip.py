"""CLIP model loading behind one small interface: open_clip and transformers `CLIPModel`.

Which model and from where is `medvit.zeroshot.spec`. open_clip and transformers are imported lazily,
after the Hugging Face offline variables are set when offline mode is asked for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from medvit.errors import ConfigError, WeightsNotFoundError
from medvit.hub import hub_reachable, offline_requested, set_offline_env
from medvit.zeroshot.spec import WHERE, ModelSpec, looks_like_path, parse_spec

_log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NORMALIZATIONS = ("model", "chexzero")
# CheXzero's training normalisation (pixel mean/std of MIMIC-CXR on the 0-255 scale), letterboxed, not cropped.
CHEXZERO_MEAN_STD = (101.48761 / 255.0, 83.43944 / 255.0)


class ClipBackend:
    """A loaded CLIP: tokenisation, feature extraction (with gradients, for align), preprocessing and saving."""

    spec: ModelSpec
    model: Any  # open_clip CLIP/CustomTextCLIP or transformers CLIPModel: library classes with dynamic attributes
    dtype: torch.dtype
    image_size: tuple[int, int]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised text embeddings (float32), differentiable."""
        raise NotImplementedError

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (float32) of preprocessed (N, 3, H, W) images, differentiable."""
        raise NotImplementedError

    def lock_image_tower(self, trainable_blocks: int | None) -> None:
        """Freeze the image tower except its last `trainable_blocks` blocks and output projection (None: all)."""
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def save(self, out_dir: Path) -> str:
        """Write a folder this module loads again; returns its spec string."""
        raise NotImplementedError

    @property
    def model_id(self) -> str:
        """Identity of the weights and numerics, used as the text-embedding cache key."""
        return f"{self.spec}#{str(self.dtype).removeprefix('torch.')}"

    def preprocess(self, pixels: np.ndarray, normalization: str = "model") -> torch.Tensor:
        """HxW float [0,1] grey image -> 3xHxW tensor through the model's own preprocessing (or CheXzero's).

        "model": the grey image replicated to RGB and passed to the CLIP's own transform (resize, centre crop,
        the model's mean/std). "chexzero": letterbox to a square (keeps the costophrenic angles), resize,
        CheXzero's single-channel mean/std.
        """
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, not {normalization!r}")
        grey = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
        if grey.ndim != 2:
            raise ConfigError(f"expected an HxW grey image, got shape {grey.shape}")
        if normalization == "model":
            rgb = Image.fromarray(np.round(grey * 255).astype(np.uint8)).convert("RGB")
            return self._model_transform(rgb)
        h, w = grey.shape
        side = max(h, w)
        square = np.zeros((side, side), np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = grey
        x = v2.functional.resize(torch.from_numpy(square)[None], list(self.image_size),
                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        x = x.expand(3, -1, -1)  # resize the grey plane once, then repeat it as RGB
        mean, std = CHEXZERO_MEAN_STD
        return ((x - mean) / std).contiguous()

    def _model_transform(self, rgb: Image.Image) -> torch.Tensor:
        raise NotImplementedError


def _safetensors_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone so tied/viewed tensors are saved independently
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


class OpenClipBackend(ClipBackend):
    """open_clip: built-in names + tags, hf-hub repos (BiomedCLIP), local-dir folders and checkpoint files."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, allow_random_init: bool, seed: int,
                 offline: bool = False) -> None:
        import open_clip

        self.spec, self.dtype = spec, dtype
        # `spec` stays the identity (cache key, messages); `source` is what open_clip actually reads
        source = _cached_hub_source(spec) if offline and spec.name.startswith("hf-hub:") else spec
        random_init = _check_open_clip_source(source, allow_random_init)
        try:
            # a random init is seeded (without touching the global RNG) so every command rebuilds the same weights
            with torch.random.fork_rng(enabled=random_init):
                if random_init:
                    torch.manual_seed(seed)
                model, _, preprocess = open_clip.create_model_and_transforms(source.name, pretrained=source.pretrained)
        except (RuntimeError, OSError, ValueError) as e:
            if spec.name.startswith("local-dir:") or (spec.pretrained and looks_like_path(spec.pretrained)):
                raise WeightsNotFoundError(f"cannot load {spec}: {e}") from e
            raise WeightsNotFoundError(_download_hint(spec, e)) from e
        self.model = model.to(dtype).eval()
        self._transform = preprocess
        self._tokenizer = open_clip.get_tokenizer(source.name)
        cfg = model.visual.preprocess_cfg
        size = cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self._config = _open_clip_config(source)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"text": self._tokenizer(texts)}

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["text"]).float()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.dtype)).float()

    def lock_image_tower(self, trainable_blocks: int | None) -> None:
        if trainable_blocks is not None:
            # open_clip's LiT-style lock: groups are [stem], blocks..., [last block + ln_post], proj
            self.model.lock_image_tower(unlocked_groups=trainable_blocks + 1)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.float().exp()

    def _model_transform(self, rgb: Image.Image) -> torch.Tensor:
        return self._transform(rgb)

    def save(self, out_dir: Path) -> str:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "open_clip_config.json").write_text(json.dumps(self._config, indent=2), encoding="utf-8")
        save_file(_safetensors_state(self.model.float()), str(out_dir / "open_clip_model.safetensors"))
        self.model.to(self.dtype)
        return f"open_clip:local-dir:{out_dir}"


def _cached_hub_source(spec: ModelSpec) -> ModelSpec:
    """The Hugging Face cache snapshot of an ``hf-hub:`` repo, as a ``local-dir:`` spec, without any network call.

    timm imports huggingface_hub before offline mode can be set, so HF_HUB_OFFLINE is read too late and open_clip's
    hub download would retry the network for ~30 s; reading the cache directly fails at once instead.

    Raises:
        WeightsNotFoundError: the repo's open_clip_config.json or its weights are not cached (download hint).
    """
    from huggingface_hub import try_to_load_from_cache

    repo = spec.name.removeprefix("hf-hub:")
    config = try_to_load_from_cache(repo, "open_clip_config.json")
    if isinstance(config, str):
        snapshot = Path(config).parent
        if any(any(snapshot.glob(p)) for p in ("*.safetensors", "*.bin", "*.pth")):
            return ModelSpec(spec.backend, f"local-dir:{snapshot}")
        missing = "weights"
    else:
        missing = "open_clip_config.json"
    raise WeightsNotFoundError(_download_hint(spec, FileNotFoundError(
        f"offline and the {missing} of {repo} is not in the Hugging Face cache")))


def _open_clip_config(spec: ModelSpec) -> dict[str, Any]:
    """The open_clip_config.json for a loaded spec, so a saved copy rebuilds the same architecture offline."""
    import open_clip

    if spec.name.startswith("local-dir:"):
        path = Path(spec.name.removeprefix("local-dir:")) / "open_clip_config.json"
        return json.loads(path.read_text(encoding="utf-8"))
    model_cfg = open_clip.get_model_config(spec.name)
    out: dict[str, Any] = {"model_cfg": model_cfg}
    if spec.pretrained and not looks_like_path(spec.pretrained):
        tag = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
        out["preprocess_cfg"] = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    return out


def _check_open_clip_source(spec: ModelSpec, allow_random_init: bool) -> bool:
    """Refuse sources open_clip would silently replace by random weights (a config without checkpoint).

    Returns whether the model will be randomly initialised (only when `allow_random_init`).
    """
    if spec.name.startswith("local-dir:"):
        path = Path(spec.name.removeprefix("local-dir:"))
        if not (path / "open_clip_config.json").is_file():
            raise WeightsNotFoundError(f"{path} has no open_clip_config.json; expected a folder from `hf download` "
                                       "of an open_clip repo or from `medvit align`")
        has_weights = any(any(path.glob(p)) for p in ("*.safetensors", "*.bin", "*.pth"))
    elif spec.name.startswith("hf-hub:"):
        return False
    else:
        _check_open_clip_name(spec)
        if spec.pretrained and looks_like_path(spec.pretrained) and not Path(spec.pretrained).is_file():
            raise WeightsNotFoundError(f"checkpoint file not found: {spec.pretrained}")
        has_weights = bool(spec.pretrained)
    if not has_weights:
        if not allow_random_init:
            raise WeightsNotFoundError(
                f"{spec} names an architecture but no weights; its scores would be random. Give a pretrained tag "
                "(open_clip:NAME/TAG), a checkpoint (open_clip:NAME@FILE) or a folder with weights "
                "(allow_random_init / --random-init exists only for from-scratch alignment experiments)")
        _log.warning("%s: no weights, seeded random initialisation", spec)
    return not has_weights


def _check_open_clip_name(spec: ModelSpec) -> None:
    """Unknown built-in names and tags are typos, not missing downloads."""
    import open_clip

    if open_clip.get_model_config(spec.name) is None:
        raise ConfigError(f"unknown open_clip model {spec.name!r}; see open_clip.list_models()")
    if spec.pretrained and not looks_like_path(spec.pretrained) and not _tag_repo(spec):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
        raise ConfigError(f"unknown open_clip pretrained tag in {spec}; tags for {spec.name}: {known}")


def _tag_repo(spec: ModelSpec) -> str | None:
    import open_clip

    tag = open_clip.get_pretrained_cfg(spec.name, spec.pretrained or "")
    return (tag.get("hf_hub") or "").strip("/") or None


def _download_hint(spec: ModelSpec, err: BaseException) -> str:
    """What to download and where to put it, for a hub model that is not available (offline or no network)."""
    repo: str | None
    if spec.backend == "transformers":
        repo = spec.name
    elif spec.name.startswith("hf-hub:"):
        repo = spec.name.removeprefix("hf-hub:")
    else:
        repo = _tag_repo(spec)
    target = "open_clip:local-dir:DIR" if spec.backend == "open_clip" else "transformers:DIR"
    cause = (str(err).splitlines() or [""])[0][:160]
    return (f"CLIP weights for {spec} are not in the local cache and could not be downloaded (offline or no "
            f"connection: {type(err).__name__}: {cause}). On a machine with internet run "
            f"`hf download {repo} --local-dir DIR`, copy DIR here and {WHERE} {target}")


class HFClipBackend(ClipBackend):
    """transformers `CLIPModel` + `CLIPProcessor` from a hub id or a save_pretrained folder."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, offline: bool) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.spec, self.dtype = spec, dtype
        source = spec.name
        folder = spec.name.startswith(("/", ".", "~"))  # a folder, not a hub id
        if folder:
            source = str(Path(spec.name).expanduser())
            if not (Path(source) / "config.json").is_file():
                raise WeightsNotFoundError(f"{source} is not a transformers CLIP folder (no config.json); write one "
                                           "with CLIPModel.save_pretrained + CLIPProcessor.save_pretrained")
        try:
            self.model = CLIPModel.from_pretrained(source, local_files_only=offline)
            self.processor = CLIPProcessor.from_pretrained(source, local_files_only=offline)
        except OSError as e:
            if folder:  # downloading cannot help: name the files the folder lacks
                cause = (str(e).splitlines() or [""])[0].split(". ")[0]
                raise WeightsNotFoundError(
                    f"cannot load the transformers CLIP folder {source}: {cause}. It needs the model "
                    "(CLIPModel.save_pretrained) and its processor: preprocessor_config.json and the tokenizer files "
                    "(CLIPProcessor.save_pretrained into the same folder)"
                ) from e
            raise WeightsNotFoundError(_download_hint(spec, e)) from e
        self.model = self.model.to(dtype).eval()
        crop = self.processor.image_processor.crop_size or {}
        side = self.model.config.vision_config.image_size
        self.image_size = (crop.get("height", side), crop.get("width", side))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        max_len = self.model.config.text_config.max_position_embeddings
        out = self.processor.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**tokens)).float()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=images.to(self.dtype))).float()

    def lock_image_tower(self, trainable_blocks: int | None) -> None:
        if trainable_blocks is None:
            return
        vision = self.model.vision_model
        layers = vision.encoder.layers
        frozen = [vision.embeddings, vision.pre_layrnorm, *layers[:max(0, len(layers) - trainable_blocks)]]
        for module in frozen:
            module.requires_grad_(False)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.float().exp()

    def _model_transform(self, rgb: Image.Image) -> torch.Tensor:
        return self.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"][0]

    def save(self, out_dir: Path) -> str:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.float().save_pretrained(out_dir)
        self.model.to(self.dtype)
        self.processor.save_pretrained(out_dir)
        return f"transformers:{out_dir}"


def _pooled(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(
    spec: str | ModelSpec,
    *,
    offline: bool | None = None,
    dtype: str = "fp32",
    allow_random_init: bool = False,
    seed: int = 0,
) -> ClipBackend:
    """Load a CLIP from a SPEC.

    Args:
        spec: model spec string or parsed `ModelSpec`.
        offline: never touch the network (sets HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE before the libraries are
            imported); None reads MEDVIT_OFFLINE / HF_HUB_OFFLINE.
        dtype: "fp32" or "bf16" *weights*. bf16 weights are faster on CPU (1.6x for ViT-B-32 here); bf16 autocast
            is ~3x slower (it disables the fused attention path) and is never used.
        allow_random_init: accept an open_clip architecture without weights (from-scratch alignment only).
        seed: seed of that random initialisation (the same seed rebuilds the same weights in every command).

    Raises:
        WeightsNotFoundError: weights not available; the message says what to download and where to point.
        ConfigError: malformed spec or dtype.
    """
    parsed = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    is_offline = offline_requested(offline)
    if is_offline:
        set_offline_env()
    elif not hub_reachable():  # load from the cache (or fail with the download hint) now, not after a minute of retries
        is_offline = True
    _log.info("loading CLIP %s (%s weights%s)", parsed, dtype, ", offline" if is_offline else "")
    if parsed.backend == "open_clip":
        return OpenClipBackend(parsed, DTYPES[dtype], allow_random_init, seed, is_offline)
    return HFClipBackend(parsed, DTYPES[dtype], is_offline)
