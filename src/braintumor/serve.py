"""The HTTP service: a FastAPI app around one loaded ``Classifier``, and the reading-room page.

Endpoints (OpenAPI docs at ``/docs``):
- ``GET /healthz``: liveness;
- ``GET /v1/model``: class order, input size, version and metrics from the weights' metadata;
- ``POST /v1/predict``: multipart ``files`` (one or more scans of any type ``predict`` reads),
  answered with the JSON array of ``braintumor predict --json``;
- ``POST /v1/explain``: multipart ``file`` (one scan), answered with the Grad-CAM figure as PNG,
  or with ``?format=json`` the prediction plus the scan and overlay as base64 PNGs;
- ``GET /``: a self-contained page (no CDN, no web fonts) to drop scans on.

Each request's uploads go to its own temporary folder, removed when the request ends, so
concurrent requests never see each other's files. Model calls run in worker threads (never on
the event loop): concurrent predictions are batched together by ``workers`` threads (on a CPU
the model already uses every core, so one is the default), explanations run one at a time on
their own copy of the network, because Grad-CAM hooks the network it runs on. Every failure is a JSON ``{"error": ...}`` with a status:
413 too large or too many files, 415 not a scan type we read, 422 a damaged scan or bad request.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import io
import queue
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import BraintumorError, InvalidImageError
from .explain import METHODS, overlay
from .inputs import Slice, read_scan, scan_kind
from .predict import DEFAULT_CAM_LAYER, DEFAULT_CAM_METHOD, Classifier, Prediction, volume_object

CHUNK = 1 << 20


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may send. The request-size cap is checked from Content-Length before the
    body is read; each file's size is checked again while it is read."""

    max_file_bytes: int = 32 * 2**20
    max_files: int = 16

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + 2**20  # room for multipart headers


class ServiceError(Exception):
    """A request the service refuses: HTTP status and one line that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413, from Content-Length
    before anything is read, and while reading a body sent without one (chunked), so no upload
    can fill the disk the multipart parser spools to."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is over the {self.limit / 2**20:.3g} MiB limit"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit:
                # FastAPI passes its own HTTPException through body parsing (others become a 400).
                raise HTTPException(413, message)
            return event

        await self.app(scope, counted, send)


def _safe_name(name: str | None, number: int) -> str:
    """The upload's base name with only harmless characters; keeps the suffix (type detection)."""
    base = Path(name or "").name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return cleaned or f"upload-{number}"


def _save(upload: UploadFile, folder: Path, number: int, limits: ServiceLimits) -> tuple[Path, str]:
    """Write one upload under ``folder``; refuse it (413) as soon as it passes the size cap.
    Blocking file I/O: called in a worker thread."""
    shown = Path(upload.filename or f"upload-{number}").name
    target = folder / str(number) / _safe_name(upload.filename, number)
    target.parent.mkdir()
    size = 0
    upload.file.seek(0)
    with open(target, "wb") as handle:
        while chunk := upload.file.read(CHUNK):
            size += len(chunk)
            if size > limits.max_file_bytes:
                raise ServiceError(413, f"{shown}: larger than the {limits.max_file_bytes / 2**20:.3g} MiB limit per file")
            handle.write(chunk)
    return target, shown


def _read(path: Path, shown: str) -> list[Slice]:
    """Every slice of an uploaded file, named by the client's file name; 415/422 with the reason."""
    if path.stat().st_size == 0:
        raise ServiceError(422, f"{shown}: file is empty")
    if scan_kind(path) is None:
        raise ServiceError(415, f"{shown}: unsupported file type (send JPEG, PNG, BMP, TIFF, WebP, DICOM or NIfTI)")
    try:
        slices = read_scan(path)
    except InvalidImageError as exc:
        raise ServiceError(422, str(exc).replace(str(path), shown)) from None
    return [replace(s, source=s.source.replace(str(path), shown), path=shown) for s in slices]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def model_info(classifier: Classifier) -> dict[str, Any]:
    """What ``GET /v1/model`` answers: enough for a client to check it talks to the right model."""
    metadata = classifier.metadata
    path = classifier.weights_path
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None
    return {
        "model": metadata.get("model", "efficientnet_b0"),
        "class_names": classifier.class_names,
        "image_size": classifier.image_size,
        "mean": metadata.get("mean"),
        "std": metadata.get("std"),
        "preprocessing": classifier.preprocessing.to_metadata(),
        "outside_range_flag": classifier.guard is not None and classifier.guard.range_threshold is not None,
        "version": {"braintumor": __version__, "weights": path.name if path else None, "sha256": digest},
        "backend": classifier.backend,
        "temperature": classifier.temperature,
        "uncertainty_threshold": classifier.uncertainty_threshold,
        "ood_guard": classifier.guard is not None,
        "tta": classifier.tta,
        "explain": classifier.model is not None,
        "metrics": {"test": metadata.get("test_metrics"), "validation": metadata.get("validation")},
        "recipe": metadata.get("recipe"),
    }


