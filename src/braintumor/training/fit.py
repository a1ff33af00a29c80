"""``fit(config)``: train EfficientNet-B0 on a data root and fill a run folder.

The run folder holds:
- ``config.yaml``: the resolved configuration;
- ``split.json``: which Training files went to validation (near-duplicate groups kept together);
- ``metrics.jsonl``: one line per epoch; ``learning_curves.png``;
- ``best.safetensors``: the weights with the best validation accuracy, with their metadata (with
  ``ema_decay`` set, the moving average of the weights: it is what gets validated and kept);
- ``last.pt``: model, moving average, optimizer, scheduler and random state after the last finished epoch, for
  ``--resume``. Resuming replays nothing: the next epoch starts from exactly that state.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same function trains with DistributedDataParallel:
each process takes its slice of every global batch (see ``engine.train_one_epoch``), gradients
and epoch metrics are reduced across processes, and only rank 0 validates and writes the run
folder. NCCL on CUDA (one GPU per process, SyncBatchNorm), gloo on the CPU (with
``distributed.GlobalBatchNorm2d``, as PyTorch's SyncBatchNorm needs a GPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import __version__
from ..constants import CLASS_NAMES
from ..data.cache import load_cached
from ..data.datasets import fingerprint, resolve_split_dir
from ..data.sources import (
    SourcedImage,
    balanced_weights,
    counts_by_source,
    draw_epoch,
    held_out_groups,
    load_sources,
    split_by_source,
)
from ..data.transforms import AUGMENT_POLICIES, Preprocessing
from ..errors import ConfigError
from ..evaluation.plots import plot_learning_curves
from ..models.checkpoint import load_training_state, save_training_state, save_weights
from ..models.registry import create_model
from ..models.runtime import Runtime, select_runtime
from ..models.spec import ModelSpec
from .config import TrainConfig
from .distributed import convert_batch_norm, init_distributed
from .engine import TrainingStep, evaluate, train_one_epoch

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Decoded Training pixels of every source in memory, with the leak-free split."""

    pixels: torch.Tensor  # (N, S, S) uint8, readable images only
    labels: torch.Tensor  # (N,) int64
    images: list[SourcedImage]  # path, source, subject, sequence and plane of each pixel row
    train_index: np.ndarray
    val_index: np.ndarray
    skipped: list[str]
    fingerprint: str

    @property
    def paths(self) -> list[Path]:
        return [image.path for image in self.images]


def prepare_data(config: TrainConfig, progress: bool = True) -> TrainingData:
    """Scan every source, decode (through the cache), drop unreadable files, and split each source
    with its subjects and near-duplicate clusters whole (``sources.split_by_source``)."""
    images = load_sources(config.sources)
    decoded = load_cached([s.path for s in images], config.image_size, config.cache_dir, config.workers, progress)
    for line in decoded.errors:
        logger.warning("skipped %s", line)
    keep = np.flatnonzero(decoded.ok)
    kept = [images[i] for i in keep]
    if len(kept) < 4:
        raise ConfigError(f"{config.data}: only {len(kept)} readable images; need at least 4 to train")
    pixels = np.ascontiguousarray(decoded.pixels[keep])
    labels = np.array([s.label for s in kept])
    if config.val_fraction > 0:
        train_index, val_index = split_by_source(kept, pixels, config.val_fraction, config.seed, config.near_threshold)
    else:
        train_index, val_index = np.arange(len(labels)), np.zeros(0, dtype=int)
    return TrainingData(
        pixels=torch.from_numpy(pixels),
        labels=torch.from_numpy(labels),
        images=kept,
        train_index=train_index,
        val_index=val_index,
        skipped=decoded.errors,
        fingerprint=_fingerprint(config, kept),
    )


