"""One training step of B0 on this machine: fp32 against bf16 autocast, and what each augmentation
policy costs per batch. The figure behind ``runtime.cpu_supports_bf16``: on a CPU without native
bf16 (no AVX-512 BF16, no AMX), oneDNN converts to and from fp32 and the step gets slower.

    python benchmarks/train_step.py

Batch of 32 at 224x224, channels_last, Adam; best of 3 steps after 1 warm-up.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from braintumor.data.transforms import AUGMENT_POLICIES, Preprocessing, augment
from braintumor.models.registry import build_efficientnet_b0
from braintumor.models.runtime import cpu_supports_bf16

BATCH = 32


def best_of(step, repeats: int = 3) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    model = build_efficientnet_b0().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 4, (BATCH,))

    def train_step(amp: bool):
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(inputs).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    fp32, bf16 = best_of(train_step(False)), best_of(train_step(True))
    print(f"native bf16 on this CPU: {cpu_supports_bf16()}")
    print(f"training step, batch {BATCH}: fp32 {fp32:.2f} s ({BATCH / fp32:.1f} img/s), "
          f"bf16 autocast {bf16:.2f} s ({BATCH / bf16:.1f} img/s): bf16 takes x{bf16 / fp32:.2f} the time of fp32")
    pixels = torch.randint(0, 256, (BATCH, 224, 224), dtype=torch.uint8)
    labels = torch.arange(BATCH) % 4
    generator = torch.Generator().manual_seed(0)
    preprocessing = Preprocessing(standardise="head", smoothing=1.0)
    for name, policy in AUGMENT_POLICIES.items():
        seconds = best_of(lambda policy=policy: preprocessing(augment(pixels, policy, generator, labels)), repeats=10)
        print(f"augmentation '{name}' + head standardisation and smoothing, batch {BATCH}: {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()
