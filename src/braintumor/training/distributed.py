"""Training across processes with ``torchrun``: the process group, and batch norm that sees the
whole global batch on every backend.

``torchrun --nproc_per_node N -m braintumor train ...`` starts N copies of the training script
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; ``init_distributed`` joins them into one
group (NCCL on CUDA, one GPU per process; gloo on the CPU). Multi-node runs use torchrun's own
rendezvous arguments (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``); nothing here changes.

Batch norm normalises with the statistics of the batch it sees. With the global batch split over
processes, each would see a slice and train a different model than one process would. PyTorch's
``SyncBatchNorm`` fixes that on GPUs only, so ``GlobalBatchNorm2d`` does the same on any backend:
it sums per-channel counts, sums and squared sums over processes (an autograd-aware all-reduce)
and normalises with the global mean and variance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from ..errors import ConfigError
from .config import TrainConfig


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over processes."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()


def init_distributed(config: TrainConfig) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if config.batch_size % world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {world_size} processes")
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch over all processes.

    Same parameters and buffers as ``nn.BatchNorm2d`` (checkpoints stay interchangeable); in eval
    mode, or outside a process group, it is exactly ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        values = x.float()
        local_count = torch.full((1,), values.numel() / values.shape[1], dtype=torch.float32, device=x.device)
        stats = torch.cat([local_count, values.sum((0, 2, 3)), (values * values).sum((0, 2, 3))])
        total = dist_fn.all_reduce(stats)
        count, sums, squares = total[0], total[1 : 1 + self.num_features], total[1 + self.num_features :]
        mean = sums / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, -1, 1, 1)
        normalised = (values - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        return normalised.to(x.dtype)


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` in ``module`` for ``GlobalBatchNorm2d``, keeping its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement.to(child.running_mean.device if child.running_mean is not None else None))
        else:
            convert_batch_norm(child)
    return module
