"""What kind of slice an input is (sequence and plane), and whether the training data covers it.

A reader weighs an answer differently on a T2 slice than on a contrast-T1 one, and so must the tool:
every training tumour of the Kaggle set is contrast T1 (docs/generalisation), so a T2 glioma is
read as ``notumor`` and nothing else in the answer would say why.

- ``SliceKindEstimator``: two multinomial logistic regressions on the classifier's own pooled
  features (the 1280 values both backends already return), one for the sequence family
  (``SEQUENCES``) and one for the plane (``PLANES``). Fitted by ``scripts/fit_slice_kind.py`` on
  the extra source's manifest and slices labelled by eye (docs/slice_kind); its tensors travel in
  the weights file under ``slice_kind.*``, as the guard's do.
- ``SliceKind``: one slice's sequence and plane, each with its confidence and where it came from:
  the DICOM header when it names one (``header``, confidence None), else the image (``image``).
- ``Coverage``: how many training slices of each class the estimator puts in each (sequence,
  plane) cell; stored in the weights' metadata. ``coverage_reason`` turns a slice's kind and answer into
  the words of the ``outside_validated_range`` flag when the training data has (almost) no
  counterpart, e.g. "T2 slice: no tumour in the training data is T2; a T2 tumour may be read as
  notumor".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SEQUENCES: tuple[str, ...] = ("t1", "t1c", "t2", "flair", "other")
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
SEQUENCE_WORDS = {"t1": "plain T1", "t1c": "contrast T1", "t2": "T2", "flair": "FLAIR", "other": "non-standard"}
TENSOR_PREFIX = "slice_kind."
# A class is covered in a sequence (or plane) when the training data holds at least MIN_COVERED of
# its slices there and at least MIN_SHARE of that class's slices: a few slices the estimator puts
# in a cell by mistake (contrast T1 read as plain T1) do not make the cell covered.
MIN_COVERED = 30
MIN_SHARE = 0.05
NO_TUMOUR = "notumor"
# A DICOM header's sequence (data.series.sequence_of) to the estimator's families; DWI, SWI and the
# like are 'other'; 'unknown' leaves the sequence to the image.
HEADER_SEQUENCES = {"T1": "t1", "T1C": "t1c", "T2": "t2", "FLAIR": "flair"}


@dataclass(frozen=True)
class SliceKind:
    """A slice's sequence family and plane; a confidence is None where a header says it."""

    sequence: str
    sequence_confidence: float | None
    sequence_origin: str  # 'header' or 'image'
    plane: str
    plane_confidence: float | None
    plane_origin: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (every output writes this)."""
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {"sequence": self.sequence, "sequence_confidence": rounded(self.sequence_confidence),
                "sequence_origin": self.sequence_origin, "plane": self.plane,
                "plane_confidence": rounded(self.plane_confidence), "plane_origin": self.plane_origin}

    def label(self) -> str:
        """Short words for a table cell: 'T2 axial' (a '?' after a value the image alone suggests
        with confidence under 0.8)."""
        def unsure(confidence: float | None) -> str:
            return "?" if confidence is not None and confidence < 0.8 else ""

        return (f"{SEQUENCE_WORDS[self.sequence]}{unsure(self.sequence_confidence)} "
                f"{self.plane}{unsure(self.plane_confidence)}")

    def with_header(self, plane: str | None, sequence: str | None) -> SliceKind:
        """This estimate with what a DICOM header says put first (values the estimator does not
        know, such as 'oblique' or 'unknown', leave the image's estimate in place)."""
        named = sequence not in (None, "", "unknown")
        family = HEADER_SEQUENCES.get((sequence or "").upper(), "other" if named else None)
        kind = self
        if family is not None:
            kind = SliceKind(family, None, "header", kind.plane, kind.plane_confidence, kind.plane_origin)
        if plane in PLANES:
            kind = SliceKind(kind.sequence, kind.sequence_confidence, kind.sequence_origin, plane, None, "header")
        return kind


@dataclass
class _Head:
    """A multinomial logistic regression on standardised features."""

    weight: np.ndarray  # (k, d)
    bias: np.ndarray  # (k,)

    def probabilities(self, standardised: np.ndarray) -> np.ndarray:
        logits = standardised @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        odds = np.exp(logits)
        return odds / odds.sum(axis=1, keepdims=True)


@dataclass
class SliceKindEstimator:
    """Sequence and plane from the classifier's pooled features."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    sequence: _Head
    plane: _Head

    def probabilities(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, len(SEQUENCES)) and (N, len(PLANES)) probabilities of (N, d) features."""
        standardised = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return self.sequence.probabilities(standardised), self.plane.probabilities(standardised)

    def estimate(self, features: np.ndarray) -> list[SliceKind]:
        """One ``SliceKind`` (origin 'image') per feature row."""
        sequences, planes = self.probabilities(features)
        return [
            SliceKind(SEQUENCES[int(s.argmax())], float(s.max()), "image",
                      PLANES[int(p.argmax())], float(p.max()), "image")
            for s, p in zip(sequences, planes, strict=True)
        ]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        import torch

        values = {"mean": self.mean, "scale": self.scale, "sequence_weight": self.sequence.weight,
                  "sequence_bias": self.sequence.bias, "plane_weight": self.plane.weight, "plane_bias": self.plane.bias}
        return {TENSOR_PREFIX + k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in values.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> SliceKindEstimator | None:
        """The estimator stored in a weights file, or None when the file has none.

        Raises:
            ValueError: a tensor is missing, of the wrong shape, or not finite.
        """
        if not any(k.startswith(TENSOR_PREFIX) for k in tensors):
            return None
        get = {k[len(TENSOR_PREFIX):]: v.double().numpy() for k, v in tensors.items() if k.startswith(TENSOR_PREFIX)}
        shapes = {"mean": (-1,), "scale": (-1,), "sequence_weight": (len(SEQUENCES), -1),
                  "sequence_bias": (len(SEQUENCES),), "plane_weight": (len(PLANES), -1), "plane_bias": (len(PLANES),)}
        width = get.get("mean", np.zeros(0)).shape[-1:]
        for name, shape in shapes.items():
            expected = tuple(width[0] if n == -1 and width else n for n in shape)
            if name not in get or get[name].shape != expected or not np.isfinite(get[name]).all():
                found = get[name].shape if name in get else "missing"
                raise ValueError(f"slice_kind tensor {name} must be finite with shape {expected}, got {found}")
        if (get["scale"] <= 0).any():
            raise ValueError("slice_kind tensor scale must be positive")
        return cls(get["mean"], get["scale"], _Head(get["sequence_weight"], get["sequence_bias"]),
                   _Head(get["plane_weight"], get["plane_bias"]))


def fit_estimator(features: np.ndarray, sequences: Sequence[str], planes: Sequence[str],
                  regularisation: float = 0.05) -> SliceKindEstimator:
    """Fit both heads (classes weighted to balance, so 600 FLAIR slices weigh as much as 60 T2).

    A family or plane absent from the labels gets a bias of -30: never predicted, still a column,
    so every estimator has the same tensor shapes.
    """
    from sklearn.linear_model import LogisticRegression

    features = np.asarray(features, dtype=np.float64)
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    standardised = (features - mean) / scale

    def head(labels: Sequence[str], names: tuple[str, ...]) -> _Head:
        targets = np.array([names.index(label) for label in labels])
        present = np.unique(targets)
        model = LogisticRegression(C=regularisation, class_weight="balanced", max_iter=3000)
        model.fit(standardised, targets)
        weight, bias = np.zeros((len(names), features.shape[1])), np.full(len(names), -30.0)
        coef, intercept = model.coef_, model.intercept_
        if len(present) == 2:  # scikit-learn keeps one row for two classes: split it into two softmax rows
            coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        weight[present], bias[present] = coef, intercept
        return _Head(weight, bias)

    return SliceKindEstimator(mean, scale, head(sequences, SEQUENCES), head(planes, PLANES))


def split_slice_kind(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], SliceKindEstimator | None]:
    """Separate a weights file's tensors into the rest and its estimator (if any)."""
    rest = {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)}
    return rest, SliceKindEstimator.from_tensors(tensors)


