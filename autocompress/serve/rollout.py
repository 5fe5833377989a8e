"""The rollout's state as a fold over its events, and the policy's verdicts: no I/O, no clock.

:class:`Rollout` is rebuilt by applying every event of the log in order, so a restarted
server (``--resume``) is exactly where the killed one was. After each new event the server
asks :meth:`Rollout.verdict` whether the policy acts now: a ``failover`` event (a threshold
is crossed: the share drops to 0 at once) or a ``promote`` event (the stage has enough
evidence, all within thresholds). Admin actions become events through :func:`admin_event`.

Failover judges the most recent requests and scores (``window``, ``shadow_window``), so a
fault shows within a few requests; promotion judges everything seen in the stage. Latency
is compared on requests of the current stage only: both arms then served under the same
traffic split, so neither is judged against the other's load of another stage. (At 100%
the original serves nothing and latency is not judged; errors and shadow quality are.)
"""
from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UserError
from .policy import Policy
from .routing import Arm
from .stats import mean, quantile


class Status(str, enum.Enum):
    """Where the rollout stands."""

    RAMPING = "ramping"          # the policy promotes stage by stage
    PAUSED = "paused"            # an admin froze the share; failover still guards it
    COMPLETE = "complete"        # at the last stage; failover still guards it
    FAILED_OVER = "failed_over"  # a threshold was crossed: share 0 until an admin promotes
    ROLLED_BACK = "rolled_back"  # an admin set the share to 0


@dataclass(frozen=True)
class RequestSample:
    """One finished request as the policy sees it."""

    latency: float | None  # seconds; None for a failed request
    error: bool


@dataclass(frozen=True)
class ShadowSample:
    """One candidate completion scored by the original."""

    kl: float
    agreement: float


