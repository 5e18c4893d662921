"""The machine: CPU flags read once from /proc/cpuinfo, native bf16, the user cache dir and a fingerprint.

A cached engine choice or benchmark figure is only valid on the machine that measured it."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

_log = logging.getLogger(__name__)

def cache_root() -> Path:
    """The user cache dir for exported graphs, inductor artefacts and backend choices ($MEDVIT_CACHE wins)."""
    import platformdirs

    return Path(os.environ.get("MEDVIT_CACHE") or platformdirs.user_cache_dir("medvit"))


def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def int8_dot_product() -> bool:
    """True when the CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8).

    Without one, ONNX Runtime's u8s8 kernels use vpmaddubsw, whose int16 pair sums saturate.
    """
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def bf16_supported() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX-BF16); emulated bf16 is slower than fp32."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags) or "BF16" in torch.backends.cpu.get_cpu_capability()


def machine_fingerprint() -> str:
    """A short id of this CPU + software stack: a cached backend choice is only valid where it was measured."""
    parts = [platform.machine(), platform.processor(), ",".join(sorted(cpu_flags())), torch.__version__,
             str(torch.get_num_threads())]
    try:
        import onnxruntime

        parts.append(onnxruntime.__version__)
    except ImportError:
        pass
    try:
        model_name = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        parts.append(model_name)
    except (OSError, StopIteration):
        pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
