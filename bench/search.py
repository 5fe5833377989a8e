"""Search vs the obvious allocations on the real model: evaluation perplexity and search time.

For each scenario (search space + budget) this runs a fresh ``autocompress search`` on a run
directory holding the real model's ``profile.json``, then evaluates on the *evaluation* split
(never seen by profile or search) the searched schedule, the best measured uniform baseline
that fits the budget, and the knapsack and greedy allocations under the additive model.

    python bench/search.py --run runs/smollm2 --trials 200
    python bench/search.py --run runs/smollm2 --scenario quant-only:avg-bits=3.5 --scenario default:memory=50%

Needs RUN/profile.json made with ``autocompress profile smollm2-135m --out RUN`` (default space).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

# bench/profile.py would shadow the standard library's profile module (torch imports cProfile).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from rich.console import Console
from rich.table import Table

from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel
from autocompress.data import load_tokens
from autocompress.evaluate import perplexity
from autocompress.models import load_model
from autocompress.profile.artifact import Profile
from autocompress.search.decisions import build_slots, to_schedule
from autocompress.search.space import load_space
from autocompress.search.study import SearchSettings, search

SCENARIOS = ("quant-only:avg-bits=3.5", "quant-only:avg-bits=3.0", "default:memory=50%")


def evaluate_picks(model, slots, picks, fingerprint, calibration, eval_tokens, window) -> tuple[float, int]:
    """Evaluation perplexity and exact bytes of ``model`` compressed as ``picks`` (on a copy)."""
    schedule = to_schedule(slots, picks, fingerprint)
    work = copy.deepcopy(model)
    apply(work, schedule, calibration, progress=False, seq_len=256, fingerprint=fingerprint)
    return perplexity(work, eval_tokens, window=window, batch_size=1), MemoryModel.from_model(model).schedule_bytes(schedule)


def main() -> None:
    """Run the scenarios and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory with the real model's profile.json")
    parser.add_argument("--scenario", action="append", help=f"SPACE:BUDGET (default: {', '.join(SCENARIOS)})")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--measure", type=int, default=None, help="most real evaluations per search")
    parser.add_argument("--holdout-tokens", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    run = Path(args.run)
    profile = Profile.load(run / "profile.json")
    loaded = load_model(profile.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    from autocompress.models import model_fingerprint

    fingerprint = model_fingerprint(model)
    data = profile.data
    eval_tokens = load_tokens(data, tokenizer, "evaluation", args.eval_tokens).tokens
    calibration = load_tokens(data, tokenizer, "calibration", 2048).tokens
    tick = time.perf_counter()
    original_ppl = perplexity(model, eval_tokens, window=args.window, batch_size=1)
    eval_seconds = time.perf_counter() - tick

    console = Console(width=150)
    table = Table(title=f"search vs baselines: {profile.model}, {args.trials} trials, eval ppl on "
                        f"{eval_tokens.numel()} held-out tokens (16-bit: {original_ppl:.2f}, {eval_seconds:.0f} s/eval)")
    for column in ("scenario", "schedule", "trial", "eval ppl", "held-aside KL", "MB", "avg bits", "search s"):
        table.add_column(column)
    figures = {"original_ppl": original_ppl, "scenarios": {}}
    for scenario in args.scenario or SCENARIOS:
        space_name, _, budget = scenario.partition(":")
        stamp = time.strftime("%H%M%S")
        settings = SearchSettings(str(run), (budget,), trials=args.trials, space=space_name,
                                  storage=f"sqlite:///{run.resolve()}/bench-{stamp}.db",
                                  study_name=f"bench:{scenario}:{stamp}", holdout_tokens=args.holdout_tokens,
                                  measure=args.measure, progress=True)
        start = time.perf_counter()
        result = search(settings, model=model, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        slots = build_slots(load_space(space_name), model)
        rows = {}
        uniform = [(b["measured_kl"], name) for name, b in result.baselines.items() if name.startswith("uniform:")]
        if uniform:
            rows["best uniform (" + min(uniform)[1] + ")"] = result.baselines[min(uniform)[1]]["trial"]
        for name in ("knapsack", "greedy"):
            if name in result.baselines:
                rows[name] = result.baselines[name]["trial"]
        rows["search (best)"] = result.best
        out = {"search_seconds": seconds, "notes": result.notes, "rows": {}}
        for what, number in rows.items():
            record = result.trial(number)
            tick = time.perf_counter()
            ppl, size = evaluate_picks(model, slots, record.choices, fingerprint, calibration, eval_tokens, args.window)
            out["rows"][what] = {"trial": number, "source": record.source, "eval_ppl": ppl,
                                 "holdout_kl": record.measured_kl, "memory_bytes": size, "avg_bits": record.avg_bits,
                                 "eval_seconds": time.perf_counter() - tick}
            table.add_row(scenario, what, str(number), f"{ppl:.2f}", f"{record.measured_kl:.4f}", f"{size / 1e6:.1f}",
                          f"{record.avg_bits:.2f}", f"{seconds:.0f}")
        figures["scenarios"][scenario] = out
        if args.out:
            Path(args.out).write_text(json.dumps(figures, indent=2))
        console.print(table)
        for note in result.notes:
            console.print(f"{scenario}: note: {note}")


if __name__ == "__main__":
    main()
