"""The search: an Optuna study over slot options, seeded with baselines, under budget constraints.

Flow of one search (``autocompress search RUN --budget ... --trials N``):

1. read ``RUN/profile.json``, load its model, build the slots of the search space, price every
   option (:class:`~autocompress.search.cost.CostModel`) and refuse an infeasible budget;
2. create the study on ``--storage`` (default ``sqlite:///RUN/study.db``) and enqueue its
   first trials: the ``--warm-start`` schedules (a transfer and its neighbours), then the
   baselines: the best-predicted uniform choices that fit, the exact knapsack and the greedy
   allocation under the additive model;
3. each worker asks the study for trials (TPE, or NSGA-II with ``--pareto``; in single-objective
   searches two trials in three are local moves around the best measured trial, enqueued
   by :func:`~autocompress.search.proposals.local_move`): the additive prediction and its
   learned correction cost microseconds; promising feasible candidates (and every baseline) are measured for real
   on held-aside calibration windows by swapping cached compressed blocks, with intermediate KL
   reported so the pruner stops hopeless ones; budgets are ``trial.set_constraint`` values;
4. the best *measured* feasible trial becomes ``RUN/schedule.json``; every trial goes to
   ``RUN/search.json``. Baselines are measured, so the result is never worse than them.

``--trials N`` is the total of finished (complete or pruned) trials of the study, whoever
ran them: a resumed study runs what is missing, and several workers on one storage stop
together at exactly N.
"""
from __future__ import annotations

import os
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
from .collect import BASELINE_SOURCES, _measured_samples, best_schedule, collect, result_table  # noqa: F401
from .decisions import Slot, build_slots
from .objective import AdditivePredictor, Correction
from .proposals import baseline_picks, local_move, warm_start_picks  # noqa: F401
from .result import SearchResult
from .storage import Heartbeat, _worker_id, default_study_name, fail_dead_trials, open_storage, storage_url



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
    device: str = "h100"  # the latency device
    model_device: str = "auto"  # where the model runs (--device), as given: workers resolve it the same way
    model_dtype: str = "auto"  # --dtype, as given
    batch: int = 1
    context: int = 512
    measure_latency: bool | None = None
    progress: bool = True
    finalize: bool = True
    threads: int | None = None
    cache_mib: int | None = None  # memory for compressed blocks and statistics (default: half the 16-bit model)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

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
    code_cache: Any = None
    _evaluator: Any = None

    @property
    def evaluator(self):
        """The block-swapping evaluator (built on first use: it runs the original model once)."""
        if self._evaluator is None:
            from .measure import SwapEvaluator  # noqa: PLC0415

            mib = self.settings.cache_mib
            self._evaluator = SwapEvaluator(self.model, self.slots, self.holdout, self.calibration,
                                            code_cache=self.code_cache, max_bytes=None if mib is None else mib << 20)
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


def prepare(settings: SearchSettings, *, model=None, tokenizer=None, holdout=None, calibration=None) -> Context:
    """Read the profile, load model and tokens, build slots and prices; refuse infeasible budgets."""
    import torch  # noqa: PLC0415

    from ..compress.code_cache import CodeCache  # noqa: PLC0415
    from ..compress.memory import MemoryModel  # noqa: PLC0415
    from ..data import bos_id, load_tokens  # noqa: PLC0415
    from ..evaluate import windows  # noqa: PLC0415
    from ..models import load_model, model_fingerprint  # noqa: PLC0415
    from ..profile.artifact import Profile  # noqa: PLC0415
    from ..run_calibration import load_calibration  # noqa: PLC0415
    from .cost import CostModel  # noqa: PLC0415
    from .space import check_space_measured, load_space  # noqa: PLC0415

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
    check_space_measured(space, profile, profile_path)
    predictor = AdditivePredictor(slots, profile)
    data = profile.data
    run_calibration = load_calibration(run, profile.meta.get("calibration", {}).get("fingerprint"))
    start = max(profile.calibration_tokens, run_calibration.span if run_calibration is not None else 0)
    holdout_meta = {"data": data, "split": "calibration", "start": start,
                    "tokens": settings.holdout_tokens, "window": settings.window}
    bos = bos_id(tokenizer)  # every window starts with BOS when the tokenizer adds one
    if holdout is None:
        stream = load_tokens(data, tokenizer, "calibration", settings.holdout_tokens, start=start)
        holdout = stream.tokens
    if holdout.dim() == 1:
        holdout = windows(holdout, settings.window, bos)
    code_cache = None
    if calibration is None and run_calibration is not None:
        calibration = run_calibration.rows
        code_cache = CodeCache.for_run(run, fingerprint, calibration)
    if calibration is None and tokenizer is not None:
        count = min(settings.calibration_tokens or profile.calibration_tokens, profile.calibration_tokens)
        stream = load_tokens(data, tokenizer, "calibration", max(count, settings.window))
        calibration = windows(stream.tokens, settings.window, bos)
    if calibration is not None and calibration.dim() == 1:
        calibration = windows(calibration, settings.window, bos)
    holdout_meta["tokens"] = int(holdout.numel()) - (holdout.shape[0] if bos is not None else 0)  # text tokens
    torch.manual_seed(settings.seed)
    return Context(settings, profile, model, profile.model, fingerprint, space, slots, budget, base, tables,
                   predictor.option_values(), predictor, holdout, calibration, holdout_meta, code_cache)


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
    """Enqueue ``--warm-start`` schedules, then the baselines, as the study's first trials; returns notes."""
    notes = []
    if ctx.settings.warm_start:
        picks_list, skipped = warm_start_picks(ctx)
        notes += skipped
        for picks in picks_list:
            study.enqueue_trial(picks, user_attrs={"source": "warm-start", "measure": True})
    for sources, picks in baseline_picks(ctx):
        study.enqueue_trial(picks, user_attrs={"source": sources[0], "also": sources[1:], "measure": True})
    return notes


