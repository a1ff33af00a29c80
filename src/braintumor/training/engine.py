"""The loops: one training epoch over in-memory pixels, evaluation, and batched inference. No file I/O.

Both take decoded uint8 pixels already in memory (see ``cache``), so the loops do no decoding,
and both keep the model in channels_last with bf16/fp16 autocast when the hardware has it:
that doubles CPU training speed on CPUs with AVX-512 BF16 and is the standard fast path on CUDA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from ..data.transforms import AugmentConfig, Preprocessing, augment
from ..models.network import predict_logits_and_features
from ..models.runtime import Runtime


@dataclass
class TrainingStep:
    """What one optimisation step needs, fixed for a whole run (``training.fit`` builds it).

    ``model`` is what runs forward and backward (a DistributedDataParallel wrapper under
    torchrun). Distributed (``world_size`` > 1): every process draws the same order and the same
    augmentation for the whole global batch of ``batch_size`` images, then trains on its own slice
    of ``batch_size // world_size``; with the gradients averaged across processes, a step sees the
    same images as a single process with the same global batch. ``ema``, when given, is updated
    from ``model`` after every optimizer step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: Runtime
    generator: torch.Generator
    batch_size: int
    augmentation: AugmentConfig | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    scaler: torch.amp.GradScaler | None = None
    label_smoothing: float = 0.0
    ema: AveragedModel | None = None
    rank: int = 0
    world_size: int = 1


def train_one_epoch(
    step: TrainingStep,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    description: str = "train",
    progress: bool = True,
    frozen_features: bool = False,
    order: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over ``pixels`` (N, H, W) uint8 in a seeded random order; the last partial batch is
    dropped so batch norm never sees a batch of one. The figures returned are this process's share
    (``training.fit`` sums them over processes).

    ``frozen_features``: a linear-probe epoch. The feature extractor stays in eval mode (its
    batch-norm statistics do not move) and only parameters that require gradients change; the
    caller turns ``requires_grad`` off for the features.

    ``order``: the indices to visit (balanced sampling draws them, with repeats); None visits every
    image once in an order drawn from the step's generator.

    Returns:
        Mean loss, accuracy, images seen, wall seconds and images per second.
    """
    model, runtime = step.model, step.runtime
    model.train()
    if frozen_features:
        _network(model).features.eval()
    if order is None:
        order = torch.randperm(len(pixels), generator=step.generator)
    n_batches = len(order) // step.batch_size
    local = step.batch_size // step.world_size
    mine = slice(step.rank * local, (step.rank + 1) * local)
    # Running sums stay on the device: reading them every step would stall a GPU.
    total_loss = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    seen = 0
    started = time.perf_counter()
    bar = tqdm(range(n_batches), desc=description, unit="batch", disable=not progress, leave=False)
    for number in bar:
        index = order[number * step.batch_size : (number + 1) * step.batch_size]
        batch = pixels[index.to(pixels.device)].to(runtime.device, non_blocking=True)
        batch_labels = labels[index.to(labels.device)].to(runtime.device, non_blocking=True)
        floats = augment(batch, step.augmentation, step.generator, batch_labels) if step.augmentation else batch
        logits, loss = _optimise(step, runtime.to_input(step.preprocessing(floats[mine])), batch_labels[mine])
        total_loss += loss.detach() * len(logits)
        correct += (logits.argmax(1) == batch_labels[mine]).sum()
        seen += len(logits)
        if progress and (number % 10 == 9 or number == n_batches - 1):
            bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}", acc=f"{int(correct) / seen:.4f}")
    seconds = time.perf_counter() - started
    return {
        "loss": float(total_loss) / max(seen, 1),
        "accuracy": int(correct) / max(seen, 1),
        "images": seen,
        "seconds": seconds,
        "images_per_second": seen / seconds if seconds > 0 else 0.0,
    }


def _optimise(step: TrainingStep, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, backward and optimizer step; returns (logits, loss)."""
    with step.runtime.autocast():
        logits = step.model(inputs)
        loss = training_loss(logits, targets, step.label_smoothing)
    step.optimizer.zero_grad(set_to_none=True)
    if step.scaler is not None:
        step.scaler.scale(loss).backward()
        step.scaler.step(step.optimizer)
        step.scaler.update()
    else:
        loss.backward()
        step.optimizer.step()
    step.scheduler.step()
    if step.ema is not None:
        step.ema.update_parameters(step.model)
    return logits, loss


def training_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against targets smoothed by ``label_smoothing``: the true class gets
    ``1 - label_smoothing`` of the mass plus its share of ``label_smoothing`` spread evenly over
    all classes. Computed in fp32 even under bf16 autocast, where a loss rounded to 8 bits of
    mantissa would make steps depend on the CPU's arithmetic more than they need to."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def evaluate(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    runtime: Runtime,
    preprocessing: Preprocessing,
    class_names: list[str],
    batch_size: int = 64,
    groups: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Loss, accuracy and weighted F1 of ``model`` on (N, H, W) uint8 ``pixels`` (eval mode);
    with ``groups`` (name -> boolean mask over the N images), also the accuracy of each group
    under ``by_group``, from the same forward pass."""
    from ..evaluation.metrics import classification_report

    logits = predict_logits_and_features(model, pixels, runtime, batch_size, preprocessing=preprocessing)[0]
    report = classification_report(labels.numpy(), torch.softmax(logits, 1).numpy(), class_names, bootstrap=0)
    result: dict[str, Any] = {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": report.accuracy,
        "weighted_f1": report.weighted_f1,
    }
    if groups is not None:
        right = logits.argmax(1) == labels
        result["by_group"] = {name: float(right[mask].float().mean()) for name, mask in groups.items() if mask.any()}
    return result


def _network(model: nn.Module) -> nn.Module:
    """The EfficientNet inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
