"""The rollout controller: routes requests, records every event, and acts on the policy's verdicts.

It lives on the server's event loop (one thread), so the event log, the rollout state and
the monitor change in one order. Each recorded event is appended to the log, folded into
the :class:`Rollout` and the :class:`Monitor`, and then the policy is asked for a verdict;
a failover (or an admin rollback) cancels the candidate's running requests at once, and
the server retries each of them on the original.
"""
from __future__ import annotations

import time

from .engine import Engine
from .events import EventLog
from .monitor import Monitor
from .policy import Policy
from .rollout import Rollout, Status, admin_event
from .routing import Arm, choose_arm, take_shadow

JUDGED = ("request", "shadow")


class Controller:
    """Routing, the event log, the rollout state, the monitor and the candidate's in-flight requests."""

    def __init__(self, policy: Policy, log: EventLog, engine: Engine, *, seed: int, shadow: float, start: dict,
                 bucket_s: float = 5.0):
        self.policy, self.log, self.engine = policy, log, engine
        self.seed, self.shadow = seed, shadow
        self.rollout = Rollout(policy)
        self.monitor = Monitor(bucket_s=bucket_s)
        self.inflight: set = set()  # the candidate's running requests (with abort() and started)
        self.routed = self.sampled = 0
        for event in log.past:
            self.rollout.apply(event)
            self.monitor.apply(event)
            if event["type"] == "request" and not event.get("retried"):
                self.routed += not event.get("pinned")
                self.sampled += event["arm"] == Arm.CANDIDATE.value
        self.record({"type": "start", **start, "policy": policy.to_dict(), "share": self.rollout.share,
                     "stage": self.rollout.stage, "resumed": bool(log.past)})

    @property
    def failed(self) -> bool:
        """Whether the candidate is out of service (failed over or rolled back)."""
        return self.rollout.status in (Status.FAILED_OVER, Status.ROLLED_BACK)

    def route(self, pin: Arm | None = None) -> Arm:
        """The arm for the next request; a pin to the candidate is not honoured while it is out of service."""
        if pin is Arm.CANDIDATE and self.failed:
            pin = Arm.ORIGINAL
        arm = choose_arm(self.rollout.share, self.seed, self.routed, pin)
        self.routed += pin is None
        return arm

    def sample_shadow(self) -> bool:
        """Whether the next candidate request is scored by the original."""
        chosen = take_shadow(self.shadow, self.seed, self.sampled)
        self.sampled += 1
        return chosen

    def record(self, event: dict) -> dict:
        """Log ``event``, fold it in, act on the policy's verdict; returns the stamped event."""
        stamped = self.log.append(event)
        self.rollout.apply(stamped)
        self.monitor.apply(stamped)
        if stamped["type"] in ("failover", "rollback"):
            self.log.sync()
            self._drain_candidate()
        elif stamped["type"] in ("promote", "pause"):
            self.log.sync()
        if stamped["type"] in JUDGED:
            now = time.monotonic()
            verdict = self.rollout.verdict([now - request.started for request in self.inflight])
            if verdict is not None:
                self.record(verdict)
        return stamped

    def record_shadow(self, score: dict) -> None:
        """Record a shadow score from the engine (errors in scoring are not the candidate's)."""
        if "error" not in score:
            self.record({"type": "shadow", **score})

    def admin(self, action: str, body: dict | None = None) -> dict:
        """Apply an admin action (promote, rollback, pause); returns the state after it."""
        self.record(admin_event(self.rollout, action, body))
        return self.rollout.snapshot()

    def _drain_candidate(self) -> None:
        for request in list(self.inflight):
            request.abort()
        self.engine.cancel(Arm.CANDIDATE)
