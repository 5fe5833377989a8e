"""``autocompress transfer SCHEDULE NEW_MODEL --budget ...``: reuse a learned schedule on another model."""
from __future__ import annotations

from .common import add_device_options, add_threads, add_trust_remote_code, device_options


def register(verbs) -> None:
    """Add the ``transfer`` sub-command."""
    tr = verbs.add_parser(
        "transfer", help="map a learned schedule onto another model and meet a new budget",
        description="Map SCHEDULE (a schedule.json or a run directory) onto NEW_MODEL by role and relative "
                    "depth, then repair it to meet --budget exactly, spending bytes where the predicted loss "
                    "per byte is best. No profile of NEW_MODEL is needed; --profile uses one.")
    tr.add_argument("schedule", metavar="SCHEDULE", help="schedule.json or a run directory holding one")
    tr.add_argument("model", metavar="NEW_MODEL", help="hub id, local or compressed directory, .gguf, or alias")
    tr.add_argument("--budget", action="append", required=True,
                    help="memory=60MB|45%%, avg-bits=3.5, params=70%%, latency=4ms@h100 (repeat or comma-join)")
    tr.add_argument("--space", help="search space (name or YAML) the target may use "
                                    "(default: every bit width plus the pruning kinds the source used)")
    tr.add_argument("--profile", help="profile.json (or run directory) of NEW_MODEL, to price choices by it")
    tr.add_argument("--predictor", help="sensitivity predictor JSON, used when no profile summary is at hand")
    tr.add_argument("--signature-tokens", type=int, default=1024,
                    help="calibration tokens for one forward pass of NEW_MODEL that aligns its blocks to the "
                         "source's by block influence (default: 1024; 0: align by relative depth alone)")
    tr.add_argument("--check-tokens", type=int, default=2048,
                    help="calibration tokens of NEW_MODEL on which the transfer and --check-count exchanges of it "
                         "(two same-size units trading choices) are measured end to end, keeping the lowest KL "
                         "(default: 2048; 0: no check)")
    tr.add_argument("--check-count", type=int, default=6,
                    help="exchanges the check measures, plus a third as many one-up-one-down neighbours "
                         "(default: 6; 0: no check)")
    tr.add_argument("--data", default="stdlib-docs",
                    help="calibration data spec for the signature and the check (default: stdlib-docs)")
    tr.add_argument("--out", default="transfer-run", help="run directory for schedule.json (default: transfer-run)")
    add_trust_remote_code(tr)
    add_threads(tr)
    add_device_options(tr)
    tr.set_defaults(run=run)


def _label(choice) -> str:
    from ..transfer.sensitivity import choice_labels  # noqa: PLC0415

    return "+".join(choice_labels(choice)) or "bits=16"


def _block_of(name: str) -> str:
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return digits[0] if digits else name


def _check_table(check: dict):
    """The candidates the check measured: what each changed, its KL and perplexity, which was kept."""
    from rich.table import Table  # noqa: PLC0415

    from ..schedule import Choice  # noqa: PLC0415

    table = Table(title=f"check: KL to NEW_MODEL's own output on {check['tokens']:,} calibration tokens")
    for column in ("candidate", "changed", "KL", "perplexity", ""):
        table.add_column(column, justify="right" if column in ("KL", "perplexity") else "left")
    for number, candidate in enumerate(check["candidates"]):
        changed = ", ".join(f"{_block_of(name)}: {_label(Choice.from_json(choice))}"
                            for name, choice in candidate["changed"].items()) or "the transfer"
        measured = "kl" in candidate
        table.add_row(str(number), changed, f"{candidate['kl']:.4f}" if measured else "-",
                      f"{candidate['ppl']:.2f}" if measured else "-", "kept" if number == check["chosen"] else "")
    return table


