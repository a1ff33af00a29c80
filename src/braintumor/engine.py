"""The two loops: one training epoch over in-memory pixels, and batched inference. No file I/O.

Both take decoded uint8 pixels already in memory (see ``cache``), so the loops do no decoding,
and both keep the model in channels_last with bf16/fp16 autocast when the hardware has it:
that doubles CPU training speed on CPUs with AVX-512 BF16 and is the standard fast path on CUDA.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from .transforms import AugmentConfig, Preprocessing, augment


@dataclass(frozen=True)
class Runtime:
    """Where and how the network runs: device, autocast dtype (None = fp32), memory layout."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool = True

    def autocast(self) -> AbstractContextManager:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX).

    oneDNN also "supports" bf16 on any AVX-512 CPU by converting to fp32 and back, which makes a
    training step about 1.8x slower than fp32 on a Xeon without AVX-512 BF16 (3.61 s against
    1.96 s for a batch of 32, ``python benchmarks/train_step.py``), so the CPU's own flags decide
    where Linux lists them."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if flags:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def select_runtime(device: str = "auto", amp: bool = True) -> Runtime:
    """CUDA with fp16/bf16 autocast when available, else the CPU with bf16 autocast if supported."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if not amp:
        return Runtime(dev, None)
    if dev.type == "cuda":
        return Runtime(dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Runtime(dev, torch.bfloat16 if cpu_supports_bf16() else None)


def train_one_epoch(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    runtime: Runtime,
    batch_size: int,
    generator: torch.Generator,
    augmentation: AugmentConfig | None,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    description: str = "train",
    label_smoothing: float = 0.0,
    rank: int = 0,
    world_size: int = 1,
    ema: AveragedModel | None = None,
    preprocessing: Preprocessing = Preprocessing(),
    frozen_features: bool = False,
) -> dict[str, float]:
    """One pass over ``pixels`` (N, H, W) uint8 in a seeded random order; the last partial batch is
    dropped so batch norm never sees a batch of one.

    Distributed (``world_size`` > 1): every process draws the same order and the same augmentation
    for the whole global batch of ``batch_size`` images, then trains on its own slice of
    ``batch_size // world_size``; with DistributedDataParallel averaging the gradients, a step sees
    the same images as a single process with the same global batch. The returned figures are this
    process's share (``training.fit`` sums them over processes).

    ``ema``, when given, is updated from ``model`` after every optimizer step.

    ``frozen_features``: a linear-probe epoch. The feature extractor stays in eval mode (its
    batch-norm statistics do not move) and only parameters that require gradients change; the
    caller turns ``requires_grad`` off for the features.

    Returns:
        Mean loss, accuracy, images seen, wall seconds and images per second.
    """
    model.train()
    if frozen_features:
        _network(model).features.eval()
    order = torch.randperm(len(pixels), generator=generator)
    n_batches = len(order) // batch_size
    local = batch_size // world_size
    # Running sums stay on the device: reading them every step would stall a GPU.
    total_loss = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    seen = 0
    started = time.perf_counter()
    bar = tqdm(range(n_batches), desc=description, unit="batch", disable=not progress, leave=False)
    for step in bar:
        index = order[step * batch_size : (step + 1) * batch_size]
        batch = pixels[index.to(pixels.device)].to(runtime.device, non_blocking=True)
        batch_labels = labels[index.to(labels.device)].to(runtime.device, non_blocking=True)
        floats = augment(batch, augmentation, generator, batch_labels) if augmentation else batch
        mine = slice(rank * local, (rank + 1) * local)
        inputs = runtime.to_input(preprocessing(floats[mine]))
        targets = batch_labels[mine]
        with runtime.autocast():
            logits = model(inputs)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.detach() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(targets)
        if progress and (step % 10 == 9 or step == n_batches - 1):
            bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}", acc=f"{int(correct) / seen:.4f}")
    seconds = time.perf_counter() - started
    return {
        "loss": float(total_loss) / max(seen, 1),
        "accuracy": int(correct) / max(seen, 1),
        "images": seen,
        "seconds": seconds,
        "images_per_second": seen / seconds if seconds > 0 else 0.0,
    }


@torch.inference_mode()
def predict_logits_and_features(
    model: nn.Module,
    pixels: torch.Tensor,
    runtime: Runtime,
    batch_size: int = 64,
    progress: bool = False,
    preprocessing: Preprocessing = Preprocessing(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and pooled features (N, 1280) of a torchvision EfficientNet, float32 on the CPU.
    The features cost nothing extra: they are the classifier's input. ``preprocessing`` must be the
    weights' own (``Preprocessing.from_metadata``)."""
    model.eval()
    logits, features = [], []
    for start in tqdm(range(0, len(pixels), batch_size), desc="predict", unit="batch", disable=not progress, leave=False):
        batch = runtime.to_input(preprocessing(pixels[start : start + batch_size].to(runtime.device)))
        with runtime.autocast():
            pooled = torch.flatten(model.avgpool(model.features(batch)), 1)
            logits.append(model.classifier(pooled).float().cpu())
        features.append(pooled.float().cpu())
    if not logits:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(logits), torch.cat(features)


def predict_logits(
    model: nn.Module, pixels: torch.Tensor, runtime: Runtime, batch_size: int = 64, preprocessing: Preprocessing = Preprocessing()
) -> torch.Tensor:
    """Logits (N, classes) in float32 on the CPU for (N, H, W) uint8 pixels, in eval mode."""
    return predict_logits_and_features(model, pixels, runtime, batch_size, preprocessing=preprocessing)[0]


def _network(model: nn.Module) -> nn.Module:
    """The EfficientNet inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
