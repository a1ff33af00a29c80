"""Shared fixtures: small synthetic MRI-like trees written under tmp_path, and the real data root."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def synthetic_scan(rng: np.random.Generator, label: int, size: int = 64) -> Image.Image:
    """A dark 'head' with random blobs and a class-specific bright bar, so a tiny net can learn it
    while no two images are near duplicates."""
    image = Image.fromarray((rng.random((size, size)) * 40).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, size - 12, 2)
        r = int(rng.integers(3, size // 5))
        draw.ellipse([int(x), int(y), int(x) + r, int(y) + r], fill=int(rng.integers(60, 200)))
    top = size // 8 + label * size // 5
    draw.rectangle([size // 3, top, size // 3 + size // 4, top + size // 8], fill=255)
    return image


def write_tree(
    root: Path, per_class: dict[str, int], seed: int = 0, folder_names: dict[str, str] | None = None
) -> Path:
    """root/<class folder>/<n>.png for each class; folder names may be aliases."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        count = per_class.get(name, 0)
        if not count:
            continue
        folder = root / (folder_names or {}).get(name, name)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            synthetic_scan(rng, label).save(folder / f"{name}_{index:03d}.png")
    return root


@pytest.fixture
def kaggle_tree(tmp_path: Path) -> Path:
    """A Kaggle-layout root: Training/ with 12 images per class, Testing/ with 4."""
    root = tmp_path / "kaggle"
    write_tree(root / "Training", {name: 12 for name in CLASSES}, seed=1)
    write_tree(root / "Testing", {name: 4 for name in CLASSES}, seed=2)
    return root


def kill_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch, train: Callable[[], object]) -> None:
    """Run ``train`` as if the process were killed right after its first epoch's checkpoint was
    written (what ``--resume`` must recover from); checkpoints are saved normally afterwards."""
    from braintumor.training import fit as fit_module

    real_save = fit_module.save_training_state

    def save_then_die(path: Path, state: dict) -> None:
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(fit_module, "save_training_state", real_save)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the real data set is slow: the everyday loop (``pytest -m "not slow"``) stays
    on synthetic data whether or not BRAINTUMOR_DATA is set."""
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def real_data() -> Path:
    """The real Kaggle data set, when BRAINTUMOR_DATA points at it (CI sets it)."""
    value = os.environ.get("BRAINTUMOR_DATA")
    if not value or not Path(value).is_dir():
        pytest.skip("BRAINTUMOR_DATA is not set to the Kaggle data set")
    return Path(value)


def write_dicom(
    path: Path,
    frames: np.ndarray,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    pixel_data: bool = True,
) -> Path:
    """A minimal valid DICOM file (MR image storage) with 16-bit unsigned frames (F, H, W) or (H, W)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, MRImageStorage, generate_uid

    frames = np.asarray(frames, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.Rows, dataset.Columns = frames.shape[-2:]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    if frames.ndim == 3:
        dataset.NumberOfFrames = frames.shape[0]
    if pixel_data and meta.TransferSyntaxUID.is_compressed:
        from pydicom.encaps import encapsulate

        dataset.PixelData = encapsulate([frames.tobytes()])  # not real JPEG 2000: no codec can read it
    elif pixel_data:
        dataset.PixelData = frames.tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scans"


@pytest.fixture(scope="session")
def shipped_onnx() -> Path:
    """The shipped model's exported graph, which ships beside its weights."""
    from braintumor.inference.predict import default_weights_path

    return default_weights_path().with_suffix(".onnx")


@pytest.fixture(scope="session", autouse=True)
def _private_graph_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Graphs exported from test weights go to a folder of the session, never the user's cache."""
    previous = os.environ.get("BRAINTUMOR_CACHE_DIR")
    os.environ["BRAINTUMOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("BRAINTUMOR_CACHE_DIR", None)
    else:
        os.environ["BRAINTUMOR_CACHE_DIR"] = previous


@contextmanager
def live_server(app: object, **config: object) -> Iterator[str]:
    """Serve ``app`` with uvicorn (``config``: more of ``uvicorn.Config``'s options) on a free
    loopback port in a background thread; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def local_client(app: object, **kwargs: object):
    """A ``TestClient`` that addresses the service as ``localhost``: the service answers only the
    host names it is told to (``serving.security``), and TestClient's own default is ``testserver``."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://localhost", **kwargs)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained B0 saved at 32x32 input (seed 0): loading, predicting and evaluating in a blink."""
    import torch

    from braintumor.models.checkpoint import save_weights
    from braintumor.models.registry import build_efficientnet_b0

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(build_efficientnet_b0().state_dict(), path, {"class_names": list(CLASSES), "image_size": 32})
    return path
