"""The search: an Optuna study over slot options, seeded with baselines, under budget constraints.

Flow of one search (``autocompress search RUN --budget ... --trials N``):

1. read ``RUN/profile.json``, load its model, build the slots of the search space, price every
   option (:class:`~autocompress.search.cost.CostModel`) and refuse an infeasible budget;
2. create the study on ``--storage`` (default ``sqlite:///RUN/study.db``) and enqueue the
   baselines as its first trials: the best-predicted uniform choices that fit, the exact
   knapsack and the greedy allocation under the additive model (and ``--warm-start`` schedules);
3. each worker asks the study for trials: the additive prediction and its learned correction
   cost microseconds; promising feasible candidates (and every baseline) are measured for real
   on held-aside calibration windows by swapping cached compressed blocks, with intermediate KL
   reported so the pruner stops hopeless ones; budgets are ``trial.set_constraint`` values;
4. the best *measured* feasible trial becomes ``RUN/schedule.json``; every trial goes to
   ``RUN/search.json``. Baselines are measured, so the result is never worse than them.

``--trials N`` is the total of finished (complete or pruned) trials of the study, whoever
ran them: a resumed study runs what is missing, and several workers on one storage stop
together at exactly N.
"""
from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .budget import Budget
from .decisions import Slot, build_slots, to_schedule
from .objective import AdditivePredictor, Correction
from .result import SearchResult, TrialRecord