@dataclass(frozen=True)
class Coverage:
    """Training slices per (class, sequence family, plane) cell, as the estimator reads them."""

    cells: Mapping[str, Mapping[str, Mapping[str, int]]]  # class -> sequence -> plane -> slices
    minimum: int = MIN_COVERED
    minimum_share: float = MIN_SHARE

    @classmethod
    def count(cls, kinds: Sequence[SliceKind], labels: Sequence[str], class_names: Sequence[str]) -> Coverage:
        cells = {name: {s: dict.fromkeys(PLANES, 0) for s in SEQUENCES} for name in class_names}
        for kind, label in zip(kinds, labels, strict=True):
            cells[label][kind.sequence][kind.plane] += 1
        return cls(cells)

    def to_metadata(self) -> dict[str, Any]:
        cells = {c: {s: dict(p) for s, p in v.items()} for c, v in self.cells.items()}
        return {"cells": cells, "minimum": self.minimum, "minimum_share": self.minimum_share}

    @classmethod
    def from_metadata(cls, value: Any) -> Coverage | None:
        """The coverage stored in a weights file's metadata (None: the file has none).

        Raises:
            ValueError: it is not a table of counts per class, sequence and plane.
        """
        if value is None:
            return None
        try:
            cells = {str(c): {s: {p: int(v.get(s, {}).get(p, 0)) for p in PLANES} for s in SEQUENCES}
                     for c, v in value["cells"].items()}
            coverage = cls(cells, int(value.get("minimum", MIN_COVERED)), float(value.get("minimum_share", MIN_SHARE)))
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as exc:
            raise ValueError(f"coverage must be counts per class, sequence and plane ({exc!r})") from None
        counts = [n for planes in (p for c in cells.values() for p in c.values()) for n in planes.values()]
        if min(counts, default=0) < 0 or coverage.minimum < 0 or not 0.0 <= coverage.minimum_share <= 1.0:
            raise ValueError("coverage counts and minimum must be >= 0 and minimum_share in [0, 1]")
        return coverage

    def of(self, axis: str, name: str, value: str) -> int:
        """Training slices of class ``name`` in a sequence (``axis`` 'sequence') or a plane."""
        per_sequence = self.cells.get(name, {})
        if axis == "sequence":
            return sum(per_sequence.get(value, {}).values())
        return sum(planes.get(value, 0) for planes in per_sequence.values())

    def tumours(self, axis: str, value: str) -> int:
        """Training tumour slices (every class but notumor) in a sequence or plane."""
        return sum(self.of(axis, name, value) for name in self.cells if name != NO_TUMOUR)

    def total(self, name: str | None = None) -> int:
        """Training slices of class ``name`` (None: of every tumour class)."""
        names = [name] if name is not None else [c for c in self.cells if c != NO_TUMOUR]
        return sum(self.of("sequence", c, s) for c in names for s in SEQUENCES)

    def covers(self, count: int, total: int) -> bool:
        return count >= self.minimum and count >= self.minimum_share * total

    def lines(self) -> list[str]:
        """A terminal table: slices per class and sequence, then per class and plane."""
        out = [f"{'training coverage':<18}" + "".join(f"{SEQUENCE_WORDS[s]:>14}" for s in SEQUENCES)]
        out += [f"  {c:<16}" + "".join(f"{self.of('sequence', c, s):>14}" for s in SEQUENCES) for c in self.cells]
        out.append(f"{'':<18}" + "".join(f"{p:>14}" for p in PLANES))
        out += [f"  {c:<16}" + "".join(f"{self.of('plane', c, p):>14}" for p in PLANES) for c in self.cells]
        return out


