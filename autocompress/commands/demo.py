"""``autocompress demo``: the whole job on the embedded default (what ``make demo`` runs)."""
from __future__ import annotations

from pathlib import Path

from .common import add_device_options, add_threads, device_options, positive_int


def register(verbs) -> None:
    """Add the ``demo`` sub-command."""
    demo = verbs.add_parser(
        "demo", help="the whole job on the demo model (what `make demo` runs)",
        description="Fetch SmolLM2-135M, then profile -> search -> apply -> eval -> report on stdlib-docs "
                    "with a quick preset (few tokens and trials); the run goes to --out, the report also "
                    "to reports/demo-report.html.")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--budget", default="memory=50%", help="budget (default memory=50%%)")
    demo.add_argument("--trials", type=positive_int, default=40, help="search trials (default 40)")
    demo.add_argument("--profile-tokens", type=positive_int, default=512,
                      help="calibration tokens the profile measures (default 512)")
    demo.add_argument("--tokens", type=positive_int, default=16384, help="evaluation tokens (default 16384)")
    demo.add_argument("--reports", default="reports", help="where the report is copied (default reports/)")
    add_threads(demo)
    add_device_options(demo)
    demo.set_defaults(run=run)


def run(args) -> int:
    """Run the demo."""
    from ..demo import DemoConfig, run_demo  # noqa: PLC0415

    device, dtype = device_options(args)
    run_demo(DemoConfig(out=Path(args.out), budget=args.budget, trials=args.trials,
                        profile_tokens=args.profile_tokens, eval_tokens=args.tokens,
                        reports=Path(args.reports) if args.reports else None, device=device, dtype=dtype))
    return 0