BASELINE_SOURCES = ("uniform:", "knapsack", "greedy")


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search needs besides the run directory's artifacts.

    ``trials`` is the study's total of finished trials. ``measure`` caps real evaluations
    (default: an eighth of the trials plus eight; baselines are always measured). ``holdout_tokens`` of the
    calibration split, after the profile's own tokens, are the measuring slice; Wanda and GPTQ
    statistics use the first ``calibration_tokens`` (default: the profile's own tokens), so
    what is measured never informed what is compressed.
    """

    run_dir: str
    budget: tuple[str, ...]
    trials: int = 200
    space: str | None = None
    storage: str | None = None
    study_name: str | None = None
    resume: bool = False
    pareto: bool = False
    workers: int = 1
    seed: int = 0
    holdout_tokens: int = 1024
    window: int = 256
    calibration_tokens: int | None = None
    measure: int | None = None
    uniform_baselines: int = 4
    prune_factor: float = 1.5
    promising_slack: float = 0.25
    warm_start: str | None = None
    device: str = "h100"
    batch: int = 1
    context: int = 512
    measure_latency: bool | None = None
    progress: bool = True
    finalize: bool = True
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------
# Storage


def storage_url(settings: SearchSettings) -> str:
    """The storage URL: ``--storage`` or ``sqlite:///RUN/study.db``."""
    return settings.storage or f"sqlite:///{Path(settings.run_dir).resolve() / 'study.db'}"


def open_storage(url: str):
    """An Optuna storage: a journal file for paths ending ``.journal``/``.log``, an RDB URL otherwise."""
    import optuna  # noqa: PLC0415

    if "://" not in url:
        if not url.endswith((".journal", ".log")):
            raise UserError(f"storage {url!r}: give an RDB URL (sqlite:///path.db, postgresql://...) "
                            f"or a journal file ending in .journal")
        from optuna.storages.journal import JournalFileBackend  # noqa: PLC0415

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        if url.startswith("sqlite"):
            _fast_sqlite(storage.engine)
        return storage
    except (ImportError, ModuleNotFoundError) as exc:
        raise UserError(f"storage {url!r} needs a database driver that is not installed ({exc})") from None
    except Exception as exc:  # SQLAlchemy's errors for bad URLs and unreachable servers
        raise UserError(f"cannot open storage {url!r}: {str(exc).splitlines()[0]}") from None


def _fast_sqlite(engine) -> None:
    """WAL journal, fsync at checkpoints only: a commit still survives a killed process (SIGKILL),
    only an operating-system crash could lose the last trials; readers no longer block the writer."""
    from sqlalchemy import event  # noqa: PLC0415

    def pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()


def default_study_name(space: str, budget: Budget, pareto: bool) -> str:
    """``space:budget-specs[:pareto]``, so different budgets in one run directory do not collide."""
    return f"{space}:{','.join(budget.specs)}{':pareto' if pareto else ''}"


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


HEARTBEAT_SECONDS = 15.0


def fail_dead_trials(study) -> int:
    """Mark RUNNING trials whose worker is gone as FAIL: at once for a dead process on this host
    (a SIGKILLed run), after four missed heartbeats for a worker on another machine."""
    from optuna.trial import TrialState  # noqa: PLC0415

    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit():
            beat = trial.user_attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else None)
            if beat is not None and time.time() - beat > 4 * HEARTBEAT_SECONDS:
                failed += bool(study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            failed += 1
    return failed


class Heartbeat:
    """Writes the time into a running trial's ``heartbeat`` attribute every few seconds."""

    def __init__(self, trial):
        import threading  # noqa: PLC0415

        self.trial, self.stop = trial, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # noqa: BLE001 (the trial finished in between; nothing to keep alive)
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


# ---------------------------------------------------------------------------------------
# Preparation


@dataclass
class Context:
    """What every worker shares: model, slots, budget, cost tables, predictor, evaluator."""

    settings: SearchSettings
    profile: Any
    model: Any
    model_name: str
    fingerprint: str
    space: Any
    slots: list[Slot]
    budget: Budget
    base: np.ndarray
    tables: list[np.ndarray]
    values: list[np.ndarray]
    predictor: AdditivePredictor
    holdout: Any
    calibration: Any
    holdout_meta: dict
    _evaluator: Any = None

    @property
    def evaluator(self):
        """The block-swapping evaluator (built on first use: it runs the original model once)."""
        if self._evaluator is None:
            from .measure import SwapEvaluator  # noqa: PLC0415

            self._evaluator = SwapEvaluator(self.model, self.slots, self.holdout, self.calibration)
        return self._evaluator

    def index_picks(self, picks: dict[str, str]) -> list[int]:
        """Option indices of label picks."""
        return [[o.label for o in slot.options].index(picks[slot.name]) for slot in self.slots]

    def label_picks(self, indices: list[int]) -> dict[str, str]:
        """Label picks of option indices."""
        return {slot.name: slot.options[i].label for slot, i in zip(self.slots, indices)}

    def figures(self, picks: dict[str, str]) -> dict[str, float]:
        """Budget figures of the picks from the additive cost tables (exact: costs are additive)."""
        raw = self.base + sum(table[i] for table, i in zip(self.tables, self.index_picks(picks)))
        return self.budget.cost.to_figures(raw)


def profile_data_spec(profile) -> str:
    """The data spec a profile was measured on (``"stdlib-docs (calibration)"`` names the split too)."""
    return re.sub(r" \((calibration|evaluation)\)$", "", profile.data)


def prepare(settings: SearchSettings, *, model=None, tokenizer=None, holdout=None, calibration=None) -> Context:
    """Read the profile, load model and tokens, build slots and prices; refuse infeasible budgets."""
    import torch  # noqa: PLC0415

    from ..compress.memory import MemoryModel  # noqa: PLC0415
    from ..data import load_tokens  # noqa: PLC0415
    from ..evaluate import windows  # noqa: PLC0415
    from ..models import load_model, model_fingerprint  # noqa: PLC0415
    from ..profile.artifact import Profile  # noqa: PLC0415
    from .cost import CostModel  # noqa: PLC0415
    from .space import load_space  # noqa: PLC0415

    run = Path(settings.run_dir)
    profile_path = run / "profile.json"
    if not profile_path.exists():
        raise UserError(f"{profile_path} not found; run `autocompress profile MODEL --out {run}` first")
    profile = Profile.load(profile_path)
    if model is None:
        loaded = load_model(profile.model)
        model, tokenizer = loaded.model, loaded.tokenizer
    fingerprint = model_fingerprint(model)
    profile.check_matches(fingerprint, path=profile_path)
    space = load_space(settings.space or profile.space)
    if space.granularity.value != profile.granularity:
        raise UserError(f"search space {space.name!r} is {space.granularity.value}-grained but {profile_path} "
                        f"profiled {profile.granularity} units; use a {profile.granularity} space or re-profile")
    slots = build_slots(space, model)
    if not slots:
        raise UserError(f"search space {space.name!r} freezes every unit: nothing to search")
    memory = MemoryModel.from_model(model)
    cost = CostModel(memory, device=settings.device, batch=settings.batch, context=settings.context,
                     measure=settings.measure_latency)
    budget = Budget.parse(list(settings.budget), memory, cost, measure_latency=settings.measure_latency)
    base, tables = budget.cost.slot_costs(slots)
    budget.check_feasible(base, tables)
    predictor = AdditivePredictor(slots, profile)
    data = profile_data_spec(profile)
    holdout_meta = {"data": data, "split": "calibration", "start": profile.calibration_tokens,
                    "tokens": settings.holdout_tokens, "window": settings.window}
    if holdout is None:
        stream = load_tokens(data, tokenizer, "calibration", settings.holdout_tokens,
                             start=profile.calibration_tokens)
        holdout = stream.tokens
    if holdout.dim() == 1:
        holdout = windows(holdout, settings.window)
    if calibration is None and tokenizer is not None:
        count = min(settings.calibration_tokens or profile.calibration_tokens, profile.calibration_tokens)
        stream = load_tokens(data, tokenizer, "calibration", max(count, settings.window))
        calibration = windows(stream.tokens, settings.window)
    if calibration is not None and calibration.dim() == 1:
        calibration = windows(calibration, settings.window)
    holdout_meta["tokens"] = int(holdout.numel())
    torch.manual_seed(settings.seed)
    return Context(settings, profile, model, profile.model, fingerprint, space, slots, budget, base, tables,
                   predictor.option_values(), predictor, holdout, calibration, holdout_meta)


# ---------------------------------------------------------------------------------------
# Baselines


def baseline_picks(ctx: Context) -> list[tuple[list[str], dict[str, str]]]:
    """(sources, picks) of the baselines: best-predicted uniform fits, knapsack, greedy; equal picks merged."""
    from . import baselines  # noqa: PLC0415

    limits = ctx.budget.raw_limits() - ctx.base
    labels = [o.label for o in ctx.slots[0].options]
    same_options = all([o.label for o in s.options] == labels for s in ctx.slots)
    out: list[tuple[str, dict[str, str]]] = []
    if same_options:
        # Dropping every block is no model; a uniform "drop" is never a baseline.
        fitting = [o for o in baselines.uniform(len(labels), ctx.tables, limits) if labels[o] != "drop"]
        fitting.sort(key=lambda o: sum(v[o] for v in ctx.values))
        out += [(f"uniform:{labels[o]}", ctx.label_picks([o] * len(ctx.slots)))
                for o in fitting[: ctx.settings.uniform_baselines]]
    for name, picks in (("knapsack", baselines.knapsack_multi(ctx.values, ctx.tables, limits)),
                        ("greedy", baselines.greedy(ctx.values, ctx.tables, limits))):
        if picks is not None:
            out.append((name, ctx.label_picks(picks)))
    unique: dict[tuple, tuple[list[str], dict[str, str]]] = {}
    for source, picks in out:
        unique.setdefault(tuple(sorted(picks.items())), ([], picks))[0].append(source)
    return [(sources, picks) for sources, picks in unique.values()]


def warm_start_picks(ctx: Context) -> tuple[list[dict[str, str]], list[str]]:
    """Picks from ``--warm-start`` schedules (the transfer module), and notes on what was skipped."""
    try:
        from ..transfer import warm_start_schedules  # noqa: PLC0415
    except ImportError:
        raise UserError("--warm-start needs autocompress.transfer, which this installation lacks") from None
    schedules = warm_start_schedules(ctx.settings.warm_start, ctx.model, ctx.space, ctx.budget, profile=ctx.profile)
    from ..schedule import Choice  # noqa: PLC0415

    picks_list, notes = [], []
    for number, schedule in enumerate(schedules):
        picks = {}
        for slot in ctx.slots:
            wanted = schedule.units.get(slot.members[0], Choice())
            match = next((o.label for o in slot.options if o.choice == wanted
                          or (wanted == Choice() and o.label == "bits=16")), None)
            if match is None:
                break
            picks[slot.name] = match
        if len(picks) == len(ctx.slots):
            picks_list.append(picks)
        else:
            notes.append(f"warm-start schedule {number} uses choices outside this space; skipped")
    return picks_list, notes


# ---------------------------------------------------------------------------------------
# The study


def _sampler(settings: SearchSettings, worker: int):
    import optuna  # noqa: PLC0415

    seed = settings.seed + 1000 * worker + os.getpid() % 1000 if worker else settings.seed
    if settings.pareto:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)


