"""The HTTP service through httpx: status codes, JSON shapes, every limit, isolation, the page."""

from __future__ import annotations

import base64
import copy
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from braintumor.cli import app as cli_app
from braintumor.inference.predict import Classifier, load_model
from braintumor.serving.app import ServiceLimits, create_app
from braintumor.serving.security import LOCAL_HOSTS, AccessPolicy, header_deadline_protocol
from conftest import EXAMPLES, live_server, local_client, write_dicom

LIMITS = ServiceLimits(max_file_bytes=300_000, max_files=4, max_request_bytes=4 * 300_000 + 2**20)
SCANS = sorted(EXAMPLES.glob("*/*.jpg"))


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def client(classifier: Classifier) -> TestClient:
    return local_client(create_app(classifier, LIMITS))


def _upload(path: Path, field: str = "files") -> tuple[str, tuple[str, bytes, str]]:
    return field, (path.name, path.read_bytes(), "application/octet-stream")


def test_health_and_model_information(client: TestClient, classifier: Classifier) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["class_names"] == classifier.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert info["image_size"] == 224 and info["backend"] == "onnx" and info["ood_guard"] is True
    assert len(info["version"]["sha256"]) == 64 and info["version"]["weights"].endswith(".safetensors")
    assert 0.975 <= info["metrics"]["test"]["accuracy"] <= 1.0
    assert info["uncertainty_threshold"] == pytest.approx(classifier.uncertainty_threshold)


def test_predict_answers_what_the_python_api_answers(client: TestClient, classifier: Classifier) -> None:
    chosen = SCANS[:3]
    response = client.post("/v1/predict", files=[_upload(p) for p in chosen])
    assert response.status_code == 200
    objects = response.json()
    assert [o["path"] for o in objects] == [p.name for p in chosen]
    for obj, path in zip(objects, chosen, strict=True):
        expected = classifier.predict(path)[0]
        assert obj["label"] == expected.label == path.parent.name
        assert set(obj) >= {"label", "confidence", "probabilities", "uncertain", "not_brain_mri"}
        for name, value in expected.probabilities.items():
            assert obj["probabilities"][name] == pytest.approx(value, abs=1e-6)


def test_a_colour_picture_of_a_scan_is_refused_by_the_service(client: TestClient, tmp_path: Path) -> None:
    grey = np.asarray(Image.open(SCANS[0]).convert("L"), dtype=np.float32)
    tinted = tmp_path / "tinted.png"
    Image.fromarray(np.stack([grey, grey * 0.55, grey * 0.2], axis=2).astype(np.uint8)).save(tinted)
    response = client.post("/v1/predict", files=[_upload(tinted), _upload(SCANS[0])])
    assert response.status_code == 200, response.text
    refused, accepted = response.json()
    assert refused["not_brain_mri"] is True and refused["label"] == "not_brain_mri"
    assert refused["not_brain_mri_reason"] == "a colour picture (MRI slices are grey)"
    assert accepted["not_brain_mri"] is False and "not_brain_mri_reason" not in accepted
    explained = client.post("/v1/explain?format=json", files=[_upload(tinted, "file")]).json()["prediction"]
    assert explained["not_brain_mri_reason"] == refused["not_brain_mri_reason"] and explained["path"] == "tinted.png"


def test_predict_reads_dicom_frames_and_nifti_volumes(client: TestClient, tmp_path: Path) -> None:
    dicom = write_dicom(tmp_path / "series.dcm", np.stack([np.eye(32) * 900, np.ones((32, 32)) * 300]))
    volume = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 24, 5)).astype(np.float32), np.eye(4)), volume)
    response = client.post("/v1/predict", files=[_upload(dicom), _upload(volume)])
    assert response.status_code == 200, response.text
    objects = response.json()
    assert [o.get("kind") for o in objects[:2]] == ["series", "series"]  # verdicts first, then slices
    slices = objects[2:]
    assert [o["path"] for o in slices[:2]] == ["series.dcm#frame=0", "series.dcm#frame=1"]
    assert [o["index"] for o in slices[2:7]] == list(range(5))
    [summary] = [o for o in objects if o.get("kind") == "series" and o["path"].endswith(".nii.gz")]
    assert summary["path"] == "head.nii.gz" and summary["summary"]["n_slices"] == 5
    [frames] = [o for o in objects if o.get("kind") == "series" and o["path"] == "series.dcm"]
    assert frames["summary"]["n_slices"] == 2 and frames["reason"]  # a multi-frame file gets a verdict too


