"""Start-up cost: `import braintumor` and `braintumor --help` in fresh interpreters, and what
loading the model adds (wall seconds, peak resident memory of the process), best and median of
several runs. Prints the CPU's model and flags with the figures.

    python benchmarks/startup.py [--repeats 7]

Targets (issue 21): import <= 0.3 s and <= 150 MB; --help <= 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CASES = {
    "python -c pass (the interpreter alone)": [sys.executable, "-c", "pass"],
    "import braintumor": [sys.executable, "-c", "import braintumor"],
    # the environment's own console script, whether or not its bin folder is on PATH
    "braintumor --help": [str(Path(sys.executable).with_name("braintumor")), "--help"],
    "import braintumor; load_model() (for scale)": [sys.executable, "-c", "import braintumor; braintumor.load_model()"],
}


def cpu() -> str:
    """The CPU's model name and the flags that decide the numeric paths."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni"})
    return f"{name}, {os.cpu_count()} logical cores, flags: {' '.join(shown) or 'none of note'}"


_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "started = time.perf_counter()\n"
    "subprocess.run(json.loads(sys.argv[1]), check=True, capture_output=True)\n"
    "print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run_once(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of ``command``, timed by a fresh parent process so
    that the peak is this run's alone (``ru_maxrss`` of children is the largest child so far)."""
    import json

    out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(command)], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]), float(out[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(cpu())
    print(f"Python {platform.python_version()}; best / median of {args.repeats} runs")
    for name, command in CASES.items():
        runs = [run_once(command) for _ in range(args.repeats)]
        seconds = [s for s, _ in runs]
        memory = max(m for _, m in runs)
        print(f"{name:<46} {min(seconds):6.2f} s / {statistics.median(seconds):6.2f} s   peak {memory:7.0f} MB")


if __name__ == "__main__":
    main()