def hopeless_pruner(factor: float):
    """An Optuna pruner: stop a measurement whose running KL exceeds ``factor`` times the best
    finished trial's running KL at the same step (those trials are hopeless, not just unlucky)."""
    import optuna  # noqa: PLC0415
    from optuna.trial import TrialState  # noqa: PLC0415

    class HopelessPruner(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:  # noqa: D102 (Optuna's hook)
            step = trial.last_step
            if step is None:
                return False
            best = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if step in t.intermediate_values]
            return bool(best) and trial.intermediate_values[step] > factor * min(best)

    return HopelessPruner()


def open_study(ctx: Context, *, create: bool):
    """Create (refusing an existing one without ``--resume``) or load the study; returns it."""
    import optuna  # noqa: PLC0415

    settings = ctx.settings
    url = storage_url(settings)
    storage = open_storage(url)
    name = settings.study_name or default_study_name(ctx.space.name, ctx.budget, settings.pareto)
    exists = name in {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if exists and not settings.resume:
        raise UserError(f"study {name!r} already exists in {url}; pass --resume to continue it, "
                        f"or give another --study-name")
    pruner = hopeless_pruner(settings.prune_factor) if not settings.pareto else optuna.pruners.NopPruner()
    directions = ["minimize", "minimize", "minimize"] if settings.pareto else ["minimize"]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True,
                                sampler=_sampler(settings, 0 if create else 1), pruner=pruner)
    stamp = {"budget": list(ctx.budget.specs), "space": ctx.space.name, "pareto": settings.pareto,
             "fingerprint": ctx.fingerprint}
    if exists:
        known = study.user_attrs.get("settings")
        if known is not None and known != stamp:
            raise UserError(f"study {name!r} was made with {known}, not {stamp}; give another --study-name")
    else:
        study.set_user_attr("settings", stamp)
    return study, url, name


