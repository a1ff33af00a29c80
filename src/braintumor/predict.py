"""``load_model()``: the classifier users import. Load once, then predict many times.

The classifier rebuilds its preprocessing from the weights file's metadata (class order, input
size, normalisation), so a model trained with other settings is used correctly without flags.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from .checkpoint import load_weights
from .engine import Runtime, predict_logits_and_features, select_runtime
from .errors import CheckpointError, ConfigError, InvalidImageError
from .explain import HeatmapRequest, compute_heatmaps, resize_heatmap, resolve_layer, save_figure
from .imaging import array_to_grey, colour_share, resize_grey
from .inputs import Slice, expand_inputs, read_scan
from .models import build_efficientnet_b0, fold_batch_norm
from .onnx_backend import OnnxNetwork, export_model_proto
from .ood import OODGuard, colour_rejects, outside_range_reason, refusal_reason, split_guard
from .transforms import Preprocessing

ImageInput = str | Path | Image.Image | np.ndarray | Slice  # a Slice: already read (inputs.read_scan)
NOT_BRAIN_MRI = "not_brain_mri"  # the label given to inputs the out-of-distribution guard rejects
# Grad-CAM defaults, chosen by the faithfulness comparison in docs/explanations.md.
DEFAULT_CAM_METHOD = "layercam"
DEFAULT_CAM_LAYER = "features.5"  # the last 14x14 stage: four times finer than the 7x7 head

SHIPPED_WEIGHTS_NAME = "braintumor-b0.safetensors"


def default_weights_path() -> Path:
    """The model that ships inside the package."""
    return Path(str(resources.files("braintumor") / "weights" / SHIPPED_WEIGHTS_NAME))


@dataclass
class Prediction:
    """The result for one 2-D image: its class, the class's probability and all probabilities.

    ``error`` is set (and the rest empty) when the input could not be read.
    """

    path: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    index: int | None = None  # frame or slice number within the file
    volume: bool = False
    uncertain: bool | None = None  # confidence below the model's refer-to-a-radiologist threshold
    not_brain_mri: bool | None = None  # the out-of-distribution guard rejected the input
    not_brain_mri_reason: str | None = None  # which of the guard's rules refused it, in words
    # A brain MRI slice, classified, but unlike the scans the model was validated on (ood.OODGuard)
    outside_validated_range: bool | None = None
    outside_validated_range_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``predict --json`` and of the HTTP service."""
        result: dict[str, Any] = {
            "path": self.path, "label": self.label, "confidence": self.confidence,
            "probabilities": self.probabilities, "uncertain": self.uncertain, "not_brain_mri": self.not_brain_mri,
        }
        if self.not_brain_mri_reason is not None:
            result["not_brain_mri_reason"] = self.not_brain_mri_reason
        result["outside_validated_range"] = self.outside_validated_range
        if self.outside_validated_range_reason is not None:
            result["outside_validated_range_reason"] = self.outside_validated_range_reason
        if self.index is not None:
            result["index"] = self.index
        if self.error is not None:
            result["error"] = self.error
        return result


def summarize_volume(predictions: list[Prediction]) -> dict[str, Any]:
    """Volume-level view of one NIfTI volume's slice predictions: which classes, on which slices,
    with what confidence. The volume is called a tumour class when any slice is, choosing the
    tumour class with the most confident slice; otherwise ``notumor``."""
    by_class: dict[str, dict[str, Any]] = {}
    for prediction in predictions:
        if prediction.label is None:
            continue
        entry = by_class.setdefault(prediction.label, {"slices": [], "max_confidence": 0.0})
        entry["slices"].append(prediction.index)
        entry["max_confidence"] = max(entry["max_confidence"], float(prediction.confidence or 0.0))
    tumours = {k: v for k, v in by_class.items() if k not in ("notumor", NOT_BRAIN_MRI)}
    label = max(tumours, key=lambda k: tumours[k]["max_confidence"]) if tumours else ("notumor" if by_class else None)
    return {"path": predictions[0].path.split("#")[0] if predictions else "", "n_slices": len(predictions), "label": label, "classes": by_class}


