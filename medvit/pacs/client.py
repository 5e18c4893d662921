"""A thin wrapper over `dicomweb_client.DICOMwebClient`: the three DICOMweb calls medvit needs, typed errors.

QIDO-RS finds CR/DX instances, WADO-RS retrieves one (in its stored transfer syntax, so `read_image` sees
exactly what the modality sent), STOW-RS stores results, several in one request. Multipart encoding and
decoding are dicomweb-client's; this module only adds credentials from the environment and turns transport
failures into `PacsError` (the server is down or refuses us: back off) or `PacsRequestError` (one request
failed: only its instances fail). Credentials and patient attributes are never logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import TypeVar

import pydicom
import requests
from pydicom.dataset import Dataset

from medvit.errors import PacsError, PacsRequestError

_log = logging.getLogger(__name__)

USER_ENV = "MEDVIT_DICOMWEB_USER"
PASSWORD_ENV = "MEDVIT_DICOMWEB_PASSWORD"
TOKEN_ENV = "MEDVIT_DICOMWEB_TOKEN"
CA_BUNDLE_ENV = "MEDVIT_DICOMWEB_CA_BUNDLE"
RADIOGRAPH_MODALITIES = ("CR", "DX")
# Only what the watcher needs to key, retrieve and order instances: no patient attributes are requested.
_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "StudyDate", "ViewPosition",
           "BodyPartExamined")
_AUTH_STATUS = (401, 403)
# Busy, or a gateway that cannot reach the PACS: back off. Any other error status (500 included: the server
# answered, and failed this one request, e.g. one object it cannot store) fails only that request's instances.
_OUTAGE_STATUS = (408, 429, 502, 503, 504)
_T = TypeVar("_T")


@dataclass(frozen=True)
class InstanceRef:
    """Where one instance lives in the PACS: its three UIDs, modality, study date, view and body part (no patient
    data)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    study_date: str | None = None
    view: str | None = None
    body_part: str | None = None


def session_from_env(*, verify: bool | str | None = None) -> requests.Session:
    """A requests session with the credentials of the environment and TLS verification on.

    A bearer token (`MEDVIT_DICOMWEB_TOKEN`) wins over user and password (`MEDVIT_DICOMWEB_USER`,
    `MEDVIT_DICOMWEB_PASSWORD`); with neither, requests go unauthenticated. `verify` (default: the CA bundle
    in `MEDVIT_DICOMWEB_CA_BUNDLE`, else the system's) may name a CA file; False is accepted only explicitly.
    """
    session = requests.Session()
    token = os.environ.get(TOKEN_ENV)
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    session.verify = verify if verify is not None else (os.environ.get(CA_BUNDLE_ENV) or True)
    # No HTTP compression: a PACS that gzips a 7 MB radiograph on the fly (Orthanc does, by default) spends ~10x
    # the transfer time on it (benchmarks/README.md, watch throughput), and compressed pixel data barely shrinks.
    session.headers["Accept-Encoding"] = "identity"
    return session


# WADO-RS media type for "the instance in the transfer syntax the PACS stored it in": no transcoding on the server
AS_STORED = (("application/dicom", "*"),)


