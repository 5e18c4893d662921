"""Load starting weights into a timm backbone strictly, and say what was loaded.

timm's own `pretrained=True` load turns non-strict when the head is dropped (`num_classes=0`): a file with
the wrong keys then loads nothing and only logs "Unexpected keys ... may be expected". Here every source
(a local file, a folder holding `model.safetensors` such as a medvit run folder, or the hub) is read into a
state dict, passed through the model family's own `checkpoint_filter_fn` (format conversions, position-
embedding resampling), and compared key by key with the backbone. Only a classifier head may be left over;
any missing backbone tensor, any other leftover key, or any shape difference is one error line naming the
file and the first mismatches. What was loaded (file, SHA-256, counts) is kept on the backbone as
`starting_weights` for `config.json` and the model card.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from medvit import hub
from medvit._io import sha256_file
from medvit.errors import CheckpointError, WeightsNotFoundError

_log = logging.getLogger(__name__)

FOLDER_WEIGHTS = "model.safetensors"  # the weights file of a timm hub repo and of a medvit run folder alike
RUN_PREFIX = "backbone."  # a medvit run's model.safetensors: backbone.* + head.*
RUN_HEAD = "head."
SHOWN = 3  # mismatched keys named in an error


@dataclass(frozen=True)
class StartingWeights:
    """Where a backbone's starting weights came from and how much of the file it used."""

    file: str
    sha256: str
    source: str  # "file", "run folder" or "hub <repo id>"
    loaded: int
    missing: int
    unexpected_head: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def hub_hint(name: str) -> str:
    """What an error message says about a model's pretrained weights: where to download them."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if repo:
        return f"download model.safetensors from https://huggingface.co/{repo} (repo id {repo})"
    return f"download the pretrained weights of {name!r} (timm has no Hugging Face hub id for it)"


def resolve_file(weights_file: str | Path) -> tuple[Path, str]:
    """The weights file `model.weights_file` names, and what kind of source it is.

    A folder stands for its `model.safetensors` (a medvit run folder, or a downloaded timm hub repo).
    """
    path = Path(weights_file).expanduser()
    if path.is_dir():
        inner = path / FOLDER_WEIGHTS
        if not inner.is_file():
            raise WeightsNotFoundError(f"model.weights_file {path} is a folder without {FOLDER_WEIGHTS} "
                                       "(give a weights file, a medvit run folder or a downloaded hub repo)")
        return inner, "run folder" if (path / "config.json").is_file() else "folder"
    return path, "file"


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pth/.bin through timm (torch.load with weights_only=True)."""
    try:  # a pickle payload fails under weights_only instead of running
        state = timm.models.load_state_dict(str(path), use_ema=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
        raise CheckpointError(f"model.weights_file {path} is not a readable weights file "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.weights_file {path} holds no plain tensor state dict")
    return state


def _strip_run_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """A medvit classifier's state (backbone.* + head.*) as the backbone's own keys; returns (state, head keys)."""
    if not any(k.startswith(RUN_PREFIX) for k in state):
        return state, 0
    backbone = {k.removeprefix(RUN_PREFIX): v for k, v in state.items() if k.startswith(RUN_PREFIX)}
    head = sum(1 for k in state if k.startswith(RUN_HEAD))
    others = sorted(k for k in state if not k.startswith((RUN_PREFIX, RUN_HEAD)))
    backbone.update({k: state[k] for k in others})  # reported as unexpected below
    return backbone, head


def _family_filter(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The timm family's `checkpoint_filter_fn`: converts original-format checkpoints, resamples position
    embeddings to the model's image size. A file the filter cannot read is reported, not raised raw."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return fn(state, model)
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"model.weights_file {path} does not fit {type(model).__name__} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier: str | Sequence[str] = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _first(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_file_strict(model: nn.Module, path: Path, name: str, source: str = "file") -> StartingWeights:
    """Load `path` into `model` (a timm backbone built with num_classes=0); only a classifier head may be left over.

    Raises:
        CheckpointError: unreadable file, shape mismatch, missing backbone tensors or foreign keys (one line).
    """
    state, run_head = _strip_run_prefix(_read(path))
    state = _family_filter(model, state, path)
    target = model.state_dict()
    heads = _head_prefixes(model)
    shapes = [k for k in target if k in state and state[k].shape != target[k].shape]
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"model.weights_file {path.name} does not fit {name} as configured: {len(shapes)} tensor(s) differ in "
            f"shape, first {k} is {_shape(state[k])} in the file but {_shape(target[k])} in the model; "
            "make model.name and model.model_kwargs (embed_dim, depth, patch_size, ...) match the file")
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    foreign = [k for k in extra if not k.startswith(heads)]
    if missing or foreign:
        raise CheckpointError(
            f"model.weights_file {path} is not a {name} backbone: {len(target) - len(missing)} of {len(target)} "
            f"tensors found" + (f"; missing {_first(missing)}" if missing else "")
            + (f"; unexpected {_first(foreign)}" if foreign else "")
            + "; give the backbone's own weights (timm model.safetensors, a medvit run folder, or MAE encoder)")
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=True)
    report = StartingWeights(file=str(path.resolve()), sha256=sha256_file(path), source=source,
                             loaded=len(target), missing=0, unexpected_head=len(extra) + run_head)
    _log.info("loaded %s from %s (%s): %d tensors loaded, 0 missing, %d head tensors left out; sha256 %s",
              name, path, source, report.loaded, report.unexpected_head, report.sha256[:12])
    return report


def _hub_file(model: nn.Module, name: str) -> tuple[Path, str]:
    """The pretrained weights of `name` from the Hugging Face cache or hub (no download when offline/unreachable)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from timm.models._hub import hf_split

    cfg = getattr(model, "pretrained_cfg", None) or {}
    repo = cfg.get("hf_hub_id")
    hint = (f"{hub_hint(name)}, then set model.weights_file: /path/to/model.safetensors "
            "(or --set model.weights_file=...), or train from scratch with model.pretrained: false")
    if not repo:
        raise WeightsNotFoundError(f"timm has no Hugging Face hub weights for {name}: {hint}")
    repo_id, revision = hf_split(repo)
    local_only = hub.use_local_files_only()
    names = [cfg.get("hf_hub_filename") or FOLDER_WEIGHTS, "pytorch_model.bin"]
    for filename in dict.fromkeys(names):
        try:
            path = hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only)
            return Path(path), f"hub {repo_id}"
        except LocalEntryNotFoundError:  # not cached (a subclass of EntryNotFoundError: caught first)
            if local_only:
                break
            continue
        except EntryNotFoundError:  # the repo has no such file: try the next name
            continue
        except (OSError, ValueError) as e:  # network errors are OSError subclasses
            raise WeightsNotFoundError(f"pretrained weights for {name} could not be downloaded "
                                       f"({type(e).__name__}): {hint}") from None
    if local_only:
        raise WeightsNotFoundError(f"pretrained weights for {name} are not in the local Hugging Face cache and "
                                   f"{hub.unavailable_reason()}: {hint}")
    raise WeightsNotFoundError(f"the hub repo {repo_id} has no {' or '.join(names)}: {hint}")


def load_backbone(cfg: Any, kwargs: dict[str, Any]) -> nn.Module:
    """The timm backbone of `cfg` (a ModelConfig) with its starting weights: none, `weights_file`, or the hub.

    The returned backbone carries `starting_weights` (a `StartingWeights`, or None for random initialisation).

    Raises:
        WeightsNotFoundError: the file does not exist, or hub weights are not cached and cannot be downloaded.
        CheckpointError: the weights do not fit the backbone (see `load_file_strict`).
    """
    model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    report: StartingWeights | None = None
    if cfg.weights_file is not None:
        path, source = resolve_file(cfg.weights_file)
        if not path.is_file():
            raise WeightsNotFoundError(f"model.weights_file {path} does not exist: "
                                       f"{hub_hint(cfg.name)} and put it at that path")
        report = load_file_strict(model, path, cfg.name, source)
    elif cfg.pretrained:
        path, source = _hub_file(model, cfg.name)
        report = load_file_strict(model, path, cfg.name, source)
    object.__setattr__(model, "starting_weights", report)  # a plain attribute, not a submodule or tensor
    return model


def starting_weights(model: nn.Module) -> dict[str, Any] | None:
    """The `starting_weights` record of a classifier's backbone (or of a backbone), as JSON; None when random."""
    backbone = getattr(model, "backbone", model)
    report = getattr(backbone, "starting_weights", None)
    return report.to_json() if isinstance(report, StartingWeights) else None
