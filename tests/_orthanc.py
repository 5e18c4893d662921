"""A real Orthanc for the PACS tests: temporary storage, the DICOMweb plugin, HTTP authentication on with a test
user, remote access off; started on free loopback ports and stopped by its PID.

`running_orthanc` is the body of a fixture (it skips, with the reason, when Orthanc or its DICOMweb plugin is not
installed, and puts the test user's credentials in the environment for `medvit.pacs.client`); `Orthanc` is the
server, usable on its own (a restart keeps the storage, the port and the password).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import free_port

from medvit.pacs.client import PASSWORD_ENV, TOKEN_ENV, USER_ENV

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGINS = Path("/usr/share/orthanc/plugins")
USER = "medvit"


class Orthanc:
    """One Orthanc process over a storage folder that outlives it (so a restart finds the same instances).

    `lua`: an Orthanc Lua script (e.g. a `ReceivedInstanceFilter` that makes the server reject some objects).
    """

    def __init__(self, root: Path, lua: str | None = None) -> None:
        self.root, self.password = root, secrets.token_urlsafe(16)
        root.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        scripts = []
        if lua is not None:
            (root / "filter.lua").write_text(lua)
            scripts = [str(root / "filter.lua")]
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "medvit-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: self.password},
            "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so"), str(PLUGINS / "libOrthancGdcm.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "LuaScripts": scripts,
        }))  # fmt: skip
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    def start(self) -> None:
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([str(ORTHANC), str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}: {(self.root / 'orthanc.log').read_text()}")
            try:
                if requests.get(f"{self.base}/system", auth=(USER, self.password), timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        pytest.fail("Orthanc did not answer /system within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # this process only, by its PID
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def upload(self, ds: pydicom.Dataset) -> None:
        buf = BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        r = requests.post(f"{self.base}/instances", data=buf.getvalue(), auth=(USER, self.password), timeout=30)
        assert r.ok, r.text

    def count(self, modality: str | None = None) -> int:
        r = requests.post(f"{self.base}/tools/find", auth=(USER, self.password), timeout=30,
                          json={"Level": "Instance", "Query": {"Modality": modality} if modality else {}})
        return len(r.json())


def running_orthanc(root: Path, monkeypatch: pytest.MonkeyPatch, lua: str | None = None) -> Iterator[Orthanc]:
    """Start an Orthanc in `root` with the client's credentials in the environment; stop it afterwards.

    For fixtures: ``yield from running_orthanc(tmp_path / "orthanc", monkeypatch)``.
    """
    if not ORTHANC.is_file() or not (PLUGINS / "libOrthancDicomWeb.so").is_file():
        pytest.skip(f"Orthanc not installed ({ORTHANC}, DICOMweb plugin): apt-get install orthanc orthanc-dicomweb")
    server = Orthanc(root, lua)
    server.start()
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, server.password)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    try:
        yield server
    finally:
        server.stop()

