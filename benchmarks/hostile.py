"""Hostile and careless inputs against the command line and the HTTP service, with what each costs:

    python benchmarks/hostile.py [--only NAME ...]

Builds each input of issue 22 in a temporary folder (most are small files whose headers claim huge
sizes; the 1,000-slice volume is real), then
- CLI: ``braintumor predict INPUT --json`` in a fresh process per input: wall seconds, peak resident
  memory above a one-scan run's, exit code and the first line of the answer or error;
- service: one ``braintumor serve`` process, each input posted to ``/v1/predict``: seconds, the
  server's peak resident memory during the request above its level before it (VmHWM, reset per
  request), its resident memory after, status and the answer's first error; then the edges
  (DNS rebinding, 70 idle connections, SIGTERM during a long request).
- DICOM node: one ``braintumor dicom-node`` process (results sent nowhere), each DICOM input sent
  by C-STORE in its own transfer syntax, plus a deflate bomb (1.5 GB of zeros, 1.5 MB deflated):
  C-STORE status, seconds, the node's peak memory above its level before, and whether a normal
  series sent after the bombs is classified; then SIGTERM.
Prints one table per target with the CPU's model and flags.
Targets (issue 22): a one-line reason or a result, <= 2 GB above idle, <= 30 s, back at idle after.
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
from startup import cpu  # benchmarks/ is the script's own folder

ROOT = Path(__file__).resolve().parents[1]
SCAN = sorted((ROOT / "examples" / "scans" / "glioma").glob("*.jpg"))[0]
BRAINTUMOR = str(Path(sys.executable).with_name("braintumor"))


def _dicom(path: Path, rows: int, columns: int, frames: int, bits: int = 16, data: bytes | None = None,
           syntax: str = "1.2.840.10008.1.2.1") -> Path:
    """A DICOM file whose header claims ``frames`` frames of ``rows`` x ``columns`` at ``bits``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.Rows, dataset.Columns, dataset.NumberOfFrames = "MR", rows, columns, frames
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits, bits - 1, 0
    dataset.PixelData = data if data is not None else bytes(rows * columns * frames * bits // 8)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _nifti_claim(path: Path, shape: tuple[int, ...], dtype: type, version: int = 1, packed: bool = False) -> Path:
    """A NIfTI file whose header claims ``shape`` of ``dtype``: zeros, streamed through gzip when
    ``packed`` (the whole claimed size, a few hundred KiB compressed), else a few bytes of data."""
    header = nib.Nifti2Header() if version == 2 else nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    head = header.binaryblock + b"\0" * 4
    if not packed:
        path.write_bytes(head + b"\0" * 1024)
        return path
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    packer, chunk, out = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20), [b""]
    out.append(packer.compress(head))
    for _ in range(total >> 20):
        out.append(packer.compress(chunk))
    out.append(packer.flush())
    path.write_bytes(b"".join(out))
    return path


def build_inputs(folder: Path) -> dict[str, Path]:
    """Each hostile input of issue 22, by name."""
    names: dict[str, Callable[[Path], Path]] = {
        "NIfTI-2 2x2x30,000,000": lambda p: _nifti_claim(p.with_suffix(".nii"), (2, 2, 30_000_000), np.float32, 2),
        "DICOM 1x1x25,000,000 frames": lambda p: _dicom(p.with_suffix(".dcm"), 1, 1, 25_000_000, data=bytes(64)),
        "DICOM 16x16x20,000 frames (5 MB)": lambda p: _dicom(p.with_suffix(".dcm"), 16, 16, 20_000),
        "DICOM 4096x4096x7 64-bit": lambda p: _dicom(p.with_suffix(".dcm"), 4096, 4096, 7, 64, data=bytes(64)),
        "NIfTI float64 gzip 512x512x400": lambda p: _nifti_claim(p.with_suffix(".nii.gz"), (512, 512, 400),
                                                                 np.float64, packed=True),
        "sparse 1.5 GB DICOM": lambda p: _sparse(p.with_suffix(".dcm"), 1536 << 20),
        "big-endian syntax lie": lambda p: _lie(p.with_suffix(".dcm")),
        "volume 64x64x1,000 (real)": lambda p: _volume(p.with_suffix(".nii")),
    }
    return {name: build(folder / f"input{k}") for k, (name, build) in enumerate(names.items())}


def _sparse(path: Path, size: int) -> Path:
    _dicom(path, 64, 64, 1)
    with path.open("r+b") as handle:
        handle.truncate(size)
    return path


