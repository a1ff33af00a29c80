"""The HTTP service: a FastAPI app around one loaded ``Classifier``, and the reading-room page.

Endpoints (the OpenAPI description at ``/openapi.json``; no /docs page, which would load scripts
from a CDN):
- ``GET /healthz``: liveness;
- ``GET /v1/model``: class order, input size, version and metrics from the weights' spec, and the
  request limits (``ServiceLimits.public``);
- ``POST /v1/predict``: multipart ``files`` (one or more scans of any type ``predict`` reads),
  answered with the JSON objects of ``braintumor predict --json``, each series' verdict first
  (DICOM files of one series, a volume, a multi-frame file), then a result per slice: the good
  scans classified and a bad one with its error, as the command line does;
- ``POST /v1/explain``: multipart ``file`` (one scan), answered with the Grad-CAM figure as PNG,
  or with ``?format=json`` the prediction plus the scan and overlay as base64 PNGs;
- ``GET /``: a self-contained page (no CDN, no web fonts) to drop scans on.

Uploads are decoded from their bytes (this module writes none; Starlette's multipart parser spools a
file over 1 MiB to the temporary folder until its request ends: docs/serving.md),
named by the client's file name. Model calls run in worker threads (never on the event loop):
concurrent predictions are batched together (``batcher``), explanations run one at a time on
their own copy of the network, because Grad-CAM hooks the network it runs on. Every failure is a
JSON ``{"error": ...}`` with a status: 413 too large or too many files, 415 not a scan type we
read, 422 a damaged scan or bad request (when every file of a request fails).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..data.inputs import Slice, read_scan
from ..data.medical import MAX_INPUT_VOXELS
from ..errors import BraintumorError, InvalidImageError, UnsupportedFileType
from ..inference.explain import METHODS, overlay
from ..inference.predict import DEFAULT_CAM_METHOD, Classifier
from ..inference.results import Prediction, prediction_objects
from ..models.checkpoint import weights_sha256
from .batcher import PredictionBatcher
from .security import AccessGuard, AccessPolicy

CHUNK = 1 << 20


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may send. The request-size cap is checked from Content-Length before the
    body is read; each file's size is checked again while it is read."""

    max_file_bytes: int = 32 * 2**20
    max_files: int = 256  # a whole series in one request: its verdict needs every slice at once
    max_request_bytes: int = 256 * 2**20  # the whole body, multipart headers included
    max_request_pixels: int = 16 * MAX_INPUT_VOXELS  # what all files of a request decode to (2 Gi grey pixels)
    work_seconds: float = 300.0  # a request's classification is given up (503) after this long

    def public(self) -> dict[str, int]:
        """What a client needs to size its requests (``GET /v1/model``'s ``limits``)."""
        return {"max_files": self.max_files, "max_file_bytes": self.max_file_bytes,
                "max_request_bytes": self.max_request_bytes, "max_request_pixels": self.max_request_pixels}


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


def give_back_memory() -> None:
    """Return the heap pages freed by a finished request to the system (glibc's ``malloc_trim``; a
    no-op elsewhere): with ONNX Runtime's own memory given back, a 1,000-slice volume leaves the
    process within a few MB of its size before (``python benchmarks/hostile.py``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryReturn:
    """ASGI middleware: after each ``/v1/`` request, ``give_back_memory`` in a worker thread."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope["path"].startswith("/v1/"):
                await to_thread.run_sync(give_back_memory)


MAX_NAME_CHARS = 255


def _display_name(name: str | None, number: int) -> str:
    """The upload's base name as the client sent it (cut to ``MAX_NAME_CHARS``), for results and
    errors; nothing is ever written under it."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base[:MAX_NAME_CHARS] or f"upload-{number}"


async def _receive(upload: UploadFile, number: int, limits: ServiceLimits) -> tuple[str, bytes]:
    """(display name, bytes) of one upload; refused (413) as soon as it passes the size cap."""
    shown = _display_name(upload.filename, number)
    data = bytearray()
    await upload.seek(0)
    while chunk := await upload.read(CHUNK):
        data += chunk
        if len(data) > limits.max_file_bytes:
            raise ServiceError(413, f"{shown}: larger than the {limits.max_file_bytes / 2**20:.3g} MiB limit per file")
    return shown, bytes(data)


def _read(shown: str, data: bytes) -> list[Slice]:
    """Every slice of an uploaded file, named by the client's file name; 415/422 with the reason."""
    try:
        return read_scan(data, shown)
    except UnsupportedFileType as exc:
        raise ServiceError(415, str(exc)) from None
    except InvalidImageError as exc:
        raise ServiceError(422, str(exc)) from None


