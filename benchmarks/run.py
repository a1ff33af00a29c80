"""Speed of braintumor against the plain loops of the original work, measured side by side.

One command prints a table and writes ``benchmarks/RESULTS.md``:

    python benchmarks/run.py --data ../shared/data/brain-tumor-mri

- inference: JPEG files of the official Testing split to class probabilities. The baseline is the
  original work's loop (PIL open, torchvision Resize/ToTensor/Normalize per image, eager fp32,
  batch 32); then braintumor's predict path and its variants. Each variant's accuracy and the
  number of predictions that differ from the baseline are reported: a faster path that changes
  predictions beyond noise is not acceptable.
- training: images/s over the same steps for a plain loop (JPEGs decoded every step, eager fp32)
  and braintumor's loop (decoded cache, augmentation on tensors, channels_last, bf16 autocast),
  with the projected time of the full 20-epoch recipe.
- memory: peak resident memory of ``braintumor predict`` over the Testing split and over ten
  times as many files (links to the same images).

All numbers are from one run on this machine; rerun to compare machines. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from startup import cpu  # benchmarks/ is the script's own folder

from braintumor import __version__, load_model
from braintumor.data.cache import load_cached
from braintumor.data.datasets import load_split
from braintumor.data.imaging import decode_image, resize_grey
from braintumor.data.transforms import AugmentConfig
from braintumor.inference.predict import default_weights_path
from braintumor.models.registry import create_model, load_weights_file
from braintumor.models.runtime import cpu_supports_bf16, select_runtime
from braintumor.training.engine import TrainingStep, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
PLAIN_TRANSFORM = transforms.Compose(
    [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
)
TRAIN_IMAGES_PER_EPOCH = 5137  # the shipped recipe's training split (docs/training/split.json)
VAL_IMAGES = 571


def machine() -> str:
    """The CPU's model and flags (``startup.cpu``), the threads and the versions behind the figures."""
    return (
        f"{cpu()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"bf16 kernels: {'yes' if cpu_supports_bf16() else 'no'}, Python {platform.python_version()}, braintumor {__version__}"
    )


# ---------------------------------------------------------------- inference


