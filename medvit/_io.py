"""Atomic file I/O shared by every writer: temp file + fsync + rename, so a reader never sees half a file.

Also the safetensors/JSON readers, which refuse pickles (they can run code on load). torch is imported only by
the two tensor functions: commands read JSON and write files through this module before their arguments are
checked, and must not pay the torch import for it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from medvit.errors import CheckpointError

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


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
    from safetensors.torch import save

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
    from safetensors.torch import load_file

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