def _read_each(uploads: list[tuple[str, bytes]], max_pixels: int) -> list[list[Slice] | ServiceError]:
    """Each upload's slices, or the error that says why it could not be read. The whole request
    is refused (413) as soon as its slices pass ``max_pixels`` in all: each file is within the
    budget per input (``data.medical``), and this bounds what many files decode to together."""
    outcomes: list[list[Slice] | ServiceError] = []
    decoded = 0
    for shown, data in uploads:
        try:
            outcomes.append(_read(shown, data))
        except ServiceError as exc:
            outcomes.append(exc)
            continue
        decoded += sum(s.pixels.size for s in outcomes[-1])
        if decoded > max_pixels:
            raise ServiceError(413, f"{shown}: the files of this request decode to more than {max_pixels:,} pixels "
                                    "in all; send fewer files per request")
    return outcomes


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def model_info(classifier: Classifier) -> dict[str, Any]:
    """What ``GET /v1/model`` answers: enough for a client to check it talks to the right model."""
    spec, path = classifier.spec, classifier.weights_path
    digest = weights_sha256(path) if path is not None and path.is_file() else None
    return {
        "model": spec.architecture,
        "class_names": list(spec.class_names),
        "image_size": spec.image_size,
        "mean": list(spec.preprocessing.mean),
        "std": list(spec.preprocessing.std),
        "preprocessing": spec.preprocessing.to_metadata(),
        "outside_range_flag": (spec.guard is not None and spec.guard.range_threshold is not None)
        or (spec.coverage is not None and spec.slice_kind is not None),
        "slice_kind": spec.slice_kind is not None,
        "coverage": spec.coverage.to_metadata() if spec.coverage is not None else None,
        "version": {"braintumor": __version__, "weights": path.name if path else None, "sha256": digest},
        "backend": classifier.backend,
        "temperature": spec.temperature,
        "uncertainty_threshold": spec.uncertainty_threshold,
        "ood_guard": spec.guard is not None,
        "tta": classifier.tta,
        "explain": path is not None and path.suffix.lower() != ".onnx",
        "metrics": {"test": spec.info.get("test_metrics"), "validation": spec.info.get("validation")},
        "recipe": spec.info.get("recipe"),
    }