def volume_object(slices: list[Prediction]) -> dict[str, Any]:
    """The ``predict --json`` (and HTTP) object for a whole NIfTI volume: its summary plus the mean
    of its slices' probabilities."""
    summary = summarize_volume(slices)
    label = summary["label"]
    readable = [p for p in slices if p.probabilities]
    names = list(readable[0].probabilities) if readable else []
    mean = {n: float(sum(p.probabilities[n] for p in readable) / len(readable)) for n in names}
    confidence = summary["classes"][label]["max_confidence"] if label in summary["classes"] else None
    return {"path": summary["path"], "kind": "volume", "label": label, "confidence": confidence, "probabilities": mean, "summary": summary}


@dataclass
class Explanation:
    """A heat map over one image at its own size, with the prediction it explains.

    ``heatmap`` and ``pixels`` are None when the input could not be read (``prediction.error``).
    """

    prediction: Prediction
    heatmap: np.ndarray | None  # (H, W) float32 in [0, 1]
    pixels: np.ndarray | None  # (H, W) uint8, the scan as the model saw it before resizing
    target: str | None  # the explained class
    method: str
    layer: str

    def save_png(self, path: Path | BinaryIO) -> None:
        """The scan beside its heat-map overlay, titled with the prediction (and target)."""
        assert self.heatmap is not None and self.pixels is not None, "no heat map for an unreadable input"
        title = f"{self.prediction.label} ({self.prediction.confidence:.1%})"
        if self.target != self.prediction.label:
            title += f"; explaining {self.target}"
        save_figure(self.pixels, self.heatmap, f"{title}\n{Path(self.prediction.path).name}  [{self.method}, {self.layer}]", path)


@dataclass
class Assessment:
    """What the network says about a batch: calibrated probabilities (N, C) and, with a guard,
    which inputs are refused (not brain MRI), which are outside the validated range, and the
    guard's score of each."""

    probabilities: np.ndarray
    rejected: np.ndarray | None = None
    outside_range: np.ndarray | None = None
    scores: np.ndarray | None = None