def plain_inference(paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """The original work's loop: per-image PIL decoding and resizing, eager fp32, NCHW, an unfolded
    network; the shipped model's own preprocessing (its spec) and temperature, so probabilities
    compare with the predict path's."""
    model, spec = load_weights_file(default_weights_path())
    outputs = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            grey = [np.asarray(Image.open(p).convert("L").resize((224, 224), Image.BILINEAR)) for p in paths[start : start + batch_size]]
            logits = model(spec.preprocessing(torch.from_numpy(np.stack(grey))))
            outputs.append(torch.softmax(logits / spec.temperature, 1).numpy())
    return np.concatenate(outputs)


def braintumor_inference(paths: list[Path], **options) -> Callable[[], np.ndarray]:
    """The predict path (threads decode ahead of the model) with the given load/predict options."""
    batch_size = options.pop("batch_size", 32)
    workers = options.pop("workers", 2)
    threads = options.pop("threads", None)
    classifier = load_model(device="cpu", **options)
    names = classifier.class_names

    def run() -> np.ndarray:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            results = classifier.predict_iter(paths, batch_size=batch_size, workers=workers)
            return np.array([[r.probabilities[n] for n in names] for r in results])
        finally:
            torch.set_num_threads(previous)

    return run


def _decode_resized(path: Path) -> np.ndarray:
    return resize_grey(decode_image(path), 224)


def process_decoding_inference(paths: list[Path], batch_size: int = 64) -> Callable[[], np.ndarray]:
    """Decoding in 2 worker processes instead of threads, feeding the ONNX Runtime backend."""
    classifier = load_model(device="cpu", backend="onnx")

    def run() -> np.ndarray:
        outputs = []
        with ProcessPoolExecutor(max_workers=2) as pool:
            decoded = pool.map(_decode_resized, paths, chunksize=16)
            while batch := list(itertools.islice(decoded, batch_size)):
                outputs.append(classifier.infer(np.stack(batch), batch_size=batch_size)[0])
        return np.concatenate(outputs)

    return run


def timed(function: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float]:
    """The result and the best wall time of ``repeats`` runs (the least disturbed by the machine)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    assert result is not None
    return result, best


def bench_inference(data: Path, repeats: int) -> list[dict]:
    samples = load_split(data, "Testing")
    paths, labels = [s.path for s in samples], np.array([s.label for s in samples])
    braintumor_inference(paths[:64])()  # warm the page cache and the kernels
    variants: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("plain loop (PIL decode and resize per image, eager fp32, NCHW, unfolded network, batch 32)", lambda: plain_inference(paths)),
        ("braintumor predict, default (auto: ONNX Runtime on a CPU), 2 decode threads", braintumor_inference(paths)),
        ("braintumor predict, PyTorch fp32 channels_last (--backend torch)", braintumor_inference(paths, backend="torch")),
        ("braintumor predict, PyTorch bf16 autocast (--backend torch --amp)", braintumor_inference(paths, backend="torch", amp=True)),
        ("braintumor predict, default, batch 64", braintumor_inference(paths, batch_size=64)),
        ("braintumor predict, default, batch 128", braintumor_inference(paths, batch_size=128)),
        ("braintumor predict, default, 1 decode thread", braintumor_inference(paths, workers=1)),
        ("ONNX Runtime, batch 64, decoding in 2 worker processes", process_decoding_inference(paths)),
    ]
    rows, baseline = [], None
    for name, function in variants:
        probabilities, seconds = timed(function, repeats if "plain" not in name else 1)
        predicted = probabilities.argmax(1)
        if baseline is None:
            baseline = (predicted, probabilities, seconds)
        rows.append({
            "variant": name,
            "images_per_second": len(paths) / seconds,
            "speedup": baseline[2] / seconds,
            "accuracy": float((predicted == labels).mean()),
            "changed": int((predicted != baseline[0]).sum()),
            "max_probability_change": float(np.abs(probabilities - baseline[1]).max()),
        })
        print(f"  {rows[-1]['images_per_second']:7.1f} img/s  x{rows[-1]['speedup']:4.2f}  acc {rows[-1]['accuracy']:.4f}  {name}", flush=True)
    return rows


# ---------------------------------------------------------------- training


def plain_training_step_factory(paths: list[Path], labels: np.ndarray, batch_size: int) -> Callable[[int], None]:
    torch.manual_seed(0)
    model = create_model("lite0").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(k: int) -> None:
        index = [(k * batch_size + i) % len(paths) for i in range(batch_size)]
        batch = torch.stack([PLAIN_TRANSFORM(Image.open(paths[i]).convert("RGB")) for i in index])
        loss = F.cross_entropy(model(batch), torch.as_tensor(labels[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def bench_training(data: Path, steps: int) -> list[dict]:
    batch_size = 32
    samples = load_split(data, "Training")
    rng = np.random.default_rng(0)
    chosen = [samples[i] for i in rng.choice(len(samples), size=steps * batch_size + batch_size, replace=False)]
    paths, labels = [s.path for s in chosen], np.array([s.label for s in chosen])
    rows = []

    plain = plain_training_step_factory(paths, labels, batch_size)
    plain(0)  # warm-up step
    started = time.perf_counter()
    for k in range(1, steps + 1):
        plain(k)
    plain_rate = steps * batch_size / (time.perf_counter() - started)
    rows.append({"variant": "plain loop (JPEG decode per step, eager fp32, NCHW)", "images_per_second": plain_rate})
    print(f"  {plain_rate:7.1f} img/s  plain loop", flush=True)

    decoded = load_cached(paths, 224, None, progress=False)
    pixels, targets = torch.from_numpy(decoded.pixels), torch.from_numpy(labels)
    for name, amp, channels_last in [
        ("braintumor loop, fp32, NCHW", False, False),
        ("braintumor loop, fp32, channels_last", False, True),
        ("braintumor loop, bf16 autocast, NCHW", True, False),
        ("braintumor loop, bf16 autocast, channels_last (train's default)", True, True),
    ]:
        if amp and not cpu_supports_bf16():
            continue
        runtime = select_runtime("cpu", amp)
        runtime = type(runtime)(runtime.device, runtime.amp_dtype, channels_last)
        torch.manual_seed(0)
        model = create_model("lite0")
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        generator = torch.Generator().manual_seed(0)
        warm = slice(0, batch_size)
        step = TrainingStep(model, optimizer, scheduler, runtime, generator, batch_size, AugmentConfig())
        train_one_epoch(step, pixels[warm], targets[warm], progress=False)
        result = train_one_epoch(step, pixels[batch_size:], targets[batch_size:], progress=False)
        rows.append({"variant": name, "images_per_second": result["images_per_second"]})
        print(f"  {result['images_per_second']:7.1f} img/s  {name}", flush=True)
    for row in rows:
        row["speedup"] = row["images_per_second"] / plain_rate
        row["epoch_minutes"] = TRAIN_IMAGES_PER_EPOCH / row["images_per_second"] / 60
        row["recipe_minutes"] = 20 * row["epoch_minutes"]
    return rows


# ---------------------------------------------------------------- memory


# Runs the command line in a fresh interpreter and prints its own high-water mark (VmHWM, which
# starts afresh at exec: the parent's memory, shared after fork, is not counted as ru_maxrss would).
PEAK_WRAPPER = """
import atexit, re, sys
atexit.register(lambda: print("VmHWM_KiB", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1), file=sys.stderr))
from braintumor.cli import main
sys.argv = ["braintumor", *sys.argv[1:]]
main()
"""


def peak_memory_of_predict(folder: Path, *options: str, out: Path | None = None) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, files) of ``braintumor predict FOLDER --csv OUT [options]`` in a
    fresh process."""
    out = out or folder.parent / f"{folder.name}.csv"
    command = [sys.executable, "-c", PEAK_WRAPPER, "predict", str(folder), "--csv", str(out), *options]
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    peaks = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("VmHWM_KiB")]
    if result.returncode not in (0, 1) or not peaks:
        raise SystemExit(f"error: braintumor predict failed: {result.stderr[-500:]}")
    files = sum(1 for _ in open(out)) - 1
    return int(peaks[-1]) / 1024, seconds, files