def _fingerprint(config: TrainConfig, kept: list[SourcedImage]) -> str:
    """One source: the file list's hash, as before sources existed (older runs still resume);
    several: a hash of each source's name and file-list hash."""
    per_source = []
    for source in config.sources:
        mine = [image for image in kept if image.source == source.name]
        per_source.append((source.name, fingerprint(mine, resolve_split_dir(source.root, "Training"))))
    if len(per_source) == 1:
        return per_source[0][1]
    return hashlib.sha256(json.dumps(per_source).encode()).hexdigest()[:16]


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Constant learning rate (the original recipe) or per-step cosine decay to zero; the
    linear-probe epochs, if any, come first at ``probe_lr`` and the schedule starts after them."""
    probe = config.probe_epochs * steps_per_epoch
    total = max(1, (config.epochs - config.probe_epochs) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < probe:
            return config.probe_lr / config.lr
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step - probe, total) / total))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def validate_epoch(
    model: torch.nn.Module, data: TrainingData, runtime: Runtime, batch_size: int, preprocessing: Preprocessing
) -> dict[str, Any]:
    """Validation loss, accuracy and weighted F1 on the held-out groups (None without validation),
    the accuracy of each source and of each (source, sequence) among them (``by_group``: 'extra',
    'extra/flair', ...), and ``score``: the mean of the sources' accuracies, which picks the
    checkpoint (the plain accuracy where there is one source)."""
    if len(data.val_index) == 0:
        return {"loss": None, "accuracy": None, "weighted_f1": None, "score": None}
    held_out = [data.images[i] for i in data.val_index]
    groups = {name: torch.from_numpy(mask) for name, mask in held_out_groups(held_out).items()}
    index = torch.from_numpy(data.val_index)
    val = evaluate(
        model, data.pixels[index], data.labels[index], runtime, preprocessing, list(CLASS_NAMES), max(batch_size, 64),
        groups=groups,
    )
    sources = sorted({image.source for image in held_out})
    val["score"] = float(np.mean([val["by_group"][name] for name in sources]))
    return val


def weights_metadata(config: TrainConfig, data: TrainingData, epoch: int, val: dict[str, Any]) -> dict[str, Any]:
    """What travels inside best.safetensors so the weights explain themselves: the model's spec
    (``ModelSpec``, the same object every inference path reads back) plus the record of the run:
    the recipe, the sources (licence, images per class on each side of the split) and validation."""
    excluded = ("data", "out", "cache_dir", "resume", "workers", "sources")
    recipe = {k: v for k, v in config.to_dict().items() if k not in excluded}
    spec = ModelSpec(class_names=tuple(CLASS_NAMES), preprocessing=preprocessing_of(config))
    return {
        **spec.to_metadata(),
        "preprocessing": "greyscale, bilinear resize to image_size x image_size, grey repeated to 3 channels, "
        + (f"Gaussian blur sigma {config.smoothing} px, " if config.smoothing else "")
        + ("head pixels z-scored per image" if config.standardise == "head" else "ImageNet mean/std"),
        "init": config.init,
        "recipe": recipe,
        "epoch": epoch,
        "training_data": {
            "fingerprint": data.fingerprint,
            "n_train": int(len(data.train_index)),
            "n_val": int(len(data.val_index)),
            "n_skipped": len(data.skipped),
            "sources": sources_record(config, data),
            "split": "each source split on its own, stratified by class, its subjects (from a manifest) or else its "
            "near-duplicate clusters kept whole; a near-duplicate pair across sources never straddles",
            "sampling": "balanced by class, then source, then (sequence, plane)" if config.balance else "uniform",
        },
        "validation": val,
        "versions": {"braintumor": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def sources_record(config: TrainConfig, data: TrainingData) -> list[dict[str, Any]]:
    """Per source: name, licence, manifest file name, and images per class in training and validation
    (no paths of the machine that trained)."""
    train = counts_by_source(data.images, data.train_index)
    val = counts_by_source(data.images, data.val_index)
    return [
        {
            "name": source.name, "licence": source.licence,
            "manifest": None if source.manifest is None else source.manifest.name,
            "train": train.get(source.name, {}), "val": val.get(source.name, {}),
        }
        for source in config.sources
    ]


def preprocessing_of(config: TrainConfig) -> Preprocessing:
    """The input preprocessing a run trains with, and that its weights carry."""
    return Preprocessing(image_size=config.image_size, standardise=config.standardise, smoothing=config.smoothing)


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, out / "metrics.jsonl")
    plot_learning_curves(history, out / "learning_curves.png")


def _start_run_folder(config: TrainConfig, data: TrainingData) -> None:
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    val_subjects: dict[str, list[str]] = {}
    for i in data.val_index:
        image = data.images[i]
        if image.subject:
            val_subjects.setdefault(image.source, []).append(image.subject)
    split = {
        "val_paths": [str(data.paths[i]) for i in data.val_index],
        "val_subjects": {name: sorted(set(subjects)) for name, subjects in val_subjects.items()},
        "n_train": int(len(data.train_index)),
        "sources": sources_record(config, data),
        "skipped": data.skipped,
        "fingerprint": data.fingerprint,
    }
    (config.out / "split.json").write_text(json.dumps(split, indent=1))


def fit(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train as ``config`` says, writing the run folder; returns the best epoch's summary (on the
    processes other than rank 0 of a distributed run, ``best`` is None: rank 0 keeps the record).

    Raises:
        ConfigError: the run folder already holds a run and ``resume`` is off, or nothing to resume.
        DataError: the data root cannot be read.
    """
    state = _previous_state(config)
    group = init_distributed(config)
    progress = progress and group.main
    torch.manual_seed(config.seed)
    if not group.main:
        group.barrier()  # rank 0 fills the decoded-image cache first; the others then read it
    data = prepare_data(config, progress)
    if group.main:
        group.barrier()
    runtime = select_runtime(config.device, config.amp)
    if group.main:
        logger.info(
            "training on %d images, validating on %d (%s), skipped %d unreadable; "
            "device %s, autocast %s, %d process(es)",
            len(data.train_index), len(data.val_index), class_counts_line(data), len(data.skipped),
            runtime.device, runtime.amp_dtype, group.world_size,
        )
    model, step = build_training_step(config, runtime, group, len(data.train_index))
    validated = model if step.ema is None else step.ema.module  # what is validated and saved as best
    record = RunRecord(config, data)
    if state is None:
        if group.main:
            _start_run_folder(config, data)
    else:
        record.restore(state, model, step)
    train_pixels = data.pixels[torch.from_numpy(data.train_index)]
    train_labels = data.labels[torch.from_numpy(data.train_index)]
    weights = balanced_weights([data.images[i] for i in data.train_index]) if config.balance else None
    if runtime.device.type == "cuda":  # the whole decoded set fits on a GPU: no host copies per step
        train_pixels, train_labels = train_pixels.to(runtime.device), train_labels.to(runtime.device)
    for epoch in range(len(record.history) + 1, config.epochs + 1):
        if group.enabled:  # own dropout masks per process, reproducible per epoch (and on resume)
            torch.manual_seed(config.seed + 1_000_003 * epoch + group.rank)
        probing = epoch <= config.probe_epochs  # linear probe: only the head learns
        model.features.requires_grad_(not probing)
        description = f"epoch {epoch}/{config.epochs}" + (" (probe)" if probing else "")
        order = None if weights is None else draw_epoch(weights, step.generator)
        train = train_one_epoch(
            step, train_pixels, train_labels, description, progress, frozen_features=probing, order=order
        )
        train = _summed(train, group)
        if not group.main:
            continue  # rank 0 validates and writes; the others go on to the next epoch
        val = validate_epoch(validated, data, runtime, config.batch_size, step.preprocessing)
        raw = validate_epoch(model, data, runtime, config.batch_size, step.preprocessing) if step.ema else None
        record.epoch_done(epoch, train, val, raw, step, model, validated)
    group.barrier()
    if not group.main:
        return {"best": None, "history": [], "run_dir": str(config.out)}
    return {"best": record.best, "history": record.history, "run_dir": str(config.out)}