COVERAGE_WORDS = "in the training data"  # in every coverage reason, and in no other reason for the flag


def coverage_reason(kind: SliceKind, answer: str, coverage: Coverage) -> str | None:
    """Why an answer on this kind of slice is outside what the training data covers (None: covered).

    A ``notumor`` answer is not covered where the training data has (almost) no tumour of this
    sequence or plane: a tumour there may be missed. A tumour answer is not covered where the
    training data has (almost) no slice of that class in it.
    """
    reasons = []
    for axis, value in (("sequence", kind.sequence), ("plane", kind.plane)):
        words = SEQUENCE_WORDS[value] if axis == "sequence" else value
        what = "tumour" if answer == NO_TUMOUR else answer
        count = coverage.tumours(axis, value) if answer == NO_TUMOUR else coverage.of(axis, answer, value)
        total = coverage.total(None if answer == NO_TUMOUR else answer)
        if coverage.covers(count, total):
            continue
        amount = (f"no {what} {COVERAGE_WORDS} is" if count == 0
                  else f"only {count} of {total} {what} slices {COVERAGE_WORDS} are")
        risk = (f"a {words} tumour may be read as notumor" if answer == NO_TUMOUR
                else f"a {answer} answer on a {words} slice is not validated")
        reasons.append(f"{words} slice: {amount} {words}; {risk}")
    return "; ".join(reasons) or None