def enqueue_baselines(ctx: Context, study) -> list[str]:
    """Enqueue baselines (and warm starts) as the study's first trials; returns notes."""
    notes = []
    for sources, picks in baseline_picks(ctx):
        study.enqueue_trial(picks, user_attrs={"source": sources[0], "also": sources[1:], "measure": True})
    if ctx.settings.warm_start:
        picks_list, skipped = warm_start_picks(ctx)
        notes += skipped
        for picks in picks_list:
            study.enqueue_trial(picks, user_attrs={"source": "warm-start", "measure": True})
    return notes


def _finished(study) -> int:
    from optuna.trial import TrialState  # noqa: PLC0415

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_worker(ctx: Context, study, *, progress=None) -> int:
    """Ask/evaluate/tell until the study holds ``trials`` finished trials; returns how many this worker ran."""
    from optuna.trial import TrialState  # noqa: PLC0415

    settings = ctx.settings
    correction = Correction(ctx.slots)
    rng = np.random.default_rng(settings.seed + os.getpid())
    ran = 0
    labels = {slot.name: [o.label for o in slot.options] for slot in ctx.slots}
    while True:
        fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        active = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
        if sum(t.state is not TrialState.RUNNING for t in active) >= settings.trials:
            return ran
        if len(active) >= settings.trials:
            time.sleep(0.2)  # the last trials are running elsewhere; wait for them to finish or die
            continue
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        # Two trials in three are local moves around the best measured trial, the third is TPE's.
        if not waiting and not settings.pareto and len(trials) % 3 != 0:
            local_move(ctx, study, correction, rng)
        trial = study.ask()
        trial.set_user_attr("worker", _worker_id())
        ahead = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                          TrialState.RUNNING))
                    if t.number < trial.number)
        if ahead >= settings.trials:  # another worker took the last slot at the same moment
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return ran
        with Heartbeat(trial):
            state, values = _evaluate_trial(ctx, study, trial, correction, labels)
        study.tell(trial, values if state is TrialState.COMPLETE else None, state=state)
        ran += 1
        if progress is not None:
            progress()


