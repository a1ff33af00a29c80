"""Where and how a torch network runs: device, autocast dtype and memory layout.

On CUDA, fp16/bf16 autocast; on a CPU, bf16 autocast only where the CPU computes bf16 natively
(``cpu_supports_bf16``), and channels_last everywhere: the standard fast paths of both.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch


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
