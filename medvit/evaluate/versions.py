"""Calibration versions of a run: write-once files, their metadata, and the pointer to the active one.

A site recalibrates from its own reviews, and may need to go back. So a calibration is never overwritten: the
run's `calibration.json` (what `medvit calibrate` fitted on labelled data) is version "v1", and each later
calibration is a new file `calibrations/vN.json` beside `calibrations/vN.meta.json` (who made it, when, from
which reviews, its parent). `calibrations/active` names the version the predictor, the app, `medvit predict`,
`medvit evaluate` and the SRs use; without it, v1 is active. The first time a second version is written, v1 is
frozen as a byte copy in `calibrations/v1.json`, so a later `medvit calibrate` cannot change what v1 means:
that refit becomes a version of its own (see `register_refit`).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvit._io import atomic_write_bytes, read_json, sha256_file, write_json
from medvit.errors import CheckpointError, ConfigError
from medvit.evaluate.calibration import Calibration
from medvit.runs import CALIBRATION, CALIBRATION_ACTIVE, CALIBRATIONS

_log = logging.getLogger(__name__)

BASE = "v1"  # the run's calibration.json
UNCALIBRATED = "none"  # the version name of a run that was never calibrated
_NAME = re.compile(r"v([1-9][0-9]*)")
_META_SUFFIX = ".meta.json"


@dataclass(frozen=True)
class CalibrationVersion:
    """One stored version: its name, file, metadata, and whether it is the active one."""

    name: str
    path: Path
    meta: dict[str, Any]
    active: bool

    def summary(self) -> dict[str, Any]:
        """The JSON line `medvit calibrate --versions` prints for this version (the full record is its meta file)."""
        out = {"version": self.name, "active": self.active}
        out |= {k: self.meta[k] for k in ("parent", "source", "created_at", "created_by") if k in self.meta}
        if reviews := self.meta.get("reviews"):
            out["reviews"] = {k: reviews.get(k) for k in ("n_labelled", "n_reviewers", "from", "to")}
        if evaluation := self.meta.get("evaluation"):
            out["newest_reviews_mean"] = evaluation.get("mean")
        return out


def _folder(run_dir: Path) -> Path:
    return run_dir / CALIBRATIONS


def _frozen(run_dir: Path, name: str) -> Path:
    return _folder(run_dir) / f"{name}.json"


def _meta_path(run_dir: Path, name: str) -> Path:
    return _folder(run_dir) / f"{name}{_META_SUFFIX}"


def _stored_names(run_dir: Path) -> list[str]:
    folder = _folder(run_dir)
    names = [p.stem for p in folder.glob("v*.json") if _NAME.fullmatch(p.stem)] if folder.is_dir() else []
    return sorted(names, key=lambda n: int(n[1:]))


def version_path(run_dir: str | os.PathLike, name: str) -> Path:
    """The file holding version `name` (v1 is calibration.json until it is frozen).

    Raises:
        ConfigError: no such version (the message lists the ones that exist).
    """
    run_dir = Path(run_dir)
    if _NAME.fullmatch(name):
        path = _frozen(run_dir, name)
        if path.is_file():
            return path
        if name == BASE and (run_dir / CALIBRATION).is_file():
            return run_dir / CALIBRATION
    known = [v.name for v in list_versions(run_dir)]
    raise ConfigError(f"calibration version {name!r} not found in {run_dir}; versions: {', '.join(known) or 'none'}")


def active_name(run_dir: str | os.PathLike) -> str:
    """The active version's name: the pointer file, else v1, else "none" (never calibrated)."""
    run_dir = Path(run_dir)
    pointer = run_dir / CALIBRATION_ACTIVE
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _NAME.fullmatch(name):
            raise CheckpointError(f"{pointer} names {name!r}, not a calibration version; fix it with --activate")
        return name
    return BASE if (run_dir / CALIBRATION).is_file() else UNCALIBRATED


def load_version(run_dir: str | os.PathLike, name: str, findings: Sequence[str] | None = None) -> Calibration:
    """Calibration `name` of the run, checked against the model's findings when given."""
    cal = Calibration.load(version_path(run_dir, name))
    if findings is not None:
        cal.check_findings(findings)
    return cal


def load_active(run_dir: str | os.PathLike, findings: Sequence[str]) -> tuple[str, Calibration]:
    """The active version's name and calibration; ("none", identity) for a run that was never calibrated."""
    name = active_name(run_dir)
    if name == UNCALIBRATED:
        return name, Calibration.identity(findings)
    try:
        return name, load_version(run_dir, name, findings)
    except ConfigError as e:  # the pointer names a file that is gone: the run folder is damaged
        raise CheckpointError(str(e)) from None