def local_move(ctx: Context, study, correction: Correction, rng, candidates: int = 400) -> bool:
    """Enqueue the most promising untried feasible neighbour of the best measured trial (source ``local``).

    Neighbours change one to three slots; the learned correction (the additive model until it
    is fitted) ranks them. This is where measured interactions, which the additive model and
    hence the knapsack cannot see, get exploited. Returns whether a trial was enqueued.
    """
    from optuna.trial import TrialState  # noqa: PLC0415

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    measured = [t for t in done if t.user_attrs.get("record", {}).get("measure_complete")
                and t.user_attrs["record"]["feasible"]]
    if not measured:
        return False
    best = min(measured, key=lambda t: t.user_attrs["record"]["measured_kl"])
    tried = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)}
    correction.fit(_measured_samples(study))
    start = ctx.index_picks(best.params)
    limits = ctx.budget.raw_limits()
    ranked = []
    for _ in range(candidates):
        picks = list(start)
        for slot in rng.choice(len(picks), size=int(rng.integers(1, min(3, len(picks)) + 1)), replace=False):
            picks[slot] = int(rng.integers(len(ctx.slots[slot].options)))
        raw = ctx.base + sum(table[i] for table, i in zip(ctx.tables, picks))
        if np.any(raw > limits + 1e-9 * np.abs(limits)):
            continue
        labels = ctx.label_picks(picks)
        if tuple(sorted(labels.items())) in tried:
            continue
        predicted = ctx.predictor.predict(labels)
        corrected = correction.predict(labels, predicted)
        ranked.append((corrected if corrected is not None else predicted, labels))
    if not ranked:
        return False
    study.enqueue_trial(min(ranked, key=lambda r: r[0])[1], user_attrs={"source": "local"})
    return True


def _measured_samples(study) -> list[tuple[dict, float, float]]:
    out, seen = [], set()
    for t in study.get_trials(deepcopy=False):
        record = t.user_attrs.get("record", {})
        key = tuple(sorted(t.params.items()))
        if record.get("measure_complete") and key not in seen:  # a re-used measurement is no new evidence
            seen.add(key)
            out.append((t.params, record["predicted_kl"], record["measured_kl"]))
    return out