class PredictionBatcher:
    """Runs the slices of concurrent ``/v1/predict`` requests through the network together.

    ``workers`` threads each take every request waiting in the queue (up to ``max_batch`` slices)
    and run them as one batch, then hand each request its own results. With one client nothing
    waits; under load every forward pass is full, which costs less per image than one pass per
    request (about 1.5x on a CPU). Threads, not event-loop tasks, so it serves any event loop.
    """

    def __init__(self, classifier: Classifier, workers: int = 1, max_batch: int = 32):
        self.classifier = classifier
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[list[Slice], Future]] = queue.Queue()
        for number in range(workers):
            threading.Thread(target=self._serve, name=f"braintumor-batcher-{number}", daemon=True).start()

    def submit(self, slices: list[Slice]) -> Future:
        """A future of the slices' predictions, in order."""
        future: Future = Future()
        self._queue.put((slices, future))
        return future

    def _serve(self) -> None:
        while True:
            waiting = [self._queue.get()]
            count = len(waiting[0][0])
            while count < self.max_batch:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                count += len(waiting[-1][0])
            try:
                results = self.classifier.predict_slices([s for slices, _ in waiting for s in slices], self.max_batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
                for _, future in waiting:
                    future.set_exception(exc)
                continue
            start = 0
            for slices, future in waiting:
                future.set_result(results[start : start + len(slices)])
                start += len(slices)


def _prediction_objects(results: list[Prediction]) -> list[dict[str, Any]]:
    """The ``predict --json`` array: one object per slice, then one per NIfTI volume."""
    objects = [r.to_dict() for r in results]
    volumes: dict[str, list[Prediction]] = {}
    for result in results:
        if result.volume:
            volumes.setdefault(result.path.split("#")[0], []).append(result)
    objects.extend(volume_object(v) for v in volumes.values())
    return objects


def create_app(classifier: Classifier, limits: ServiceLimits | None = None, workers: int = 1) -> FastAPI:
    """The service around an already loaded classifier (load once, serve many requests)."""
    limits = limits or ServiceLimits()
    limiter = CapacityLimiter(workers)  # decoding uploads
    batcher = PredictionBatcher(classifier, workers)
    # Grad-CAM hooks the network while it runs, and a prediction passing through a hooked network
    # would feed its activations to the heat map. So explanations get their own copy of the
    # network, one at a time, and predictions never share a network with them.
    explainer = copy.copy(classifier)
    explainer.model = copy.deepcopy(classifier.model)
    explain_limiter = CapacityLimiter(1)
    info = model_info(classifier)
    page = (resources.files("braintumor") / "static" / "index.html").read_text(encoding="utf-8")
    app = FastAPI(
        title="braintumor",
        version=__version__,
        description="Brain MRI slice classification (glioma, meningioma, pituitary tumour, no tumour) with "
        "Grad-CAM explanations. Research and second-opinion use only; not a diagnostic device.",
    )

    app.state.classifier, app.state.explainer = classifier, explainer

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"malformed request ({problems})"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {exc})"}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        """Class order, input size, version, calibration and metrics of the loaded model."""
        return info

    @app.post("/v1/predict")
    async def predict(files: list[UploadFile] = File(..., description="One or more scans.")) -> JSONResponse:
        """Classify each uploaded scan; the same JSON objects as ``braintumor predict --json``."""
        if len(files) > limits.max_files:
            raise ServiceError(413, f"{len(files)} files in one request; the limit is {limits.max_files}")
        with tempfile.TemporaryDirectory(prefix="braintumor-") as folder:
            saved = [await to_thread.run_sync(_save, upload, Path(folder), k, limits) for k, upload in enumerate(files)]
            scans = [await to_thread.run_sync(_read, path, shown, limiter=limiter) for path, shown in saved]
        results = await asyncio.wrap_future(batcher.submit([s for scan in scans for s in scan]))
        return JSONResponse(_prediction_objects(results))

    @app.post("/v1/explain", response_model=None)
    async def explain(
        file: UploadFile = File(..., description="One scan."),
        format: str = Query("png", pattern="^(png|json)$", description="png: the figure; json: prediction and images."),
        method: str = Query(DEFAULT_CAM_METHOD, description=f"One of {', '.join(METHODS)}."),
        target: str | None = Query(None, description="Class to explain (default: the predicted class)."),
        index: int | None = Query(None, ge=0, description="Frame or slice of a multi-slice file (default: the middle one)."),
    ) -> Response:
        """Grad-CAM heat map of one scan (one slice of a volume or multi-frame DICOM)."""
        if classifier.model is None:
            raise ServiceError(501, "this server runs an ONNX file; Grad-CAM needs the .safetensors weights")
        if method not in METHODS:
            raise ServiceError(422, f"method {method!r} is not one of {', '.join(METHODS)}")
        if target is not None and target not in classifier.class_names:
            raise ServiceError(422, f"target {target!r} is not one of {', '.join(classifier.class_names)}")
        with tempfile.TemporaryDirectory(prefix="braintumor-") as folder:
            path, shown = await to_thread.run_sync(_save, file, Path(folder), 0, limits)
            slices = await to_thread.run_sync(_read, path, shown, limiter=explain_limiter)
        chosen = len(slices) // 2 if index is None else index
        if chosen >= len(slices):
            raise ServiceError(422, f"{shown}: index {chosen} is out of range; the file has {len(slices)} slice(s)")
        item = slices[chosen]

        def run() -> tuple[Any, bytes]:
            explanation = explainer.explain([item], method=method, target=target, layer=DEFAULT_CAM_LAYER)[0]
            buffer = io.BytesIO()
            explanation.save_png(buffer)
            return explanation, buffer.getvalue()

        try:
            explanation, figure = await to_thread.run_sync(run, limiter=explain_limiter)
        except BraintumorError as exc:
            raise ServiceError(422, str(exc)) from None
        if format == "png":
            return Response(figure, media_type="image/png")
        assert explanation.pixels is not None and explanation.heatmap is not None
        return JSONResponse({
            "prediction": explanation.prediction.to_dict(),
            "target": explanation.target,
            "method": method,
            "layer": explanation.layer,
            "n_slices": len(slices),
            "scan_png": base64.b64encode(_png(explanation.pixels)).decode("ascii"),
            "overlay_png": base64.b64encode(_png(overlay(explanation.pixels, explanation.heatmap))).decode("ascii"),
        })

    return app