class Classifier:
    """An EfficientNet-B0 with the metadata that says how to feed it and name its outputs.

    Several threads may predict with one classifier at once. Explaining hooks the network while it
    runs, so do not explain while another thread predicts with the same classifier: give the
    explaining thread a copy (``copy.copy`` with a ``copy.deepcopy`` of ``model``, as the HTTP
    service does)."""

    def __init__(
        self,
        model: nn.Module | None,
        metadata: dict[str, Any],
        runtime: Runtime,
        weights_path: Path | None = None,
        tta: bool = False,
        guard: OODGuard | None = None,
        onnx: OnnxNetwork | None = None,
    ):
        """``model`` runs inference unless ``onnx`` is given; then it only serves Grad-CAM (which
        needs gradients) and may be None for a classifier loaded from an ``.onnx`` file."""
        self.model = model.eval() if model is not None else None
        self.onnx = onnx
        self.backend = "onnx" if onnx is not None else "torch"
        self.guard = guard
        self.metadata = metadata
        self.runtime = runtime
        self.weights_path = weights_path
        self.tta = tta
        self.class_names: list[str] = list(metadata["class_names"])
        self.preprocessing = Preprocessing.from_metadata(metadata)
        self.image_size: int = self.preprocessing.image_size
        # Calibration travels with the weights (scripts/calibrate.py); absent, confidences are raw.
        self.temperature: float = float(metadata.get("temperature", 1.0))
        threshold = metadata.get("uncertainty_threshold")
        self.uncertainty_threshold: float | None = None if threshold is None else float(threshold)

    def predict_pixels(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities (N, C) for decoded, resized grey pixels (N, S, S) uint8.

        Logits are divided by the model's fitted temperature. With test-time augmentation on, the
        probabilities are the mean over the scan and its left-right mirror (the one augmentation
        that is exact for brain slices), at twice the cost.
        """
        return self.infer(pixels, batch_size, progress)[0]

    def infer(
        self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, C), not-a-brain-MRI flags (N,) or None without a guard)."""
        assessment = self.assess(pixels, batch_size, progress)
        return assessment.probabilities, assessment.rejected

    def assess(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False) -> Assessment:
        """Probabilities and the guard's verdicts on the features of (N, S, S) uint8 pixels."""
        tensor = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
        logits, features = self._logits_and_features(tensor, batch_size, progress)
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        if self.tta:
            mirrored = self._logits_and_features(tensor.flip(-1), batch_size)[0]
            probabilities = (probabilities + torch.softmax(mirrored / self.temperature, dim=1)) / 2
        if self.guard is None or not len(features):
            return Assessment(probabilities.numpy())
        scores, refused, outside = self.guard.verdicts(features.double().numpy())
        return Assessment(probabilities.numpy(), refused, outside, scores)

    def logits_and_features(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Logits before temperature scaling (N, C) float32 and pooled features (N, 1280) float64 of
        (N, S, S) uint8 pixels, in one pass: what calibration, the guard's fitting and analyses such
        as nearest training neighbours work on."""
        tensor = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
        logits, features = self._logits_and_features(tensor, batch_size)
        return logits.numpy(), features.double().numpy()

    def _logits_and_features(
        self, pixels: torch.Tensor, batch_size: int, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.onnx is not None:
            return self.onnx.logits_and_features(pixels, batch_size)
        assert self.model is not None
        return predict_logits_and_features(self.model, pixels, self.runtime, batch_size, progress, self.preprocessing)

    def predict_slices(self, slices: list[Slice], batch_size: int = 64) -> list[Prediction]:
        """Predictions for slices already read (``inputs.read_scan``), each resized here if needed."""
        if not slices:
            return []
        pixels = np.stack([resize_grey(s.pixels, self.image_size) for s in slices])
        assessment = self.assess(pixels, batch_size)
        refusals = self._refusals(slices, assessment.rejected)
        return [self._result(s, assessment, k, refusals[k]) for k, s in enumerate(slices)]

    def _refusals(self, slices: list[Slice], by_features: np.ndarray | None) -> list[str | None]:
        """Why each slice is not a brain MRI (None: it may be one), from the guard's verdicts on
        the features, the colour rule (``ood.colour_rejects``: the features only ever see the
        grey version of an input) and a DICOM header's own word (``inputs.dicom_refusal``).
        All None when the model has no guard."""
        if by_features is None:
            return [None] * len(slices)
        by_colour = colour_rejects(np.array([s.colour_share for s in slices]))
        return [refusal_reason(bool(f), bool(c), s.header_refusal) for f, c, s in zip(by_features, by_colour, slices)]

    def _result(self, item: Slice, assessment: Assessment, k: int, refusal: str | None = None) -> Prediction:
        """The prediction for ``item`` (row ``k`` of ``assessment``); ``refusal`` says why the guard
        refused it (None: it did not)."""
        probabilities = assessment.probabilities[k]
        rejected = None if self.guard is None else refusal is not None
        best = int(probabilities.argmax())
        confidence = float(probabilities[best])
        threshold = self.uncertainty_threshold
        outside, reason = self._outside_range(assessment, k, bool(rejected))
        return Prediction(
            path=item.source,
            label=NOT_BRAIN_MRI if rejected else self.class_names[best],
            not_brain_mri=rejected,
            not_brain_mri_reason=refusal,
            confidence=confidence,
            probabilities={name: float(p) for name, p in zip(self.class_names, probabilities)},
            index=item.index,
            volume=item.volume,
            uncertain=None if threshold is None else confidence < threshold,
            outside_validated_range=outside,
            outside_validated_range_reason=reason,
        )

    def _outside_range(self, assessment: Assessment, k: int, rejected: bool) -> tuple[bool | None, str | None]:
        """The outside-the-validated-range flag and its reason (None: the guard has no such band;
        a refused input is not flagged: it is not classified at all)."""
        if self.guard is None or self.guard.range_threshold is None or assessment.outside_range is None:
            return None, None
        if rejected or not assessment.outside_range[k]:
            return False, None
        return True, outside_range_reason(float(assessment.scores[k]), self.guard.range_threshold)

    def _read(self, path: Path, resize: bool) -> list[Slice] | Prediction:
        try:
            slices = read_scan(path)
        except InvalidImageError as exc:
            return Prediction(path=str(path), error=str(exc))
        if not resize:
            return slices
        return [replace(s, pixels=resize_grey(s.pixels, self.image_size)) for s in slices]

    def _from_memory(self, item: Image.Image | np.ndarray, number: int, resize: bool) -> list[Slice] | Prediction:
        name = f"<image {number}>"
        try:
            array = np.asarray(item.convert("RGBA") if isinstance(item, Image.Image) and item.mode == "P" else item)
            grey = array_to_grey(array)
        except InvalidImageError as exc:
            return Prediction(path=name, error=f"{name}: {exc}")
        return [Slice(name, resize_grey(grey, self.image_size) if resize else grey, name, colour_share=colour_share(array))]

    def _given(self, item: Slice, resize: bool) -> list[Slice]:
        return [replace(item, pixels=resize_grey(item.pixels, self.image_size))] if resize else [item]

    def _slices(self, inputs: Iterable[ImageInput], workers: int, resize: bool = True) -> Iterator[Slice | Prediction]:
        """Decoded slices in input order (a failed file as a Prediction with its error), read by
        worker threads at most a few batches ahead so memory stays bounded."""
        lookahead = 4 * workers + 8
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future] = deque()

            def ready(limit: int) -> Iterator[Slice | Prediction]:
                while len(pending) > limit:
                    result = pending.popleft().result()
                    yield from ([result] if isinstance(result, Prediction) else result)

            for number, item in enumerate(inputs):
                if isinstance(item, (str, Path)):
                    for path in expand_inputs([item]):
                        pending.append(pool.submit(self._read, path, resize))
                        yield from ready(lookahead)
                elif isinstance(item, Slice):  # keeps what reading found out: colour share, header
                    pending.append(pool.submit(self._given, item, resize))
                    yield from ready(lookahead)
                else:
                    pending.append(pool.submit(self._from_memory, item, number, resize))
                    yield from ready(lookahead)
            yield from ready(0)

    def predict_iter(
        self, inputs: ImageInput | Iterable[ImageInput], batch_size: int = 32, workers: int = 2, progress: bool = False
    ) -> Iterator[Prediction]:
        """Predictions in input order, streamed: memory stays flat however many files there are.

        Args:
            inputs: a path (file, folder or glob), a PIL image, an array, or a list of these.
        """
        items = [inputs] if isinstance(inputs, (str, Path, Image.Image, np.ndarray, Slice)) else list(inputs)
        queue: list[Slice | Prediction] = []  # slices waiting for a full batch, failures kept in order
        bar = tqdm(desc="predict", unit="img", disable=not progress)

        def flush() -> Iterator[Prediction]:
            results = iter(self.predict_slices([item for item in queue if isinstance(item, Slice)], batch_size))
            for item in queue:
                yield item if isinstance(item, Prediction) else next(results)
            bar.update(len(queue))
            queue.clear()

        waiting = 0
        for item in self._slices(items, workers):
            queue.append(item)
            waiting += isinstance(item, Slice)
            if waiting == batch_size:
                yield from flush()
                waiting = 0
        if queue:
            yield from flush()
        bar.close()

    def predict(self, inputs: ImageInput | Iterable[ImageInput], batch_size: int = 32) -> list[Prediction]:
        """Predictions for every image in ``inputs`` (see ``predict_iter``), as a list."""
        return list(self.predict_iter(inputs, batch_size=batch_size))

    def explain_iter(
        self,
        inputs: ImageInput | Iterable[ImageInput],
        method: str = DEFAULT_CAM_METHOD,
        target: str | None = None,
        layer: str = DEFAULT_CAM_LAYER,
        batch_size: int = 8,
    ) -> Iterator[Explanation]:
        """Heat maps at each image's own size, with the prediction; streamed like ``predict_iter``.

        Args:
            target: the class to explain (default: the predicted class).
        """
        if self.model is None:
            raise ConfigError(
                f"{self.weights_path}: Grad-CAM needs gradients, which an ONNX file cannot give; "
                "explain with the .safetensors weights it was exported from"
            )
        if target is not None and target not in self.class_names:
            raise ConfigError(f"target {target!r} is not one of {', '.join(self.class_names)}")
        request = HeatmapRequest(method, layer, None if target is None else self.class_names.index(target))
        resolve_layer(self.model, layer)  # fail on a bad layer before reading any file
        items = [inputs] if isinstance(inputs, (str, Path, Image.Image, np.ndarray, Slice)) else list(inputs)
        batch: list[Slice] = []

        def flush() -> Iterator[Explanation]:
            resized = np.stack([resize_grey(s.pixels, self.image_size) for s in batch])
            heatmaps, raw = compute_heatmaps(self.model, resized, request, self.preprocessing)
            # The reported prediction is predict's own (temperature, guard, TTA), so the two agree.
            assessment = self.assess(resized, batch_size)
            refusals = self._refusals(batch, assessment.rejected)
            for k, (item, heatmap) in enumerate(zip(batch, heatmaps)):
                prediction = self._result(item, assessment, k, refusals[k])
                explained = target or self.class_names[int(raw[k].argmax())]
                yield Explanation(prediction, resize_heatmap(heatmap, item.pixels.shape), item.pixels, explained, method, layer)
            batch.clear()

        for item in self._slices(items, workers=2, resize=False):
            if isinstance(item, Prediction):
                yield from flush() if batch else iter(())
                yield Explanation(item, None, None, None, method, layer)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def explain(self, inputs: ImageInput | Iterable[ImageInput], **options: Any) -> list[Explanation]:
        """Explanations for every image in ``inputs`` (see ``explain_iter``), as a list."""
        return list(self.explain_iter(inputs, **options))


BACKENDS: tuple[str, ...] = ("torch", "onnx")


def load_model(
    weights: str | Path | None = None,
    device: str = "auto",
    amp: bool = False,
    tta: bool = False,
    backend: str | None = None,
) -> Classifier:
    """Load a braintumor weights file (default: the shipped model) into a ready classifier.

    Args:
        weights: a ``.safetensors`` file written by ``braintumor train``, an ``.onnx`` file written
            by ``braintumor export``, or None for the shipped model.
        device: 'auto', 'cpu' or 'cuda' (the ONNX backend runs on the CPU).
        amp: bf16/fp16 autocast for speed; off by default so results match fp32 exactly.
        tta: average each prediction with that of the mirrored scan (see ``predict_pixels``).
        backend: 'torch' or 'onnx' (ONNX Runtime); default: 'onnx' for an ``.onnx`` file, else
            'torch'. With 'onnx' and a ``.safetensors`` file the network is exported in memory
            (a few seconds), and the PyTorch model is kept for Grad-CAM.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the model.
        ConfigError: an unknown backend, or the torch backend asked to run an ONNX file.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    is_onnx_file = path.suffix.lower() == ".onnx"
    backend = backend or ("onnx" if is_onnx_file else "torch")
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if is_onnx_file:
        if backend != "onnx":
            raise ConfigError(f"{path}: an ONNX file runs only with the onnx backend")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        network = OnnxNetwork(path, str(path))
        return Classifier(None, network.metadata, select_runtime("cpu", False), path, tta, network.guard, network)
    tensors, metadata = load_weights(path)
    state, guard = split_guard(tensors)
    model = build_efficientnet_b0(len(metadata["class_names"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit EfficientNet-B0 ({str(exc).splitlines()[0]})") from None
    model = fold_batch_norm(model)
    onnx = None
    if backend == "onnx":
        proto = export_model_proto(model.eval(), metadata, guard, path.name)
        onnx = OnnxNetwork(proto.SerializeToString(), str(path))
    runtime = select_runtime(device, amp)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Classifier(model, metadata, runtime, path, tta, guard, onnx)
