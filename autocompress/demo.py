"""The demo run behind ``make demo``: the whole job on the embedded default model and corpus.

profile -> search -> apply -> eval (original and compressed) -> report, each stage the same
library function its CLI verb calls, into one run directory; the report is copied to
``reports/``. The default is a *quick preset* (few calibration tokens and trials) so that a
fresh machine finishes in minutes; :data:`FULL_COMMANDS` is the full-size run.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "stdlib-docs"
DEFAULT_BUDGET = "memory=50%"

FULL_COMMANDS = """\
autocompress profile smollm2-135m --data stdlib-docs --out runs/full --tokens 4096 --role-tokens 8192 --calib-tokens 16384
autocompress search  runs/full --budget memory=50% --trials 200
autocompress apply   runs/full
autocompress eval    smollm2-135m --tokens 16384 --out runs/full/eval_original.json
autocompress eval    runs/full/model --tokens 16384 --reference smollm2-135m --out runs/full/eval.json
autocompress report  runs/full"""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on, how much of it (the quick preset by default) and where it writes."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    out: Path = Path("runs/demo")
    reports: Path | None = Path("reports")
    budget: str = DEFAULT_BUDGET
    space: str = "quant-high"
    profile_tokens: int = 512
    role_tokens: int = 2048
    trials: int = 40
    calib_tokens: int = 4096
    eval_tokens: int = 16384
    window: int = 512
    device: torch.device | str = "cpu"  # where every stage runs (see autocompress.device)
    dtype: torch.dtype = torch.float32  # how the model is stored; statistics stay float32


def _evaluate_to(path: Path, spec: str, config: DemoConfig, reference=None):
    from .data import Split, bos_id, load_tokens  # noqa: PLC0415
    from .evaluate import evaluate, write_eval  # noqa: PLC0415
    from .models import load_model  # noqa: PLC0415

    loaded = load_model(spec, dtype=config.dtype, device=config.device)
    stream = load_tokens(config.data, loaded.tokenizer, Split.EVALUATION, config.eval_tokens)
    result = evaluate(loaded.model, stream.tokens, model_name=spec, data_name=f"{config.data} (evaluation)",
                      window=config.window, reference=reference, decode_tokens=16, bos=bos_id(loaded.tokenizer))
    write_eval(result, path)
    return loaded, result


def run_demo(config: DemoConfig, console: Console | None = None) -> dict:
    """Run the whole job on the demo model; print a summary table and return its figures."""
    from .artifacts import check_output  # noqa: PLC0415
    from .compress.apply_run import ApplyConfig, apply_run  # noqa: PLC0415
    from .errors import UserError  # noqa: PLC0415
    from .profile import ProfileSettings, profile_run  # noqa: PLC0415
    from .report import write_report  # noqa: PLC0415
    from .search.budget import check_specs  # noqa: PLC0415
    from .search.study import SearchSettings, search  # noqa: PLC0415

    # Bad settings are refused before minutes of fetching, evaluating and profiling.
    seq_len = 256
    check_specs(config.budget)
    if config.eval_tokens < config.window:
        raise UserError(f"--tokens {config.eval_tokens} is less than one evaluation window of {config.window}; "
                        f"raise --tokens")
    if config.profile_tokens < seq_len:
        raise UserError(f"--profile-tokens {config.profile_tokens} is less than one profile row of {seq_len}; "
                        f"raise --profile-tokens")
    check_output(config.out, "--out", directory=True)
    if config.reports is not None:
        check_output(config.reports, "--reports", directory=True)
    console = console or Console()
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    console.rule(f"autocompress demo: {config.model} on {config.data}, budget {config.budget}")
    console.print(f"quick preset: profile on {config.profile_tokens:,} tokens, {config.trials} search trials, "
                  f"evaluation on {config.eval_tokens:,} tokens; the full-size run is in the README")
    seconds: dict[str, float] = {}
    started = tick = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal tick
        seconds[stage] = time.perf_counter() - tick
        tick = time.perf_counter()
        console.print(f"[green]done[/green] {stage} in {seconds[stage]:.0f} s")

    original, base = _evaluate_to(run_dir / "eval_original.json", config.model, config)
    lap("evaluate the original")
    settings = ProfileSettings(tokens=config.profile_tokens, seq_len=seq_len, role_tokens=config.role_tokens,
                               calib_tokens=config.calib_tokens)
    try:
        outcome = profile_run(config.model, run_dir, data=config.data, space=config.space, settings=settings,
                              device=config.device, dtype=config.dtype)
    except UserError as exc:  # a profile of an older demo (another space or preset) is replaced
        console.print(f"[yellow]{exc}[/yellow]; profiling again")
        (run_dir / "study.db").unlink(missing_ok=True)  # its trials measured the old profile's choices
        outcome = profile_run(config.model, run_dir, data=config.data, space=config.space, settings=settings,
                              force=True, device=config.device, dtype=config.dtype)
    lap("profile" + (" (reused)" if outcome.reused else ""))
    found = search(SearchSettings(str(run_dir), (config.budget,), trials=config.trials,
                                  resume=(run_dir / "study.db").exists()),
                   model=original.model, tokenizer=original.tokenizer)
    lap("search")
    applied = apply_run(ApplyConfig(run_dir, overwrite=True, device=config.device, dtype=config.dtype))
    lap("apply")
    _, compressed = _evaluate_to(run_dir / "eval.json", str(applied.out), config, reference=original.model)
    lap("evaluate the compressed model")
    report = write_report(run_dir)
    if config.reports is not None:
        Path(config.reports).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report, Path(config.reports) / "demo-report.html")
    lap("report")

    best = found.trial(found.best)
    table = Table(title=f"demo summary ({config.model}, {config.data}, budget {config.budget})")
    for column in ("", "original", "compressed"):
        table.add_column(column, justify="right")
    table.add_row("size as stored", f"{base.size_bytes / 2**20:.1f} MiB", f"{compressed.size_bytes / 2**20:.1f} MiB")
    table.add_row("parameters", f"{base.parameters:,}", f"{compressed.parameters:,}")
    table.add_row(f"perplexity ({compressed.tokens:,} evaluation tokens)", f"{base.perplexity:.3f}",
                  f"{compressed.perplexity:.3f}")
    table.add_row("KL to the original", "0", f"{compressed.kl:.4f}")
    table.add_row("top-1 agreement", "100%", f"{compressed.top1:.1%}")
    table.add_row("schedule", "", f"trial {found.best} ({best.source})")
    for stage, value in seconds.items():
        table.add_row(f"wall time: {stage}", "", f"{value:.0f} s")
    total = time.perf_counter() - started
    table.add_row("wall time: total", "", f"{total:.0f} s")
    console.print(table)
    console.print(f"report: {report}" + (f" (copied to {Path(config.reports) / 'demo-report.html'})"
                                          if config.reports is not None else ""))
    return {"perplexity_original": base.perplexity, "perplexity": compressed.perplexity,
            "size_original": base.size_bytes, "size": compressed.size_bytes, "wall_seconds": total,
            "report": str(report)}
