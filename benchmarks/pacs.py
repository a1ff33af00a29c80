"""How long a 150-slice DICOM series takes from its last instance to its results stored in a PACS:

    python benchmarks/pacs.py --data DATA_ROOT [--slices 150] [--quiet 1]

Builds one series of the first ``--slices`` Testing images (sorted by name; single-frame MR files,
``braintumor.pacs.sample``), starts a throw-away Orthanc and a ``DicomNode`` in this process,
sends the series to the node by C-STORE, and waits until Orthanc holds the node's SR and
Secondary Capture. Prints, in seconds: the C-STORE transfer, the node's own time for the series
(read, classify, Grad-CAM, SR and Secondary Capture, from its log), and from the last
acknowledged instance to both results stored in Orthanc, less the quiet period that decides the
series is complete.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the throw-away Orthanc of the tests
from orthanc import free_port, throwaway_orthanc, wait_for  # noqa: E402

from braintumor.data.datasets import load_split  # noqa: E402
from run import machine  # noqa: E402
from braintumor.inference.predict import load_model  # noqa: E402
from braintumor.pacs.destinations import CStoreDestination  # noqa: E402
from braintumor.pacs.node import DicomNode, NodeSettings  # noqa: E402
from braintumor.pacs.sample import write_series  # noqa: E402


class SeriesTimes(logging.Handler):
    """The node's own seconds per series, from its log line."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r" in ([0-9.]+) s$", record.getMessage())
        if match:
            self.seconds.append(float(match.group(1)))


def send(port: int, files: list[Path]) -> float:
    """C-STORE every file to the node; returns when the last one was acknowledged."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="BRAINTUMOR")
    for path in files:
        if association.send_c_store(pydicom.dcmread(path)).Status != 0x0000:
            raise SystemExit(f"{path}: not stored by the node")
    association.release()
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--quiet", type=float, default=1.0, help="the node's quiet period, seconds")
    parser.add_argument("--backend", default="auto", help="the classifier's backend: auto (as dicom-node), torch, onnx")
    arguments = parser.parse_args()
    images = sorted(s.path for s in load_split(arguments.data, "Testing"))[: arguments.slices]
    times = SeriesTimes()
    logging.getLogger("braintumor.dicom_node").addHandler(times)
    logging.getLogger("braintumor.dicom_node").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as folder:
        files = write_series(images, Path(folder) / "series")
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        node_port = free_port()
        with throwaway_orthanc(Path(folder), node_port) as pacs:
            settings = NodeSettings(Path(folder) / "queue", port=node_port, quiet_seconds=arguments.quiet)
            node = DicomNode(load_model(backend=arguments.backend), CStoreDestination("ORTHANC", "127.0.0.1", pacs.dicom_port), settings)
            node.start()
            started = time.perf_counter()
            last_ack = send(node_port, files)
            wait_for(lambda: {"SR", "OT"} <= {s["MainDicomTags"].get("Modality") for s in pacs.study_series(study)},
                     120, "the results in Orthanc", every=0.05)
            stored = time.perf_counter()
            node.stop()
    print(machine())
    print(f"series: {len(files)} slices of {arguments.data.name}/Testing, quiet period {arguments.quiet} s")
    print(f"C-STORE of the series to the node: {last_ack - started:.2f} s")
    print(f"node's time for the series (read, classify, Grad-CAM, SR and SC): {times.seconds[0]:.2f} s")
    print(f"last instance acknowledged -> results stored in Orthanc, less the quiet period: "
          f"{stored - last_ack - arguments.quiet:.2f} s")


if __name__ == "__main__":
    main()
