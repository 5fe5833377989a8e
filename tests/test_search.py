"""Search: budgets, costs, baselines, the Optuna study, persistence (tiny models, real storages)."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autocompress.compress.memory import MemoryModel
from autocompress.errors import UserError
from autocompress.models import load_model, model_fingerprint
from autocompress.schedule import Choice, Schedule
from autocompress.search import baselines
from autocompress.search.budget import Budget
from autocompress.search.decisions import build_slots, to_schedule
from autocompress.search.result import SearchResult
from autocompress.search.space import load_space, space_from_dict
from autocompress.search.study import SearchSettings, open_storage, search

TINY = dict(holdout_tokens=1024, window=128, calibration_tokens=512, progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    from search_helpers import make_run

    return make_run(tmp_path_factory.mktemp("search"), tokenizer)


@pytest.fixture(scope="module")
def rtn_run(tmp_path_factory, tokenizer):
    """A run of an RTN space (fast trials) for the storage and worker tests, and its space file."""
    from search_helpers import make_run
    from space_helpers import space_file

    root = tmp_path_factory.mktemp("search-rtn")
    space = space_file(root, "rtn-default")  # the old built-in default: RTN, bits 2-16, pruning
    return make_run(root, tokenizer, space=space), space


@pytest.fixture(scope="module")
def tiny_llama():
    from tiny import tiny_model

    return tiny_model("llama")


# -- budgets -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("memory=abc", "expected a size"), ("speed=3", "unknown kind 'speed'"), ("latency=4ms@tpu", "unknown device"),
    ("avg-bits=-1", "positive"), ("memory=60MB,memory=50MB", "twice"), ("params=150%", "above 100"),
    ("latency=4ms@h100,latency=3ms@cpu", "several devices"), ("latency=fast@h100", "expected a time"),
    ("memory=50%,", "empty budget"),
])
def test_budget_errors_are_one_line(tiny_llama, spec, words):
    with pytest.raises(UserError) as err:
        Budget.parse([spec], MemoryModel.from_model(tiny_llama))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_budget_resolves_limits(tiny_llama):
    memory = MemoryModel.from_model(tiny_llama)
    budget = Budget.parse(["memory=45%,avg-bits=3.5", "params=70%", "latency=4ms@a100"], memory)
    dense = memory.schedule_bytes(Schedule("", {}))
    limits = {limit.figure: limit.value for limit in budget.limits}
    assert limits["memory_bytes"] == pytest.approx(0.45 * dense)
    assert limits["avg_bits"] == 3.5 and limits["latency_ms"] == 4.0
    assert limits["params"] == pytest.approx(0.7 * memory.schedule_parameters(Schedule("", {})))
    assert budget.latency_source == "roofline:a100"
    assert Budget.parse(["memory=60MB"], memory).limits[0].value == 60e6
    assert Budget.parse(["memory=1.5MiB"], memory).limits[0].value == 1.5 * 2**20


def test_figures_are_exact_and_additive(tiny_llama):
    """Every figure of a random pick, summed from the per-slot tables, equals the schedule's."""
    memory = MemoryModel.from_model(tiny_llama)
    fp = model_fingerprint(tiny_llama)
    for space_name in ("default", "quant-linear"):
        space = load_space(space_name)
        slots = build_slots(space, tiny_llama)
        budget = Budget.parse(["memory=50%"], memory)
        base, tables = budget.cost.slot_costs(slots)
        rng = np.random.default_rng(0)
        for _ in range(20):
            picks = [int(rng.integers(len(s.options))) for s in slots]
            schedule = to_schedule(slots, {s.name: s.options[i].label for s, i in zip(slots, picks)}, fp)
            if all(schedule.units.get(f"model.layers.{i}", Choice()).drop for i in range(3)):
                continue
            summed = budget.cost.to_figures(base + sum(t[i] for t, i in zip(tables, picks)))
            exact = budget.evaluate(schedule)
            assert summed["memory_bytes"] == exact["memory_bytes"] == memory.schedule_bytes(schedule)
            for key in ("avg_bits", "params", "latency_ms"):
                assert summed[key] == pytest.approx(exact[key], rel=1e-9)
    tied = [s for s in build_slots(load_space("quant-linear"), tiny_llama) if ":" in s.name]
    assert tied[0].members == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")