def bench_memory(data: Path) -> list[dict]:
    samples = load_split(data, "Testing")
    rows = []
    with tempfile.TemporaryDirectory(prefix="braintumor-bench-") as tmp:
        for copies in (1, 10):
            folder = Path(tmp) / f"testing-x{copies}"
            for copy in range(copies):
                target = folder / f"copy{copy:02d}"
                target.mkdir(parents=True)
                for sample in samples:
                    link = target / f"{sample.path.parent.name}-{sample.path.name}"
                    link.symlink_to(sample.path.resolve())
            peak, seconds, files = peak_memory_of_predict(folder)
            rows.append({"files": files, "peak_mib": peak, "seconds": seconds, "images_per_second": files / seconds})
            print(f"  {files:6d} files  peak {peak:6.0f} MiB  {files / seconds:6.1f} img/s", flush=True)
    return rows


# ---------------------------------------------------------------- report


def _section(title: str, columns: list[str], rows: list[str], note: str = "") -> list[str]:
    """A Markdown section: heading, table, optional note."""
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows, "", *([note, ""] if note else [])]


# What the default path must reach on this machine (issues 12 and 21), checked in the same run.
TARGETS = {"speedup": 4.0, "images_per_second": 150.0, "changed": 0, "command_seconds": 10.0, "command_peak_mib": 1536.0}