def test_predict_answers_a_series_of_dicom_files_with_its_verdict_first(client: TestClient, tmp_path: Path) -> None:
    from braintumor.pacs.sample import write_series

    names = ["notumor/Te-no_0229.jpg", "glioma/Te-glTr_0006.jpg", "glioma/Te-gl_0010.jpg", "notumor/Te-no_0292.jpg"]
    files = write_series([EXAMPLES / n for n in names], tmp_path)  # in anatomical order; sent shuffled
    response = client.post("/v1/predict", files=[_upload(files[k]) for k in (2, 0, 3, 1)])
    assert response.status_code == 200, response.text
    verdict, *slices = response.json()
    assert verdict["kind"] == "series" and verdict["label"] == "glioma" and verdict["confidence"] > 0.9
    assert verdict["summary"]["slice_paths"] == [p.name for p in files]
    assert verdict["summary"]["key_paths"] == [files[1].name, files[2].name]
    assert [o["path"] for o in slices] == [files[k].name for k in (2, 0, 3, 1)]  # slices as sent
    limits = client.get("/v1/model").json()["limits"]
    assert (limits["max_files"], limits["max_file_bytes"], limits["max_request_bytes"]) == (4, 300_000, 2_248_576)


def test_a_request_whose_files_decode_past_its_pixel_budget_is_refused(classifier: Classifier, tmp_path: Path) -> None:
    volume = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 40)).astype(np.float32), np.eye(4)), volume)
    small = create_app(classifier, ServiceLimits(max_file_bytes=8 << 20, max_files=4, max_request_pixels=200_000))
    with local_client(small) as client:
        assert client.post("/v1/predict", files=[_upload(volume)]).status_code == 200  # 163,840 pixels
        response = client.post("/v1/predict", files=[_upload(volume), _upload(volume)])
    assert response.status_code == 413
    assert response.json()["error"] == ("head.nii.gz: the files of this request decode to more than 200,000 pixels "
                                        "in all; send fewer files per request")


def _truncated_jpeg() -> bytes:
    return SCANS[0].read_bytes()[:2000]


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        (
            [("files", ("a.jpg", SCANS[0].read_bytes(), "image/jpeg"))] * 5,
            413,
            "5 files in one request; the limit is 4",
        ),
        ([("files", ("big.png", b"\x89PNG" + bytes(400_000), "image/png"))], 413, "big.png: larger than"),
        ([("files", ("notes.txt", b"hello, radiologist", "text/plain"))], 415, "notes.txt: unsupported file type"),
        ([("files", ("cut.jpg", _truncated_jpeg(), "image/jpeg"))], 422, "cut.jpg: "),
        ([("files", ("empty.png", b"", "image/png"))], 422, "empty.png: file is empty"),
        ([("files", ("fake.dcm", b"DICM" * 100, "application/dicom"))], 422, "fake.dcm: DICOM file has no pixel data"),
        ([("other", ("a.jpg", b"x", "image/jpeg"))], 422, "malformed request"),
    ],
)
def test_limits_and_bad_files_get_json_errors(client: TestClient, files: list, status: int, message: str) -> None:
    response = client.post("/v1/predict", files=files)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_an_oversized_request_is_refused_before_its_body_is_read(client: TestClient) -> None:
    body = bytes(LIMITS.max_request_bytes + 1)
    response = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "over the" in response.json()["error"]