def _evaluate_trial(ctx: Context, study, trial, correction: Correction, labels: dict):
    from optuna.trial import TrialState  # noqa: PLC0415

    from .measure import Pruned  # noqa: PLC0415

    settings = ctx.settings
    tick = time.perf_counter()
    picks = {slot.name: trial.suggest_categorical(slot.name, labels[slot.name]) for slot in ctx.slots}
    source = trial.user_attrs.get("source") or ("nsga2" if settings.pareto else "tpe")
    figures = ctx.figures(picks)
    violations = ctx.budget.violations_of(figures)
    for limit, value in zip(ctx.budget.limits, violations):
        trial.set_constraint(limit.kind, float(value))
    feasible = all(v <= 0 for v in violations)
    if all(label == "drop" for label in picks.values()) and len(ctx.slots) == len(ctx.budget.cost.memory.blocks):
        trial.set_constraint("keep-a-block", 1.0)  # a model with no block at all
        feasible = False
    predicted = ctx.predictor.predict(picks)
    samples = _measured_samples(study)
    correction.fit(samples)
    corrected = correction.predict(picks, predicted)
    # One user attribute per trial, written once at the end: each write is a storage commit.
    record = {"source": source, "predicted_kl": predicted, "corrected_kl": corrected, "feasible": feasible,
              "latency_source": ctx.budget.latency_source, **figures}
    estimate = corrected if corrected is not None else predicted

    measured = None
    previous = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.params == picks and t.user_attrs.get("record", {}).get("measure_complete")), None)
    if previous is not None:
        measured = {k: previous.user_attrs["record"][f"measured_{k}"] for k in ("kl", "loss", "ppl")}
        record["measured_from"] = previous.number
    elif feasible and _should_measure(ctx, study, trial, estimate, len(samples)):
        def report(step: int, kl: float) -> bool:
            if settings.pareto or trial.user_attrs.get("measure"):
                return False  # baselines are always measured to the end: the result is compared with them
            trial.report(kl, step)
            return trial.should_prune()

        try:
            measured = ctx.evaluator.measure(picks, report)
        except Pruned as stop:
            record.update(measured_kl=stop.kl, seconds=time.perf_counter() - tick)
            trial.set_user_attr("record", record)
            return TrialState.PRUNED, None
    if measured is not None:
        record.update({f"measured_{key}": value for key, value in measured.items()}, measure_complete=True)
    record["seconds"] = time.perf_counter() - tick
    trial.set_user_attr("record", record)
    kl = measured["kl"] if measured is not None else estimate
    if settings.pareto:
        return TrialState.COMPLETE, [kl, figures["memory_bytes"], figures["latency_ms"]]
    return TrialState.COMPLETE, [kl]


def _should_measure(ctx: Context, study, trial, estimate: float, measured_count: int) -> bool:
    settings = ctx.settings
    if trial.user_attrs.get("measure"):
        return True
    cap = settings.measure if settings.measure is not None else settings.trials // 8 + 8
    if measured_count >= cap:
        return False
    records = [t.user_attrs.get("record", {}) for t in study.get_trials(deepcopy=False)]
    best = min((r["measured_kl"] for r in records if r.get("measure_complete") and r.get("feasible")), default=None)
    return best is None or estimate <= best * (1.0 + settings.promising_slack)


# ---------------------------------------------------------------------------------------
# Result


def _records(ctx: Context, study) -> list[TrialRecord]:
    records = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs.get("record")
        if a is None:
            continue
        records.append(TrialRecord(
            number=t.number, source=a.get("source", "tpe"), choices=dict(t.params), predicted_kl=a["predicted_kl"],
            corrected_kl=a.get("corrected_kl"), measured_kl=a.get("measured_kl"), measured_loss=a.get("measured_loss"),
            measured_ppl=a.get("measured_ppl"), memory_bytes=int(a["memory_bytes"]), avg_bits=a["avg_bits"],
            params=int(a["params"]), latency_ms=a["latency_ms"], latency_source=a["latency_source"],
            feasible=bool(a["feasible"]), state=t.state.name, seconds=a.get("seconds", 0.0)))
    return records


def _pareto(records: list[TrialRecord]) -> list[int]:
    points = [(r.number, (r.measured_kl if r.measured_kl is not None else (r.corrected_kl or r.predicted_kl)),
               r.memory_bytes, r.latency_ms) for r in records if r.feasible and r.state == "COMPLETE"]
    front = []
    for n, *p in points:
        dominated = any(all(q[i] <= p[i] for i in range(3)) and any(q[i] < p[i] for i in range(3))
                        for _, *q in points)
        if not dominated:
            front.append(n)
    return sorted(front)


