"""The machine: CPU model and ISA flags (read once from /proc/cpuinfo), native bf16, the user cache dir, a fingerprint.

This is the only module that reads /proc/cpuinfo. A cached engine choice or benchmark figure is only valid
on the machine that measured it."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

import platformdirs
import torch


def cache_root() -> Path:
    """The user cache dir for exported graphs, inductor artefacts and backend choices ($MEDVIT_CACHE wins)."""
    return Path(os.environ.get("MEDVIT_CACHE") or platformdirs.user_cache_dir("medvit"))


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:  # not Linux
        return ()


def _cpuinfo_field(*keys: str) -> str | None:
    line = next((ln for ln in _cpuinfo() if ln.startswith(keys)), None)
    return line.partition(":")[2].strip() if line is not None else None


def isa_flags() -> frozenset[str]:
    """CPU feature flags (x86 "flags", Arm "Features"); empty where /proc/cpuinfo does not exist."""
    return frozenset((_cpuinfo_field("flags", "Features") or "").split())


def cpu_model() -> str:
    """The CPU's marketing name ("model name"), else what `platform.processor()` says."""
    return _cpuinfo_field("model name") or platform.processor()


def int8_dot_product() -> bool:
    """True when the CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8).

    Without one, ONNX Runtime's u8s8 kernels use vpmaddubsw, whose int16 pair sums saturate.
    """
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & isa_flags())


def bf16_supported() -> bool:
    """The one bf16 rule: native bf16 matmul (AVX512-BF16 or AMX-BF16). Emulated bf16 is slower than fp32,
    so bf16 engines and bf16 autocast are only offered where this holds."""
    return bool({"avx512_bf16", "amx_bf16"} & isa_flags()) or "BF16" in torch.backends.cpu.get_cpu_capability()


def machine_fingerprint() -> str:
    """A short id of this CPU + software stack: a cached backend choice is only valid where it was measured."""
    parts = [platform.machine(), cpu_model(), ",".join(sorted(isa_flags())), torch.__version__,
             str(torch.get_num_threads())]
    try:
        import onnxruntime

        parts.append(onnxruntime.__version__)
    except ImportError:
        pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
