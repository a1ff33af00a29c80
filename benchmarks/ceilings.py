"""What bounds the default predict path on this machine, and how the service shares it, in one
command (the figures behind benchmarks/ANALYSIS.md's first section):

    python benchmarks/ceilings.py --data DATA_ROOT

- the network alone: ONNX Runtime images/s on 256 decoded Testing slices at batch 32 (no file
  decoding): the ceiling of any predict path in fp32 on this CPU;
- decoding and resizing one Testing JPEG: milliseconds per image, one thread;
- ONNX Runtime at 8 and 32 images per session run (images/s, how much the process grew) and the
  share of its kernel time per operator type;
- ``braintumor predict Testing --csv`` as a whole command at batch 32 and 16: seconds and peak
  resident memory, in a fresh process;
- the service: latency of one-scan ``/v1/predict`` requests sent while a 200-slice NIfTI volume
  upload is being classified (fair batching).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from run import peak_memory_of_predict  # benchmarks/ is the script's own folder
from startup import cpu

from braintumor.data.datasets import load_split
from braintumor.data.imaging import decode_image_and_colour, resize_grey
from braintumor.inference.predict import load_model

ROOT = Path(__file__).resolve().parents[1]


def network_alone(paths: list[Path]) -> tuple[float, float]:
    """(ONNX Runtime images/s on decoded pixels, decode+resize ms per image)."""
    started = time.perf_counter()
    pixels = np.stack([resize_grey(decode_image_and_colour(p)[0], 224) for p in paths])
    decode_ms = 1000 * (time.perf_counter() - started) / len(paths)
    network = load_model(device="cpu").network
    batch = torch.from_numpy(pixels)
    network.logits_and_features(batch[:32], 32)  # warm-up
    started = time.perf_counter()
    network.logits_and_features(batch, 32)
    return len(paths) / (time.perf_counter() - started), decode_ms


def run_batches(pixels: np.ndarray) -> list[tuple[int, float, float]]:
    """(images per session run, images/s, MB the process grew) of the shipped graph on decoded
    pixels, each in a fresh session: why ``onnx_backend.RUN_BATCH`` is 8."""
    import re

    import onnxruntime as ort

    def resident_mb() -> float:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    rows = []
    for run in (8, 32):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(ROOT / "src/braintumor/weights/braintumor-b0.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        session.run(None, {"pixels": pixels[:1]})
        before, started = resident_mb(), time.perf_counter()
        for start in range(0, len(pixels), run):
            session.run(None, {"pixels": pixels[start : start + run]})
        rows.append((run, len(pixels) / (time.perf_counter() - started), resident_mb() - before))
    return rows


def operator_shares(pixels: np.ndarray) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per operator type over a few runs of 8 decoded scans."""
    import collections
    import json

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level, options.enable_profiling = 3, True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(ROOT / "src/braintumor/weights/braintumor-b0.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(4):
            session.run(None, {"pixels": pixels[:8]})
        events = json.loads(Path(session.end_profiling()).read_text())
    times: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values())
    return {name: value / total for name, value in times.most_common(5)}


def fair_batching(scan: Path) -> tuple[float, list[float]]:
    """(seconds for a 200-slice volume upload, latencies of one-scan requests sent during it)."""
    import httpx
    import nibabel as nib
    import uvicorn

    from braintumor.serving.app import ServiceLimits, create_app

    with tempfile.TemporaryDirectory() as tmp:
        volume = (np.random.default_rng(0).random((224, 224, 200)) * 1000).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), Path(tmp) / "vol.nii")
        data = (Path(tmp) / "vol.nii").read_bytes()
    app = create_app(load_model(), ServiceLimits(max_file_bytes=64 << 20))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    one = [("files", (scan.name, scan.read_bytes()))]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        client.post("/v1/predict", files=one)  # warm-up
        took: list[float] = []
        started = time.perf_counter()
        upload = threading.Thread(
            target=lambda: (client.post("/v1/predict", files=[("files", ("vol.nii", data))]),
                            took.append(time.perf_counter() - started))
        )
        upload.start()
        time.sleep(1.0)  # the volume is being read and classified
        latencies = []
        for _ in range(5):
            sent = time.perf_counter()
            client.post("/v1/predict", files=one)
            latencies.append(time.perf_counter() - sent)
        upload.join()
    server.should_exit = True
    thread.join()
    return took[0], latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("BRAINTUMOR_DATA"), help="Kaggle data root.")
    args = parser.parse_args()
    if args.data is None or not Path(args.data).is_dir():
        parser.error("--data (or BRAINTUMOR_DATA) must point at the Kaggle data root")
    print(f"CPU: {cpu()}")
    paths = [s.path for s in load_split(args.data, "Testing")]
    rate, decode_ms = network_alone(paths[:256])
    print(f"network alone (ONNX Runtime, batch 32, decoded pixels): {rate:.1f} images/s")
    print(f"decode and resize one Testing JPEG: {decode_ms:.2f} ms (one thread)")
    pixels = np.stack([resize_grey(decode_image_and_colour(p)[0], 224) for p in paths[:256]])
    for run, images_per_second, grew in run_batches(pixels):
        print(f"ONNX Runtime, {run} images per run: {images_per_second:.1f} images/s, the process grew {grew:.0f} MB")
    shares = ", ".join(f"{name} {share:.0%}" for name, share in operator_shares(pixels).items())
    print(f"ONNX Runtime kernel time by operator: {shares}")
    testing = Path(args.data) / "Testing"
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (32, 16):
            peak, seconds, files = peak_memory_of_predict(
                testing, "--batch-size", str(batch), out=Path(tmp) / f"b{batch}.csv"
            )
            print(f"braintumor predict Testing ({files} files), batch {batch}: {seconds:.1f} s, peak {peak:.0f} MiB")
    took, latencies = fair_batching(sorted((ROOT / "examples" / "scans").glob("*/*.jpg"))[0])
    print(f"service: a 200-slice volume took {took:.1f} s; one-scan requests sent meanwhile took "
          + ", ".join(f"{x:.2f}" for x in latencies) + " s")


if __name__ == "__main__":
    main()