def collect(ctx: Context, study, url: str, name: str, notes: list[str], seconds: float) -> SearchResult:
    """Turn the study into a :class:`SearchResult` (best = lowest measured KL among feasible trials)."""
    records = _records(ctx, study)
    done = [r for r in records if r.state == "COMPLETE" and r.feasible]
    measured = [r for r in done if r.measured_kl is not None]
    if measured:
        best = min(measured, key=lambda r: (r.measured_kl, r.number))
    elif done:
        best = min(done, key=lambda r: (r.corrected_kl or r.predicted_kl, r.number))
        notes.append("no trial was measured; the best is chosen by predicted KL")
    else:
        best = None
        notes.append("no feasible trial finished")
    baselines = {}
    also = {t.number: t.user_attrs.get("also", []) for t in study.get_trials(deepcopy=False)}
    for r in records:
        for source in [r.source] + list(also.get(r.number, [])):
            if source.startswith(BASELINE_SOURCES) and r.state == "COMPLETE" and source not in baselines:
                    baselines[source] = {"trial": r.number, "measured_kl": r.measured_kl, "measured_ppl": r.measured_ppl,
                                     "predicted_kl": r.predicted_kl, "memory_bytes": r.memory_bytes,
                                     "avg_bits": r.avg_bits, "latency_ms": r.latency_ms}
    beat = best is not None and not best.source.startswith(BASELINE_SOURCES)
    if best is not None and not beat:
        notes.append(f"the search did not beat the best baseline: {best.source} (trial {best.number}) is kept")
    measured_base = [b["measured_kl"] for b in baselines.values() if b["measured_kl"] is not None]
    if best is not None and measured_base and best.measured_kl is not None:
        assert best.measured_kl <= min(measured_base) + 1e-12  # baselines are measured, so this holds by choice
    original = dict(ctx.evaluator.original_quality()) if measured else {}
    original.update(ctx.budget.original)
    correction = Correction(ctx.slots)
    correction.fit(_measured_samples(study))
    return SearchResult(
        model=ctx.model_name, model_fingerprint=ctx.fingerprint, budget=ctx.budget.to_json(), space=ctx.space.name,
        storage=url, study_name=name, objective="pareto" if ctx.settings.pareto else "kl",
        holdout=ctx.holdout_meta, original=original, trials=records, baselines=baselines,
        best=best.number if best else None, pareto=_pareto(records), beat_baselines=beat,
        correction=correction.to_json(), notes=notes, seconds=seconds)


def best_schedule(ctx: Context, result: SearchResult):
    """The best trial as a :class:`~autocompress.schedule.Schedule` with its figures in ``meta``."""
    best = result.trial(result.best)
    schedule = to_schedule(ctx.slots, best.choices, ctx.fingerprint)
    figures = ctx.budget.evaluate(schedule)
    meta = {"search": {"trial": best.number, "source": best.source, "study": result.study_name,
                       "storage": result.storage, "space": ctx.space.name, "budget": ctx.budget.to_json(),
                       "predicted_kl": best.predicted_kl, "corrected_kl": best.corrected_kl,
                       "measured_kl": best.measured_kl, "measured_ppl": best.measured_ppl,
                       "holdout": ctx.holdout_meta, **figures, "latency_source": ctx.budget.latency_source,
                       "pareto": result.pareto, "beat_baselines": result.beat_baselines}}
    schedule = to_schedule(ctx.slots, best.choices, ctx.fingerprint, meta)
    try:
        from ..transfer.coordinates import describe  # noqa: PLC0415
    except ImportError:
        result.notes.append("schedule.json has no model-agnostic coordinates (autocompress.transfer missing)")
        return schedule
    return describe(schedule, ctx.model, ctx.profile)


# ---------------------------------------------------------------------------------------
# Entry point


