"""The ``apply`` verb as one function: a run directory's schedule -> a saved compressed model.

Reads ``RUN/schedule.json`` (the search's output), loads its model (the one given, else the
schedule's ``meta.model``, else the model ``RUN/profile.json`` was made from), compresses it in one shot with :func:`~autocompress.compress.apply.apply`
or in gated steps with :func:`~autocompress.compress.staged.staged_apply`, measures the
validation perplexity before and after, and saves the model with
:func:`~autocompress.compress.saving.save_compressed`.

Data: the run's calibration rows (``RUN/calibration.safetensors``, chosen by ``profile``)
feed the statistics, so the model shipped is the model the search measured; ``calib_tokens``
replaces them with that many tokens from the start of the calibration split (then the codes
may differ from the measured ones, and the result says so). With the run's rows, the GPTQ
codes come from ``RUN/codes/`` (:mod:`.code_cache`) when the profile or the search already
computed them. Distillation reads
``calib_tokens`` (default 8192) from the split. The ``valid_tokens`` after everything the
calibration drew from, never seen by the compression, are the validation slice.

Example::

    result = apply_run(ApplyConfig(run_dir=Path("runs/x"), staged=StagedConfig()))
    print(result.perplexity_after, result.out)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import UserError
from ..schedule import Schedule
from .staged import StagedConfig, StagedResult


@dataclass(frozen=True)
class ApplyConfig:
    """What :func:`apply_run` does. ``schedule``/``out`` default to ``RUN/schedule.json`` / ``RUN/model``."""

    run_dir: Path
    schedule: Path | None = None
    out: Path | None = None
    model: str | None = None
    data: str | None = None
    calib_tokens: int | None = None
    valid_tokens: int = 2048
    sequential: bool = False
    seq_len: int = 512
    batch_size: int = 8
    eval_window: int = 256
    staged: StagedConfig | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    device: torch.device | str = "cpu"  # where the model runs (see autocompress.device)
    dtype: torch.dtype = torch.float32  # how it is stored while compressing; statistics stay float32


@dataclass
class ApplyResult:
    """What :func:`apply_run` produced and measured."""

    out: Path
    model: str
    data: str
    bytes_before: int
    bytes_after: int
    bytes_predicted: int
    parameters_before: int
    parameters_after: int
    perplexity_before: float
    perplexity_after: float
    valid_tokens: int
    seconds: float
    staged: StagedResult | None = None
    calibration: str = ""


def _model_spec(config: ApplyConfig, schedule: Schedule, path: Path, profile) -> str:
    """The model to compress: given, else the schedule's ``meta.model``, else the run's profile's."""
    spec = config.model or schedule.meta.get("model") or (profile.model if profile is not None else None)
    if not isinstance(spec, str) or not spec:
        raise UserError(f"{path} does not name its model (meta.model) and the run has no profile.json; "
                        f"pass the model with --model")
    return spec


