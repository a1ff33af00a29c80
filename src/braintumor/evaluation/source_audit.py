"""Source audit: with training data from several sources, how well trivial cues tell apart what the
network must not learn to tell apart by them.

Each source comes from its own scanners and pipeline (the extra source's healthy brains are IXI's
2 mm volumes, 90-120 px; its gliomas all come through one preprocessing of TCGA-LGG), so a cue
that knows nothing of anatomy may name the source, and where sources and classes overlap
unevenly, the class. Measured here, with the cues of ``shortcuts`` (grey level, sharpness,
framing, plane proxy, file format), by classifiers cross-validated with each subject's images
in one fold (``GroupKFold``; images without a subject are their own group):

- ``class``: the class from cues, on all sources together (the shortcut the network could take);
- ``source | class``: inside each class that several sources have, which source an image is from;
- ``sequence | class, source`` and ``plane | class, source``: inside each class of a source whose
  manifest gives two or more sequences (or planes), which one.

Balanced accuracy is reported against chance (1 / number of values): near chance, the cue group
carries no information; near 1, a network can read it too. By default the pixel cues are those of
the decoded image. Given a ``Preprocessing`` (a recipe's blur and standardisation), they are
those of what the network receives, drawn as a grey picture (``seen_by_network``): the evidence
that a preprocessing closes a shortcut rather than the hope. The file cues (PNG against JPEG)
reach the network only through JPEG artefacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..constants import CLASS_NAMES
from ..data.sources import Source, SourcedImage, load_sources
from ..data.transforms import Preprocessing
from .shortcuts import FIT_GROUPS, HEAD_THRESHOLD, CueTable, cue_table

AUDITED_GROUPS = ("grey", "sharpness", "framing", "plane", "file", "pixels (no file)")
FOLDS = 3
_HEAD_GREY = HEAD_THRESHOLD + 1  # the darkest head grey of a seen picture: still head to the cues
_SEEN_RANGE = {"head": (-3.0, 3.0), "head_rank": (-(3**0.5), 3**0.5)}  # network input drawn black to white
_CHUNK = 256


def seen_by_network(pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """(N, S, S) uint8 grey to the same, showing what the network receives after ``preprocessing``.

    The first channel of the network input is drawn with one fixed grey scale for all images (so
    the drawing itself normalises nothing): ImageNet's back to [0, 255]; a head standardisation's
    range onto [21, 255] for head pixels, with the background black, so the cues still find the head.
    Under ``head`` the network's background is each image's -mean/std and its head runs to +-8,
    so this drawing shows it a little less than the network gets; under ``head_rank`` the
    background is one constant for every image and the drawing loses nothing but rounding.
    """
    import torch

    out = np.empty_like(pixels)
    for start in range(0, len(pixels), _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(pixels[start:start + _CHUNK]))
        with torch.no_grad():
            channel = preprocessing(chunk)[:, 0]
        if preprocessing.standardise in _SEEN_RANGE:
            low, high = _SEEN_RANGE[preprocessing.standardise]
            grey = _HEAD_GREY + (255 - _HEAD_GREY) * ((channel - low) / (high - low)).clamp(0, 1)
            grey = torch.where(chunk > HEAD_THRESHOLD, grey, torch.zeros_like(grey))
        else:
            grey = 255 * (channel * preprocessing.std[0] + preprocessing.mean[0]).clamp(0, 1)
        out[start:start + _CHUNK] = grey.round().to(torch.uint8).numpy()
    return out


def _problems(images: list[SourcedImage]) -> dict[str, np.ndarray]:
    """Name -> target per image (-1: not part of this problem), for every question worth asking."""
    problems: dict[str, np.ndarray] = {"class": np.array([image.label for image in images])}
    sources = sorted({image.source for image in images})
    for label, class_name in enumerate(CLASS_NAMES):
        present = sorted({i.source for i in images if i.label == label})
        if len(present) > 1:
            problems[f"source | {class_name}"] = np.array(
                [present.index(i.source) if i.label == label else -1 for i in images]
            )
        for source in sources:
            for attribute in ("sequence", "plane"):
                values = sorted({getattr(i, attribute) for i in images if i.label == label and i.source == source})
                if len(values) > 1:
                    problems[f"{attribute} | {class_name}, {source}"] = np.array([
                        values.index(getattr(i, attribute)) if i.label == label and i.source == source else -1
                        for i in images
                    ])
    return problems


def _models() -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {"logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
            "forest": RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=0, n_jobs=1)}


def _cross_validated(matrix: np.ndarray, target: np.ndarray, groups: np.ndarray, model: Any) -> float | None:
    """Balanced accuracy of ``model`` under group k-fold; None when the groups are too few to fold."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    if len(np.unique(groups)) < FOLDS:
        return None
    predicted = cross_val_predict(model, matrix, target, groups=groups, cv=GroupKFold(n_splits=FOLDS))
    return float(balanced_accuracy_score(target, predicted))