def _base_meta(run_dir: Path) -> dict[str, Any]:
    """v1's metadata, read from calibration.json itself (it was written by `medvit calibrate`)."""
    path = run_dir / CALIBRATION
    cal = Calibration.load(path)
    created = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
    return {
        "version": BASE,
        "parent": None,
        "source": "medvit calibrate",
        "created_at": created,
        "fitted_on": cal.info.get("fitted_on"),
        "method": cal.method,
    }


def list_versions(run_dir: str | os.PathLike) -> list[CalibrationVersion]:
    """Every version of the run, oldest first (v1 included while it is still only calibration.json)."""
    run_dir = Path(run_dir)
    names = _stored_names(run_dir)
    if BASE not in names and (run_dir / CALIBRATION).is_file():
        names.insert(0, BASE)
    active = active_name(run_dir)
    out = []
    for name in names:
        path = version_path(run_dir, name)
        meta_file = _meta_path(run_dir, name)
        meta = read_json(meta_file) if meta_file.is_file() else _base_meta(run_dir)
        out.append(CalibrationVersion(name, path, {**meta, "sha256": sha256_file(path)}, name == active))
    return out


def _write_once(path: Path, data: bytes) -> bool:
    """Write `data` to a new file `path` atomically; False (and nothing written) if `path` already exists.

    The bytes go to a fsynced temp file that is then hard-linked to the final name: linking fails rather than
    replaces, so two processes writing the same version number cannot overwrite each other.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _freeze_base(run_dir: Path) -> None:
    """Copy calibration.json to calibrations/v1.json once, so v1 stays what it was when versioning began."""
    _folder(run_dir).mkdir(exist_ok=True)
    base = run_dir / CALIBRATION
    if base.is_file() and _write_once(_frozen(run_dir, BASE), base.read_bytes()):
        write_json(_meta_path(run_dir, BASE), _base_meta(run_dir))
        _log.info("calibration v1 frozen in %s", _frozen(run_dir, BASE))


def save_version(
    run_dir: str | os.PathLike,
    calibration: Calibration,
    meta: dict[str, Any],
    *,
    activate: bool = True,
    created_by: str | None = None,
) -> str:
    """Store `calibration` as the next version (never replacing a file) and return its name.

    `meta` is recorded beside it (review counts, evaluation, ...), with the parent (the version active now),
    who made it (`created_by`, default the OS user) and when. `activate` points the run at it.
    """
    run_dir = Path(run_dir)
    parent = active_name(run_dir)
    _freeze_base(run_dir)
    data = calibration.to_json().encode()
    number = max([int(n[1:]) for n in _stored_names(run_dir)] or [1]) + 1
    while not _write_once(_frozen(run_dir, f"v{number}"), data):  # another process took this number
        number += 1
    name = f"v{number}"
    write_json(
        _meta_path(run_dir, name),
        {
            **meta,
            "version": name,
            "parent": None if parent == UNCALIBRATED else parent,
            "created_at": datetime.now(UTC).isoformat(),
            "created_by": created_by or getpass.getuser(),
        },
    )
    _log.info("calibration %s written (parent %s)", name, parent)
    if activate:
        activate_version(run_dir, name)
    return name


def activate_version(run_dir: str | os.PathLike, name: str) -> str:
    """Point the run at version `name` (roll back or forward) and return the version that was active before.

    Raises:
        ConfigError: no such version.
    """
    run_dir = Path(run_dir)
    version_path(run_dir, name)  # refuse unknown names before touching anything
    previous = active_name(run_dir)
    if _folder(run_dir).is_dir():  # without it only v1 exists, and v1 is active by default
        _freeze_base(run_dir)
        atomic_write_bytes(run_dir / CALIBRATION_ACTIVE, f"{name}\n".encode())
    _log.info("calibration %s active (was %s)", name, previous)
    return previous


def register_refit(run_dir: str | os.PathLike) -> str:
    """After `medvit calibrate` rewrote calibration.json: in a run with versions, keep that fit as a new active
    version (v1 stays the frozen original); in a run without versions it simply is v1. Returns its name."""
    run_dir = Path(run_dir)
    if not _folder(run_dir).is_dir():
        return BASE
    cal = Calibration.load(run_dir / CALIBRATION)
    meta = {"source": "medvit calibrate", "fitted_on": cal.info.get("fitted_on"), "method": cal.method}
    return save_version(run_dir, cal, meta)