def test_infeasible_budget_names_the_minimum(tiny_llama):
    from space_helpers import rtn_space

    memory = MemoryModel.from_model(tiny_llama)
    space = rtn_space("rtn-quant-only")  # bits 2-16, one group size
    slots = build_slots(space, tiny_llama)
    budget = Budget.parse(["memory=10%"], memory)
    base, tables = budget.cost.slot_costs(slots)
    smallest = memory.schedule_bytes(Schedule.uniform(tiny_llama, space.quant_choice(2)))
    with pytest.raises(UserError) as err:
        budget.check_feasible(base, tables)
    assert f"memory={smallest / 1e6:.4g} MB" in str(err.value)
    bits = Budget.parse(["avg-bits=1.5"], memory)
    with pytest.raises(UserError, match=r"avg-bits=2\.\d+ bits"):
        bits.check_feasible(*bits.cost.slot_costs(slots))


def test_infeasible_budget_names_the_minimum_with_embedding_units(tiny_llama):
    """The built-in quant-only space: 3 bits at the largest group everywhere, and the token
    embedding and the (untied) head at 4 bits: that is its smallest model."""
    memory = MemoryModel.from_model(tiny_llama)
    space = load_space("quant-only")
    assert min(space.bits) == 3 and min(space.embedding_bits) == 4 and max(space.group_sizes) == 128
    slots = build_slots(space, tiny_llama)
    assert [s.name for s in slots[:2]] == ["model.embed_tokens", "lm_head"]
    budget = Budget.parse(["memory=10%"], memory)
    base, tables = budget.cost.slot_costs(slots)
    smallest = Schedule(model_fingerprint(tiny_llama), {
        **{f"model.layers.{i}": space.quant_choice(3, 128) for i in range(3)},
        "model.embed_tokens": Choice(bits=4, group_size=128), "lm_head": Choice(bits=4, group_size=128)})
    smallest_bytes = memory.schedule_bytes(smallest)
    # no other pick is smaller: every unit at its cheapest option
    cheapest = base + sum(t[t[:, 0].argmin()] for t in tables)
    assert budget.cost.to_figures(cheapest)["memory_bytes"] == smallest_bytes
    with pytest.raises(UserError) as err:
        budget.check_feasible(base, tables)
    assert f"memory={smallest_bytes / 1e6:.4g} MB" in str(err.value) and "\n" not in str(err.value)
    # without the embedding units (embedding_bits: []) the smallest model keeps them at 16 bits
    plain = space_from_dict({**space.to_json(), "embedding_bits": []}, "test")
    without = Schedule(model_fingerprint(tiny_llama), {f"model.layers.{i}": plain.quant_choice(3, 128) for i in range(3)})
    with pytest.raises(UserError) as err:
        budget.check_feasible(*budget.cost.slot_costs(build_slots(plain, tiny_llama)))
    assert f"memory={memory.schedule_bytes(without) / 1e6:.4g} MB" in str(err.value)
    assert memory.schedule_bytes(without) > smallest_bytes


# -- baselines -----------------------------------------------------------------------------

def test_knapsack_is_optimal_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(25):
        slots, options = 5, 4
        values = [rng.random(options) for _ in range(slots)]
        costs = [rng.integers(1, 20, options).astype(float) for _ in range(slots)]
        capacity = float(rng.integers(15, 70))
        best = None
        for combo in itertools.product(range(options), repeat=slots):
            if sum(costs[s][o] for s, o in enumerate(combo)) <= capacity:
                value = sum(values[s][o] for s, o in enumerate(combo))
                best = value if best is None or value < best else best
        picks = baselines.knapsack(values, costs, capacity, quantum=1.0)
        if best is None:
            assert picks is None
            continue
        assert sum(costs[s][o] for s, o in enumerate(picks)) <= capacity
        assert sum(values[s][o] for s, o in enumerate(picks)) == pytest.approx(best)
        raw = [np.stack([c, np.zeros(options), np.zeros(options), np.zeros(options)], 1) for c in costs]
        limits = np.array([capacity, np.inf, np.inf, np.inf])
        greedy = baselines.greedy(values, raw, limits)
        assert baselines.fits(raw, greedy, limits)
        assert sum(values[s][o] for s, o in enumerate(greedy)) >= best - 1e-12


