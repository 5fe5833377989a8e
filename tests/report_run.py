"""A hand-built run directory for the report tests: every artifact, with known numbers.

Six blocks; block 0 and the last one are the sensitive ones. The Optuna study is real (sqlite
in the run directory) and search.json is written from its trials, as the search does.
"""
from __future__ import annotations

import json
from pathlib import Path

import optuna

from autocompress.artifacts import write_artifact
from autocompress.evaluate import EvalResult, write_eval
from autocompress.profile.artifact import AdditivityCheck, Profile, UnitProfile
from autocompress.schedule import Choice, Schedule, SparsityPattern
from autocompress.search.result import SearchResult, TrialRecord

BLOCKS = 6
LABELS = ["bits=2", "bits=3", "bits=4", "bits=8", "2:4", "heads=0.25", "drop"]
BASE_KL = {"bits=2": 0.2, "bits=3": 0.04, "bits=4": 0.008, "bits=8": 0.0001, "2:4": 0.1, "heads=0.25": 0.05,
           "drop": 0.6}
BLOCK_PARAMS = 1000
BITS = {"bits=2": 2, "bits=3": 3, "bits=4": 4}


def unit_name(i: int) -> str:
    """Block ``i``'s unit name."""
    return f"model.layers.{i}"


def block_kl(i: int, label: str) -> float:
    """KL of block ``i`` at ``label``: the first and last blocks are 10x and 5x more sensitive."""
    scale = 10.0 if i == 0 else 5.0 if i == BLOCKS - 1 else 1.0 + 0.1 * i
    return BASE_KL[label] * scale


def make_profile(model: str = "tiny-llama") -> Profile:
    """A profile of six blocks, units listed in reverse order (the report must sort them)."""
    tasks = ["lexical", "word_class", "nesting"]
    units = [UnitProfile(name=unit_name(i), block=i, relative_depth=i / (BLOCKS - 1), parameters=BLOCK_PARAMS,
                         kl={label: block_kl(i, label) for label in LABELS},
                         loss_delta={label: block_kl(i, label) * 0.9 for label in LABELS},
                         proxies={"fisher": block_kl(i, "bits=2")},
                         roles={t: 0.1 * (k + 1) + 0.05 * i for k, t in enumerate(tasks)},
                         dominant_role=tasks[i % 3])
             for i in reversed(range(BLOCKS))]
    choices = {label: Choice().to_json() for label in LABELS}
    curves = {t: [0.0] + [0.1 * (k + 1) + 0.05 * i for i in range(BLOCKS)] for k, t in enumerate(tasks)}
    return Profile(model=model, model_fingerprint="fp-model", data="stdlib-docs", data_fingerprint="fp-data",
                   space="default", space_fingerprint="fp-space", granularity="block", calibration_tokens=4096,
                   base_loss=2.9, choices=choices, units=units,
                   additivity=[AdditivityCheck(bits=3, predicted_kl=0.3, measured_kl=0.5)],
                   proxy_spearman={"fisher": 0.8}, role_curves=curves)


