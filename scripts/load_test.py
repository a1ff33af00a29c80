"""Bounded load test of the HTTP service on loopback: requests/s, p50/p99 latency and errors at
several concurrency levels, a fixed number of requests each.

By default it starts ``braintumor serve`` itself on a free loopback port (so the numbers include
nothing but this machine), sends the bundled scans round-robin, and stops the server afterwards.
``--url`` targets a server already running, but only on loopback: this is not a tool for
loading other people's machines.

    python scripts/load_test.py                       # default backend, 1/4/16 clients, 64 requests each
    python scripts/load_test.py --backend onnx --markdown
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCANS = sorted((ROOT / "examples" / "scans").glob("*/*.jpg"))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(backend: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "braintumor", "serve", "--port", str(port), "--backend", backend]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: the server exited with code {process.returncode}; run `{' '.join(command)}` to see why")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("error: the server did not answer /healthz within 120 s")


def run_level(url: str, endpoint: str, clients: int, requests: int) -> dict[str, float]:
    """``requests`` uploads spread over ``clients`` threads, each with its own connection."""
    payloads = [(p.name, p.read_bytes()) for p in SCANS]
    field = "files" if endpoint == "predict" else "file"
    params = {} if endpoint == "predict" else {"format": "json"}

    def worker(worker_index: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(base_url=url, timeout=300) as http:
            for k in range(worker_index, requests, clients):
                name, data = payloads[k % len(payloads)]
                started = time.perf_counter()
                try:
                    response = http.post(f"/v1/{endpoint}", params=params, files=[(field, (name, data, "image/jpeg"))])
                    errors += response.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - started)
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - started
    latencies = sorted(x for r in results for x in r[0])
    return {
        "clients": clients,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": sum(r[1] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="A running server on loopback (default: start one).")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto", help="Backend of the server started here.")
    parser.add_argument("--endpoint", choices=("predict", "explain"), default="predict")
    parser.add_argument("--requests", type=int, default=64, help="Requests per concurrency level.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    args = parser.parse_args()
    if args.requests < 1 or any(c < 1 for c in args.concurrency):
        parser.error("--requests and --concurrency must be positive")
    process = None
    url = args.url
    if url is None:
        port = free_port()
        process = start_server(args.backend, port)
        url = f"http://127.0.0.1:{port}"
    elif urlparse(url).hostname not in LOOPBACK:
        parser.error(f"{url}: only loopback addresses are load-tested")
    try:
        run_level(url, args.endpoint, 1, 4)  # warm-up: first requests pay for lazy initialisation
        rows = [run_level(url, args.endpoint, c, args.requests) for c in args.concurrency]
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    if args.markdown:
        print("| endpoint | backend | clients | requests | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| /v1/{args.endpoint} | {args.backend if process else 'external'} | {row['clients']} | {row['requests']} | "
                  f"{row['rps']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} |")
    else:
        print(f"{'clients':>8}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for row in rows:
            print(f"{row['clients']:>8}{row['requests']:>10}{row['rps']:>9.1f}{row['p50_ms']:>9.0f}{row['p99_ms']:>9.0f}{row['errors']:>8}")


if __name__ == "__main__":
    main()
