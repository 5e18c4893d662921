"""The review app's settings and the one environment contract that carries them.

`medvit review` writes them with `app_environment(AppSettings(...))`; the page reads them back with
`AppSettings.from_env()`. Environment variables (rather than command-line arguments to the page) let
`streamlit run apps/review.py` and the AppTest harness see exactly the configuration `medvit review` sets up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from medvit.errors import MedvitError
from medvit.rundir import RUN_ENV

_log = logging.getLogger(__name__)

# This module imports nothing heavy: `medvit review` reads it before it starts the server (cold start, issue 13).
DB_URL_ENV = "MEDVIT_DB_URL"  # the review database's SQLAlchemy URL (medvit.review.store reads it too)
WORKLIST_ENV = "MEDVIT_WORKLIST"  # folder of images listed in the sidebar
FILE_ENV = "MEDVIT_FILE"  # image opened at start
MAX_UPLOAD_ENV = "MEDVIT_MAX_UPLOAD_MB"  # largest upload accepted, in MB
CLIP_TEMPERATURES_ENV = "MEDVIT_CLIP_TEMPERATURES"  # temperatures.json for the zero-shot panel's CLIP
CLIP_ENV = "MEDVIT_CLIP"  # the zero-shot panel's CLIP model (medvit.zeroshot.spec reads it)
DICOMWEB_ENV = "MEDVIT_DICOMWEB_URL"  # a DICOMweb root: the worklist lists the PACS's CR/DX studies
AUTH_ENV = "MEDVIT_AUTH"  # "local" (no sign-in) or "accounts" (site mode)
IDLE_ENV = "MEDVIT_SESSION_IDLE_MINUTES"  # site mode: sign out after this long without activity
DEFAULT_MAX_UPLOAD_MB = 64
DEFAULT_IDLE_MINUTES = 15.0
AuthMode = Literal["local", "accounts"]
AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
DEFAULT_EXAMPLE = "RG1_UNCI.dcm"  # a real 15-bit MONOCHROME1 PA chest CR from pydicom-data
# The app never downloads weights mid-session; huggingface_hub reads these once, at import.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def default_example() -> Path | None:
    """RG1_UNCI.dcm from pydicom-data, the image a fresh install opens on (None if the package is missing)."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(DEFAULT_EXAMPLE)
    except Exception:  # noqa: BLE001 - optional data package: any failure just means "no example"
        _log.warning("pydicom-data not available: the app starts without an example image")
        return None
    return Path(path) if path else None


@dataclass(frozen=True)
class AppSettings:
    """The app's configuration: which run, worklist, first image, upload limit and review database."""

    run_dir: str | None = None  # None: the packaged demo model
    worklist: Path | None = None
    default_file: Path | None = None  # None in the environment: the pydicom-data example
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    db_url: str | None = None  # None: SQLite in the user data dir
    auth: AuthMode = "local"  # "accounts": site mode, sign-in before anything is shown
    idle_minutes: float = DEFAULT_IDLE_MINUTES
    dicomweb_url: str | None = None  # the PACS worklist (credentials: MEDVIT_DICOMWEB_USER/_PASSWORD or _TOKEN)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    def to_env(self) -> dict[str, str]:
        """The environment variables that carry these settings (unset ones are left out, so defaults apply)."""
        values = {
            RUN_ENV: self.run_dir,
            WORKLIST_ENV: self.worklist,
            FILE_ENV: self.default_file,
            DB_URL_ENV: self.db_url,
            MAX_UPLOAD_ENV: self.max_upload_mb,
            AUTH_ENV: self.auth,
            IDLE_ENV: f"{self.idle_minutes:g}",
            DICOMWEB_ENV: self.dicomweb_url,
        }
        return {name: str(v) for name, v in values.items() if v is not None}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AppSettings:
        """Read the settings `to_env` wrote (default: this process's environment).

        Raises:
            MedvitError: the upload limit is not a whole number of at least 1 MB, the sign-in mode is unknown or
                the idle time is not a positive number of minutes.
        """
        env = os.environ if env is None else env
        raw = env.get(MAX_UPLOAD_ENV, str(DEFAULT_MAX_UPLOAD_MB))
        try:
            max_mb = int(raw)
        except ValueError:
            raise MedvitError(f"{MAX_UPLOAD_ENV}={raw!r} is not a whole number") from None
        if max_mb < 1:
            raise MedvitError(f"{MAX_UPLOAD_ENV}={max_mb}: the upload limit must be at least 1 MB")
        file = env.get(FILE_ENV)
        return cls(
            run_dir=env.get(RUN_ENV) or None,
            worklist=Path(env[WORKLIST_ENV]) if env.get(WORKLIST_ENV) else None,
            default_file=Path(file) if file else default_example(),
            max_upload_mb=max_mb,
            db_url=env.get(DB_URL_ENV) or None,
            auth=auth_mode(env),
            idle_minutes=idle_minutes(env),
            dicomweb_url=env.get(DICOMWEB_ENV) or None,
        )


def auth_mode(env: Mapping[str, str] | None = None) -> AuthMode:
    """``$MEDVIT_AUTH``: "local" (the default) or "accounts".

    Raises:
        MedvitError: any other value.
    """
    raw = ((os.environ if env is None else env).get(AUTH_ENV) or "local").strip().lower()
    if raw not in AUTH_MODES:
        raise MedvitError(f"{AUTH_ENV}={raw!r} is not one of {', '.join(AUTH_MODES)}")
    return raw  # type: ignore[return-value]


def idle_minutes(env: Mapping[str, str] | None = None) -> float:
    """``$MEDVIT_SESSION_IDLE_MINUTES`` (default 15): how long a site-mode session may sit idle.

    Raises:
        MedvitError: not a number of minutes in (0, 1440].
    """
    raw = (os.environ if env is None else env).get(IDLE_ENV) or f"{DEFAULT_IDLE_MINUTES:g}"
    try:
        minutes = float(raw)
    except ValueError:
        raise MedvitError(f"{IDLE_ENV}={raw!r} is not a number of minutes") from None
    if not 0 < minutes <= 24 * 60:
        raise MedvitError(f"{IDLE_ENV}={raw}: the idle time must be more than 0 and at most 1440 minutes")
    return minutes


def app_environment(settings: AppSettings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The app process's environment: `base` (default: this process's) with the settings, and offline Hugging
    Face unless `base` says otherwise."""
    return {**_OFFLINE, **(os.environ if base is None else base), **settings.to_env()}
