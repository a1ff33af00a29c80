"""Training configuration: dataclass defaults, then an optional YAML file, then overrides.

Validated once here, with the valid choices named in each error; the resolved config is saved
in the run folder as ``config.yaml`` so every run can be repeated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..data.sources import Source
from ..data.transforms import AUGMENT_POLICIES, STANDARDISATIONS, Preprocessing
from ..errors import ConfigError
from ..models.registry import INITS

LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults are the original recipe (224x224, ImageNet
    mean/std, CrossEntropy, Adam lr 1e-4, batch 32, 20 epochs, constant learning rate) plus
    augmentation, a leak-free validation split and an offline ImageNet warm start (``lite0``).

    ``ema_decay`` > 0 keeps an exponential moving average of the weights (and batch-norm
    statistics), updated after every optimizer step; validation and ``best.safetensors`` then use
    the average, which moves less from step to step than the raw weights. 0 turns it off.

    ``val_fraction`` 0 trains on every Training image with no validation (a final refit); the
    last epoch's weights are then the run's weights.

    ``standardise`` says how input intensities are scaled and ``smoothing`` how much every input is
    blurred first (``transforms.Preprocessing``; both stored with the weights), ``augment_policy``
    which augmentation (``transforms.AUGMENT_POLICIES``).
    ``probe_epochs`` > 0 starts with that many linear-probe epochs (features frozen, head trained
    at ``probe_lr``) before fine-tuning everything at ``lr``: a head trained first does not send
    large random gradients into the pretrained features, which keeps more of what transfers.
    ``save_every_epoch`` keeps each epoch's weights (``epoch_NN.safetensors``) so checkpoints can be
    compared on external data afterwards.

    ``sources`` are the training data roots (``data.sources.Source``: name, root, manifest,
    licence); ``data`` is the first one's root. One source is the original setting. With several,
    validation holds out a share of every source's classes, and the checkpoint kept is the one with
    the best mean of the sources' validation accuracies, so a small source counts as much as a big
    one. ``balance`` draws each epoch so that every class, and inside a class every source and
    every (sequence, plane) cell, gets an even share (``sources.balanced_weights``); off, an epoch
    is one pass over the training images in random order."""

    data: Path
    out: Path
    sources: tuple[Source, ...] = ()
    balance: bool = False
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    dropout: float = 0.2
    stochastic_depth: float = 0.2
    ema_decay: float = 0.0
    standardise: str = "imagenet"
    smoothing: float = 0.0
    augment_policy: str = "basic"
    probe_epochs: int = 0
    probe_lr: float = 1e-3
    save_every_epoch: bool = False
    image_size: int = 224
    init: str = "lite0"
    augment: bool = True
    val_fraction: float = 0.1
    near_threshold: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    workers: int = 2
    cache_dir: Path | None = None
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain values for YAML and checkpoint metadata."""
        values = dataclasses.asdict(self)
        values["sources"] = [source_to_dict(source) for source in self.sources]
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


SOURCE_KEYS: tuple[str, ...] = ("name", "root", "manifest", "licence")


def source_to_dict(source: Source) -> dict[str, str | None]:
    """A source as plain values (YAML, metadata)."""
    return {
        "name": source.name, "root": str(source.root),
        "manifest": None if source.manifest is None else str(source.manifest), "licence": source.licence,
    }


def _source(entry: Any, position: int) -> Source:
    """One ``sources:`` entry (a mapping, or a bare root) as a ``Source``."""
    entry = {"root": entry} if isinstance(entry, (str, Path)) else entry
    if not isinstance(entry, dict):
        raise ConfigError(f"sources[{position}] must be a mapping of {', '.join(SOURCE_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise ConfigError(f"sources[{position}]: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SOURCE_KEYS)}")
    if not entry.get("root"):
        raise ConfigError(f"sources[{position}] has no root: give it in the config or with --data")
    root = Path(entry["root"]).expanduser()
    manifest = entry.get("manifest")
    return Source(
        name=str(entry.get("name") or root.name), root=root, manifest=None if not manifest else Path(manifest),
        licence=str(entry.get("licence") or ""),
    )


def _resolve_sources(listed: Any, data: Any) -> tuple[Source, ...]:
    """The sources of a run: the config's ``sources`` list with its roots replaced, in order, by the
    ``data`` roots given on the command line; or, without a list, one source per ``data`` root."""
    roots = [] if data is None else list(data) if isinstance(data, (list, tuple)) else [data]
    if listed is None:
        if not roots:
            raise ConfigError("setting 'data' is required")
        return tuple(_source(root, i) for i, root in enumerate(roots))
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"sources must be a non-empty list of mappings of {', '.join(SOURCE_KEYS)}")
    entries = [dict(entry) if isinstance(entry, dict) else entry for entry in listed]
    if roots:
        if len(roots) != len(entries):
            raise ConfigError(
                f"the config lists {len(entries)} source(s) but {len(roots)} data root(s) were given; "
                "give --data once per source, in the config's order, or not at all"
            )
        entries = [{**(e if isinstance(e, dict) else {}), "root": r} for e, r in zip(entries, roots, strict=True)]
    return tuple(_source(entry, i) for i, entry in enumerate(entries))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainConfig) -> TrainConfig:
    """Return ``config`` unchanged if every value is in range, else raise ``ConfigError``."""
    _check(config.epochs >= 1, f"epochs must be at least 1, got {config.epochs}")
    _check(config.batch_size >= 2, f"batch_size must be at least 2 (batch norm), got {config.batch_size}")
    _check(config.lr > 0, f"lr must be positive, got {config.lr}")
    for key in ("dropout", "stochastic_depth"):
        _check(0.0 <= getattr(config, key) < 1.0, f"{key} must be in [0, 1), got {getattr(config, key)}")
    _check(0.0 <= config.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    _check(0.0 <= config.ema_decay < 1.0, f"ema_decay must be in [0, 1) (0: off), got {config.ema_decay}")
    _check(config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}")
    _check(
        config.lr_schedule in LR_SCHEDULES,
        f"lr_schedule {config.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}",
    )
    _check(
        config.standardise in STANDARDISATIONS,
        f"standardise {config.standardise!r} is not one of {', '.join(STANDARDISATIONS)}",
    )
    _check(
        config.augment_policy in AUGMENT_POLICIES,
        f"augment_policy {config.augment_policy!r} is not one of {', '.join(AUGMENT_POLICIES)}",
    )
    _check(
        0.0 <= config.smoothing <= 4.0,
        f"smoothing must be a Gaussian sigma in [0, 4] pixels (0: off), got {config.smoothing}",
    )
    _check(0 <= config.probe_epochs < config.epochs, f"probe_epochs must be in [0, epochs), got {config.probe_epochs}")
    _check(config.probe_lr > 0, f"probe_lr must be positive, got {config.probe_lr}")
    _check(config.device in DEVICES, f"device {config.device!r} is not one of {', '.join(DEVICES)}")
    _check(
        config.image_size >= 32 and config.image_size % 32 == 0,
        f"image_size must be a multiple of 32 >= 32, got {config.image_size}",
    )
    _check(
        0.0 <= config.val_fraction < 0.5,
        f"val_fraction must be in [0, 0.5), got {config.val_fraction} (0: no validation)",
    )
    _check(0 <= config.near_threshold <= 32, f"near_threshold must be in [0, 32] bits, got {config.near_threshold}")
    names = [source.name for source in config.sources]
    _check(len(set(names)) == len(names), f"source names must be unique, got {', '.join(names)}")
    _check(config.workers >= 1, f"workers must be at least 1, got {config.workers}")
    _check(
        config.init in INITS or Path(config.init).is_file(),
        f"init {config.init!r} is not one of {', '.join(INITS)} or an existing weights file",
    )
    return config


def _read_yaml(yaml_file: Path) -> dict[str, Any]:
    """The mapping of settings in ``yaml_file`` (an empty file: none)."""
    try:
        loaded = yaml.safe_load(Path(yaml_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{yaml_file}: cannot read config ({exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{yaml_file}: expected a mapping of settings")
    return loaded


def read_preprocessing(yaml_file: Path) -> Preprocessing:
    """The input preprocessing a config file sets, the rest of it unread (an audit needs neither a
    data root nor a run folder); settings it leaves out take the training defaults."""
    values = _read_yaml(yaml_file)
    _check_types({k: v for k, v in values.items() if k in ("image_size", "smoothing")})
    defaults = TrainConfig.__dataclass_fields__
    return Preprocessing(
        image_size=values.get("image_size", defaults["image_size"].default),
        standardise=str(values.get("standardise", defaults["standardise"].default)),
        smoothing=float(values.get("smoothing", defaults["smoothing"].default)),
    )


def _check_types(values: dict[str, Any]) -> None:
    """Integer settings are ints (not bools), numeric settings are numbers."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key in ("epochs", "batch_size", "image_size", "near_threshold", "seed", "workers", "probe_epochs"):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool)):
            raise ConfigError(f"{key} must be an integer, got {values[key]!r} ({types[key]})")
    for key in ("balance", "augment", "amp", "save_every_epoch"):
        if key in values and not isinstance(values[key], bool):
            raise ConfigError(f"{key} must be true or false, got {values[key]!r}")
    numbers = (
        "lr", "probe_lr", "smoothing", "weight_decay", "label_smoothing", "ema_decay", "dropout", "stochastic_depth",
        "val_fraction",
    )
    for key in numbers:
        if key in values and not isinstance(values[key], (int, float)):
            raise ConfigError(f"{key} must be a number, got {values[key]!r}")


def resolve_config(yaml_file: Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then ``yaml_file``, then the overrides that are not None; validated.

    Raises:
        ConfigError: unknown keys, unreadable YAML, or out-of-range values.
    """
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if yaml_file is not None:
        values.update(_read_yaml(yaml_file))
        if "sources" in values:  # a saved config.yaml repeats the first root as data: the list wins
            values.pop("data", None)
    values.update({k: v for k, v in overrides.items() if v is not None and not (k == "data" and v == [])})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    if "out" not in values:
        raise ConfigError("setting 'out' is required")
    values["sources"] = _resolve_sources(values.get("sources"), values.get("data"))
    values["data"] = values["sources"][0].root
    for key in ("out", "cache_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    _check_types(values)
    return validate(TrainConfig(**values))
