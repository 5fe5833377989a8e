"""The demo run behind ``make demo``: the whole job on the embedded default model and corpus."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "stdlib-docs"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on and where it writes."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    out: Path = Path("runs/demo")
    eval_tokens: int = 16384
    window: int = 512


def run_demo(config: DemoConfig, console: Console | None = None) -> dict:
    """Fetch the demo model, evaluate it on the built-in corpus, print and return the figures."""
    from .data import Split, load_tokens
    from .evaluate import eval_table, evaluate, write_eval
    from .models import load_model

    console = console or Console()
    started = time.perf_counter()
    console.rule(f"autocompress demo: {config.model} on {config.data}")
    loaded = load_model(config.model)
    load_seconds = time.perf_counter() - started
    stream = load_tokens(config.data, loaded.tokenizer, Split.EVALUATION, config.eval_tokens)
    result = evaluate(loaded.model, stream.tokens, model_name=config.model,
                      data_name=f"{config.data} (evaluation)", window=config.window)
    write_eval(result, config.out / "eval.json")
    console.print(eval_table(result))
    summary = Table(title="demo summary")
    for column in ("model", "data", "tokens", "perplexity", "load s", "total wall s"):
        summary.add_column(column, justify="right")
    total = time.perf_counter() - started
    summary.add_row(config.model, config.data, f"{result.tokens:,}", f"{result.perplexity:.3f}",
                    f"{load_seconds:.1f}", f"{total:.1f}")
    console.print(summary)
    console.print(f"wrote {config.out / 'eval.json'}")
    return {"perplexity": result.perplexity, "wall_seconds": total}