@dataclass
class Rollout:
    """Stage, share and status, plus the recent evidence the thresholds are judged on."""

    policy: Policy
    stage: int = 0
    status: Status = Status.RAMPING
    reason: str = ""
    recent: dict[Arm, deque] = field(default_factory=dict)
    latencies: dict[Arm, deque] = field(default_factory=dict)  # this stage's, most recent last
    shadow: deque = field(default_factory=deque)
    stage_requests: int = 0
    stage_errors: int = 0
    stage_kl: list[float] = field(default_factory=list)
    stage_agreement: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.recent = {arm: deque(maxlen=self.policy.window) for arm in Arm}
        self.latencies = {arm: deque(maxlen=self.policy.window) for arm in Arm}
        self.shadow = deque(maxlen=self.policy.shadow_window)
        if len(self.policy.stages) == 1:
            self.status = Status.COMPLETE

    @property
    def share(self) -> float:
        """Percent of unpinned traffic the candidate gets now."""
        if self.status in (Status.FAILED_OVER, Status.ROLLED_BACK):
            return 0.0
        return self.policy.stages[min(self.stage, len(self.policy.stages) - 1)]

    @property
    def last_stage(self) -> int:
        """Index of the final stage."""
        return len(self.policy.stages) - 1

    def apply(self, event: dict) -> None:
        """Fold one event into the state (events of kinds the rollout ignores are skipped)."""
        kind = event["type"]
        if kind == "request" and not event.get("aborted"):
            arm = Arm(event["arm"])
            self.recent[arm].append(RequestSample(event.get("latency"), bool(event.get("error"))))
            if event.get("latency") is not None:
                self.latencies[arm].append(event["latency"])
            if arm is Arm.CANDIDATE:
                self.stage_requests += 1
                self.stage_errors += bool(event.get("error"))
        elif kind == "shadow":
            self.shadow.append(ShadowSample(event["kl"], event["agreement"]))
            self.stage_kl.append(event["kl"])
            self.stage_agreement.append(event["agreement"])
        elif kind == "promote":
            if self.status in (Status.FAILED_OVER, Status.ROLLED_BACK):
                # a fresh start: the evidence that failed it must not fail it again at once
                self.recent[Arm.CANDIDATE].clear()
                self.shadow.clear()
            self.stage = event["stage"]
            self.status = Status.COMPLETE if self.stage >= self.last_stage else Status.RAMPING
            self.reason = event.get("reason", "")
            self._new_stage()
        elif kind == "failover":
            self.status, self.reason = Status.FAILED_OVER, event["reason"]
        elif kind == "rollback":
            self.status, self.reason = Status.ROLLED_BACK, event.get("reason", "rolled back by an admin")
        elif kind == "pause":
            if event["paused"] and self.status is Status.RAMPING:
                self.status = Status.PAUSED
            elif not event["paused"] and self.status is Status.PAUSED:
                self.status = Status.RAMPING

    def _new_stage(self) -> None:
        for window in self.latencies.values():
            window.clear()
        self.stage_requests = self.stage_errors = 0
        self.stage_kl, self.stage_agreement = [], []

    def breach(self, inflight: Sequence[float] = ()) -> str | None:
        """The first threshold the recent evidence crosses, as a sentence; None when all hold.

        ``inflight`` are the ages (seconds) of the candidate's unfinished requests: each is a
        lower bound on that request's latency, so they count towards the candidate's p95 (a
        candidate that hangs would otherwise never finish a request to be judged by).
        """
        p, t = self.policy, self.policy.thresholds
        candidate = self.recent[Arm.CANDIDATE]
        if len(candidate) >= max(p.min_samples, 1):
            rate = sum(s.error for s in candidate) / len(candidate)
            if rate > t.error_rate:
                return f"error rate {rate:.2f} > {t.error_rate:g} over the last {len(candidate)} candidate requests"
        mine = [*self.latencies[Arm.CANDIDATE], *inflight]
        theirs = list(self.latencies[Arm.ORIGINAL])
        if len(mine) >= max(p.min_samples, 1) and len(theirs) >= max(p.min_samples, 1):
            ours, base = quantile(mine, 0.95), quantile(theirs, 0.95)
            if ours > t.latency * base:
                return (f"candidate p95 latency {ours * 1000:.0f} ms > {t.latency:g} x original's "
                        f"{base * 1000:.0f} ms over the last {len(mine)} requests"
                        + (f" ({len(inflight)} still running)" if inflight else ""))
        if len(self.shadow) >= max(p.min_shadow_samples, 1):
            agreement = mean(s.agreement for s in self.shadow)
            if agreement < t.agreement:
                return f"shadow agreement {agreement:.3f} < {t.agreement:g} over the last {len(self.shadow)} scores"
            kl = mean(s.kl for s in self.shadow)
            if kl > t.kl:
                return f"shadow KL {kl:.3f} > {t.kl:g} nats over the last {len(self.shadow)} scores"
        return None

    def promotable(self) -> bool:
        """Whether the current stage holds enough evidence, all of it within the thresholds."""
        p, t = self.policy, self.policy.thresholds
        if self.status is not Status.RAMPING or self.stage >= self.last_stage:
            return False
        if self.stage_requests < p.min_requests or len(self.stage_kl) < p.min_shadow:
            return False
        if self.stage_requests and self.stage_errors / self.stage_requests > t.error_rate:
            return False
        if self.stage_kl and (mean(self.stage_kl) > t.kl or mean(self.stage_agreement) < t.agreement):
            return False
        return True

    def verdict(self, inflight: Sequence[float] = ()) -> dict | None:
        """The event the policy makes now (``failover`` or ``promote``), or None (see :meth:`breach`)."""
        if self.status in (Status.FAILED_OVER, Status.ROLLED_BACK):
            return None
        reason = self.breach(inflight)
        if reason is not None:
            return {"type": "failover", "by": "policy", "stage": self.stage, "reason": reason}
        if self.promotable():
            stage = self.stage + 1
            return {"type": "promote", "by": "policy", "stage": stage, "share": self.policy.stages[stage],
                    "reason": (f"stage {self.stage} ({self.share:g}%) passed: {self.stage_requests} candidate "
                               f"requests, {len(self.stage_kl)} shadow scores within thresholds")}
        return None

    def snapshot(self) -> dict:
        """The state as plain JSON (for ``/admin`` answers and the dashboard)."""
        return {"stage": self.stage, "stages": list(self.policy.stages), "share": self.share,
                "status": self.status.value, "reason": self.reason, "stage_requests": self.stage_requests,
                "stage_shadow": len(self.stage_kl)}


def admin_event(rollout: Rollout, action: str, body: dict | None = None) -> dict:
    """The event an admin ``action`` (promote, rollback, pause) makes; UserError when it cannot apply.

    ``promote`` moves to the next stage (``{"stage": N}`` picks one); after a failover or a
    rollback it starts again at the first stage. ``pause`` freezes the share
    (``{"paused": false}`` lifts the pause).
    """
    body = body or {}
    if action == "promote":
        if rollout.status in (Status.FAILED_OVER, Status.ROLLED_BACK):
            stage = 0
        else:
            stage = rollout.stage + 1
        if "stage" in body:
            stage = body["stage"]
            if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= rollout.last_stage:
                raise UserError(f"stage must be an integer from 0 to {rollout.last_stage}, got {stage!r}")
        if stage > rollout.last_stage:
            raise UserError(f"already at the last stage ({rollout.share:g}%)")
        return {"type": "promote", "by": "admin", "stage": stage, "share": rollout.policy.stages[stage],
                "reason": "promoted by an admin"}
    if action == "rollback":
        return {"type": "rollback", "by": "admin", "reason": "rolled back by an admin"}
    if action == "pause":
        paused = body.get("paused", True)
        if not isinstance(paused, bool):
            raise UserError(f"paused must be true or false, got {paused!r}")
        return {"type": "pause", "by": "admin", "paused": paused}
    raise UserError(f"unknown admin action {action!r}")