def apply_run(config: ApplyConfig) -> ApplyResult:
    """Compress the model of ``config.run_dir``'s schedule and save it; see the module docstring."""
    from ..data import Split, bos_id, load_tokens  # noqa: PLC0415
    from ..evaluate import perplexity  # noqa: PLC0415
    from ..models import load_model, model_fingerprint, parameter_count  # noqa: PLC0415
    from ..profile.artifact import Profile  # noqa: PLC0415
    from ..run_calibration import load_calibration  # noqa: PLC0415
    from .apply import apply  # noqa: PLC0415
    from .calibrate import token_batch  # noqa: PLC0415
    from .code_cache import CodeCache  # noqa: PLC0415
    from .memory import MemoryModel, dense_bytes, stored_bytes  # noqa: PLC0415
    from .saving import save_compressed  # noqa: PLC0415
    from .staged import staged_apply  # noqa: PLC0415

    started = time.perf_counter()
    if config.calib_tokens is not None and config.calib_tokens < config.seq_len:
        raise UserError(f"--calib-tokens {config.calib_tokens} is less than one row of --seq-len {config.seq_len}; "
                        f"raise --calib-tokens or lower --seq-len")
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found; run `autocompress search` first or give another RUN")
    schedule_path = Path(config.schedule) if config.schedule else run_dir / "schedule.json"
    out = Path(config.out) if config.out else run_dir / "model"
    if out.exists() and not config.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite or choose another --out")
    schedule = Schedule.load(schedule_path)
    profile = Profile.load(run_dir / "profile.json") if (run_dir / "profile.json").exists() else None
    spec = _model_spec(config, schedule, schedule_path, profile)
    profile_data = profile.data if profile is not None and profile.data != "tokens" else None
    data = config.data or schedule.meta.get("data") or profile_data or "stdlib-docs"

    loaded = load_model(spec, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)
    model = loaded.model
    fingerprint = model_fingerprint(model)
    schedule.validate(model, fingerprint=fingerprint)
    bos = bos_id(loaded.tokenizer)  # every window starts with BOS when the tokenizer adds one
    recorded = profile.meta.get("calibration", {}).get("fingerprint") if profile is not None else None
    run_calibration = load_calibration(run_dir, recorded) if profile is not None else None
    calib_count = config.calib_tokens or 8192
    calib = load_tokens(data, loaded.tokenizer, Split.CALIBRATION, calib_count)
    span = run_calibration.span if run_calibration is not None else 0
    as_measured = run_calibration is not None and config.calib_tokens is None and config.staged is None
    if as_measured:
        calib_rows, valid_start = run_calibration.rows, span
        described = f"the run's {run_calibration.mode} rows ({run_calibration.fingerprint}), as measured"
    else:
        calib_rows, valid_start = calib.tokens, max(calib_count, span)
        described = f"the first {calib_count} tokens of the calibration split"
    valid = load_tokens(data, loaded.tokenizer, Split.CALIBRATION, config.valid_tokens, start=valid_start)
    window = min(config.eval_window, config.valid_tokens)
    memory = MemoryModel.from_model(model)
    bytes_before, params_before = dense_bytes(model), parameter_count(model)
    predicted = memory.schedule_bytes(schedule)

    staged = None
    if config.staged is not None:
        if profile is not None:
            profile.check_matches(fingerprint, path=run_dir / "profile.json")
        staged_config = replace(config.staged, eval_window=window)
        staged = staged_apply(model, schedule, calib.tokens, valid.tokens, staged_config, run_dir,
                              tokenizer=loaded.tokenizer, profile=profile, fingerprint=fingerprint)
        model, schedule = staged.model, staged.schedule
        predicted = staged.final_bytes
        ppl_before, ppl_after = staged.original.perplexity, staged.final.perplexity
    else:
        ppl_before = perplexity(model, valid.tokens, window=window, bos=bos)
        # The run's rows and original activations: the codes the profile and the search computed.
        cache = CodeCache.for_run(run_dir, fingerprint, calib_rows) if as_measured and not config.sequential else None
        rows = calib_rows if calib_rows.dim() == 2 else token_batch(calib_rows, config.seq_len, bos=bos)
        apply(model, schedule, rows, progress=config.progress, seq_len=config.seq_len,
              batch_size=config.batch_size, fingerprint=fingerprint, sequential=config.sequential, cache=cache)
        ppl_after = perplexity(model, valid.tokens, window=window, bos=bos)
    save_compressed(model, loaded.tokenizer, schedule, out, overwrite=config.overwrite)
    return ApplyResult(out=out, model=spec, data=data, bytes_before=bytes_before, bytes_after=stored_bytes(model),
                       bytes_predicted=predicted, parameters_before=params_before,
                       parameters_after=parameter_count(model), perplexity_before=ppl_before,
                       perplexity_after=ppl_after, valid_tokens=int(valid.tokens.numel()),
                       seconds=time.perf_counter() - started, staged=staged, calibration=described)


def apply_table(result: ApplyResult):
    """A rich table of one apply run."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"apply: {result.model} -> {result.out}")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    table.add_row("size as stored (MiB)", f"{result.bytes_before / 2**20:.2f}", f"{result.bytes_after / 2**20:.2f}")
    table.add_row("size predicted (MiB)", "-", f"{result.bytes_predicted / 2**20:.2f}")
    table.add_row("parameters", f"{result.parameters_before:,}", f"{result.parameters_after:,}")
    table.add_row(f"validation perplexity ({result.valid_tokens:,} tokens)", f"{result.perplexity_before:.3f}",
                  f"{result.perplexity_after:.3f}")
    table.add_row("calibration", "", result.calibration)
    table.add_row("wall time", "", f"{result.seconds:.1f} s")
    return table