def _previous_state(config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: a new run); refuses to overwrite a run by accident."""
    last_path = config.out / "last.pt"
    if last_path.exists() and not config.resume:
        raise ConfigError(
            f"{config.out} already holds a training run; pass --resume to continue it or choose another --out"
        )
    return load_training_state(last_path) if config.resume else None


def build_training_step(
    config: TrainConfig, runtime: Runtime, group: Any, n_train: int
) -> tuple[torch.nn.Module, TrainingStep]:
    """The model (unwrapped) and everything a step needs: the network that runs (DDP under
    torchrun, with batch norm over the global batch), optimizer, schedule, scaler, generator,
    moving average, augmentation and preprocessing."""
    if group.enabled and config.probe_epochs:
        raise ConfigError(
            "probe_epochs is not supported under torchrun (frozen parameters would stall DDP's gradient hooks)"
        )
    model = create_model(
        "none" if config.resume else config.init, dropout=config.dropout, stochastic_depth=config.stochastic_depth
    ).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    network: torch.nn.Module = model
    if group.enabled:  # batch norm over the global batch, so N processes train what one would
        cuda = runtime.device.type == "cuda"
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if cuda else convert_batch_norm(model)
        network = torch.nn.parallel.DistributedDataParallel(model, device_ids=[group.local_rank] if cuda else None)
    # The fused CUDA kernel updates all tensors in one launch; the CPU keeps the default for-each path.
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=runtime.device.type == "cuda" or None
    )
    # The average copies the module; its batch-norm statistics are averaged like the weights.
    ema = None
    if config.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    step = TrainingStep(
        model=network, optimizer=optimizer, scheduler=make_scheduler(optimizer, config, n_train // config.batch_size),
        runtime=runtime, generator=torch.Generator().manual_seed(config.seed), batch_size=config.batch_size,
        augmentation=AUGMENT_POLICIES[config.augment_policy] if config.augment else None,
        preprocessing=preprocessing_of(config),
        scaler=torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None,
        label_smoothing=config.label_smoothing, ema=ema, rank=group.rank, world_size=group.world_size,
    )
    return model, step


def _summed(train: dict[str, float], group: Any) -> dict[str, float]:
    """One process's epoch figures, summed over the processes of a distributed run."""
    if not group.enabled:
        return train
    loss_sum, correct, images, seconds = group.sum(
        [train["loss"] * train["images"], train["accuracy"] * train["images"], train["images"], train["seconds"]]
    )
    seconds /= group.world_size
    return {
        "loss": loss_sum / images, "accuracy": correct / images, "images": images,
        "seconds": seconds, "images_per_second": images / seconds,
    }


