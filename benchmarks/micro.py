"""The small measurements behind benchmarks/ANALYSIS.md and the model card, in one command:

    python benchmarks/micro.py

- folding batch norm into the convolutions: network-only images/s before and after, fp32 and bf16;
- torch.compile (inductor, weight freezing) and TorchScript freeze on the folded network: speed
  and compile time;
- augmentation and normalisation of one training batch of 32: milliseconds;
- ONNX Runtime against PyTorch on the bundled scans: the largest probability difference;
- what the guard's colour rule adds to decoding a file (``decode_image_and_colour`` against
  ``decode_image``, on the bundled scans read from memory): milliseconds per image.

Network-only timings use one synthetic batch of 32 at 224x224, best of 3 passes after 2 warm-ups.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from braintumor import load_model
from braintumor.data.imaging import decode_image, decode_image_and_colour
from braintumor.data.transforms import AugmentConfig, augment, normalise
from braintumor.inference.predict import default_weights_path
from braintumor.models.checkpoint import load_weights
from braintumor.models.ood import split_guard
from braintumor.models.registry import build_efficientnet_b0, fold_batch_norm

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def images_per_second(function: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> float:
    with torch.inference_mode():
        for _ in range(2):
            function(inputs)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            function(inputs)
            best = min(best, time.perf_counter() - started)
    return BATCH / best


def bf16(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inputs)

    return run


def main() -> None:
    warnings.simplefilter("ignore")
    unfolded = build_efficientnet_b0()
    unfolded.load_state_dict(split_guard(load_weights(default_weights_path())[0])[0])
    unfolded = unfolded.eval().to(memory_format=torch.channels_last)
    folded = fold_batch_norm(copy.deepcopy(unfolded))
    inputs = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    rows = {
        "unfolded fp32": images_per_second(unfolded, inputs),
        "folded fp32": images_per_second(folded, inputs),
        "unfolded bf16": images_per_second(bf16(unfolded), inputs),
        "folded bf16": images_per_second(bf16(folded), inputs),
    }
    for name, rate in rows.items():
        print(f"{rate:7.1f} img/s  {name} (channels_last)")
    print(f"batch-norm folding: x{rows['folded fp32'] / rows['unfolded fp32']:.2f} fp32, "
          f"x{rows['folded bf16'] / rows['unfolded bf16']:.2f} bf16")

    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    started = time.perf_counter()
    compiled = torch.compile(folded)
    with torch.inference_mode():
        compiled(inputs)
    compile_seconds = time.perf_counter() - started
    compiled_rate = images_per_second(compiled, inputs)
    print(f"{compiled_rate:7.1f} img/s  torch.compile with freezing, fp32 (x{compiled_rate / rows['folded fp32']:.2f}; "
          f"compiled in {compile_seconds:.0f} s)")
    contiguous = torch.randn(BATCH, 3, 224, 224)
    with torch.inference_mode():
        scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(folded).to(
            memory_format=torch.contiguous_format), contiguous)))
    scripted_rate = images_per_second(scripted, contiguous)
    print(f"{scripted_rate:7.1f} img/s  TorchScript freeze + optimize_for_inference, fp32 (x{scripted_rate / rows['folded fp32']:.2f})")

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (BATCH, 224, 224), dtype=torch.uint8)
    for _ in range(2):
        normalise(augment(pixels, AugmentConfig(), generator))
    started = time.perf_counter()
    for _ in range(10):
        normalise(augment(pixels, AugmentConfig(), generator)).contiguous(memory_format=torch.channels_last)
    print(f"augmentation + normalisation of a batch of {BATCH}: {(time.perf_counter() - started) * 100:.0f} ms")

    scans = ROOT / "examples" / "scans"
    reference = load_model(device="cpu").predict(scans)
    onnx = load_model(backend="onnx", device="cpu").predict(scans)
    difference = max(abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(reference, onnx) for k in a.probabilities)
    print(f"ONNX Runtime against PyTorch on the {len(reference)} bundled scans: max probability difference {difference:.1e}")

    files = [path.read_bytes() for path in sorted(scans.rglob("*.jpg"))]
    per_image = {}
    for decode in (decode_image, decode_image_and_colour, decode_image):  # plain twice: the first warms up
        started = time.perf_counter()
        for _ in range(20):
            for data in files:
                decode(data)
        per_image[decode.__name__] = (time.perf_counter() - started) / (20 * len(files)) * 1000
    print(f"decoding a bundled scan: {per_image['decode_image']:.2f} ms; with the colour share "
          f"{per_image['decode_image_and_colour']:.2f} ms")


if __name__ == "__main__":
    main()
