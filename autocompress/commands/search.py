"""``autocompress search RUN --budget ... --trials N``: budget-constrained Optuna search."""
from __future__ import annotations

import argparse

from .common import add_device_options, add_threads, device_options, non_negative_int, positive_int

# Latency devices that ``--device`` took before it named where the model runs (still read as ``--latency-device``).
_LATENCY_ONLY = ("h100", "h200", "a100", "rtx4090")


def register(verbs) -> None:
    """Add the ``search`` sub-command."""
    se = verbs.add_parser(
        "search", help="find per-block bits and pruning under a budget (Optuna)",
        description="Search per-unit bit widths and pruning for the model profiled in RUN (RUN/profile.json) "
                    "under --budget. Baselines (uniform, knapsack, greedy) are the first trials; the best "
                    "trial measured on held-aside calibration text goes to RUN/schedule.json, every trial to "
                    "RUN/search.json. The study lives in --storage, so a killed search resumes (--resume) and "
                    "several workers (--workers, or the same command in several shells/machines with --resume) "
                    "share it.")
    se.add_argument("run_dir", metavar="RUN", help="run directory holding profile.json")
    se.add_argument("--budget", action="append", required=True, metavar="SPEC",
                    help="memory=60MB|45%%, avg-bits=3.5, params=70%%, latency=4ms@h100; comma-separated "
                         "or repeated")
    se.add_argument("--trials", type=positive_int, default=200,
                    help="finished trials the study should hold in total, all workers together (default 200)")
    se.add_argument("--space", help="search space name or YAML (default: the space RUN/profile.json was made "
                                    "with; a YAML file is read again from the path given to profile)")
    se.add_argument("--storage", help="Optuna storage: sqlite:///path.db, postgresql://..., or a file "
                                      "ending in .journal (default sqlite:///RUN/study.db); not in memory, "
                                      "which could not be resumed")
    se.add_argument("--study-name", help="study name (default: SPACE:BUDGET)")
    se.add_argument("--resume", action="store_true", help="continue (or join) an existing study")
    se.add_argument("--pareto", action="store_true",
                    help="NSGA-II over (KL, memory, latency) instead of TPE on KL")
    se.add_argument("--workers", type=positive_int, default=1, help="worker processes on this machine")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--measure", type=non_negative_int,
                    help="most real evaluations in all; baselines are measured regardless (default: trials/8 + 8)")
    se.add_argument("--holdout-tokens", type=positive_int, default=1024,
                    help="held-aside calibration tokens to measure candidates on (default 1024)")
    se.add_argument("--calibration-tokens", type=positive_int, default=None,
                    help="calibration tokens for Wanda/GPTQ statistics, at most the profile's (default: the profile's)")
    se.add_argument("--window", type=positive_int, default=256, help="window length (default 256)")
    se.add_argument("--warm-start", metavar="SCHEDULE", help="enqueue schedules transferred from SCHEDULE first")
    se.add_argument("--latency-device", default=None, metavar="NAME",
                    help="device for latency figures: h100, h200, a100, rtx4090 or cpu (default h100; a latency "
                         "budget's @DEVICE wins)")
    se.add_argument("--batch", type=positive_int, default=1, help="decode batch for latency (default 1)")
    se.add_argument("--context", type=positive_int, default=512, help="KV-cache length for latency (default 512)")
    se.add_argument("--measure-latency", dest="measure_latency", action="store_const", const=True, default=None,
                    help="time the linears on the device (default: when it is at hand)")
    se.add_argument("--roofline", dest="measure_latency", action="store_const", const=False,
                    help="latency from the roofline only, even on the device")
    se.add_argument("--cache-mib", type=positive_int, default=None, metavar="MIB",
                    help="memory for the compressed blocks and GPTQ statistics kept between trials, in MiB "
                         "(default: half the model's 16-bit size, at least 1024, at most a quarter of this "
                         "machine's memory); past it the least recently used are computed again when needed, "
                         "to the same numbers")
    se.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a spawned worker process
    se.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(se)
    add_device_options(se)
    se.set_defaults(run=run)


