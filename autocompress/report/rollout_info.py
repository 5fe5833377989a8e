"""A canary rollout served by ``autocompress serve``, as plain data for the report.

``serve`` logs every request, shadow score, promotion, failover, rollback and pause to
``RUN/serve/events.jsonl`` (the default ``--out`` for a candidate in ``RUN/model``). The
report folds that log with the server's own folds, :class:`~autocompress.serve.monitor.Monitor`
and :class:`~autocompress.serve.rollout.Rollout`, so its numbers are the dashboard's: the
share over time, the monitors of each stage (one fresh Monitor per stage), and every
change of share with its reason. A damaged line is skipped and named, never fatal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..serve.events import FILENAME, scan_events
from ..serve.monitor import Monitor
from ..serve.policy import policy_from_dict
from ..serve.rollout import Rollout
from ..serve.routing import Arm

LOG = Path("serve") / FILENAME
CHANGES = ("promote", "failover", "rollback", "pause")
# a new stage begins where the share may change; a pause freezes the share, so it does not
STAGE_OPENERS = ("start", "promote", "failover", "rollback")


@dataclass
class Change:
    """A promotion, failover, rollback or pause: when (seconds into the log), by whom, the share after, why."""

    t: float
    kind: str
    by: str
    share: float
    reason: str


@dataclass
class Stage:
    """One stretch of constant share: its monitors per arm (``ArmMonitor.summary``) and shadow summary."""

    number: int
    share: float
    start: float
    end: float
    opened_by: str
    arms: dict[str, dict] = field(default_factory=dict)
    shadow: dict = field(default_factory=dict)


@dataclass
class RolloutInfo:
    """The whole log folded: share steps, stages, changes, final state, and the lines that could not be used."""

    path: Path
    began: float | None = None
    original: str = "-"
    candidate: str = "-"
    share_t: list[float] = field(default_factory=list)
    share: list[float] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    status: str | None = None
    reason: str = ""
    events: int = 0
    problems: list[str] = field(default_factory=list)


def rollout_log(run_dir: Path) -> Path | None:
    """``RUN/serve/events.jsonl`` when it exists, else None (the report then has no rollout section)."""
    path = Path(run_dir) / LOG
    return path if path.is_file() else None


def rollout_info(path: Path) -> RolloutInfo:
    """Fold the event log at ``path``; unreadable or damaged lines end up in ``problems``."""
    info = RolloutInfo(path)
    try:
        events, info.problems = scan_events(path)
    except UserError as exc:
        info.problems.append(str(exc))
        return info
    whole, rollout, stage = Monitor(), None, None
    monitors: list[Monitor] = []  # one per stage, fresh, so each stage's numbers are its own
    for number, event in enumerate(events, 1):
        try:
            t = float(event["t"])
            kind = event["type"]
            if info.began is None:
                info.began = t
            if kind == "start" and rollout is None:
                info.original, info.candidate = str(event.get("original", "-")), str(event.get("candidate", "-"))
                rollout = _rollout(event, info)
            whole.apply(event)
            if rollout is not None:
                rollout.apply(event)
            if stage is None or (kind in STAGE_OPENERS and not (kind == "start" and whole.share == stage.share)):
                stage = _open_stage(info, event, whole.share, t, rollout)
                monitors.append(Monitor(bucket_s=3600.0, share=whole.share))
            monitors[-1].apply(event)
            stage.end = t - info.began
            if kind in CHANGES:
                text = event.get("reason") or ("paused" if event.get("paused") else "pause lifted")
                info.changes.append(Change(t - info.began, kind, str(event.get("by", "-")), whole.share, str(text)))
        except (KeyError, TypeError, ValueError) as exc:
            info.problems.append(f"{path}, readable event {number} ({event.get('type')}): missing or wrong "
                                 f"field {exc!s}; left out")
        info.events += 1
    for t, share in whole.shares:
        info.share_t.append(t - info.began)
        info.share.append(share)
    if info.share and info.stages:
        info.share_t.append(info.stages[-1].end)  # drawn on to the last event
        info.share.append(info.share[-1])
    for current, monitor in zip(info.stages, monitors):
        current.arms = {arm.value: monitor.arms[arm].summary() for arm in Arm}
        current.shadow = monitor.shadow_summary()
    if rollout is not None:
        info.status, info.reason = rollout.status.value, rollout.reason
    return info


def _rollout(start: dict, info: RolloutInfo) -> Rollout | None:
    try:
        return Rollout(policy_from_dict(start.get("policy"), "the policy in the event log"))
    except UserError as exc:
        info.problems.append(f"{exc}; the final status is not shown")
        return None


def _open_stage(info: RolloutInfo, event: dict, share: float, t: float, rollout: Rollout | None) -> Stage:
    kind = event["type"]
    opened = {"start": "resumed" if event.get("resumed") else "started", "promote": "promoted",
              "failover": "failed over", "rollback": "rolled back"}.get(kind, kind)
    if rollout is not None and kind in ("start", "promote"):
        opened += f" (policy stage {rollout.stage})"
    stage = Stage(len(info.stages) + 1, share, t - info.began, t - info.began, opened)
    info.stages.append(stage)
    return stage


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _at(seconds: float) -> str:
    return f"{seconds:.1f} s"


def summary_rows(info: RolloutInfo) -> list[tuple[str, str]]:
    """Models, log, event count and where the rollout stands at the end of the log."""
    rows = [("original model", info.original), ("candidate model", info.candidate), ("event log", str(info.path)),
            ("events", f"{info.events}, over {_at(info.stages[-1].end) if info.stages else '0 s'}")]
    if info.status is not None:
        rows.append(("status at the end", info.status.replace("_", " ") + (f": {info.reason}" if info.reason else "")))
    return rows


def stage_rows(info: RolloutInfo) -> list[tuple]:
    """Per stage and arm: requests, errors, aborted, latency p50/p95, TTFT p50/p95, tokens/s."""
    rows = []
    for stage in info.stages:
        for arm, s in stage.arms.items():
            rows.append((stage.number, f"{stage.share:g}%", f"{_at(stage.start)} to {_at(stage.end)}",
                         stage.opened_by, arm, s["requests"], s["errors"], s["aborted"],
                         _ms(s["latency_p50"]), _ms(s["latency_p95"]), _ms(s["ttft_p50"]), _ms(s["ttft_p95"]),
                         "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}"))
    return rows


STAGE_HEADER = ["#", "share", "time", "began", "arm", "requests", "errors", "aborted", "latency p50",
                "latency p95", "TTFT p50", "TTFT p95", "tokens/s"]
SHADOW_HEADER = ["#", "share", "shadow scores", "dropped", "mean KL (nats)", "top-1 agreement",
                 "candidate log-prob"]
CHANGE_HEADER = ["time", "event", "by", "share after", "reason"]


def shadow_rows(info: RolloutInfo) -> list[tuple]:
    """Per stage: the candidate's completions scored by the original (means per token)."""
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    return [(stage.number, f"{stage.share:g}%", stage.shadow["scores"], stage.shadow["dropped"],
             number(stage.shadow["kl"], 4), number(stage.shadow["agreement"], 3), number(stage.shadow["logprob"], 3))
            for stage in info.stages]


def change_rows(info: RolloutInfo) -> list[tuple]:
    """Every promotion, failover, rollback and pause, in order, with its reason."""
    return [(_at(c.t), c.kind, c.by, f"{c.share:g}%", c.reason) for c in info.changes]
