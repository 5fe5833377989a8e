"""``autocompress demo``: the whole job on the embedded default (what ``make demo`` runs)."""
from __future__ import annotations

from pathlib import Path

from .common import add_threads, positive_int


def register(verbs) -> None:
    """Add the ``demo`` sub-command."""
    demo = verbs.add_parser("demo", help="the whole job on the demo model (what `make demo` runs)",
                            description="Fetch SmolLM2-135M, evaluate it on stdlib-docs and write runs/demo.")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--tokens", type=positive_int, default=16384, help="evaluation tokens (default 16384)")
    add_threads(demo)
    demo.set_defaults(run=run)


def run(args) -> int:
    """Run the demo."""
    from ..demo import DemoConfig, run_demo  # noqa: PLC0415

    run_demo(DemoConfig(out=Path(args.out), eval_tokens=args.tokens))
    return 0