def _lie(path: Path) -> Path:
    _dicom(path, 64, 64, 1)
    path.write_bytes(path.read_bytes().replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00", 1))
    return path


def _volume(path: Path) -> Path:
    volume = (np.random.default_rng(0).random((64, 64, 1000)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


TARGET_SECONDS, TARGET_MIB = 30.0, 2048.0


def verdict(seconds: float, mib: float) -> str:
    """Within issue 22's targets for one input (<= 30 s, <= 2 GB above the level before)?"""
    return "within" if seconds <= TARGET_SECONDS and mib <= TARGET_MIB else "MISSED"


def cli_run(path: Path) -> tuple[float, float, int, str]:
    """(seconds, peak MiB, exit code, first line of the answer) of ``braintumor predict PATH --json``."""
    probe = ("import json,resource,subprocess,sys,time; t=time.perf_counter(); "
             "r=subprocess.run(json.loads(sys.argv[1]),capture_output=True,text=True,errors='replace'); "
             "print(json.dumps([time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, "
             "r.returncode, r.stdout, r.stderr]))")
    command = [BRAINTUMOR, "predict", str(path), "--json"]
    seconds, peak, code, out, err = json.loads(subprocess.run([sys.executable, "-c", probe, json.dumps(command)],
                                                              capture_output=True, text=True, check=True).stdout)
    try:
        answer = json.loads(out)[0]
        first = answer.get("error") or f"{answer.get('label')} (and {len(json.loads(out)) - 1} more)"
    except (ValueError, IndexError, AttributeError):
        first = (err.strip().splitlines() or ["(nothing)"])[-1]
    return seconds, peak, code, first[:110]


CHILDREN: list[subprocess.Popen] = []  # the server and node started here: killed at exit, whatever happened


def _spawn(command: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    CHILDREN.append(process)
    return process


@atexit.register
def _kill_children() -> None:
    for process in CHILDREN:
        if process.poll() is None:
            process.kill()


def _status(pid: int, field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def start_server(port: int) -> subprocess.Popen:
    server = _spawn([BRAINTUMOR, "serve", "--port", str(port), "--max-file-mb", "64"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("the server did not start")


def service_run(url: str, pid: int, path: Path) -> tuple[float, float, float, int, str]:
    """(seconds, peak MiB above before, MiB after minus before, status, first error) of one upload."""
    before = _status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
    started = time.perf_counter()
    if path.stat().st_size > 64 << 20:  # announced, not sent: the service answers from the length alone
        status, text = _announce(url, path.stat().st_size)
    else:
        response = httpx.post(f"{url}/v1/predict", files=[("files", (path.name, path.read_bytes()))], timeout=120)
        status, text = response.status_code, response.text
    seconds = time.perf_counter() - started
    time.sleep(0.3)
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            first = body["error"]
        else:
            first = body[0].get("error") or f"{body[0]['label']} (and {len(body) - 1} more)"
    except (ValueError, KeyError, IndexError):
        first = text[:80]
    return seconds, _status(pid, "VmHWM") - before, _status(pid, "VmRSS") - before, status, first[:100]


def _announce(url: str, length: int) -> tuple[int, str]:
    """(status, body) of a request that announces ``length`` bytes of upload and sends none."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                    f"boundary=b\r\nContent-Length: {length}\r\n\r\n".encode())
        answer = raw.recv(65536).decode("latin-1")
    head, _, body = answer.partition("\r\n\r\n")
    return int(head.split()[1]), body


def edges(url: str, port: int, server: subprocess.Popen, long_input: Path) -> list[str]:
    rows = []
    rebinding = httpx.get(f"{url}/v1/model", headers={"Host": "evil.example", "Origin": "http://evil.example"})
    refused = "within" if rebinding.status_code == 400 else "MISSED"
    rows.append(f"| DNS rebinding (Host and Origin evil.example) | {rebinding.status_code} | "
                f"{rebinding.json().get('error', '')[:90]} | {refused} |")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(70)]
    started = time.perf_counter()
    health = httpx.get(f"{url}/healthz", timeout=60)
    waited = time.perf_counter() - started
    rows.append(f"| 70 idle connections, then /healthz | {health.status_code} | answered after {waited:.1f} s | "
                f"{'within' if health.status_code == 200 else 'MISSED'} |")
    for connection in idle:
        connection.close()
    answers: list[httpx.Response] = []
    upload = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{url}/v1/predict", files=[("files", (long_input.name, long_input.read_bytes()))], timeout=60)))
    upload.start()
    time.sleep(2.0)
    stopping = time.perf_counter()
    server.send_signal(signal.SIGTERM)
    output, _ = server.communicate(timeout=60)
    took = time.perf_counter() - stopping
    upload.join(timeout=30)
    status = answers[0].status_code if answers else "none"
    clean = took <= 5 and "Traceback" not in output
    rows.append(f"| SIGTERM during a 1,000-slice request | exited in {took:.1f} s | request: {status}; traceback "
                f"in the log: {'yes' if 'Traceback' in output else 'no'} | {'within' if clean else 'MISSED'} |")
    return rows


def _c_store(port: int, path: Path) -> tuple[int | str, float]:
    """(C-STORE status or why none, seconds) of one file sent to the node on ``port``."""
    import pydicom
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, as a modality would
    header = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(header.file_meta.MediaStorageSOPClassUID, header.file_meta.TransferSyntaxUID)
    started = time.perf_counter()
    association = ae.associate("127.0.0.1", port, ae_title="BRAINTUMOR")
    if not association.is_established:
        return "no association", time.perf_counter() - started
    try:
        status = association.send_c_store(path)
        return (f"0x{status.Status:04X}" if status else "no answer"), time.perf_counter() - started
    finally:
        association.release()


def _deflate_bomb(path: Path) -> Path:
    """1.5 GB of pixel zeros in a Deflated Explicit VR Little Endian file of about 1.5 MB."""
    import pydicom

    _dicom(path, 64, 64, 1)
    dataset = pydicom.dcmread(path)
    dataset.PixelData = bytes(1536 << 20)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path


def node_rows(inputs: dict[str, Path], folder: Path) -> list[str]:
    """The DICOM inputs sent to a node, then a normal series, then SIGTERM."""
    from braintumor.pacs.sample import write_series

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = _spawn([BRAINTUMOR, "dicom-node", "--queue", str(folder / "queue"), "--port", str(port),
                   "--send-to", "NOWHERE@127.0.0.1:9", "--quiet-seconds", "1"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (folder / "queue" / ".lock").exists():
        time.sleep(0.3)
    time.sleep(3)  # the model loads after the queue is locked
    rows = []
    # the lie's bytes cannot be re-encoded by a sender, and a sender would not send 1.5 GB of nothing
    sent = {**{n: p for n, p in inputs.items() if p.suffix == ".dcm" and p.stat().st_size < 64 << 20
               and "lie" not in n},
            "deflate bomb (1.5 GB of zeros)": _deflate_bomb(folder / "bomb.dcm")}
    for name, path in sent.items():
        before = _status(node.pid, "VmRSS")
        Path(f"/proc/{node.pid}/clear_refs").write_text("5")
        status, seconds = _c_store(port, path)
        peak = _status(node.pid, "VmHWM") - before
        rows.append(f"| {name} | {status} | {seconds:.1f} | {peak:.0f} | {verdict(seconds, peak)} |")
    series = write_series(sorted((ROOT / "examples" / "scans").glob("*/*.jpg"))[:4], folder / "normal")
    for path in series:
        _c_store(port, path)
    started = time.monotonic()
    results = folder / "queue" / "outbox"
    while time.monotonic() - started < 60 and not any(results.glob("*/*/summary.json")):
        time.sleep(0.2)
    classified = any(results.glob("*/*/summary.json"))
    rows.append(f"| a normal 4-slice series after them | {'classified' if classified else 'NOT classified'} | "
                f"{time.monotonic() - started:.1f} | | {'within' if classified else 'MISSED'} |")
    stopping = time.monotonic()
    node.send_signal(signal.SIGTERM)
    output, _ = node.communicate(timeout=60)
    took = time.monotonic() - stopping
    rows.append(f"| SIGTERM | exited | {took:.1f} | traceback: {'yes' if 'Traceback' in output else 'no'} | "
                f"{'within' if took <= 5 and 'Traceback' not in output else 'MISSED'} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="Run only inputs whose name contains one of these words.")
    args = parser.parse_args()
    print(f"CPU: {cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(Path(tmp))
        if args.only:
            inputs = {n: p for n, p in inputs.items() if any(w.lower() in n.lower() for w in args.only)}
        baseline = cli_run(SCAN)[1]
        print(f"\nCLI (`braintumor predict INPUT --json`; a one-scan run peaks at {baseline:.0f} MiB)\n")
        print("| input | file | seconds | peak above one scan, MiB | exit | answer | target |")
        print("|---|---|---|---|---|---|---|")
        for name, path in inputs.items():
            seconds, peak, code, first = cli_run(path)
            print(f"| {name} | {path.stat().st_size / 2**20:.2f} MiB | {seconds:.1f} | {peak - baseline:.0f} | {code} "
                  f"| {first} | {verdict(seconds, peak - baseline)} |", flush=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = start_server(port)
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/v1/predict", files=[("files", (SCAN.name, SCAN.read_bytes()))])  # warm-up
        idle = _status(server.pid, "VmRSS")
        print(f"\nService (`/v1/predict`, one upload each; idle after a warm-up: {idle:.0f} MiB)\n")
        print("| input | seconds | peak above before, MiB | after minus before, MiB | status | answer | target |")
        print("|---|---|---|---|---|---|---|")
        for name, path in inputs.items():
            seconds, peak, after, status, first = service_run(url, server.pid, path)
            print(f"| {name} | {seconds:.1f} | {peak:.0f} | {after:+.0f} | {status} | {first} | "
                  f"{verdict(seconds, peak)} |", flush=True)
        print(f"\nService after every input: {_status(server.pid, 'VmRSS'):.0f} MiB (idle {idle:.0f})\n")
        print("| edge | outcome | detail | target |\n|---|---|---|---|")
        long_input = next(p for n, p in inputs.items() if "real" in n) if any("real" in n for n in inputs) \
            else _volume(Path(tmp) / "long")
        for row in edges(url, port, server, long_input):
            print(row, flush=True)
        print("\nDICOM node (C-STORE of each DICOM input; then a normal series)\n")
        print("| input | status | seconds | peak above before, MiB | target |\n|---|---|---|---|---|")
        for row in node_rows(inputs, Path(tmp)):
            print(row, flush=True)


if __name__ == "__main__":
    main()
