"""Where results go: a DICOM node by C-STORE (``AE@host:port``) or a DICOMweb server by STOW-RS
(``http(s)://...``). Each sends a list of datasets and raises ``SendError`` (one line: what, where,
why) unless every instance was stored, so the caller can keep them and try again."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import BraintumorError, ConfigError

AE_PATTERN = re.compile(r"^(?P<ae>[^@]+)@(?P<host>[^:@\s]+):(?P<port>\d{1,5})$")
AE_TITLE = re.compile(r"^[!-~](?:[ -~]{0,15})$")  # PS3.5: 1-16 printable ASCII characters, no backslash
# C-STORE statuses that mean stored: success, and the warnings of coercion and elements discarded.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(BraintumorError):
    """Results could not be delivered; they stay queued."""


class Destination(Protocol):
    def send(self, datasets: list[Any]) -> None: ...

    def __str__(self) -> str: ...


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM node (a PACS, a viewer) that accepts C-STORE from ``calling_ae``."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "BRAINTUMOR"
    timeout: float = 30.0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, datasets: list[Any]) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class in sorted({str(d.SOPClassUID) for d in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        association = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not association.is_established:
            raise SendError(f"{self}: association refused or no answer")
        try:
            for dataset in datasets:
                self._store(association, dataset)
        finally:
            association.release()

    def _store(self, association: Any, dataset: Any) -> None:
        try:
            status = association.send_c_store(dataset)
        except (ValueError, RuntimeError) as exc:  # pynetdicom: the peer accepted no context for this SOP class
            raise SendError(f"{self}: cannot send {dataset.SOPClassUID.name} ({exc})") from None
        code = getattr(status, "Status", None)
        if code not in STORED:
            reason = "no answer" if code is None else f"status 0x{code:04X}"
            raise SendError(f"{self}: did not store {dataset.SOPInstanceUID} ({reason})")


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server's base URL (STOW-RS: POST {url}/studies)."""

    url: str

    def __str__(self) -> str:
        return self.url

    def send(self, datasets: list[Any]) -> None:
        from dicomweb_client.api import DICOMwebClient

        try:
            response = DICOMwebClient(self.url).store_instances(datasets)
        except Exception as exc:  # noqa: BLE001 - requests' and the server's many failure types
            raise SendError(f"{self}: STOW-RS failed ({type(exc).__name__}: {exc})") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:  # a 202: some instances stored, these not
            uids = ", ".join(str(item.get("ReferencedSOPInstanceUID", "?")) for item in failed)
            raise SendError(f"{self}: STOW-RS did not store {uids}")


def check_ae_title(value: str, what: str = "AE title") -> str:
    """``value`` when it is a valid DICOM AE title, else a ``ConfigError`` that says why."""
    if not AE_TITLE.match(value) or "\\" in value or len(value.strip()) == 0:
        raise ConfigError(f"{what} {value!r}: an AE title is 1 to 16 printable ASCII characters, no backslash")
    return value.strip()


def parse_destination(text: str, calling_ae: str = "BRAINTUMOR") -> Destination:
    """``AE@host:port`` (C-STORE) or an ``http(s)://`` DICOMweb URL (STOW-RS)."""
    if text.startswith(("http://", "https://")):
        return StowDestination(text.rstrip("/"))
    match = AE_PATTERN.match(text)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"destination {text!r}: give AE@host:port (C-STORE) or an http(s):// DICOMweb URL (STOW-RS)")
    ae_title = check_ae_title(match["ae"], f"destination {text!r}:")
    return CStoreDestination(ae_title, match["host"], int(match["port"]), calling_ae)
