"""Where a run folder is and where its training data is, answered without torch.

Commands check `--run` and read a run's `config.json` here before the heavy imports, so a typo costs a
second, not the torch import. A run's data paths (`config.json` -> `config.data`) are stored absolute
by `medvit train`; older runs stored them relative to the directory training ran in, which is tried after
the run folder itself. When the data has moved, `--data-root DIR` (or $MEDVIT_DATA_ROOT) names the folder
that now holds it: every data path keeps its place below the paths' common folder, re-rooted at DIR.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from medvit.errors import CheckpointError, ConfigError
from medvit.resources import DEMO_RUN

_log = logging.getLogger(__name__)

CONFIG = "config.json"  # findings, preprocessing, model build args, the resolved training config
RUN_ENV = "MEDVIT_RUN"
DATA_ROOT_ENV = "MEDVIT_DATA_ROOT"
DATA_PATH_KEYS = ("labels_csv", "images_root")  # plus every value of `split_files`


def resolve_run_dir(run_dir: str | os.PathLike | None = None) -> Path:
    """The run to serve: `run_dir`, else $MEDVIT_RUN, else the packaged demo model."""
    if run_dir:
        return Path(run_dir)
    if os.environ.get(RUN_ENV):
        return Path(os.environ[RUN_ENV])
    if (DEMO_RUN / CONFIG).is_file():
        return DEMO_RUN
    raise CheckpointError(
        f"no model given and the demo model is missing from {DEMO_RUN}: pass --run RUN_DIR or set {RUN_ENV}"
    )


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """`run_dir` if it is a run folder (holds config.json), else one CheckpointError line."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"run folder not found: {path}")
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a run folder: it has no {CONFIG} (made by medvit train)")
    return path


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The training config a run saved (`config.json` -> "config"), as a plain mapping."""
    path = check_run_dir(run_dir) / CONFIG
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is incomplete or invalid: {e}") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: 'config' is not a mapping")
    return saved


def check_data_root(data_root: str | os.PathLike | None) -> Path | None:
    """`--data-root` (else $MEDVIT_DATA_ROOT) as an existing folder, or None."""
    raw = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        where = "--data-root" if data_root is not None else f"${DATA_ROOT_ENV}"
        raise ConfigError(f"{where} {path}: folder not found")
    return path


def _data_paths(data: dict[str, Any]) -> dict[str, str]:
    """Dotted key -> stored path, for every path of a config's data section."""
    paths = {k: str(data[k]) for k in DATA_PATH_KEYS if data.get(k)}
    paths.update({f"split_files.{k}": str(v) for k, v in (data.get("split_files") or {}).items()})
    return paths


def _locate(stored: str, run_dir: Path) -> Path:
    path = Path(stored).expanduser()
    if path.is_absolute():
        return path
    for base in (run_dir, Path.cwd()):  # run-relative; then the legacy cwd-relative form
        if (base / path).exists():
            return (base / path).absolute()
    return (run_dir / path).absolute()


def resolve_run_data(data: dict[str, Any], run_dir: str | os.PathLike,
                     data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """A run's data section with every path made absolute: as stored (absolute, run-relative or legacy
    cwd-relative), or re-rooted under `data_root` / $MEDVIT_DATA_ROOT when given (see the module docstring)."""
    paths = _data_paths(data)
    root = check_data_root(data_root)
    if root is not None and paths:
        common = os.path.commonpath([os.path.dirname(p) if k == "labels_csv" or k.startswith("split_files.")
                                     else p for k, p in paths.items()])
        located = {k: root / os.path.relpath(p, common) for k, p in paths.items()}
    else:
        located = {k: _locate(p, Path(run_dir)) for k, p in paths.items()}
    out = dict(data)
    for key, path in located.items():
        if key.startswith("split_files."):
            out["split_files"] = {**out["split_files"], key.removeprefix("split_files."): str(path)}
        else:
            out[key] = str(path)
    return out


def data_available(data: dict[str, Any]) -> bool:
    """Whether a (resolved) data section's labels CSV and image folder exist on this machine."""
    return bool(data.get("labels_csv")) and Path(data["labels_csv"]).is_file() \
        and bool(data.get("images_root")) and Path(data["images_root"]).is_dir()
