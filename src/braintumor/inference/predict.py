"""``load_model()``: the classifier users import. Load once, then predict many times.

A ``Classifier`` is a ``network.Network`` (PyTorch or ONNX Runtime, one interface) plus the
``spec.ModelSpec`` read from the weights: the class order, the preprocessing the network applies,
the calibration and the out-of-distribution guard. It turns the network's logits and features into
``results.Prediction`` objects with their flags, and explains with Grad-CAM on the torch network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..data.dicom_series import DicomSeries
from ..data.imaging import resize_grey
from ..data.inputs import InputItem, ReadFailure, Slice, read_inputs
from ..data.transforms import Preprocessing
from ..errors import ConfigError
from ..models.network import BACKENDS, Network, TorchNetwork, load_network, load_torch_network
from ..models.ood import OODGuard, colour_rejects, outside_range_reason, refusal_reason
from ..models.slice_kind import SliceKind, coverage_reason
from ..models.spec import DEFAULT_CAM_LAYER, ModelSpec
from .explain import HeatmapRequest, compute_heatmaps, resize_heatmap, resolve_layer
from .results import NOT_BRAIN_MRI, Explanation, Prediction, SeriesResult, series_result

__all__ = [
    "BACKENDS", "DEFAULT_CAM_LAYER", "DEFAULT_CAM_METHOD", "NOT_BRAIN_MRI", "Assessment", "Classifier", "Explanation",
    "ImageInput", "Prediction", "default_weights_path", "load_model",
]

ImageInput = InputItem  # a path, a folder, a glob, a PIL image, an array, or a Slice already read
DEFAULT_CAM_METHOD = "layercam"  # chosen by the faithfulness comparison in docs/explanations.md
SHIPPED_WEIGHTS_NAME = "braintumor-b0.safetensors"


def default_weights_path() -> Path:
    """The model that ships inside the package (its exported graph ships beside it)."""
    return Path(str(resources.files("braintumor") / "weights" / SHIPPED_WEIGHTS_NAME))


@dataclass
class Assessment:
    """What the network says about a batch: calibrated probabilities (N, C) and, with a guard,
    which inputs are refused (not brain MRI), which are outside the validated range, and the
    guard's score of each; with a slice-kind estimator, each input's sequence and plane as the
    image suggests them, and with a coverage table, why each answer is outside what the training
    data covers (None where it is covered). All of it from the pixels alone: a prediction of a
    DICOM slice puts its header's plane and sequence first (``Classifier._slice_kind``)."""

    probabilities: np.ndarray
    rejected: np.ndarray | None = None
    outside_range: np.ndarray | None = None  # the guard's feature-distance band
    scores: np.ndarray | None = None
    kinds: list[SliceKind] | None = None
    coverage: list[str | None] | None = None

    def outside_validated_range(self) -> np.ndarray | None:
        """Outside the validated range for either reason (distance band or coverage), refused
        inputs excepted; None when the model has neither rule."""
        if self.outside_range is None and self.coverage is None:
            return None
        n = len(self.probabilities)
        outside = np.zeros(n, dtype=bool) if self.outside_range is None else self.outside_range.copy()
        if self.coverage is not None:
            outside |= np.array([reason is not None for reason in self.coverage], dtype=bool)
        return outside & ~self.rejected if self.rejected is not None else outside


def _as_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    return pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))