def memory_of(picks: dict[str, str]) -> int:
    """Stored bytes of a bits assignment: 1000 parameters per block plus 100 bytes of overhead."""
    return sum(BLOCK_PARAMS * BITS[label] // 8 + 100 for label in picks.values())


def make_search(run_dir: Path, model: str = "tiny-llama", trials: int = 12) -> SearchResult:
    """A real sqlite Optuna study over per-block bits, and the search.json record of it."""
    storage = f"sqlite:///{run_dir / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="report-test", storage=storage, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({unit_name(i): "bits=3" for i in range(BLOCKS)})  # uniform baseline
    study.enqueue_trial({unit_name(i): "bits=4" if i in (0, BLOCKS - 1) else "bits=3" for i in range(BLOCKS)})
    limit = memory_of({unit_name(i): "bits=3" for i in range(BLOCKS)}) + 500

    def objective(trial: optuna.Trial) -> float:
        picks = {unit_name(i): trial.suggest_categorical(unit_name(i), list(BITS)) for i in range(BLOCKS)}
        trial.set_user_attr("memory", memory_of(picks))
        return sum(block_kl(i, picks[unit_name(i)]) for i in range(BLOCKS))

    study.optimize(objective, n_trials=trials)
    records = []
    for t in study.trials:
        memory = t.user_attrs["memory"]
        predicted = t.value
        records.append(TrialRecord(
            number=t.number, source="uniform:bits=3" if t.number == 0 else "knapsack" if t.number == 1 else "tpe",
            choices=dict(t.params), predicted_kl=predicted, corrected_kl=predicted * 1.4 if t.number >= 4 else None,
            measured_kl=predicted * 1.5 if t.number % 2 == 0 else None,
            measured_loss=None, measured_ppl=20 * (1 + predicted) if t.number % 2 == 0 else None,
            memory_bytes=memory, avg_bits=8 * memory / (BLOCKS * BLOCK_PARAMS), params=BLOCKS * BLOCK_PARAMS,
            latency_ms=0.01 * memory / 1000, latency_source="roofline h100", feasible=memory <= limit,
            state="COMPLETE"))
    feasible = [r for r in records if r.feasible and r.measured_kl is not None]
    best = min(feasible, key=lambda r: r.measured_kl).number
    baselines = {"uniform:bits=3": {"trial": 0, "measured_kl": records[0].measured_kl,
                                    "measured_ppl": records[0].measured_ppl, "memory_bytes": records[0].memory_bytes},
                 "knapsack": {"trial": 1, "measured_kl": None, "measured_ppl": None,
                              "memory_bytes": records[1].memory_bytes}}
    return SearchResult(
        model=model, model_fingerprint="fp-model",
        budget={"specs": [f"memory={limit}B"], "limits": {"memory_bytes": limit},
                "original": {"memory_bytes": BLOCKS * (2 * BLOCK_PARAMS + 100), "latency_ms": 0.1},
                "latency_source": "roofline h100", "batch": 1, "context": 512},
        space="quant-only", storage=storage, study_name="report-test", objective="kl",
        holdout={"data": "stdlib-docs", "split": "calibration", "start": 4096, "tokens": 2048, "window": 512},
        original={"loss": 2.9, "ppl": 18.0}, trials=records, baselines=baselines, best=best,
        pareto=[best], beat_baselines=best != 0, correction={"regressor": "ridge", "fitted_on": 4},
        notes=["a note with <b>markup</b> from the search"])


def make_schedule(profile: Profile) -> Schedule:
    """Bits per block, plus one 2:4 block, one with heads pruned and one dropped."""
    units = {unit_name(0): Choice(bits=4), unit_name(1): Choice(bits=3, sparsity=0.5, pattern=SparsityPattern.TWO_FOUR),
             unit_name(2): Choice(bits=2, head_ratio=0.25), unit_name(3): Choice(drop=True),
             unit_name(4): Choice(bits=3), unit_name(5): Choice(bits=8)}
    return Schedule(profile.model_fingerprint, units, {})


def make_eval(model: str, perplexity: float, size: int, kl: float | None) -> EvalResult:
    """An evaluation record with the given headline figures."""
    return EvalResult(model=model, data="stdlib-docs (evaluation)", tokens=16384, window=512, perplexity=perplexity,
                      loss=2.9, kl=kl, top1=None if kl is None else 0.9, size_bytes=size, parameters=135_000_000,
                      tokens_per_second=2000.0, decode_tokens_per_second=30.0, wall_seconds=40.0, threads=1)


FRONTIER_ROWS = [  # (name, family, MiB, perplexity, grid-aligned)
    ("original, 16-bit", "original", 270, 16.0, False), ("RTN 4-bit g128", "RTN", 80, 26.0, False),
    ("GPTQ 4-bit g64", "GPTQ", 84, 22.0, False), ("HQQ 3-bit g64", "HQQ", 66, 31.0, False),
    ("Q4_1", "gguf-legacy", 85, 21.0, True)]


def make_frontier() -> dict:
    """A frontier.json as bench/frontier.py writes it; one row not measured in full (no ppl)."""
    rows = {name: {"name": name, "family": family, "bytes": mib * 2**20, "ppl": ppl, "aligned": aligned,
                   "tokens": 16384} for name, family, mib, ppl, aligned in FRONTIER_ROWS}
    rows["screened only"] = {"name": "screened only", "family": "RTN", "bytes": 2**20, "ppl": None,
                             "screen_ppl": 99.0}
    return {"key": {"model": "tiny-llama"}, "rows": rows}


def build_run(run_dir: Path, model: str = "tiny-llama", *, study: bool = True, staged: bool = True) -> Path:
    """Write every artifact of a run into ``run_dir``; returns it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    profile = make_profile(model)
    profile.save(run_dir / "profile.json")
    if study:
        make_search(run_dir, model).save(run_dir / "search.json")
    make_schedule(profile).save(run_dir / "schedule.json")
    write_eval(make_eval(f"{run_dir}/model", 24.0, 60 * 2**20, 0.25), run_dir / "eval.json")
    write_eval(make_eval(model, 16.0, 270 * 2**20, None), run_dir / "eval_original.json")
    if staged:
        write_artifact(run_dir / "staged.json", "staged", 1, staged_history(model))
    (run_dir / "frontier.json").write_text(json.dumps(make_frontier()))
    return run_dir


def staged_history(model: str) -> dict:
    """A staged.json as staged_apply writes it: one passed step, one passed after recovery, one rolled back."""
    def quality(ppl, kl):
        return {"perplexity": ppl, "loss": 2.9, "kl": kl}

    step = dict(recovery=None, recovered=None, failures=[], frozen=[], seconds=12.5)
    return {"original": {**quality(16.0, 0.0), "bytes": 270 * 2**20, "parameters": 135_000_000},
            "steps": [
                {**step, "index": 1, "units": [unit_name(1), unit_name(2)], "bytes_before": 270 * 2**20,
                 "bytes_after": 230 * 2**20, "parameters_after": 1, "before": quality(16.0, 0.0),
                 "after": quality(17.0, 0.05), "gate": "passed"},
                {**step, "index": 2, "units": [unit_name(i) for i in range(5)], "bytes_before": 230 * 2**20,
                 "bytes_after": 195 * 2**20, "parameters_after": 1, "before": quality(17.0, 0.05),
                 "after": quality(25.0, 0.3), "recovered": quality(19.0, 0.12), "recovery": {"steps": 100},
                 "gate": "passed after recovery"},
                {**step, "index": 3, "units": [model], "bytes_before": 195 * 2**20, "bytes_after": 195 * 2**20,
                 "parameters_after": 1, "before": quality(19.0, 0.12), "after": quality(40.0, 0.9),
                 "recovered": quality(30.0, 0.5), "recovery": {"steps": 100}, "gate": "rolled back",
                 "failures": ["step perplexity +58% > 25%"], "frozen": [model]}],
            "frozen": [model], "accepted": [], "pending": [], "complete": True,
            "final": {**quality(19.0, 0.12), "bytes": 195 * 2**20, "parameters": 1}}