class PacsClient:
    """QIDO / WADO / STOW against one DICOMweb root (e.g. ``http://pacs:8042/dicom-web``)."""

    def __init__(self, url: str, *, session: requests.Session | None = None, timeout: float = 30.0) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self._client = DICOMwebClient(self.url, session=session or session_from_env(), timeout=timeout)
        # dicomweb-client retries every failure, connection errors included, for ~30 s; the watcher backs off
        # on its own (and `--once` must fail fast), so one request is one attempt here.
        self._client.set_http_retry_params(retry=False)

    def search_radiographs(self, since: str | None = None) -> list[InstanceRef]:
        """All CR and DX instances (optionally with StudyDate >= `since`, YYYYMMDD), every page of results.

        One query per modality: multi-valued matching on Modality is optional in QIDO-RS.
        """
        out: list[InstanceRef] = []
        for modality in RADIOGRAPH_MODALITIES:
            filters = {"Modality": modality} | ({"StudyDate": f"{since}-"} if since else {})
            found = self._call(
                "search", lambda f=filters: self._client.search_for_instances(  # type: ignore[misc]
                    search_filters=f, fields=list(_FIELDS), get_remaining=True)
            )
            out.extend(ref for ref in map(_ref, found) if ref is not None)
        _log.debug("QIDO: %d CR/DX instance(s)", len(out))
        return out

    def retrieve_dataset(self, ref: InstanceRef) -> Dataset:
        """The instance as dicomweb-client parsed it, in the transfer syntax the PACS stored it in."""
        return self._call(
            "retrieve", lambda: self._client.retrieve_instance(
                ref.study_uid, ref.series_uid, ref.sop_uid, media_types=AS_STORED)
        )

    def retrieve(self, ref: InstanceRef) -> bytes:
        """The instance as DICOM file bytes, in the transfer syntax the PACS stored it in."""
        return file_bytes(self.retrieve_dataset(ref))

    def store(self, dataset: Dataset) -> None:
        """STOW one instance; a per-instance rejection in the response raises `PacsRequestError`."""
        for reason in self.store_many([dataset]).values():
            raise PacsRequestError(reason or f"PACS {self.url} did not acknowledge the stored object")

    def store_many(self, datasets: Sequence[Dataset]) -> dict[str, str | None]:
        """STOW several instances in one request (one multipart message, one round trip).

        Returns the instances the PACS did not acknowledge, by SOP Instance UID: the failure reason its response
        gives (PS3.18 FailedSOPSequence), or None when the response does not mention the instance (Orthanc 1.10
        answers 200 with neither list when one object breaks its multipart parsing). Acknowledged
        (ReferencedSOPSequence) instances were stored. A failure of the whole request raises `PacsRequestError`
        (or `PacsError` for an outage).
        """
        if not datasets:
            return {}
        response = self._call("store", lambda: self._client.store_instances(list(datasets)))
        response = response if response is not None else Dataset()
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in response.get("ReferencedSOPSequence", [])}
        failed = {str(item.get("ReferencedSOPInstanceUID", "")): f"PACS {self.url} rejected the stored object "
                  f"(failure reason {item.get('FailureReason', 'unknown')})"
                  for item in response.get("FailedSOPSequence", [])}
        return {uid: failed.get(uid) for uid in (str(ds.SOPInstanceUID) for ds in datasets) if uid not in stored}

    def ping(self) -> None:
        """Fail fast (`PacsError`) when the server is down or refuses the credentials."""
        self._call("search", lambda: self._client.search_for_studies(limit=1))

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        with _pacs_errors(self.url, what):
            return fn()


@contextmanager
def _pacs_errors(url: str, what: str) -> Iterator[None]:
    """Transport failures as one-line typed errors; the messages name the server, never the credentials."""
    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in _AUTH_STATUS:
            raise PacsError(
                f"PACS {url} refused the credentials (HTTP {status}): set {USER_ENV}/{PASSWORD_ENV} or {TOKEN_ENV}"
            ) from exc
        if status in _OUTAGE_STATUS:
            raise PacsError(f"PACS {url} is not answering {what} requests (HTTP {status}): try again later") from exc
        raise PacsRequestError(f"PACS {url}: {what} failed with HTTP {status}") from exc
    except requests.exceptions.SSLError as exc:
        raise PacsError(
            f"PACS {url}: TLS certificate not verified ({type(exc).__name__}); set {CA_BUNDLE_ENV} to the site's CA"
        ) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise PacsError(f"PACS {url} cannot be reached ({type(exc).__name__}): is the server running?") from exc


def file_bytes(ds: Dataset) -> bytes:
    """A dataset as DICOM file bytes (what `medvit.data.dicom.read_image` reads)."""
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _ref(item: dict) -> InstanceRef | None:
    """A QIDO JSON result as an `InstanceRef` (None when a UID is missing: nothing could be retrieved)."""

    def value(tag: str) -> str | None:
        v = (item.get(tag) or {}).get("Value")
        return str(v[0]) if v else None

    uids = value("0020000D"), value("0020000E"), value("00080018")
    if not all(uids):
        return None
    return InstanceRef(*uids, modality=value("00080060") or "", study_date=value("00080020"),  # type: ignore[arg-type]
                       view=value("00185101"), body_part=value("00180015"))