def _subject_groups(images: list[SourcedImage]) -> np.ndarray:
    keys = [f"{i.source}/{i.subject}" if i.subject else f"image/{n}" for n, i in enumerate(images)]
    ids = {key: number for number, key in enumerate(dict.fromkeys(keys))}
    return np.array([ids[key] for key in keys])


def source_audit(
    sources: tuple[Source, ...], size: int = 224, progress: bool = True, preprocessing: Preprocessing | None = None
) -> dict[str, Any]:
    """The report (see the module doc): per problem, its values and counts, chance, and the balanced
    accuracy of each model on each cue group; with ``preprocessing``, the pixel cues are those of
    what a network with that preprocessing receives.

    Raises:
        DataError: a source cannot be read.
    """
    from sklearn.base import clone

    images = load_sources(sources)
    view = None if preprocessing is None else (lambda pixels: seen_by_network(pixels, preprocessing))
    table: CueTable = cue_table(images, size, progress, view)
    readable = set(table.paths)
    kept = [image for image in images if image.path in readable]
    groups = _subject_groups(kept)
    report: dict[str, Any] = {
        "sources": [s.name for s in sources], "n_images": len(kept), "folds": FOLDS,
        "seen_by": None if preprocessing is None else preprocessing.to_metadata(), "problems": {},
    }
    problems = _problems(kept)
    jobs = [(p, g, m) for p in problems for g in AUDITED_GROUPS for m in _models()
            if m == "logreg" or g == "pixels (no file)"]
    for problem, group, model_name in tqdm(jobs, desc="source audit", unit="fit", disable=not progress, leave=False):
        target = problems[problem]
        rows = np.flatnonzero(target >= 0)
        matrix = np.nan_to_num(np.stack([table.cues[c][rows] for c in FIT_GROUPS[group]], 1), posinf=0, neginf=0)
        entry = report["problems"].setdefault(problem, {
            "n": int(len(rows)), "values": int(len(np.unique(target[rows]))),
            "chance": 1.0 / len(np.unique(target[rows])), "balanced_accuracy": {},
        })
        score = _cross_validated(matrix, target[rows], groups[rows], clone(_models()[model_name]))
        entry["balanced_accuracy"].setdefault(group, {})[model_name] = score
    return report


def write_source_report(report: dict[str, Any], out: Path) -> list[Path]:
    """sources.json and source_shortcuts.png in ``out``; returns the paths."""
    from .plots import plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sources.json", out / "source_shortcuts.png"]
    paths[0].write_text(json.dumps(report, indent=2))
    problems = list(report["problems"])
    fig, axis = plt.subplots(figsize=(max(8, 2.2 * len(problems)), 5))
    width = 0.8 / len(AUDITED_GROUPS)
    for offset, group in enumerate(AUDITED_GROUPS):
        values = [report["problems"][p]["balanced_accuracy"][group]["logreg"] or 0.0 for p in problems]
        where = np.arange(len(problems)) + (offset - (len(AUDITED_GROUPS) - 1) / 2) * width
        axis.bar(where, values, width, label=group)
    for index, problem in enumerate(problems):
        chance = report["problems"][problem]["chance"]
        axis.hlines(chance, index - 0.45, index + 0.45, colors="black", linestyles="--")
    axis.set_xticks(range(len(problems)), problems, rotation=20, ha="right", fontsize=8)
    axis.set(ylim=(0, 1.05), ylabel="balanced accuracy (logistic regression)")
    axis.legend(fontsize=7, ncol=3)
    seen = report.get("seen_by")
    what = f"in what the network sees ({seen['standardise']}, blur {seen['smoothing']} px)" if seen else "in the files"
    axis.set_title(f"What trivial cues tell {what}, cross-validated by subject (dashed: chance)", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths


def source_summary_lines(report: dict[str, Any]) -> list[str]:
    """A terminal table: balanced accuracy per problem and cue group (logistic regression), with chance."""
    seen = report.get("seen_by")
    title = "source audit" + (f" (as seen: {seen['standardise']}, blur {seen['smoothing']})" if seen else "")
    header = f"{title[:43]:<44}" + "".join(f"{g[:10]:>11}" for g in AUDITED_GROUPS)
    lines = [header + f"{'chance':>9}"]
    for problem, entry in report["problems"].items():
        cells = []
        for group in AUDITED_GROUPS:
            score = entry["balanced_accuracy"][group]["logreg"]
            cells.append(f"{'-' if score is None else f'{score:.3f}':>11}")
        lines.append(f"  {problem[:42]:<42}" + "".join(cells) + f"{entry['chance']:>9.3f}")
    return lines