class RunRecord:
    """The run folder's memory: the history of epochs, the best one, and what is written after
    each epoch (best and per-epoch weights, ``last.pt``, ``metrics.jsonl``, the curves)."""

    def __init__(self, config: TrainConfig, data: TrainingData):
        self.config, self.data = config, data
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"val_score": -1.0, "val_accuracy": -1.0, "val_loss": math.inf}

    def restore(self, state: dict[str, Any], model: torch.nn.Module, step: TrainingStep) -> None:
        """Put ``model`` and ``step`` back where ``last.pt`` left them."""
        config = self.config
        if state["fingerprint"] != self.data.fingerprint:
            raise ConfigError(f"{config.data}: Training data differs from the data this run started on; cannot resume")
        model.load_state_dict(state["model"])
        if step.ema is not None:
            if state.get("ema") is None:
                raise ConfigError(
                    f"{config.out} was started without ema_decay; resume it with the settings it started with"
                )
            step.ema.load_state_dict(state["ema"])
        step.optimizer.load_state_dict(state["optimizer"])
        step.scheduler.load_state_dict(state["scheduler"])
        step.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history, self.best = state["history"], state["best"]
        logger.info("resuming %s after epoch %d", config.out, len(self.history))

    def epoch_done(
        self, epoch: int, train: dict[str, float], val: dict[str, Any], raw: dict[str, Any] | None,
        step: TrainingStep, model: torch.nn.Module, validated: torch.nn.Module,
    ) -> None:
        """Log the epoch, keep its weights as the rules say, and checkpoint."""
        config = self.config
        row = {
            "epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_weighted_f1": val["weighted_f1"],
            "lr": step.scheduler.get_last_lr()[0], "seconds": train["seconds"],
            "images_per_second": train["images_per_second"],
        }
        if len(config.sources) > 1 and val["accuracy"] is not None:
            row.update(val_score=val["score"], val_by_group=val["by_group"])
        if raw is not None:  # the raw weights too, so the log shows what averaging bought
            row.update(raw_val_loss=raw["loss"], raw_val_accuracy=raw["accuracy"])
        self.history.append(row)
        # Without validation every epoch "improves", so the run keeps its last weights.
        best_score = self.best.get("val_score", self.best["val_accuracy"])  # runs begun before scores: accuracy
        improved = val["accuracy"] is None or (val["score"], -val["loss"]) > (best_score, -self.best["val_loss"])
        metadata = weights_metadata(config, self.data, epoch, val)
        if improved:
            self.best = {
                "epoch": epoch, "val_score": val["score"], "val_accuracy": val["accuracy"], "val_loss": val["loss"],
                "val_weighted_f1": val["weighted_f1"],
            }
            save_weights(validated.state_dict(), config.out / "best.safetensors", metadata)
        if config.save_every_epoch:
            save_weights(validated.state_dict(), config.out / f"epoch_{epoch:02d}.safetensors", metadata)
        save_training_state(config.out / "last.pt", {
            "model": model.state_dict(), "ema": None if step.ema is None else step.ema.state_dict(),
            "optimizer": step.optimizer.state_dict(), "scheduler": step.scheduler.state_dict(),
            "generator": step.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "history": self.history, "best": self.best, "fingerprint": self.data.fingerprint,
        })
        _write_history(config.out, self.history)
        validation = "no validation" if val["accuracy"] is None else (
            f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} wF1 {val['weighted_f1']:.4f}"
        )
        logger.info(
            "epoch %d/%d  train loss %.4f acc %.4f  %s  %.0f img/s%s", epoch, config.epochs, train["loss"],
            train["accuracy"], validation, train["images_per_second"], "  (best)" if improved else "",
        )


def class_counts_line(data: TrainingData) -> str:
    """'glioma 1189/132, ...': training/validation images per class, for the log."""
    labels = data.labels.numpy()
    n_classes = len(CLASS_NAMES)
    train = np.bincount(labels[data.train_index], minlength=n_classes)
    val = np.bincount(labels[data.val_index], minlength=n_classes)
    return ", ".join(f"{name} {train[i]}/{val[i]}" for i, name in enumerate(CLASS_NAMES))