def create_app(
    classifier: Classifier,
    limits: ServiceLimits | None = None,
    workers: int = 1,
    policy: AccessPolicy | None = None,
) -> FastAPI:
    """The service around an already loaded classifier (load once, serve many requests).
    ``policy``: API key, allowed origins and body deadline (default: no key, same origin only).
    An ONNX Runtime network is switched to give its activation memory back after each batch
    (``OnnxNetwork.release_after_call``), so a large request leaves the process at its idle size."""
    limits = limits or ServiceLimits()
    if hasattr(classifier.network, "release_after_call"):  # ONNX Runtime: memory back after each batch
        classifier.network.release_after_call = True
    batcher = PredictionBatcher(classifier, workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await to_thread.run_sync(batcher.stop)

    app = FastAPI(
        title="braintumor",
        version=__version__,
        description="Brain MRI slice classification (glioma, meningioma, pituitary tumour, no tumour) with "
        "Grad-CAM explanations. Research and second-opinion use only; not a diagnostic device.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's /docs and /redoc load scripts from public CDNs; /openapi.json stays
        redoc_url=None,
    )
    # Grad-CAM hooks the network while it runs, and a prediction passing through a hooked network
    # would feed its activations to the heat map. So explanations get their own copy of the
    # network, one at a time, and predictions never share a network with them.
    app.state.classifier, app.state.explainer = classifier, classifier.explaining_copy()
    app.state.batcher = batcher
    _add_error_handlers(app)
    app.add_middleware(MemoryReturn)
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    app.add_middleware(AccessGuard, policy=policy or AccessPolicy())
    _add_pages(app, {**model_info(classifier), "limits": limits.public()})
    _add_predict(app, batcher, limits, CapacityLimiter(max(2, workers)))
    _add_explain(app, app.state.explainer, limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as JSON ``{"error": ...}`` with its status, never a server path or a traceback."""

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


def _add_pages(app: FastAPI, info: dict[str, Any]) -> None:
    page = (resources.files("braintumor.serving") / "static" / "index.html").read_text(encoding="utf-8")

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


def _add_predict(app: FastAPI, batcher: PredictionBatcher, limits: ServiceLimits, limiter: CapacityLimiter) -> None:
    @app.post("/v1/predict")
    async def predict(
        request: Request, files: list[UploadFile] = File(..., description="One or more scans.")
    ) -> JSONResponse:
        """Classify each uploaded scan; the same JSON objects as ``braintumor predict --json``."""
        if len(files) > limits.max_files:
            raise ServiceError(413, f"{len(files)} files in one request; the limit is {limits.max_files}")
        uploads = [await _receive(upload, k, limits) for k, upload in enumerate(files)]
        outcomes = await to_thread.run_sync(_read_each, uploads, limits.max_request_pixels, limiter=limiter)
        readable = [o for o in outcomes if not isinstance(o, ServiceError)]
        if not readable:
            raise outcomes[0]  # nothing to classify: the first file's reason and status
        submitted = batcher.submit([s for slices in readable for s in slices])
        predictions = iter(await _while_connected(request, asyncio.wrap_future(submitted), limits.work_seconds))
        results: list[Prediction] = []
        for (shown, _), outcome in zip(uploads, outcomes, strict=True):
            if isinstance(outcome, ServiceError):
                results.append(Prediction(path=shown, error=outcome.message))
            else:
                results.extend(next(predictions) for _ in outcome)
        return JSONResponse(prediction_objects(results))


CLIENT_CHECK_SECONDS = 0.5


async def _while_connected(request: Request, work: asyncio.Future, seconds: float) -> Any:
    """``work``'s result; cancelled (which stops a batcher job's remaining slices) as soon as the
    client has gone away, checked every ``CLIENT_CHECK_SECONDS``, or once it has run ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        done, _ = await asyncio.wait({work}, timeout=CLIENT_CHECK_SECONDS)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            raise ServiceError(499, "the client went away before its answer was ready")
        if asyncio.get_running_loop().time() > deadline:
            work.cancel()
            raise ServiceError(503, f"classifying this request took longer than {seconds:g} s; send fewer scans")


def _add_explain(app: FastAPI, explainer: Classifier, limits: ServiceLimits) -> None:
    one_at_a_time = CapacityLimiter(1)

    @app.post("/v1/explain", response_model=None)
    async def explain(
        request: Request,
        file: UploadFile = File(..., description="One scan."),
        format: str = Query("png", pattern="^(png|json)$", description="png: the figure; json: prediction and images."),
        method: str = Query(DEFAULT_CAM_METHOD, description=f"One of {', '.join(METHODS)}."),
        target: str | None = Query(None, description="Class to explain (default: the predicted class)."),
        index: int | None = Query(
            None, ge=0, description="Frame or slice of a multi-slice file (default: the middle one)."
        ),
    ) -> Response:
        """Grad-CAM heat map of one scan (one slice of a volume or multi-frame DICOM)."""
        _check_explain_request(explainer, method, target)
        if len((await request.form()).getlist("file")) != 1:
            raise ServiceError(422, "send exactly one scan, as the multipart field 'file'")
        shown, data = await _receive(file, 0, limits)
        slices = await to_thread.run_sync(_read, shown, data, limiter=one_at_a_time)
        chosen = len(slices) // 2 if index is None else index
        if chosen >= len(slices):
            raise ServiceError(422, f"{shown}: index {chosen} is out of range; the file has {len(slices)} slice(s)")

        def run() -> Any:
            return explainer.explain([slices[chosen]], method=method, target=target)[0]

        try:
            explanation = await to_thread.run_sync(run, limiter=one_at_a_time)
        except BraintumorError as exc:
            raise ServiceError(422, str(exc)) from None
        if format == "png":
            return Response(await to_thread.run_sync(_figure, explanation), media_type="image/png")
        return JSONResponse({
            "prediction": explanation.prediction.to_dict(),
            "target": explanation.target,
            "method": method,
            "layer": explanation.layer,
            "n_slices": len(slices),
            "scan_png": base64.b64encode(_png(explanation.pixels)).decode("ascii"),
            "overlay_png": base64.b64encode(_png(overlay(explanation.pixels, explanation.heatmap))).decode("ascii"),
        })


def _check_explain_request(explainer: Classifier, method: str, target: str | None) -> None:
    if explainer.model is None:
        raise ServiceError(501, "this server runs an ONNX file; Grad-CAM needs the .safetensors weights")
    if method not in METHODS:
        raise ServiceError(422, f"method {method!r} is not one of {', '.join(METHODS)}")
    if target is not None and target not in explainer.class_names:
        raise ServiceError(422, f"target {target!r} is not one of {', '.join(explainer.class_names)}")


def _figure(explanation: Any) -> bytes:
    buffer = io.BytesIO()
    explanation.save_png(buffer)
    return buffer.getvalue()