def _finished(study) -> int:
    from optuna.trial import TrialState  # noqa: PLC0415

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_worker(ctx: Context, study, *, progress=None) -> int:
    """Ask/evaluate/tell until the study holds ``trials`` finished trials; returns how many this worker ran."""
    from optuna.trial import TrialState  # noqa: PLC0415

    settings = ctx.settings
    correction = Correction(ctx.slots)
    # The study's own process draws its local moves from the seed alone (a run repeats); workers that
    # join it mix in their process id, as their samplers do, so they do not all propose the same move.
    rng = np.random.default_rng(settings.seed if settings.finalize else settings.seed + os.getpid())
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
        measured = {k: previous.user_attrs["record"].get(f"measured_{k}")
                    for k in ("kl", "loss", "ppl", "window_kl", "window_loss")}
        record["measured_from"] = previous.number
    elif feasible and _should_measure(ctx, study, trial, estimate, len(samples), correction):
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


def _should_measure(ctx: Context, study, trial, estimate: float, measured_count: int,
                    correction: Correction) -> bool:
    """Baselines always; others while under the cap if they look as good as the best measured trial.

    "As good" compares like with like: the candidate's estimate against the best trial's
    measured KL, or against that trial's own estimate under the same model, so a correction
    that is still biased (fitted on few, dissimilar trials) does not veto every candidate.
    """
    settings = ctx.settings
    if trial.user_attrs.get("measure"):
        return True
    cap = settings.measure if settings.measure is not None else settings.trials // 8 + 8
    if measured_count >= cap:
        return False
    measured = [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("record", {}).get("measure_complete") and t.user_attrs["record"]["feasible"]]
    if not measured:
        return True
    best = min(measured, key=lambda t: t.user_attrs["record"]["measured_kl"])
    record = best.user_attrs["record"]
    own = correction.predict(best.params, record["predicted_kl"]) if correction.model is not None \
        else record["predicted_kl"]
    return estimate <= (1.0 + settings.promising_slack) * max(record["measured_kl"], own)


# ---------------------------------------------------------------------------------------
# Entry point


def worker_command(settings: SearchSettings) -> list[str]:
    """The command line of one extra worker process for ``settings`` (joins the same study, and
    loads the model on the same device in the same dtype, so its measurements compare)."""
    cmd = [sys.executable, "-m", "autocompress", "search", settings.run_dir, "--trials", str(settings.trials),
           "--resume", "--worker", "--storage", storage_url(settings), "--seed", str(settings.seed)]
    for spec in settings.budget:
        cmd += ["--budget", spec]
    options = {"--space": settings.space, "--study-name": settings.study_name, "--holdout-tokens": settings.holdout_tokens,
               "--window": settings.window, "--calibration-tokens": settings.calibration_tokens,
               "--measure": settings.measure, "--latency-device": settings.device, "--batch": settings.batch,
               "--context": settings.context, "--threads": settings.threads, "--device": settings.model_device,
               "--dtype": settings.model_dtype, "--cache-mib": settings.cache_mib}
    for flag, value in options.items():
        if value is not None:
            cmd += [flag, str(value)]
    if settings.pareto:
        cmd.append("--pareto")
    return cmd


def search(settings: SearchSettings, *, model=None, tokenizer=None, holdout=None, calibration=None,
           evaluator=None) -> SearchResult:
    """Run (or resume, or join) a search; with ``finalize`` write ``search.json`` and ``schedule.json``.

    ``model``/``tokenizer``/``holdout``/``calibration`` override what the profile names (tests).
    ``evaluator`` (a :class:`~.measure.SwapEvaluator` of the same model, slots and held-aside
    text, e.g. ``prepare(settings, model=...).evaluator``) reuses its compressed blocks: several
    budgets searched in one process compress each (block, choice) once.

    Example::

        result = search(SearchSettings("runs/x", ("avg-bits=3.5",), trials=200))
        result.trial(result.best).measured_kl
    """
    from ..progress import progress_bar  # noqa: PLC0415

    start = time.perf_counter()
    if settings.trials < 1:
        raise UserError("--trials must be at least 1")
    if settings.holdout_tokens < settings.window:
        raise UserError(f"--holdout-tokens {settings.holdout_tokens} is less than one --window of {settings.window}; "
                        f"raise --holdout-tokens or lower --window")
    ctx = prepare(settings, model=model, tokenizer=tokenizer, holdout=holdout, calibration=calibration)
    if evaluator is not None:
        ctx._evaluator = evaluator
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