# -- the search ----------------------------------------------------------------------------

def test_search_meets_memory_exactly_and_keeps_the_best_baseline(run_dir, tmp_path):
    from autocompress.compress.apply import apply
    from autocompress.compress.saving import save_compressed

    settings = SearchSettings(str(run_dir), ("memory=45%",), trials=14, storage=f"sqlite:///{tmp_path}/a.db", **TINY)
    result = search(settings)
    loaded = load_model(str(run_dir.parent / "model"))
    memory = MemoryModel.from_model(loaded.model)
    schedule = Schedule.load(run_dir / "schedule.json")
    limit = result.budget["limits"]["memory_bytes"]
    assert memory.schedule_bytes(schedule) <= limit
    assert schedule.meta["search"]["memory_bytes"] == memory.schedule_bytes(schedule)

    saved = SearchResult.load(run_dir / "search.json")
    assert len(saved.trials) == 14 and saved.best == result.best
    best = saved.trial(saved.best)
    measured = [b["measured_kl"] for b in saved.baselines.values()]
    assert {"knapsack", "greedy"} <= set(saved.baselines) and any(k.startswith("uniform:") for k in saved.baselines)
    # a uniform baseline is one block option with an option of the embedding and of the (untied) head:
    # uniform:bits=4/g64+embed:bits=8/g128+embed:bits=16
    uniform = [k for k in saved.baselines if k.startswith("uniform:")]
    assert all(k.count("+embed:bits=") == 2 and k.split("+")[0].startswith("uniform:bits=") for k in uniform), uniform
    assert all(m is not None for m in measured) and best.measured_kl <= min(measured)
    windows = 1024 // 128
    assert all(len(t.window_kl) == windows and sum(t.window_kl) / windows == pytest.approx(t.measured_kl, rel=1e-5)
               for t in saved.trials if t.measured_kl is not None and t.state == "COMPLETE")
    assert saved.beat_baselines == (not best.source.startswith(("uniform:", "knapsack", "greedy")))
    assert all(t.latency_source == "roofline:h100" for t in saved.trials)
    assert saved.pareto and saved.best in [t.number for t in saved.trials]

    from autocompress.data import load_tokens

    calibration = load_tokens("stdlib-docs", loaded.tokenizer, "calibration", 512).tokens
    apply(loaded.model, schedule, calibration, progress=False, seq_len=128)
    weights = save_compressed(loaded.model, loaded.tokenizer, schedule, tmp_path / "compressed") / "model.safetensors"
    from safetensors import safe_open

    with safe_open(weights, "pt") as handle:
        stored = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    assert stored == memory.schedule_bytes(schedule)

    with pytest.raises(UserError, match="already exists.*--resume"):
        search(settings)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_resume_continues_to_the_total(run_dir, tmp_path, storage):
    url = f"sqlite:///{tmp_path}/s.db" if storage == "sqlite" else str(tmp_path / "s.journal")
    common = dict(budget=("avg-bits=3.5",), space="quant-only", storage=url, measure=3, **TINY)
    first = search(SearchSettings(str(run_dir), trials=6, **common))
    second = search(SearchSettings(str(run_dir), trials=10, resume=True, **common))
    assert [t.choices for t in second.trials[:6]] == [t.choices for t in first.trials]
    assert sum(t.state in ("COMPLETE", "PRUNED") for t in second.trials) == 10


def _count_finished(url: str) -> int:
    import optuna

    storage = open_storage(url)
    summaries = optuna.study.get_all_study_summaries(storage, include_best_trial=False)
    if not summaries:
        return 0
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