def test_an_oversized_chunked_upload_is_cut_off_while_it_streams(client: TestClient) -> None:
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    def body():  # no Content-Length: the client streams it chunked
        yield head
        for _ in range(LIMITS.max_request_bytes // 65536 + 2):
            yield bytes(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/predict", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413 and "request body is over" in response.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_a_bad_upload_does_not_disturb_the_next_request(client: TestClient) -> None:
    truncated = client.post("/v1/predict", files=[("files", ("cut.jpg", _truncated_jpeg(), "image/jpeg"))])
    assert truncated.status_code == 422
    not_multipart = client.post("/v1/predict", content=b"not multipart", headers={"content-type": "text/plain"})
    assert not_multipart.status_code == 422
    good = client.post("/v1/predict", files=[_upload(SCANS[0])])
    assert good.status_code == 200 and good.json()[0]["label"] == SCANS[0].parent.name
    assert client.get("/healthz").status_code == 200


def test_explain_returns_a_figure_or_json_with_images(client: TestClient) -> None:
    scan = SCANS[0]
    figure = client.post("/v1/explain", files=[_upload(scan, "file")])
    assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
    assert figure.content.startswith(b"\x89PNG")
    response = client.post(
        "/v1/explain", params={"format": "json", "target": "pituitary"}, files=[_upload(scan, "file")]
    )
    data = response.json()
    assert data["prediction"]["path"] == scan.name and data["target"] == "pituitary" and data["method"] == "layercam"
    original = Image.open(scan).size
    for key in ("scan_png", "overlay_png"):
        image = Image.open(io.BytesIO(base64.b64decode(data[key])))
        assert image.size == original
    predicted = client.post("/v1/predict", files=[_upload(scan)]).json()[0]
    assert data["prediction"]["label"] == predicted["label"]
    assert data["prediction"]["confidence"] == pytest.approx(predicted["confidence"], abs=1e-5)


@pytest.mark.parametrize(
    ("params", "message"),
    [({"method": "magic"}, "method 'magic'"), ({"target": "cat"}, "target 'cat'"),
     ({"index": 3}, "index 3 is out of range"), ({"format": "gif"}, "malformed request")],
)
def test_explain_rejects_bad_parameters(client: TestClient, params: dict, message: str) -> None:
    response = client.post("/v1/explain", params=params, files=[_upload(SCANS[0], "file")])
    assert response.status_code == 422 and message in response.json()["error"]


def test_the_page_is_self_contained(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "v1/explain" in text and 'name="viewport"' in text
    assert "http://" not in text and "https://" not in text and "@import" not in text  # no CDN, no web fonts
    assert client.get("/docs").status_code == 404  # FastAPI's docs page loads scripts from CDNs: off
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/healthz"} <= set(client.get("/openapi.json").json()["paths"])


def test_concurrent_requests_each_get_their_own_answer(classifier: Classifier) -> None:
    expected = {p.name: classifier.predict(p)[0] for p in SCANS[:6]}
    with live_server(create_app(classifier, LIMITS, workers=2)) as url, httpx.Client(base_url=url, timeout=60) as http:

        def ask(path: Path) -> dict:
            response = http.post("/v1/predict", files=[_upload(path)])
            assert response.status_code == 200
            return response.json()[0]

        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(ask, SCANS[:6] * 3))
    for answer, path in zip(answers, SCANS[:6] * 3, strict=True):
        assert answer["path"] == path.name and answer["label"] == expected[path.name].label
        assert answer["confidence"] == pytest.approx(expected[path.name].confidence, abs=1e-5)


def test_concurrent_requests_share_forward_passes(classifier: Classifier) -> None:
    """While one batch runs, waiting requests queue up and go through the network together."""
    spy = copy.copy(classifier)
    batches: list[int] = []

    def predict_slices(slices: list, batch_size: int = 64) -> list:
        batches.append(len(slices))
        time.sleep(0.3)  # hold the network so the other requests are waiting in the queue
        return classifier.predict_slices(slices, batch_size)

    spy.predict_slices = predict_slices  # type: ignore[method-assign]
    with (
        live_server(create_app(spy, LIMITS)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        answers = list(pool.map(lambda p: http.post("/v1/predict", files=[_upload(p)]).json()[0], SCANS[:8]))
    assert [a["path"] for a in answers] == [p.name for p in SCANS[:8]]
    assert sum(batches) == 8 and max(batches) >= 2 and len(batches) < 8


def test_a_failing_batch_is_a_json_500_and_the_server_goes_on(classifier: Classifier) -> None:
    broken = copy.copy(classifier)

    def fail(slices: list, batch_size: int = 64) -> list:
        raise RuntimeError("out of memory")

    broken.predict_slices = fail  # type: ignore[method-assign]
    client = local_client(create_app(broken, LIMITS), raise_server_exceptions=False)
    response = client.post("/v1/predict", files=[_upload(SCANS[0])])
    assert response.status_code == 500 and response.json() == {"error": "internal error (RuntimeError: out of memory)"}
    assert client.get("/healthz").json() == {"status": "ok"}


def test_explanations_run_on_their_own_copy_of_the_network(classifier: Classifier) -> None:
    """Grad-CAM hooks the network it runs on; a prediction passing through that network at the
    same moment would leak its activations into the heat map. The race is too rare to provoke in a
    test, so this pins the guarantee itself: explanations never share a network with predictions."""
    app = create_app(classifier, LIMITS, workers=2)
    assert app.state.explainer.model is not app.state.classifier.model
    network = dict(app.state.classifier.model.named_parameters())
    copy = dict(app.state.explainer.model.named_parameters())
    assert all(torch.equal(network[k], copy[k]) and network[k].data_ptr() != copy[k].data_ptr() for k in network)


def test_onnx_backend_serves_the_same_answers(client: TestClient, shipped_onnx: Path) -> None:
    onnx_client = local_client(create_app(load_model(shipped_onnx), LIMITS))
    assert onnx_client.get("/v1/model").json()["backend"] == "onnx"
    files = [_upload(p) for p in SCANS[:4]]
    torch_answers = client.post("/v1/predict", files=files).json()
    onnx_answers = onnx_client.post("/v1/predict", files=files).json()
    for a, b in zip(torch_answers, onnx_answers, strict=True):
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) <= 1e-4
    response = onnx_client.post("/v1/explain", files=[_upload(SCANS[0], "file")])
    assert response.status_code == 501 and "Grad-CAM needs" in response.json()["error"]


def test_serve_command_reports_bad_weights_and_busy_ports_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--weights", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2
    assert "missing.safetensors" in result.output and "Traceback" not in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_a_bad_file_among_good_ones_gets_its_own_error(client: TestClient) -> None:
    files = [_upload(SCANS[0]), ("files", ("notes.txt", b"hello", "text/plain")), _upload(SCANS[1])]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200
    objects = response.json()
    assert [o["path"] for o in objects] == [SCANS[0].name, "notes.txt", SCANS[1].name]
    assert objects[0]["label"] == SCANS[0].parent.name and objects[2]["label"] == SCANS[1].parent.name
    assert objects[1]["label"] is None and "notes.txt: unsupported file type" in objects[1]["error"]


def test_a_long_upload_name_is_answered_without_server_paths(client: TestClient) -> None:
    name = "x" * 300 + ".jpg"
    response = client.post("/v1/predict", files=[("files", (name, SCANS[0].read_bytes(), "image/jpeg"))])
    assert response.status_code == 200
    [answer] = response.json()
    assert answer["label"] == SCANS[0].parent.name and len(answer["path"]) == 255
    bad = client.post("/v1/predict", files=[("files", (name, b"\x89PNG\r\n\x1a\n broken", "image/png"))])
    assert bad.status_code == 422 and "/tmp" not in bad.json()["error"] and "braintumor-" not in bad.json()["error"]


def test_explain_as_json_draws_no_figure(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import braintumor.inference.explain

    def no_figure(*args: object, **kwargs: object) -> None:
        raise AssertionError("a figure was drawn for a JSON answer")

    monkeypatch.setattr(braintumor.inference.explain, "save_figure", no_figure)
    response = client.post("/v1/explain?format=json", files=[_upload(SCANS[0], "file")])
    assert response.status_code == 200 and response.json()["prediction"]["label"] == SCANS[0].parent.name


def test_the_batcher_threads_end_with_the_service(classifier: Classifier) -> None:
    app = create_app(classifier, LIMITS)
    with local_client(app) as client:
        assert client.post("/v1/predict", files=[_upload(SCANS[0])]).status_code == 200
        threads = list(app.state.batcher._threads)
        assert threads and all(t.is_alive() for t in threads)
    assert not any(t.is_alive() for t in threads)


def test_explain_takes_exactly_one_file(client: TestClient) -> None:
    response = client.post("/v1/explain", files=[_upload(SCANS[0], "file"), _upload(SCANS[1], "file")])
    assert response.status_code == 422 and "exactly one scan" in response.json()["error"]


def test_api_key_origin_policy_and_security_headers(classifier: Classifier) -> None:
    policy = AccessPolicy(api_key="s3cret", allowed_origins=("https://viewer.example",))
    client = local_client(create_app(classifier, LIMITS, policy=policy))
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    missing = client.get("/v1/model")
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert client.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    key = {"X-API-Key": "s3cret"}
    foreign = client.post("/v1/predict", files=[_upload(SCANS[0])], headers={**key, "Origin": "https://evil.example"})
    assert foreign.status_code == 403 and "evil.example" in foreign.json()["error"]
    allowed = client.post("/v1/predict", files=[_upload(SCANS[0])], headers={**key, "Origin": "https://viewer.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://viewer.example"
    same = client.post("/v1/predict", files=[_upload(SCANS[0])], headers={**key, "Origin": "http://localhost"})
    assert same.status_code == 200
    page = client.get("/")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and missing.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    ("host", "allowed", "status"),
    [("localhost:8000", LOCAL_HOSTS, 200), ("127.0.0.1", LOCAL_HOSTS, 200), ("[::1]:8000", LOCAL_HOSTS, 200),
     ("evil.example", LOCAL_HOSTS, 400), ("evil.example:8000", LOCAL_HOSTS, 400), ("", LOCAL_HOSTS, 400),
     ("scans.hospital.org", ("*.hospital.org",), 200), ("hospital.org.evil", ("*.hospital.org",), 400),
     ("anything", ("*",), 200)],
)
def test_only_allowed_host_names_are_answered(classifier: Classifier, host: str, allowed: tuple, status: int) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to this machine sends its own
    Host and Origin; both match each other, so only the Host allow-list stops it."""
    client = local_client(create_app(classifier, LIMITS, policy=AccessPolicy(allowed_hosts=allowed)))
    origin = f"http://{host}" if host else ""
    response = client.get("/v1/model", headers={"Host": host, "Origin": origin})
    assert response.status_code == status
    if status == 400:
        assert "not one this service answers to" in response.json()["error"]


def test_a_slow_body_is_cut_off_and_the_server_goes_on(classifier: Classifier) -> None:
    import socket
    from urllib.parse import urlparse

    app = create_app(classifier, LIMITS, policy=AccessPolicy(body_timeout=1.0))
    with live_server(app) as url:
        address = urlparse(url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as raw:
            raw.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 5000\r\n\r\n--b\r\n"
            )
            received = b""  # waits for the server: no more body is sent; headers and body may come apart
            while b"did not arrive" not in received and (chunk := raw.recv(4096)):
                received += chunk
            answer = received.decode("latin-1")
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}


def test_idle_and_slow_header_connections_are_closed_at_the_deadline(classifier: Classifier) -> None:
    import socket
    import time
    from urllib.parse import urlparse

    with live_server(create_app(classifier, LIMITS), http=header_deadline_protocol(1.0)) as url:
        address = urlparse(url)
        with httpx.Client(base_url=url, timeout=10) as keeping:  # one kept-alive connection, two requests
            assert keeping.get("/healthz").status_code == 200
            time.sleep(0.6)
            assert keeping.get("/healthz").status_code == 200
        idle = socket.create_connection((address.hostname, address.port), timeout=10)
        slow = socket.create_connection((address.hostname, address.port), timeout=10)
        started = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        time.sleep(0.6)
        slow.sendall(b"s")  # a trickle does not move the deadline
        assert idle.recv(100) == b"" and slow.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 5
        idle.close()
        slow.close()
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


class SlowSpy:
    """A classifier stand-in for the batcher: records each batch's sources, takes 50 ms a batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()

    def predict_slices(self, slices: list, batch_size: int = 64) -> list:
        self.batches.append([s.source for s in slices])
        self.started.set()
        time.sleep(0.05)
        return [s.source for s in slices]


def _spied_volume(count: int) -> tuple:
    """(spy, a batcher of 8-slice batches around it, the future of a ``count``-slice volume, pixels)."""
    from braintumor.data.inputs import Slice
    from braintumor.serving.batcher import PredictionBatcher

    spy = SlowSpy()
    batcher = PredictionBatcher(spy, workers=1, max_batch=8)  # type: ignore[arg-type]
    pixels = np.zeros((4, 4), np.uint8)
    volume = batcher.submit([Slice(f"vol#{k}", pixels, "vol") for k in range(count)])
    spy.started.wait(5)
    return spy, batcher, volume, pixels


def test_a_large_request_does_not_hold_back_a_small_one() -> None:
    """A whole volume is served a batch at a time beside other requests: a one-scan request that
    arrives behind it goes into the next batch, not after the volume."""
    from braintumor.data.inputs import Slice

    spy, batcher, volume, pixels = _spied_volume(64)
    scan = batcher.submit([Slice("scan", pixels, "scan")])
    assert scan.result(5) == ["scan"] and not volume.done()
    assert any("scan" in batch for batch in spy.batches[1:3])
    assert volume.result(10) == [f"vol#{k}" for k in range(64)]
    assert sum(len(b) for b in spy.batches) == 65 and max(len(b) for b in spy.batches) <= 8
    batcher.stop()


def test_a_cancelled_request_has_no_more_of_its_slices_run() -> None:
    from braintumor.data.inputs import Slice

    spy, batcher, volume, pixels = _spied_volume(400)
    assert volume.cancel()
    time.sleep(0.3)
    assert len(spy.batches) <= 3  # the batch running when it was cancelled, not the other 47
    assert batcher.submit([Slice("scan", pixels, "scan")]).result(5) == ["scan"]
    batcher.stop()


def test_a_request_over_its_work_deadline_is_answered_503_and_stopped(classifier: Classifier) -> None:
    served = copy.copy(classifier)
    calls: list[int] = []

    def slow(slices: list, batch_size: int = 64) -> list:
        calls.append(len(slices))
        time.sleep(0.4)
        return classifier.predict_slices(slices, batch_size)

    served.predict_slices = slow  # type: ignore[method-assign]
    client = local_client(create_app(served, ServiceLimits(work_seconds=0.5)))
    volume = (np.random.default_rng(0).random((32, 32, 200)) * 1000).astype(np.int16)
    buffer = io.BytesIO(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
    response = client.post("/v1/predict", files=[("files", ("vol.nii", buffer.getvalue()))])
    assert response.status_code == 503 and "longer than 0.5 s" in response.json()["error"]
    time.sleep(1.0)
    assert sum(calls) < 200  # the rest of the volume was not classified


@pytest.mark.slow
def test_a_client_that_goes_away_stops_its_work(classifier: Classifier, tmp_path: Path) -> None:
    volume = (np.random.default_rng(0).random((64, 64, 600)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "long.nii")
    body = (tmp_path / "long.nii").read_bytes()
    served = copy.copy(classifier)
    calls: list[int] = []

    def counting(slices: list, batch_size: int = 64) -> list:
        calls.append(len(slices))
        return classifier.predict_slices(slices, batch_size)

    served.predict_slices = counting  # type: ignore[method-assign]
    with live_server(create_app(served, ServiceLimits(max_file_bytes=8 << 20))) as url:
        host, port = url.removeprefix("http://").split(":")
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"long.nii\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        payload = head + body + f"\r\n--{boundary}--\r\n".encode()
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                        f"boundary={boundary}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
            deadline = time.monotonic() + 30
            while not calls and time.monotonic() < deadline:
                time.sleep(0.05)
        # the client has gone; its 19 batches of 32 stop within a check or two
        time.sleep(2.0)
        settled = len(calls)
        time.sleep(2.0)
        assert len(calls) == settled and sum(calls) < 600
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


@pytest.mark.slow
def test_sigterm_stops_the_server_within_seconds_of_a_long_request(tmp_path: Path) -> None:
    """A 1,000-slice volume is being classified when SIGTERM arrives: the request gets a JSON 503
    within the shutdown deadline, the process exits within 5 s, and no traceback is logged."""
    import signal
    import subprocess
    import sys

    volume = (np.random.default_rng(0).random((64, 64, 1000)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "long.nii")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "braintumor", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        answers: list[httpx.Response] = []
        upload = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{url}/v1/predict", files=[("files", ("long.nii", (tmp_path / "long.nii").read_bytes()))], timeout=60)))
        upload.start()
        time.sleep(2.0)  # reading and classifying
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        took = time.monotonic() - stopping
        upload.join(timeout=30)
    finally:
        server.kill()
    assert took <= 5.0, output
    assert answers and answers[0].status_code == 503 and "shutting down" in answers[0].json()["error"]
    assert "Traceback" not in output


def test_the_service_has_onnx_runtime_give_its_memory_back_after_each_batch(shipped_onnx: Path) -> None:
    classifier = load_model(shipped_onnx)
    calls: list[object] = []
    real_run = classifier.network.session.run

    class Spy:
        def run(self, names: list, feed: dict, options: object = None) -> list:
            calls.append(options)
            return real_run(names, feed, options)

    classifier.network.session = Spy()
    client = local_client(create_app(classifier, LIMITS))
    assert classifier.network.release_after_call
    assert client.post("/v1/predict", files=[_upload(p) for p in SCANS[:3]]).status_code == 200
    assert calls and calls[-1] is classifier.network._releasing and all(c is None for c in calls[:-1])