def run(args) -> int:
    """Run the search; print the baselines-vs-best table."""
    from rich.console import Console  # noqa: PLC0415

    from ..search.budget import check_specs  # noqa: PLC0415
    from ..search.storage import check_storage  # noqa: PLC0415
    from ..search.study import SearchSettings, result_table, search  # noqa: PLC0415

    check_specs(args.budget)
    latency_device = args.latency_device or "h100"
    if args.device.lower() in _LATENCY_ONLY:  # the earlier meaning of --device (older worker command lines)
        latency_device, args.device = args.latency_device or args.device.lower(), "auto"
    device, dtype = device_options(args)
    if args.storage:
        check_storage(args.storage, args.run_dir)
    space = args.space or profile_space_file(args.run_dir)
    settings = SearchSettings(
        run_dir=args.run_dir, budget=tuple(args.budget), trials=args.trials, space=space, storage=args.storage,
        study_name=args.study_name, resume=args.resume, pareto=args.pareto, workers=args.workers, seed=args.seed,
        holdout_tokens=args.holdout_tokens, window=args.window, calibration_tokens=args.calibration_tokens,
        measure=args.measure, warm_start=args.warm_start, device=latency_device, batch=args.batch,
        context=args.context, measure_latency=args.measure_latency, progress=not (args.no_progress or args.worker),
        model_device=args.device, model_dtype=args.dtype, cache_mib=args.cache_mib,
        finalize=not args.worker, threads=args.threads)
    model, tokenizer = _load_profiled_model(args.run_dir, device, dtype)
    result = search(settings, model=model, tokenizer=tokenizer)
    if args.worker:
        return 0
    console = Console()
    console.print(result_table(result))
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"wrote {args.run_dir}/schedule.json and {args.run_dir}/search.json (study {result.study_name!r} "
                  f"in {result.storage})")
    return 0


def _load_profiled_model(run_dir: str, device, dtype):
    """The model ``RUN/profile.json`` was made from, on ``device`` in ``dtype``; (None, None) when
    there is no readable profile (the search says what is missing)."""
    from pathlib import Path  # noqa: PLC0415

    from ..errors import UserError  # noqa: PLC0415
    from ..models import load_model  # noqa: PLC0415
    from ..profile.artifact import Profile  # noqa: PLC0415

    try:
        profile = Profile.load(Path(run_dir) / "profile.json")
    except UserError:
        return None, None
    loaded = load_model(profile.model, dtype=dtype, device=device)
    return loaded.model, loaded.tokenizer


def profile_space_file(run_dir: str) -> str | None:
    """The YAML file ``RUN/profile.json`` was profiled with, for a search without ``--space``.

    None when the profile names a built-in space (the search loads it by name) or cannot be
    read (the search says why). A file that is gone, or that changed since, is refused with a
    line asking for ``--space``: its name inside the YAML is no space the search could load.
    """
    from pathlib import Path  # noqa: PLC0415

    from ..errors import UserError  # noqa: PLC0415
    from ..profile.artifact import Profile  # noqa: PLC0415
    from ..profile.run import space_fingerprint  # noqa: PLC0415
    from ..search.space import builtin_spaces, load_space  # noqa: PLC0415

    path = Path(run_dir) / "profile.json"
    try:
        profile = Profile.load(path)
    except UserError:
        return None
    source = profile.meta.get("space_source")
    if not isinstance(source, str) or not source.endswith((".yaml", ".yml")) or \
            (profile.space in builtin_spaces() and source == f"{profile.space}.yaml"):
        return None
    if not Path(source).is_file():
        problem = "is not found here"
    else:
        try:
            same = space_fingerprint(load_space(source)) == profile.space_fingerprint
            problem = None if same else "has changed since"
        except UserError:
            problem = "cannot be read now"
    if problem is not None:
        raise UserError(f"{path} was made with the search space file {source}, which {problem}; pass --space "
                        f"with the space to search (a file like {Path(source).name})")
    return source
