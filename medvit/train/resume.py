"""Pickle-free resume state: model + optimizer + EMA + RNG tensors in last.safetensors, the rest in state.json."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvit._io import load_tensors, read_json, save_tensors, sha256_file, write_json
from medvit.errors import CheckpointError

_log = logging.getLogger(__name__)

LAST = "last.safetensors"


STATE = "state.json"


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
