"""Live monitoring: per-arm counters and recent distributions, shadow quality, and a time series.

Like :class:`~autocompress.serve.rollout.Rollout`, a :class:`Monitor` is a fold over the event
log, so its counters survive a restart. Recent distributions keep the last ``RECENT``
requests per arm; the time series keeps ``BUCKETS`` buckets of ``bucket_s`` seconds, and
markers keep every promotion, failover, rollback and pause.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .routing import Arm
from .stats import finite_or_none, mean, quantile

RECENT = 1000
BUCKETS = 720
MARKERS = 200


@dataclass
class ArmMonitor:
    """Counters since the log began and the recent latency, TTFT and speed of one arm."""

    requests: int = 0
    errors: int = 0
    aborted: int = 0
    retried: int = 0  # served after the candidate failed (original arm only)
    tokens: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    ttfts: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    speeds: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # (tokens, seconds) per request

    def summary(self) -> dict:
        """Counters and p50/p95/p99 of latency and TTFT (seconds), tokens/s over recent requests."""
        tokens = sum(n for n, _ in self.speeds)
        seconds = sum(s for _, s in self.speeds)
        out = {"requests": self.requests, "errors": self.errors, "aborted": self.aborted, "retried": self.retried,
               "tokens": self.tokens, "tokens_per_s": finite_or_none(tokens / seconds if seconds else math.nan)}
        for name, values in (("latency", self.latencies), ("ttft", self.ttfts)):
            for q in (50, 95, 99):
                out[f"{name}_p{q}"] = finite_or_none(quantile(values, q / 100))
        return out


@dataclass
class Bucket:
    """What happened in one slice of time."""

    start: float
    requests: dict = field(default_factory=lambda: {arm: 0 for arm in Arm})
    errors: dict = field(default_factory=lambda: {arm: 0 for arm in Arm})
    latencies: dict = field(default_factory=lambda: {arm: [] for arm in Arm})
    agreement: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    share: float = 0.0


@dataclass
class Monitor:
    """Everything ``/metrics`` and the dashboard show, folded from the events."""

    bucket_s: float = 5.0
    arms: dict = field(default_factory=lambda: {arm: ArmMonitor() for arm in Arm})
    shadow_scores: int = 0
    shadow_dropped: int = 0
    shadow_recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # (kl, agreement, logprob)
    share: float = 0.0
    failovers: int = 0
    promotions: int = 0
    series: deque = field(default_factory=lambda: deque(maxlen=BUCKETS))
    markers: deque = field(default_factory=lambda: deque(maxlen=MARKERS))
    shares: deque = field(default_factory=lambda: deque(maxlen=MARKERS))  # (time, share) at every change

    def _bucket(self, t: float) -> Bucket:
        start = math.floor(t / self.bucket_s) * self.bucket_s
        if not self.series or self.series[-1].start < start:
            self.series.append(Bucket(start, share=self.share))
        return self.series[-1]

    def apply(self, event: dict) -> None:
        """Fold one event."""
        kind, t = event["type"], event["t"]
        bucket = self._bucket(t)
        if kind == "start":
            self.share = event["share"]
            self.markers.append({"t": t, "kind": "start", "text": "resumed" if event.get("resumed") else "started",
                                 "share": self.share})
        elif kind == "request":
            arm = self.arms[Arm(event["arm"])]
            arm.requests += 1
            bucket.requests[Arm(event["arm"])] += 1
            if event.get("aborted"):
                arm.aborted += 1
            elif event.get("error"):
                arm.errors += 1
                bucket.errors[Arm(event["arm"])] += 1
            else:
                arm.retried += bool(event.get("retried"))
                arm.tokens += event["tokens"]
                arm.latencies.append(event["latency"])
                bucket.latencies[Arm(event["arm"])].append(event["latency"])
                if event.get("ttft") is not None:
                    arm.ttfts.append(event["ttft"])
                arm.speeds.append((event["tokens"], event["latency"]))
        elif kind == "shadow":
            self.shadow_scores += 1
            self.shadow_recent.append((event["kl"], event["agreement"], event["logprob"]))
            bucket.agreement.append(event["agreement"])
            bucket.kl.append(event["kl"])
        elif kind == "shadow_dropped":
            self.shadow_dropped += 1
        elif kind in ("promote", "failover", "rollback", "pause"):
            if kind == "promote":
                self.share = event["share"]
                self.promotions += 1
            elif kind in ("failover", "rollback"):
                self.share = 0.0
                self.failovers += kind == "failover"
            text = event.get("reason") or ("paused" if event.get("paused") else "pause lifted")
            self.markers.append({"t": t, "kind": kind, "text": text, "share": self.share})
        bucket.share = self.share
        if kind in ("start", "promote", "failover", "rollback"):
            self.shares.append((t, self.share))

    def shadow_summary(self) -> dict:
        """Mean KL, agreement and candidate-token log-prob over the recent shadow scores."""
        recent = list(self.shadow_recent)
        return {"scores": self.shadow_scores, "dropped": self.shadow_dropped,
                "kl": finite_or_none(mean(s[0] for s in recent)),
                "agreement": finite_or_none(mean(s[1] for s in recent)),
                "logprob": finite_or_none(mean(s[2] for s in recent))}
