"""`auto`: time every engine on real images; keep the fastest that matches eager fp32, cached per weights + machine."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medvit._io import write_json
from medvit._platform import cache_root
from medvit.inference.engines import (
    AUTO_TOLERANCE,
    Backend,
    TorchBackend,
    available_backends,
    create_backend,
    median_ms,
    unavailable_reason,
)
from medvit.inference.fp32check import fp32_reference, verify

_log = logging.getLogger(__name__)

CHOICE_FILE = "backend_choice.json"

# Engines `auto` never picks; they run when named (--backend). bf16 rounds every activation to 8 bits of mantissa,
# which reorders images whose outputs are nearly tied: on an AMX Xeon the demo's mean AUROC on the 51 dev val
# images moved +0.0035 (torch-bf16) and -0.0042 (torch-compile-bf16), over issue 14's 0.002, against at most
# 0.0012 for the int8 engines (fp32 activations between int8 matmuls). No ISA seen had bf16 faster than int8.
EXPLICIT_ONLY = frozenset({"torch-bf16", "torch-compile-bf16"})


def auto_candidates() -> list[str]:
    """The engines `auto` chooses among on this machine: the available ones, less EXPLICIT_ONLY."""
    return [b for b in available_backends() if b not in EXPLICIT_ONLY]


@dataclass
class SelfCheck:
    """The result of `auto`: the chosen backend and what every candidate measured."""

    backend: str
    tolerance: float
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "tolerance": self.tolerance, "results": self.results,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def self_check(
    model: nn.Module, sample: np.ndarray, *, candidates: Sequence[str] | None = None,
    tolerance: float = AUTO_TOLERANCE, repeats: int = 3, **backend_kwargs: Any,
) -> tuple[SelfCheck, Backend]:
    """Time every candidate at batch 1 on `sample` (N real inputs) and keep the fastest that matches fp32.

    Each candidate goes through `fp32check.verify` (batch N and batch 1) before it is timed. Returns the
    check record and the built winning backend (so the caller need not build it twice). A candidate that
    raises or drifts beyond `tolerance` is recorded with the reason and skipped.
    """
    candidates = list(candidates or auto_candidates())
    if "torch" not in candidates:
        candidates.insert(0, "torch")
    input_size = sample.shape[1:]
    ref = TorchBackend(model)
    reference = fp32_reference(model, sample)
    results: dict[str, dict[str, Any]] = {}
    built: dict[str, Backend] = {}
    for name in candidates:
        reason = unavailable_reason(name)
        if reason:
            results[name] = {"ok": False, "reason": reason}
            continue
        try:
            backend = ref if name == "torch" else create_backend(name, model, input_size=input_size, **backend_kwargs)
            check = verify(backend, model, sample, tolerance, reference=reference)  # also warms up batch 1
            ms = median_ms(partial(backend, sample[:1]), repeats)
        except Exception as e:  # noqa: BLE001 - any failure just disqualifies the candidate, with its reason
            _log.warning("backend %s failed its self-check: %s", name, e)
            results[name] = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
            continue
        results[name] = {"ok": check.ok, "ms_batch1": round(ms, 3), "max_abs_dp": check.max_abs_dp,
                         "max_abs_dlogit": check.max_abs_diff}
        if check.ok:
            built[name] = backend
        else:
            results[name]["reason"] = f"max |dp| {check.max_abs_dp:.4g} > tolerance {tolerance}"
        _log.info("self-check %s: %.1f ms/image, max |dp| %.2g%s", name, ms, check.max_abs_dp,
                  "" if check.ok else " (rejected)")
    best = min(built, key=lambda n: results[n]["ms_batch1"])
    return SelfCheck(best, tolerance, results), built[best]


def load_choice(key: str, path: Path | None = None) -> dict[str, Any] | None:
    """A cached self-check for `key` (weights sha + machine), or None."""
    path = path or cache_root() / CHOICE_FILE
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        return None


def save_choice(key: str, check: SelfCheck, path: Path | None = None) -> None:
    """Record a self-check result (atomic replace; other keys are kept)."""
    path = path or cache_root() / CHOICE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = check.to_json()
    write_json(path, data)
