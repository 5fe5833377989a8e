"""``autocompress report RUN``: one self-contained HTML file of everything the run holds."""
from __future__ import annotations


def register(verbs) -> None:
    """Add the ``report`` sub-command."""
    rep = verbs.add_parser("report", help="write RUN/report.html (self-contained, opens offline)",
                           description="Draw the profile, search, schedule, evaluation and staged history of a "
                                       "run directory into one HTML file; missing artifacts are named on the page.")
    rep.add_argument("run_dir", metavar="RUN", help="run directory (the --out of `autocompress profile`)")
    rep.add_argument("--out", help="where to write the report (default: RUN/report.html)")
    rep.add_argument("--storage", metavar="URL",
                     help="the study's Optuna storage when it is not a file inside RUN (a database server, a "
                          "file elsewhere); the report never connects to such a storage on search.json's word alone")
    rep.add_argument("--screenshot", metavar="PNG", help="also save a PNG of the top of the page (needs Chromium)")
    rep.set_defaults(run=run)


def run(args) -> int:
    """Write the report; print which artifacts it was drawn from and where it went."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from ..artifacts import check_output  # noqa: PLC0415
    from ..report import load_run, write_report  # noqa: PLC0415

    if args.out:
        check_output(args.out, "--out")
    out = write_report(args.run_dir, args.out, storage=args.storage)
    missing = load_run(args.run_dir).missing
    table = Table(title=f"artifacts of {args.run_dir}")
    table.add_column("file")
    table.add_column("in the report")
    for name in ("profile.json", "search.json", "schedule.json", "eval.json", "eval_original.json", "staged.json"):
        table.add_row(name, f"no: {missing[name]}" if name in missing else "yes")
    console = Console()
    console.print(table)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if args.screenshot:
        from ..report.browser import screenshot  # noqa: PLC0415

        console.print(f"wrote {screenshot(out, args.screenshot)}")
    return 0
