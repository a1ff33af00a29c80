"""A throw-away Orthanc (Debian's ``orthanc`` package) for the PACS tests and benchmarks/pacs.py:
its own configuration and storage folder, free loopback ports, stopped on exit."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check: Callable[[], Any], seconds: float, what: str, every: float = 0.2) -> Any:
    """``check()``'s first true value, asked every ``every`` seconds for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@dataclass
class Orthanc:
    http: str
    dicom_port: int
    node_port: int  # where Orthanc's "braintumor" modality (AE BRAINTUMOR) listens

    def get(self, path: str) -> Any:
        return httpx.get(self.http + path, timeout=10).json()

    def upload(self, files: list[Path]) -> str:
        """The Orthanc ID of the series the files belong to."""
        answers = [httpx.post(self.http + "/instances", content=f.read_bytes(), timeout=10).json() for f in files]
        return answers[0]["ParentSeries"]

    def study_series(self, study_uid: str) -> list[dict]:
        """The series Orthanc holds of a study, by its StudyInstanceUID (none yet: [])."""
        found = httpx.post(f"{self.http}/tools/lookup", content=study_uid, timeout=10).json()
        return self.get(f"/studies/{found[0]['ID']}/series") if found else []

    def instance_file(self, series: dict) -> bytes:
        return httpx.get(f"{self.http}/instances/{series['Instances'][0]}/file", timeout=10).content


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def throwaway_orthanc(folder: Path, node_port: int) -> Iterator[Orthanc]:
    """Orthanc serving from ``folder`` (config, storage, log), with a DICOMweb root at /dicom-web
    when the plugin is installed and the modality ``braintumor`` at 127.0.0.1:``node_port``."""
    binary = shutil.which("Orthanc")
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "braintumor-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "SaveJobs": False,
        "DicomModalities": {"braintumor": ["BRAINTUMOR", "127.0.0.1", node_port]},
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "w") as log:
        process = subprocess.Popen([binary, str(folder / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, node_port)
    try:
        wait_for(lambda: _answers(server.http + "/system"), 30, "Orthanc to start")
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