def _cli(run_dir: Path | tuple[Path, str], *extra: str, budget: str = "memory=45%") -> list[str]:
    if isinstance(run_dir, tuple):  # (run, space file)
        run_dir, space = run_dir
        extra = ("--space", space, *extra)
    return [sys.executable, "-m", "autocompress", "search", str(run_dir), "--budget", budget,
            "--holdout-tokens", "1024", "--window", "128", "--calibration-tokens", "512", "--threads", "1",
            "--no-progress", "--measure", "4", *extra]


def _storage(kind: str, tmp_path, stem: str) -> tuple[str, Path]:
    """An Optuna storage URL of ``kind`` (sqlite or journal file) under ``tmp_path``, and its file."""
    file = tmp_path / (f"{stem}.db" if kind == "sqlite" else f"{stem}.journal")
    return (f"sqlite:///{file}" if kind == "sqlite" else str(file)), file


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_sigkill_then_resume_loses_no_completed_trial(rtn_run, tmp_path, kind):
    run_dir = rtn_run
    url, file = _storage(kind, tmp_path, "kill")
    errors = tmp_path / "worker.stderr"
    with errors.open("w") as stderr:
        proc = subprocess.Popen(_cli(run_dir, "--trials", "500", "--storage", url),
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        try:
            if file.exists() and _count_finished(url) >= 8:
                break
        except UserError:  # the worker is still creating the tables
            continue
    if proc.poll() is not None:
        pytest.fail(f"the worker exited by itself (code {proc.returncode}) before the kill: "
                    f"{errors.read_text()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _count_finished(url)
    assert before >= 8
    resumed = subprocess.run(_cli(run_dir, "--trials", str(before + 3), "--storage", url, "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _count_finished(url) == before + 3
    import optuna

    storage = open_storage(url)
    name = optuna.study.get_all_study_summaries(storage, include_best_trial=False)[0].study_name
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert states.count("FAIL") <= 1 and "RUNNING" not in states  # only the trial running at the kill failed


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_finish_exactly_the_requested_trials(rtn_run, tmp_path, kind):
    run_dir = rtn_run
    url, _ = _storage(kind, tmp_path, "two")
    done = subprocess.run(_cli(run_dir, "--trials", "16", "--storage", url, "--workers", "2"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _count_finished(url) == 16
    result = SearchResult.load(run_dir[0] / "search.json")
    assert sum(t.state in ("COMPLETE", "PRUNED") for t in result.trials) == 16


def test_a_worker_loads_the_model_as_the_search_does():
    """Extra workers get --device and --dtype as given: a worker in another dtype would measure
    KL on other numbers and its trials would not compare with the rest."""
    from autocompress.cli import build_parser
    from autocompress.search.study import worker_command

    settings = SearchSettings("runs/x", ("memory=50%", "avg-bits=6"), trials=30, model_device="cpu",
                              model_dtype="bfloat16", holdout_tokens=2048, device="a100", threads=3,
                              cache_mib=512)
    command = worker_command(settings)
    args = build_parser().parse_args(command[command.index("search"):])
    assert (args.device, args.dtype, args.latency_device, args.cache_mib) == ("cpu", "bfloat16", "a100", 512)
    assert (args.budget, args.trials, args.holdout_tokens, args.threads) == (["memory=50%", "avg-bits=6"], 30, 2048, 3)
    assert args.worker and args.resume


def test_malformed_space_and_infeasible_budget_on_the_cli(run_dir, tmp_path, capsys):
    from autocompress.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbits: [7]\n")
    assert main(_cli(run_dir, "--space", str(bad), "--storage", f"sqlite:///{tmp_path}/x.db")[3:]) == 2
    err = capsys.readouterr().err
    assert "bits" in err and len(err.strip().splitlines()) == 1
    assert main(_cli(run_dir, "--storage", f"sqlite:///{tmp_path}/y.db", budget="memory=1%")[3:]) == 2
    err = capsys.readouterr().err
    assert "smallest it reaches is memory=" in err and len(err.strip().splitlines()) == 1
