"""Load bench of ``autocompress serve``: the demo's original against its compressed model.

Starts the server in-process on a free loopback port (SmolLM2-135M as the original,
``runs/demo/model`` as the candidate), warms both arms up, then sends --requests requests
from --workers concurrent client threads (every other one streamed), half of them healthy;
then injects a fault into the candidate (tests-and-benchmarks-only hook) and sends the other
half. Prints requests/s, p50/p95 latency and TTFT per arm, the shadow scores of the healthy
phase, and the time and the number of candidate requests from the fault to the failover.
Every figure is read back from the run's event log.

    .venv/bin/python bench/serve.py                                  # the README's figures
    .venv/bin/python bench/serve.py --requests 24 --max-tokens 2     # quicker
    .venv/bin/python bench/serve.py --fault errors --canary 50

The compressed demo model is much slower than the original on a CPU (its packed weights
are unpacked at every forward pass by the PyTorch reference kernel): its healthy p95 is 5-7x
the original's here, so the policy's default latency ceiling (2x) fails it over on latency
alone. The bench sets the ceiling to 10x (--latency-factor) so that the fault it injects is
what trips.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# bench/ holds scripts named like stdlib modules (profile.py): keep them from shadowing the
# stdlib when this file is run as a script.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import torch  # noqa: E402

from autocompress.serve.engine import Fault, FaultKind  # noqa: E402
from autocompress.serve.events import read_events  # noqa: E402
from autocompress.serve.policy import Policy, Thresholds  # noqa: E402
from autocompress.serve.server import ServeConfig, Server, choose_policy, load_pair  # noqa: E402
from autocompress.serve.stats import mean, quantile  # noqa: E402

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "def fibonacci(n):",
           "The three primary colours are", "Explain recursion in one sentence:", "Once upon a time,"]


def load(url: str, count: int, workers: int, max_tokens: int, first: int, failures: list) -> float:
    """Send ``count`` requests from ``workers`` threads; returns the wall time."""
    numbers = iter(range(first, first + count))
    lock = threading.Lock()

    def worker():
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                with lock:
                    i = next(numbers, None)
                if i is None:
                    return
                stream = i % 2 == 1
                response = client.post("/v1/completions", json={
                    "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                    "stream": stream})
                ok = response.status_code == 200 and ("[DONE]" in response.text if stream else
                                                      "choices" in response.json())
                if not ok or '"error"' in response.text:
                    failures.append(response.text[:200])

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return time.perf_counter() - start


def arm_rows(events: list[dict], since: float, until: float) -> list[tuple]:
    """Per arm: requests, p50/p95 latency, p50 TTFT, tokens/s, between two times."""
    rows = []
    for arm in ("original", "candidate"):
        done = [e for e in events if e["type"] == "request" and e["arm"] == arm and since <= e["t"] <= until
                and e.get("latency") is not None]
        latencies = [e["latency"] for e in done]
        tokens, seconds = sum(e["tokens"] for e in done), sum(latencies)
        rows.append((arm, len(done), quantile(latencies, 0.5), quantile(latencies, 0.95),
                     quantile([e["ttft"] for e in done], 0.5), tokens / seconds if seconds else float("nan")))
    return rows


def main() -> int:
    """Run the bench; exit status 0 when the failover happened and no request failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", default="smollm2-135m")
    parser.add_argument("--candidate", default="runs/demo/model")
    parser.add_argument("--requests", type=int, default=64, help="total requests, half before the fault")
    parser.add_argument("--workers", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--canary", type=float, default=50.0, help="share of traffic to the candidate, percent")
    parser.add_argument("--shadow", type=float, default=50.0, help="percent of candidate requests scored")
    parser.add_argument("--fault", choices=[k.value for k in FaultKind], default="garbage")
    parser.add_argument("--latency-factor", type=float, default=10.0,
                        help="policy latency ceiling (candidate p95 / original p95) for this bench")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.candidate).exists():
        print(f"{args.candidate} does not exist: run `make demo` (or autocompress demo) first", file=sys.stderr)
        return 2

    out = args.out or tempfile.mkdtemp(prefix="autocompress-bench-serve-")
    policy = Policy(stages=(args.canary, 100.0), min_requests=10**9,
                    thresholds=Thresholds(latency=args.latency_factor))
    config = ServeConfig(args.original, args.candidate, str(Path(out) / "serve"), shadow=args.shadow, seed=0)
    started = time.perf_counter()
    choose_policy(config)
    pair = load_pair(config)
    server = Server(config, *pair, policy)
    url = server.start()
    print(f"models loaded and server up in {time.perf_counter() - started:.1f} s at {url}; "
          f"{torch.get_num_threads()} torch threads; event log {server.log.path}")
    failures: list = []
    try:
        with httpx.Client(base_url=url, timeout=600) as client:  # warm-up: one request per arm
            for arm in ("original", "candidate"):
                client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2},
                            headers={"X-Autocompress-Arm": arm})
        healthy_from = time.time()
        half = args.requests // 2
        healthy_s = load(url, half, args.workers, args.max_tokens, 0, failures)
        healthy_to = time.time()
        deadline = time.time() + 300  # bounded wait for the healthy phase's shadow scores
        while not server.engine.shadow_idle() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # the last scores reach the log through the event loop
        fault_at = time.time()
        server.engine.fault = Fault(FaultKind(args.fault), factor=5.0)
        faulty_s = load(url, args.requests - half, args.workers, args.max_tokens, half, failures)
    finally:
        server.stop()
    events = read_events(server.log.path)
    print(f"\n{args.requests} requests, {args.workers} concurrent clients, max_tokens {args.max_tokens}, "
          f"canary {args.canary:g}%, shadow {args.shadow:g}%, fault '{args.fault}' after {half}; "
          f"failed requests: {len(failures)}")
    print(f"healthy phase: {half / healthy_s:.2f} requests/s over {healthy_s:.1f} s; "
          f"after the fault: {(args.requests - half) / faulty_s:.2f} requests/s over {faulty_s:.1f} s")
    print(f"\n{'arm (healthy phase)':<22}{'requests':>9}{'p50 s':>8}{'p95 s':>8}{'TTFT p50':>10}{'tok/s':>8}")
    for arm, count, p50, p95, ttft, speed in arm_rows(events, healthy_from, healthy_to):
        print(f"{arm:<22}{count:>9}{p50:>8.2f}{p95:>8.2f}{ttft:>10.2f}{speed:>8.2f}")
    healthy_scores = [e for e in events if e["type"] == "shadow" and e["t"] <= fault_at]
    if healthy_scores:
        print(f"\nshadow scores before the fault: {len(healthy_scores)}; agreement "
              f"{mean(e['agreement'] for e in healthy_scores):.3f}, KL {mean(e['kl'] for e in healthy_scores):.4f} "
              f"nats, log-prob of candidate tokens {mean(e['logprob'] for e in healthy_scores):.3f}")
    failover = next((e for e in events if e["type"] == "failover"), None)
    if failover is None:
        print("\nno failover happened")
        return 1
    routed = [e for e in events if e["type"] == "request" and e["arm"] == "candidate" and not e.get("retried")
              and fault_at <= e["started"] <= failover["t"]]
    retried = sum(1 for e in events if e["type"] == "request" and e.get("retried"))
    print(f"\nfault -> failover: {failover['t'] - fault_at:.2f} s, {len(routed)} candidate requests routed "
          f"in between, {retried} retried on the original; reason: {failover['reason']}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