def worker_command(settings: SearchSettings) -> list[str]:
    """The command line of one extra worker process for ``settings`` (joins the same study)."""
    cmd = [sys.executable, "-m", "autocompress", "search", settings.run_dir, "--trials", str(settings.trials),
           "--resume", "--worker", "--storage", storage_url(settings), "--seed", str(settings.seed)]
    for spec in settings.budget:
        cmd += ["--budget", spec]
    options = {"--space": settings.space, "--study-name": settings.study_name, "--holdout-tokens": settings.holdout_tokens,
               "--window": settings.window, "--calibration-tokens": settings.calibration_tokens,
               "--measure": settings.measure, "--device": settings.device, "--batch": settings.batch,
               "--context": settings.context, "--threads": settings.threads}
    for flag, value in options.items():
        if value is not None:
            cmd += [flag, str(value)]
    if settings.pareto:
        cmd.append("--pareto")
    return cmd


def search(settings: SearchSettings, *, model=None, tokenizer=None, holdout=None, calibration=None) -> SearchResult:
    """Run (or resume, or join) a search; with ``finalize`` write ``search.json`` and ``schedule.json``.

    ``model``/``tokenizer``/``holdout``/``calibration`` override what the profile names (tests).

    Example::

        result = search(SearchSettings("runs/x", ("avg-bits=3.5",), trials=200))
        result.trial(result.best).measured_kl
    """
    from ..progress import progress_bar  # noqa: PLC0415

    start = time.perf_counter()
    if settings.trials < 1:
        raise UserError("--trials must be at least 1")
    ctx = prepare(settings, model=model, tokenizer=tokenizer, holdout=holdout, calibration=calibration)
    creating = settings.finalize
    study, url, name = open_study(ctx, create=creating)
    notes: list[str] = []
    if creating and not study.get_trials(deepcopy=False):
        notes += enqueue_baselines(ctx, study)
    children = []
    if settings.workers > 1:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        children = [subprocess.Popen(worker_command(settings), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE) for _ in range(settings.workers - 1)]
    already = _finished(study)
    with progress_bar(f"search {name}", settings.trials, settings.progress) as advance:
        advance(min(already, settings.trials))
        run_worker(ctx, study, progress=advance)
        for child in children:
            _, err = child.communicate()
            if child.returncode != 0:
                raise UserError(f"a search worker failed (exit {child.returncode}): "
                                f"{(err or b'').decode().strip().splitlines()[-1:] or ''}")
        # Other workers (other machines, other shells) may still be finishing the last trials.
        while _finished(study) < settings.trials and any(
                t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False)):
            time.sleep(0.5)
            fail_dead_trials(study)
    result = collect(ctx, study, url, name, notes, time.perf_counter() - start)
    if settings.finalize and result.best is not None:
        run = Path(settings.run_dir)
        schedule = best_schedule(ctx, result)
        schedule.save(run / "schedule.json")
        result.save(run / "search.json")
    return result


def result_table(result: SearchResult):
    """A rich table: the original, each baseline and the best trial, measured on the held-aside slice."""
    from rich.table import Table  # noqa: PLC0415

    from .budget import format_figure  # noqa: PLC0415

    source = result.budget.get("latency_source", "")
    table = Table(title=f"search {result.study_name} ({len(result.trials)} trials)",
                  caption=f"KL and ppl measured on held-aside calibration text; latency {source}")
    for column in ("what", "trial", "KL", "ppl", "KL pred.", "memory", "bits", "ms"):
        table.add_column(column, overflow="fold")
    if result.original:
        table.add_row("original", "-", "0", _fmt(result.original.get("ppl")), "0",
                      format_figure("memory_bytes", result.original["memory_bytes"]),
                      f"{result.original['avg_bits']:.2f}", f"{result.original['latency_ms']:.3g}")
    rows = [(name, b["trial"]) for name, b in result.baselines.items()]
    if result.best is not None:
        rows.append(("best", result.best))
    for what, number in rows:
        r = result.trial(number)
        table.add_row(what, str(number), _fmt(r.measured_kl), _fmt(r.measured_ppl), _fmt(r.predicted_kl),
                      format_figure("memory_bytes", r.memory_bytes), f"{r.avg_bits:.2f}", f"{r.latency_ms:.3g}")
    return table


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