def run(args) -> int:
    """Transfer, write RUN/schedule.json, print the per-unit table and the budget achieved."""
    from pathlib import Path  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from ..artifacts import check_output  # noqa: PLC0415
    from ..compress.memory import MemoryModel, unit_bytes  # noqa: PLC0415
    from ..errors import UserError  # noqa: PLC0415
    from ..models import load_model  # noqa: PLC0415
    from ..profile.artifact import Profile  # noqa: PLC0415
    from ..schedule import Choice  # noqa: PLC0415
    from ..search.budget import Budget, check_specs, format_figure  # noqa: PLC0415
    from ..search.space import load_space  # noqa: PLC0415
    from ..transfer import load_source, transfer_schedule  # noqa: PLC0415
    from ..transfer.predictor import SensitivityPredictor  # noqa: PLC0415

    check_specs(args.budget)
    check_output(args.out, "--out", directory=True)
    device, dtype = device_options(args)
    source = load_source(args.schedule)
    profile = None
    if args.profile:
        path = Path(args.profile)
        path = path / "profile.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"{args.profile}: no profile.json there; run `autocompress profile NEW_MODEL` first")
        profile = Profile.load(path)
    predictor = SensitivityPredictor.load(args.predictor) if args.predictor else None
    space = load_space(args.space) if args.space else None
    loaded = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    model = loaded.model
    memory = MemoryModel.from_model(model)
    if not memory.blocks:
        raise UserError(f"{args.model}: no decoder blocks found; transfer needs a decoder-only transformer")
    budget = Budget.parse(args.budget, memory)
    for flag, value in (("--signature-tokens", args.signature_tokens), ("--check-tokens", args.check_tokens),
                        ("--check-count", args.check_count)):
        if value < 0:
            raise UserError(f"{flag} must be 0 or more, got {value}")
    from ..data import bos_id, load_tokens  # noqa: PLC0415

    signature = args.signature_tokens if source.meta.get("source_signature") is not None else 0
    check = args.check_tokens if args.check_count > 0 else 0
    # both are prefixes of the calibration split: tokenize it once
    stream = load_tokens(args.data, loaded.tokenizer, "calibration", max(signature, check)).tokens \
        if max(signature, check) > 0 else None
    tokens = stream[:signature] if signature > 0 else None
    check_tokens = stream[:check] if check > 0 else None
    result = transfer_schedule(source, model, budget, space=space, profile=profile, predictor=predictor,
                               signature_tokens=tokens, check_tokens=check_tokens, check_count=args.check_count,
                               bos=bos_id(loaded.tokenizer))
    out = Path(args.out)
    result.save(out / "schedule.json")  # makes the directory; a failed write is one line

    info = result.meta["transfer"]
    source_depths = {name: entry["relative_depth"] for name, entry in source.meta.get("agnostic", {}).items()}
    table = Table(title=f"transfer {info['source_model'].get('family', '?')} "
                        f"({info['source_model'].get('blocks', '?')} blocks) -> {info['target_model']['family']} "
                        f"({info['target_model']['blocks']} blocks); losses from {info['losses']}")
    for column in ("unit", "depth", "source units (depth)", "mapped", "final", "bytes"):
        table.add_column(column, justify="right" if column in ("depth", "bytes") else "left")
    for name, entry in info["units"].items():
        sources = ", ".join(f"{_block_of(s)} ({source_depths[s]:.2f})" if s in source_depths else _block_of(s)
                            for s in entry["sources"]) or "-"
        final = Choice.from_json(entry["final"])
        table.add_row(name, f"{entry['source_depth']:.2f}", sources, _label(Choice.from_json(entry["mapped"])),
                      _label(final), f"{unit_bytes(memory, name, final):,}")
    console = Console()
    console.print(table)
    if info["alignment"]["by"] != "relative_depth":
        console.print(f"blocks aligned by {info['alignment']['by']}: target block -> source block "
                      f"{info['alignment']['source_blocks']}")
    if info["check"] is not None:
        console.print(_check_table(info["check"]))
    figures = budget.evaluate(result)
    for limit in budget.limits:
        console.print(f"budget {limit.spec}: {limit.describe(figures[limit.figure])} "
                      f"(limit {limit.describe(limit.value)}, {100 * figures[limit.figure] / limit.value:.2f}% used)")
    console.print(f"model: {format_figure('memory_bytes', figures['memory_bytes'])} stored, "
                  f"{figures['avg_bits']:.3f} average bits")
    console.print(f"wrote {out / 'schedule.json'}")
    return 0
