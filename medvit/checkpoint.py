"""Run-folder I/O: atomic safetensors/JSON writes, `load_run`, and pickle-free resume state.

A run folder is self-describing: `config.json` holds everything needed to rebuild the network
(timm name + kwargs + head), the findings and the preprocessing, so `load_run` needs no YAML.
Nothing here unpickles: weights and optimizer state are safetensors, the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from medvit.errors import CheckpointError

_log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LAST = "last.safetensors"
STATE = "state.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_MODEL_BUILD_KEYS = ("name", "model_kwargs", "head", "head_hidden", "head_dropout", "drop_path_rate")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + rename, so readers never see a partial file.

    Raises:
        CheckpointError: the write failed (full disk, permissions); the previous file is left unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; run folders are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(
                f"cannot write {path}: {e.strerror or e}; free disk space or write the run elsewhere (--out); "
                f"the previous {path.name} is unchanged"
            ) from e
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise CheckpointError(f"wrote {path} but could not sync its folder: {e.strerror or e}") from e


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path next to `path` that replaces it only if the block succeeds (for writers that need a path).

    No fsync: meant for regenerable outputs (exports, image caches) where `atomic_write_bytes` would be slow.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an export is meant to be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 dtype: torch.dtype | None = None) -> str:
    """Atomically save tensors as safetensors; floating tensors are cast to `dtype` when given.

    Returns the SHA-256 of the written file, hashed from memory (no second read of a possibly large file).
    """
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    data = save(out, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; pickle formats are refused (they can execute code on load)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name} is a pickle checkpoint, which medvit refuses to load (it can run arbitrary code); "
            "convert it once in a trusted environment with safetensors.torch.save_file(state_dict, 'model.safetensors')"
        )
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: str | os.PathLike, model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Save a model's state dict (optionally in fp16/bf16 to halve the file; `load_run` casts back)."""
    save_tensors(path, model.state_dict(), metadata={"format": "pt"}, dtype=dtype)


def model_build_args(model_cfg: Any, num_classes: int) -> dict[str, Any]:
    """The subset of a ModelConfig needed to rebuild the network (no pretrained source, no freezing)."""
    dumped = model_cfg.model_dump(mode="json")
    return {**{k: dumped[k] for k in _MODEL_BUILD_KEYS}, "num_classes": num_classes}


def write_run_config(run_dir: str | os.PathLike, config: dict[str, Any], findings: list[str],
                     preprocessing: dict[str, Any], model_args: dict[str, Any]) -> None:
    """Write `config.json`: the resolved config plus what inference needs without the YAML."""
    write_json(Path(run_dir) / CONFIG, {
        "findings": list(findings),
        "preprocessing": preprocessing,
        "model": model_args,
        "config": config,
    })


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about its model."""

    run_dir: Path
    findings: tuple[str, ...]
    preprocessing: dict[str, Any]
    model_name: str
    model_args: dict[str, Any]
    config: dict[str, Any]
    weights_path: Path
    weights_sha256: str


def _refuse_pickles(run_dir: Path) -> None:
    pickles = sorted(p.name for p in run_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    hint = f"; found pickle checkpoint(s) {', '.join(pickles)}, which medvit refuses to load" if pickles else ""
    raise CheckpointError(f"{run_dir} has no {WEIGHTS}{hint} (a run folder needs {CONFIG} + {WEIGHTS})")


def load_run(run_dir: str | os.PathLike, weights: str = WEIGHTS) -> tuple[nn.Module, RunInfo]:
    """Rebuild the trained network from a run folder, in eval mode, with float32 weights.

    Raises:
        CheckpointError: missing/invalid config.json or weights, pickle-only folders, mismatched weights.
    """
    from medvit.config import ModelConfig
    from medvit.model import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    weights_path = run_dir / weights
    if not weights_path.is_file():
        _refuse_pickles(run_dir)
    meta = read_json(run_dir / CONFIG)
    try:
        args = dict(meta["model"])
        findings = tuple(meta["findings"])
        preprocessing = dict(meta["preprocessing"])
        num_classes = int(args.pop("num_classes"))
        model_cfg = ModelConfig(**args, pretrained=False, freeze_stem=False, freeze_blocks=0)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / CONFIG} is incomplete or invalid: {e}") from None
    if num_classes != len(findings):
        raise CheckpointError(f"{run_dir / CONFIG}: {num_classes} outputs but {len(findings)} findings")
    model = build_model(model_cfg, num_classes)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_tensors(weights_path).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_path} does not match the model in {CONFIG}: {str(e)[:300]}") from None
    model.eval()
    info = RunInfo(run_dir=run_dir, findings=findings, preprocessing=preprocessing, model_name=model_cfg.name,
                   model_args=meta["model"], config=meta.get("config", {}), weights_path=weights_path,
                   weights_sha256=sha256_file(weights_path))
    return model, info


# ---- resume state: model + optimizer + EMA tensors in last.safetensors, the rest in state.json ----

def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state: Any = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_resume_state(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                      ema: nn.Module | None, state: dict[str, Any]) -> None:
    """Write everything needed to continue exactly after this epoch: last.safetensors, then state.json.

    `state` (epoch, global step, best metric, ... JSON-able) is tagged with the epoch also stored in the
    tensor file, so a crash between the two writes is detected instead of mixing epochs.
    """
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    epoch = str(state["epoch"])
    digest = save_tensors(run_dir / LAST, tensors, metadata={"epoch": epoch})
    write_json(run_dir / STATE, {**state, "param_groups": opt["param_groups"], "rng": rng_meta,
                                 "tensors_sha256": digest})


def load_resume_state(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                      ema: nn.Module | None) -> dict[str, Any]:
    """Restore model, optimizer, EMA and RNG states in place; returns the JSON state (epoch, step, ...).

    Raises:
        CheckpointError: missing or inconsistent resume files.
    """
    run_dir = Path(run_dir)
    if not (run_dir / LAST).is_file() or not (run_dir / STATE).is_file():
        raise CheckpointError(f"{run_dir} has no resume state ({LAST} + {STATE}); was it written by medvit train?")
    state = read_json(run_dir / STATE)
    if sha256_file(run_dir / LAST) != state.get("tensors_sha256"):
        raise CheckpointError(f"{run_dir / LAST} does not match {STATE} (interrupted write?); cannot resume exactly")
    tensors = load_tensors(run_dir / LAST)

    def _prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(_prefixed("model."), strict=True)
        if ema is not None:
            ema.load_state_dict(_prefixed("ema."), strict=True)
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in _prefixed("optim.").items():
            idx, key = k.split(".", 1)
            slots.setdefault(int(idx), {})[key] = v
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
        optimizer.load_state_dict({"state": slots, "param_groups": groups})  # type: ignore[dict-item]
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"resume state in {run_dir} does not match this model/optimizer: {e}") from None
    _set_rng_state(tensors, state["rng"])
    return state