def target_lines(inference: list[dict], memory: list[dict]) -> list[str]:
    """One line per target: the figure measured in this run, the target, met or not."""
    lines = []
    default = next((r for r in inference if ", default (auto" in r["variant"]), None)
    if default is not None:
        lines += [
            _target("default predict vs the plain loop", default["speedup"], f">= x{TARGETS['speedup']:.0f}",
                    default["speedup"] >= TARGETS["speedup"], "x{:.2f}"),
            _target("default predict, images/s", default["images_per_second"], f">= {TARGETS['images_per_second']:.0f}",
                    default["images_per_second"] >= TARGETS["images_per_second"], "{:.1f}"),
            _target("predictions changed by the default path", default["changed"], "0", default["changed"] == 0, "{}"),
        ]
    whole = next((r for r in memory if r["files"] < 2000), None)
    if whole is not None:
        lines += [
            _target("`braintumor predict` on the Testing files, seconds (start-up included)", whole["seconds"],
                    f"<= {TARGETS['command_seconds']:.0f}", whole["seconds"] <= TARGETS["command_seconds"], "{:.1f}"),
            _target("the same command, peak resident MiB", whole["peak_mib"], f"<= {TARGETS['command_peak_mib']:.0f}",
                    whole["peak_mib"] <= TARGETS["command_peak_mib"], "{:.0f}"),
        ]
    return lines


def _target(name: str, value: float, target: str, met: bool, fmt: str) -> str:
    return f"| {name} | {fmt.format(value)} | {target} | {'met' if met else 'MISSED'} |"


def write_results(path: Path, command: str, inference: list[dict], training: list[dict], memory: list[dict]) -> None:
    lines = [
        "# Benchmark results", "",
        f"Machine: {machine()}.", "",
        f"Command: `{command}` (all figures from that one run, each variant against the baseline in the same run).", "",
    ]
    if inference:
        lines += _section(
            "Inference: JPEG files of the Testing split (1,311) to probabilities",
            ["variant", "images/s", "vs plain loop", "accuracy", "predictions changed", "max probability change"],
            [f"| {r['variant']} | {r['images_per_second']:.1f} | x{r['speedup']:.2f} | {r['accuracy']:.4f} | {r['changed']} | "
             f"{r['max_probability_change']:.1e} |" for r in inference],
            "Accuracy here is the argmax of the probabilities on all 1,311 images (the out-of-distribution "
            "guard's refusals are not applied), so every variant is scored the same way.",
        )
    if training:
        lines += _section(
            "Training: images/s over the same batches of 32 (with the shipped recipe's augmentation for braintumor)",
            ["variant", "images/s", "vs plain loop", "minutes per epoch (5,137 images)", "20 epochs, minutes"],
            [f"| {r['variant']} | {r['images_per_second']:.1f} | x{r['speedup']:.2f} | {r['epoch_minutes']:.1f} | "
             f"{r['recipe_minutes']:.0f} |" for r in training],
            f"Validation adds about {VAL_IMAGES} predictions per epoch (a few seconds).",
        )
    if memory:
        lines += _section(
            "Memory: `braintumor predict FOLDER --csv out.csv` in a fresh process",
            ["files", "peak resident memory, MiB", "images/s"],
            [f"| {r['files']:,} | {r['peak_mib']:.0f} | {r['images_per_second']:.1f} |" for r in memory],
        )
    targets = target_lines(inference, memory)
    if targets:
        lines += _section("Targets", ["figure", "this run", "target", ""], targets)
        print("\n".join(targets))
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("BRAINTUMOR_DATA"), help="Kaggle data root.")
    parser.add_argument("--only", default="inference,training,memory", help="Comma-separated sections to run.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed passes per inference variant (best kept).")
    parser.add_argument("--train-steps", type=int, default=12, help="Timed training steps of 32 images per variant.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    if args.data is None or not Path(args.data).is_dir():
        parser.error("--data (or BRAINTUMOR_DATA) must point at the Kaggle data root")
    sections = set(args.only.split(","))
    unknown = sections - {"inference", "training", "memory"}
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    print(machine())
    inference = training = memory = []
    if "inference" in sections:
        print("inference (Testing split, JPEG to probabilities):")
        inference = bench_inference(Path(args.data), args.repeats)
    if "training" in sections:
        print("training:")
        training = bench_training(Path(args.data), args.train_steps)
    if "memory" in sections:
        print("memory of batch prediction:")
        memory = bench_memory(Path(args.data))
    command = "python benchmarks/run.py --data DATA_ROOT" + ("" if sections == {"inference", "training", "memory"} else f" --only {args.only}")
    write_results(args.out, command, inference, training, memory)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
