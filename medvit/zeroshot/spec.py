"""Which CLIP and from where: model SPEC strings and the default model (the offline switch is `medvit.hub`).

Kept apart from the loaders (`medvit.zeroshot.clip`) so a command can parse a spec
without importing torch, open_clip or transformers. A model SPEC string names the library and the weights:

* ``open_clip:ViT-B-32/laion2b_s34b_b79k``   built-in architecture + pretrained tag (downloaded from the hub)
* ``open_clip:ViT-B-32@/path/ckpt.safetensors`` built-in architecture + a local checkpoint file
* ``open_clip:hf-hub:org/repo`` or ``hf-hub:org/repo``   e.g. BiomedCLIP
* ``open_clip:local-dir:/path`` or ``local-dir:/path``  a folder with open_clip_config.json + weights
* ``transformers:org/repo`` or ``transformers:/path``  `CLIPModel` + `CLIPProcessor` (hub id or save_pretrained dir)
* ``/path`` a folder written by ``medvit align`` (either library, detected from its files)

The default comes from $MEDVIT_CLIP, then the `model:` key of the prompts file (resources/prompts.yaml).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medvit.errors import ConfigError

CLIP_LIBRARIES = ("open_clip", "transformers")
WHERE = "set MEDVIT_CLIP (or `model:` in medvit/resources/prompts.yaml) to"  # how error messages say where to point


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model SPEC: backend, model name or path, and (open_clip built-ins) a pretrained tag or file."""

    backend: str
    name: str
    pretrained: str | None = None

    def __str__(self) -> str:
        if self.pretrained is None:
            return f"{self.backend}:{self.name}"
        sep = "@" if looks_like_path(self.pretrained) else "/"
        return f"{self.backend}:{self.name}{sep}{self.pretrained}"


def looks_like_path(text: str) -> bool:
    """Whether an open_clip pretrained part names a file rather than a hub tag."""
    return "/" in text or os.sep in text or Path(text).suffix in (".safetensors", ".pt", ".pth", ".bin")


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model SPEC (see the module docstring).

    Raises:
        ConfigError: empty or malformed spec, unknown backend.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty CLIP model spec; e.g. open_clip:ViT-B-32/laion2b_s34b_b79k")
    if spec.startswith(("hf-hub:", "local-dir:")):
        spec = "open_clip:" + spec
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in CLIP_LIBRARIES:
        if Path(spec).is_dir():
            return _spec_for_dir(Path(spec))
        raise ConfigError(f"CLIP model spec {spec!r} must start with one of {CLIP_LIBRARIES} (or be a model folder)")
    if not rest:
        raise ConfigError(f"CLIP model spec {spec!r} names no model")
    if backend == "transformers" or rest.startswith(("hf-hub:", "local-dir:")):
        return ModelSpec(backend, rest)
    if "@" in rest:
        name, _, ckpt = rest.partition("@")
        return ModelSpec(backend, name, ckpt)
    name, _, tag = rest.partition("/")
    return ModelSpec(backend, name, tag or None)


def _spec_for_dir(path: Path) -> ModelSpec:
    if (path / "open_clip_config.json").is_file():
        return ModelSpec("open_clip", f"local-dir:{path}")
    if (path / "config.json").is_file():
        return ModelSpec("transformers", str(path))
    raise ConfigError(f"{path} holds neither open_clip_config.json (open_clip) nor config.json (transformers)")


def default_spec(explicit: str | None, config_model: str | None) -> str:
    """The spec to use: `explicit` (--model), else $MEDVIT_CLIP, else the config's `model:`."""
    spec = explicit or os.environ.get("MEDVIT_CLIP") or config_model
    if not spec:
        raise ConfigError("no CLIP model given: pass --model SPEC, set MEDVIT_CLIP or `model:` in prompts.yaml")
    return spec