class Classifier:
    """A network with the spec that says how to read its outputs.

    Several threads may predict with one classifier at once. Explaining hooks the torch network
    while it runs, so do not explain while another thread explains with the same classifier: give
    the explaining thread a copy (``copy.copy`` with a ``copy.deepcopy`` of ``model``, as the HTTP
    service does).
    """

    def __init__(
        self,
        network: Network,
        weights_path: Path | None = None,
        tta: bool = False,
        explain_model: Callable[[], nn.Module | None] | None = None,
    ):
        """``explain_model`` loads the torch module Grad-CAM runs on, when first needed (default:
        the network's own module for a torch network, none for an ONNX one)."""
        self.network = network
        self.spec: ModelSpec = network.spec
        self.weights_path = weights_path
        self.tta = tta
        own = network.model if isinstance(network, TorchNetwork) else None
        self._load_explain_model = explain_model or (lambda: own)
        self._model: nn.Module | None = own

    # The spec's fields, as the classifier's own attributes.
    backend = property(lambda self: self.network.backend)
    class_names = property(lambda self: list(self.spec.class_names))
    preprocessing: Preprocessing = property(lambda self: self.spec.preprocessing)  # type: ignore[assignment]
    image_size = property(lambda self: self.spec.image_size)
    temperature = property(lambda self: self.spec.temperature)
    uncertainty_threshold = property(lambda self: self.spec.uncertainty_threshold)

    @property
    def guard(self) -> OODGuard | None:
        return self.spec.guard

    @guard.setter
    def guard(self, guard: OODGuard | None) -> None:
        """Use another guard (``scripts/fit_ood.py`` scores candidates this way)."""
        self.spec = self.spec.with_guard(guard)

    @property
    def model(self) -> nn.Module | None:
        """The torch module Grad-CAM runs on, loaded on first use (None: an ONNX file has none)."""
        if self._model is None:
            self._model = self._load_explain_model()
        return self._model

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        self._model = model

    def explaining_copy(self) -> Classifier:
        """This classifier with a torch module of its own for Grad-CAM (which hooks the module it
        runs on), so explanations and predictions in other threads never share one."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self._model) if self._model is not None else self._load_explain_model()
        return twin

    def predict_pixels(
        self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Class probabilities (N, C) for decoded, resized grey pixels (N, S, S) uint8.

        Logits are divided by the model's fitted temperature. With test-time augmentation on, the
        probabilities are the mean over the scan and its left-right mirror (the one augmentation
        that is exact for brain slices), at twice the cost.
        """
        return self.assess(pixels, batch_size, progress).probabilities

    def infer(
        self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, C), not-a-brain-MRI flags (N,) or None without a guard)."""
        assessment = self.assess(pixels, batch_size, progress)
        return assessment.probabilities, assessment.rejected

    def assess(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64, progress: bool = False) -> Assessment:
        """Probabilities and the guard's verdicts on the features of (N, S, S) uint8 pixels."""
        tensor = _as_tensor(pixels)
        logits, features = self.network.logits_and_features(tensor, batch_size, progress)
        return self._assessment(tensor, logits, features, batch_size)

    def _assessment(
        self, pixels: torch.Tensor, logits: torch.Tensor, features: torch.Tensor, batch_size: int
    ) -> Assessment:
        """Calibrated probabilities (mirror-averaged with TTA) and the guard's verdicts of one pass."""
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        if self.tta:
            mirrored = self.network.logits_and_features(pixels.flip(-1), batch_size)[0]
            probabilities = (probabilities + torch.softmax(mirrored / self.temperature, dim=1)) / 2
        assessment = Assessment(probabilities.numpy())
        if not len(features):
            return assessment
        if self.guard is not None:
            assessment.scores, assessment.rejected, assessment.outside_range = self.guard.verdicts(
                features.double().numpy())
        if self.spec.slice_kind is not None:
            assessment.kinds = self.spec.slice_kind.estimate(features.double().numpy())
            if self.spec.coverage is not None:
                answers = [self.class_names[int(a)] for a in assessment.probabilities.argmax(axis=1)]
                assessment.coverage = [coverage_reason(kind, answer, self.spec.coverage)
                                       for kind, answer in zip(assessment.kinds, answers, strict=True)]
        return assessment

    def logits_and_features(
        self, pixels: np.ndarray | torch.Tensor, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits before temperature scaling (N, C) float32 and pooled features (N, F) float64 of
        (N, S, S) uint8 pixels, in one pass: what calibration, the guard's fitting and analyses such
        as nearest training neighbours work on."""
        logits, features = self.network.logits_and_features(_as_tensor(pixels), batch_size)
        return logits.numpy(), features.double().numpy()

    def predict_slices(self, slices: list[Slice], batch_size: int = 64) -> list[Prediction]:
        """Predictions for slices already read (``inputs.read_scan``), each resized here if needed."""
        if not slices:
            return []
        pixels = np.stack([resize_grey(s.pixels, self.image_size) for s in slices])
        return self.answers(slices, self.assess(pixels, batch_size))

    def answers(self, slices: list[Slice], assessment: Assessment) -> list[Prediction]:
        """What a user is told about each slice, given the network's ``assessment`` of their pixels:
        the one place that decides the flags (refused, uncertain, outside the validated range).
        ``predict``, ``explain``, ``predict_series`` and ``evaluation.evaluate`` all come here."""
        refusals = self._refusals(slices, assessment.rejected)
        return [self._result(s, assessment, k, refusals[k]) for k, s in enumerate(slices)]

    def _refusals(self, slices: list[Slice], by_features: np.ndarray | None) -> list[str | None]:
        """Why each slice is not a brain MRI (None: it may be one), from the guard's verdicts on
        the features, the colour rule (``ood.colour_rejects``: the features only ever see the
        grey version of an input) and a DICOM header's own word (``data.medical.dicom_refusal``).
        All None when the model has no guard."""
        if by_features is None:
            return [None] * len(slices)
        by_colour = colour_rejects(np.array([s.colour_share for s in slices]))
        return [
            refusal_reason(bool(f), bool(c), s.header_refusal)
            for f, c, s in zip(by_features, by_colour, slices, strict=True)
        ]

    def _result(self, item: Slice, assessment: Assessment, k: int, refusal: str | None = None) -> Prediction:
        """The prediction for ``item`` (row ``k`` of ``assessment``); ``refusal`` says why the guard
        refused it (None: it did not)."""
        probabilities = assessment.probabilities[k]
        rejected = None if self.guard is None else refusal is not None
        best = int(probabilities.argmax())
        confidence = float(probabilities[best])
        threshold = self.uncertainty_threshold
        kind = None if rejected else self._slice_kind(item, assessment, k)
        outside, reason = self._outside_range(assessment, k, bool(rejected), kind, self.class_names[best])
        return Prediction(
            path=item.source,
            label=NOT_BRAIN_MRI if rejected else self.class_names[best],
            not_brain_mri=rejected,
            not_brain_mri_reason=refusal,
            confidence=confidence,
            probabilities={name: float(p) for name, p in zip(self.class_names, probabilities, strict=True)},
            index=item.index,
            volume=item.volume,
            uncertain=None if threshold is None else confidence < threshold,
            outside_validated_range=outside,
            outside_validated_range_reason=reason,
            file=item.path if item.volume else None,
            note=item.note,
            dicom=item.dicom,
            slice_kind=kind,
        )

    @staticmethod
    def _slice_kind(item: Slice, assessment: Assessment, k: int) -> SliceKind | None:
        """The image's estimate with what the file says put first: a DICOM header's plane and
        sequence, or the axial plane of a volume's slices (volumes are read in RAS order). A plain
        T1 inferred from TR and TE alone does not overrule the image: a contrast agent is often
        given without the header saying so (``data.series._sequence_from_tags``)."""
        if assessment.kinds is None:
            return None
        kind = assessment.kinds[k]
        if item.dicom is not None:
            ref = item.dicom
            guessed_t1 = ref.sequence == "T1" and ref.sequence_source == "acquisition tags"
            return kind.with_header(ref.plane, None if guessed_t1 else ref.sequence)
        return kind.with_header("axial", None) if item.volume else kind

    def _outside_range(
        self, assessment: Assessment, k: int, rejected: bool, kind: SliceKind | None, answer: str
    ) -> tuple[bool | None, str | None]:
        """The outside-the-validated-range flag and its reasons: the training data has no
        counterpart of this kind of slice for this answer (``slice_kind.coverage_reason``), or the
        features lie in the guard's band. None: the model has neither rule; a refused input is
        not flagged: it is not classified at all."""
        guard = self.guard
        by_distance = guard is not None and guard.range_threshold is not None and assessment.outside_range is not None
        by_coverage = self.spec.coverage is not None and kind is not None
        if not (by_distance or by_coverage):
            return None, None
        if rejected:
            return False, None
        reasons = [coverage_reason(kind, answer, self.spec.coverage)] if by_coverage else []
        if by_distance and assessment.outside_range[k]:
            reasons.append(outside_range_reason(float(assessment.scores[k]), self.guard.range_threshold))
        reasons = [r for r in reasons if r]
        return bool(reasons), "; ".join(reasons) or None

    def predict_series(
        self, series: DicomSeries | list[Slice], explain: bool = False, batch_size: int = 32
    ) -> SeriesResult:
        """One series judged in one pass: every slice classified once on this classifier's network,
        put in order and given its verdict (``results.series_result``); with ``explain``, the
        Grad-CAM of the slice a person should look at first (``SeriesResult.shown_slice``) for the
        class it was given, on its pixels as read. Reads no file: a ``DicomSeries`` holds its
        instances' headers and pixels (``data.dicom_series.read_dicom_series``).

        Raises:
            ConfigError: ``explain`` with a classifier that has no torch network (an ONNX file).
        """
        slices = series.slices if isinstance(series, DicomSeries) else list(series)
        request = self._heatmap_request(DEFAULT_CAM_METHOD, None, self.spec.cam_layer) if explain else None
        predictions = self.predict_slices(slices, batch_size)
        result = series_result(predictions)
        shown = result.shown_slice() if request is not None else None
        if shown is not None:
            source = next(s for p, s in zip(predictions, slices, strict=True) if p is shown)
            result.key_heatmap = self._heatmap_of(source, shown, request)
        return result

    def _heatmap_of(self, item: Slice, prediction: Prediction, request: HeatmapRequest) -> Explanation:
        """The heat map of ``prediction``'s class over ``item`` at its own size; the prediction is
        the one already made, not made again."""
        target = replace(request, target=self.class_names.index(prediction.label))
        resized = resize_grey(item.pixels, self.image_size)[None]
        cams = compute_heatmaps(self.model, resized, target, self.preprocessing)
        heatmap = resize_heatmap(cams.heatmaps[0], item.pixels.shape)
        return Explanation(prediction, heatmap, item.pixels, prediction.label, request.method, request.layer)

    def predict_iter(
        self, inputs: ImageInput | Iterable[ImageInput], batch_size: int = 32, workers: int = 2, progress: bool = False
    ) -> Iterator[Prediction]:
        """Predictions in input order, streamed: memory stays flat however many files there are.

        Args:
            inputs: a path (file, folder or glob), a PIL image, an array, or a list of these.
            progress: a progress bar on stderr (cleared when done).
        """
        queue: list[Slice | ReadFailure] = []  # slices waiting for a full batch, failures kept in order
        bar = tqdm(desc="predict", unit="img", disable=not progress, leave=False)

        def flush() -> Iterator[Prediction]:
            results = iter(self.predict_slices([item for item in queue if isinstance(item, Slice)], batch_size))
            bar.update(len(queue))
            for item in queue:
                failed = isinstance(item, ReadFailure)
                yield Prediction(path=item.source, error=item.message) if failed else next(results)
            queue.clear()

        waiting = 0
        for item in read_inputs(_as_items(inputs), workers, self.image_size):
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
        layer: str | None = None,
        batch_size: int = 8,
    ) -> Iterator[Explanation]:
        """Heat maps at each image's own size, with the prediction; streamed like ``predict_iter``.
        One forward and one backward pass per batch give both the heat maps and the predictions.

        Args:
            target: the class to explain (default: the predicted class).
            layer: the module to read (default: the spec's ``cam_layer``).
        """
        layer = layer or self.spec.cam_layer
        request = self._heatmap_request(method, target, layer)
        batch: list[Slice] = []

        def flush() -> Iterator[Explanation]:
            yield from self._explain_batch(batch, request, batch_size)
            batch.clear()

        for item in read_inputs(_as_items(inputs), workers=2):
            if isinstance(item, ReadFailure):
                yield from flush()
                yield Explanation(Prediction(path=item.source, error=item.message), None, None, None, method, layer)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                yield from flush()
        yield from flush()

    def _heatmap_request(self, method: str, target: str | None, layer: str) -> HeatmapRequest:
        """The request, checked before any file is read: a model to explain with, a known target
        class and a layer of the network."""
        if self.model is None:
            raise ConfigError(
                f"{self.weights_path}: Grad-CAM needs gradients, which an ONNX file cannot give; "
                "explain with the .safetensors weights it was exported from"
            )
        if target is not None and target not in self.class_names:
            raise ConfigError(f"target {target!r} is not one of {', '.join(self.class_names)}")
        resolve_layer(self.model, layer)
        return HeatmapRequest(method, layer, None if target is None else self.class_names.index(target))

    def _explain_batch(self, batch: list[Slice], request: HeatmapRequest, batch_size: int) -> Iterator[Explanation]:
        if not batch:
            return
        resized = torch.as_tensor(np.stack([resize_grey(s.pixels, self.image_size) for s in batch]))
        cams = compute_heatmaps(self.model, resized.numpy(), request, self.preprocessing)
        # The reported prediction comes from the same pass, through the same temperature, guard and
        # TTA as predict's, so the two agree (to float rounding between the backends).
        predictions = self.answers(batch, self._assessment(resized, cams.logits, cams.features, batch_size))
        for k, (item, prediction) in enumerate(zip(batch, predictions, strict=True)):
            explained = self.class_names[request.target if request.target is not None else int(cams.logits[k].argmax())]
            heatmap = resize_heatmap(cams.heatmaps[k], item.pixels.shape)
            yield Explanation(prediction, heatmap, item.pixels, explained, request.method, request.layer)

    def explain(self, inputs: ImageInput | Iterable[ImageInput], **options: Any) -> list[Explanation]:
        """Explanations for every image in ``inputs`` (see ``explain_iter``), as a list."""
        return list(self.explain_iter(inputs, **options))


def _as_items(inputs: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    return [inputs] if isinstance(inputs, (str, Path, Image.Image, np.ndarray, Slice)) else list(inputs)


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
        amp: bf16/fp16 autocast for speed (torch backend); off by default so results match fp32.
        tta: average each prediction with that of the mirrored scan (see ``predict_pixels``).
        backend: 'auto' (default), 'torch' or 'onnx' (ONNX Runtime). 'auto' runs ONNX Runtime on a
            CPU (about twice as fast, the same predictions; ``benchmarks/run.py``) and PyTorch on a
            GPU. Grad-CAM always runs on the torch network, loaded when first asked for.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the model.
        ConfigError: an unknown backend, or the torch backend asked to run an ONNX file.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    network = load_network(path, backend or "auto", device, amp)
    if path.suffix.lower() == ".onnx":
        return Classifier(network, path, tta)

    def explain_model() -> nn.Module:
        return load_torch_network(path, device).model

    return Classifier(network, path, tta, explain_model)

