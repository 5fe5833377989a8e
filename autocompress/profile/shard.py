"""Sharded profiling: each machine measures a share of the units, one merge writes ``profile.json``.

A unit's measurement depends only on the original model's activations, the run's calibration
rows and the space, never on the other units, so the units can be measured apart and put
together afterwards. :func:`profile_shard` measures shard K of N into
``RUN_K/profile.partial.json`` (a :class:`~autocompress.profile.artifact.PartialProfile`)
with ``RUN_K/calibration.safetensors`` beside it; :func:`merge_profiles` checks that the
partials belong together and cover every unit exactly once, and writes ``RUN/profile.json``
as one run would have, so ``search RUN`` reads it unchanged.

What a shard measures: the blocks that hold units, in order, are dealt out in turn (the
i-th to shard ``i % N``), every unit of a block to the same shard. With block granularity
that is every N-th unit from the K-th; with ``--granularity linear`` a block's linears stay
together, because GPTQ's Hessians and codes are computed per block and would otherwise be
computed once per shard. Shard 0 also measures what exists once per model: the embedding
units and the linguistic roles (every shard traces the whole model anyway). The merge then
gives each unit its block's roles and computes the proxy correlations over all units; the
additivity check (every unit changed at once, in one forward pass) needs every unit's
compressed copy in one process, so a sharded profile has none (``meta["shards"]`` says so).

Calibration rows: every shard must measure with the same rows. ``choose_calibration`` is
deterministic given the model, data, settings and seed (``first`` takes the head of the
split; ``curated`` clusters with a fixed seed and ranks windows by the model's loss), so
shards choose them alike; but the loss ranking is float arithmetic, which on another kind of
machine may break a near tie the other way. Each partial records the rows' fingerprint and
the merge refuses a mismatch; ``calibration_from`` (``--calibration-from RUN_0``) makes a
shard reuse another run's rows, which rules the mismatch out.

Example::

    profile_shard("smollm2-135m", "runs/x0", "0/2")        # on machine A
    profile_shard("smollm2-135m", "runs/x1", "1/2")        # on machine B
    merge_profiles(["runs/x0", "runs/x1"], "runs/x")       # after copying runs/x1 next to runs/x0
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import fingerprint
from ..errors import UserError
from .artifact import FINGERPRINTS, PARTIAL_FILE, PartialProfile, Profile
from .checkpoint import CHECKPOINT_DIR
from .run import (ProfileSettings, assign_roles, calibration_fits, choose_calibration, load_inputs, measure_run,
                  settings_record, unit_refs)

PROFILE_FILE = "profile.json"
ADDITIVITY_NOTE = ("no additivity check: it changes every unit at once, which no single shard holds; "
                   "profile without --shard to have it")
_WHAT = {"model": "model", "data": "data", "space": "search space", "settings": "profile settings",
         "calibration": "set of calibration rows"}


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UserError(f"--shard {self.index}/{self.count}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` -> Shard(K, N) (UserError naming the expected form otherwise)."""
        index, slash, count = text.strip().partition("/")
        if not slash or not index.isdigit() or not count.isdigit():
            raise UserError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2")
        return cls(int(index), int(count))

    def take(self, refs: list) -> list:
        """This shard's share of ``refs`` (UnitRefs in block order): the units of every
        ``count``-th block that has any, from the ``index``-th on."""
        blocks = list(dict.fromkeys(ref.block for ref in refs))
        mine = set(blocks[self.index::self.count])
        return [ref for ref in refs if ref.block in mine]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ShardOutcome:
    """What :func:`profile_shard` did: the partial profile, where it lives, and whether it was reused."""

    partial: PartialProfile
    path: Path
    reused: bool


def profile_shard(model_spec: str, out_dir: str | Path, shard: Shard | str, *, data: str = "stdlib-docs",
                  space="default", granularity: str | None = None, settings: ProfileSettings = ProfileSettings(),
                  calibration_from: str | Path | None = None, force: bool = False,
                  trust_remote_code: bool = False, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> ShardOutcome:
    """Measure shard ``shard`` (a :class:`Shard` or ``"K/N"``) of the profile into
    ``out_dir/profile.partial.json``, or reuse the one there.

    Arguments as for :func:`~autocompress.profile.run.profile_run`; every shard of one profile
    needs the same model, data, space and settings, and its own ``out_dir``. The additivity
    check is off (``settings.additivity`` is ignored). The calibration rows are chosen as
    ``profile_run`` chooses them, or read from ``calibration_from/calibration.safetensors``
    (they must be the rows the calibration settings ask for), and written to
    ``out_dir/calibration.safetensors``. Units are checkpointed in ``out_dir/profile.units/``,
    so a killed shard resumes. An existing partial of other inputs is refused unless ``force``.
    """
    from ..run_calibration import load_calibration, save_calibration  # noqa: PLC0415

    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    settings = dataclasses.replace(settings, additivity=False)
    inputs = load_inputs(model_spec, data=data, space=space, granularity=granularity, settings=settings,
                         trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    refs = unit_refs(inputs.loaded.model, inputs.space)
    blocks = len({ref.block for ref in refs})
    if shard.count > blocks:
        raise UserError(f"--shard {shard}: the space has units in only {blocks} blocks; use at most {blocks} shards")
    record = settings_record(settings)
    wanted = {"model": inputs.model_fp, "data": inputs.data_fp, "space": inputs.space_fp,
              "settings": fingerprint(record)}
    given = _calibration_from(calibration_from, settings, inputs.bos) if calibration_from is not None else None
    path = Path(out_dir) / PARTIAL_FILE
    if path.exists() and not force:
        existing = PartialProfile.load(path)
        try:
            if (existing.shard, existing.shards) != (shard.index, shard.count):
                raise UserError(f"{path} is shard {existing.shard}/{existing.shards}, not {shard}")
            for what, value in wanted.items():
                if existing.fingerprints[what] != value:
                    raise UserError(f"{path} was made for another {_WHAT[what]} (fingerprint "
                                    f"{existing.fingerprints[what]}, now {value})")
            recorded = existing.fingerprints["calibration"]
            if given is not None and given.fingerprint != recorded:
                raise UserError(f"{path} was made with other calibration rows than {calibration_from} holds")
            load_calibration(out_dir, recorded)
        except UserError as exc:
            raise UserError(f"{exc}; pass --force to replace it") from None
        return ShardOutcome(existing, path, True)
    calibration = given if given is not None else choose_calibration(inputs.loaded, data, settings)
    save_calibration(out_dir, calibration)
    profile, checkpoint = measure_run(inputs, out_dir, settings, calibration, force=force, shard=shard)
    partial = PartialProfile(shard=shard.index, shards=shard.count,
                             fingerprints={**wanted, "calibration": calibration.fingerprint}, settings=record,
                             unit_names=[ref.name for ref in refs], measured=[u.name for u in profile.units],
                             profile=profile)
    partial.save(path)
    checkpoint.clear()
    return ShardOutcome(partial, path, False)


def _calibration_from(run: str | Path, settings: ProfileSettings, bos: int | None):
    """The calibration rows of ``run``, checked against the calibration settings."""
    from ..run_calibration import CALIBRATION_FILE, load_calibration  # noqa: PLC0415

    calibration = load_calibration(run)
    if calibration is None:
        raise UserError(f"--calibration-from {run}: no {CALIBRATION_FILE} there; give a folder `autocompress "
                        f"profile` wrote, e.g. shard 0's")
    if not calibration_fits(calibration.describe(), settings, bos):
        described = calibration.describe()
        raise UserError(f"--calibration-from {run}: its rows ({described['rows']} x {described['seq_len']}, "
                        f"{described['mode']}) are not what --calib-tokens, --calib-seq-len and --calibration "
                        f"ask for; give the options that run was made with")
    return calibration


def merge_profiles(runs: list[str | Path], out_dir: str | Path, *, force: bool = False) -> Profile:
    """Merge the partial profiles of ``runs`` (the folders ``profile_shard`` wrote, any order)
    into ``out_dir/profile.json``, with ``out_dir/calibration.safetensors`` and the shards'
    GPTQ codes (``codes/``) beside it; returns the profile.

    Refused, with one line naming the problem: a folder without a partial profile, shards of
    different splits (K/N with another N), a shard given twice or missing, partials of another
    model, data, space, profile settings or calibration rows, units not covered exactly once.
    The merged profile equals an unsharded run's (same settings) but for the additivity check
    (none; ``meta["shards"]`` says why) and the timings: ``seconds`` and ``meta["timings"]``
    are the slowest shard's (shards run side by side), CPU seconds the sum. An existing
    ``out_dir/profile.json`` of other inputs is refused unless ``force``.
    """
    from ..run_calibration import CALIBRATION_FILE, load_calibration, save_calibration  # noqa: PLC0415

    if not runs:
        raise UserError("--merge needs the shards' run folders, e.g. --merge runs/x0 runs/x1")
    parts = _load_parts([Path(run) for run in runs])
    first_run, first = parts[0]
    units = {}
    for run, part in parts:
        for unit in part.profile.units:
            if unit.name in units:
                raise UserError(f"unit {unit.name} is measured by two shards ({units[unit.name][0]} and {run})")
            units[unit.name] = (run, unit)
    missing = [name for name in first.unit_names if name not in units]
    if missing or len(units) != len(first.unit_names):
        lacking = missing[0] if missing else sorted(set(units) - set(first.unit_names))[0]
        raise UserError(f"the shards do not cover every unit exactly once (first problem: {lacking}); "
                        f"profile every shard with the same version of autocompress")
    profile = _merged(parts, [units[name][1] for name in first.unit_names])

    out = Path(out_dir)
    path = out / PROFILE_FILE
    if path.exists() and not force:
        existing = Profile.load(path)
        try:
            existing.check_matches(profile.model_fingerprint, profile.data_fingerprint, profile.space_fingerprint,
                                   path=path)
            if existing.meta.get("calibration", {}).get("fingerprint") != first.fingerprints["calibration"]:
                raise UserError(f"{path} was made with other calibration rows")
        except UserError as exc:
            raise UserError(f"{exc} (or pass --force to replace it)") from None
    calibration = next((load_calibration(run, part.fingerprints["calibration"]) for run, part in parts
                        if (run / CALIBRATION_FILE).exists()), None)
    if calibration is None:
        raise UserError(f"none of the shards' folders holds its {CALIBRATION_FILE}; copy the whole folders, "
                        f"e.g. {first_run}, not only {PARTIAL_FILE}")
    save_calibration(out, calibration)
    for run, _ in parts:
        _copy_codes(run, out)
    profile.save(path)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # an unsharded run's leftovers there: superseded
    return profile


def _load_parts(runs: list[Path]) -> list[tuple[Path, PartialProfile]]:
    """The partials of ``runs``, sorted by shard, checked to be the whole of one split."""
    parts = []
    for run in runs:
        if not (run / PARTIAL_FILE).exists():
            raise UserError(f"{run} holds no {PARTIAL_FILE}; give the folders `autocompress profile --shard K/N "
                            f"--out FOLDER` wrote")
        parts.append((run, PartialProfile.load(run / PARTIAL_FILE)))
    first_run, first = parts[0]
    for run, part in parts[1:]:
        if part.shards != first.shards:
            raise UserError(f"{run} is shard {part.shard}/{part.shards} but {first_run} is shard "
                            f"{first.shard}/{first.shards}; merge the shards of one split")
        for what in FINGERPRINTS:
            if part.fingerprints[what] != first.fingerprints[what]:
                detail = _settings_difference(first.settings, part.settings) if what == "settings" else ""
                raise UserError(f"{run} was profiled with another {_WHAT[what]} than {first_run}{detail} "
                                f"(fingerprint {part.fingerprints[what]} vs {first.fingerprints[what]}); "
                                f"profile every shard with the same MODEL, --data, --space and options")
    seen: dict[int, Path] = {}
    for run, part in parts:
        if part.shard in seen:
            raise UserError(f"shard {part.shard}/{part.shards} is given twice ({seen[part.shard]} and {run})")
        seen[part.shard] = run
    absent = [k for k in range(first.shards) if k not in seen]
    if absent:
        raise UserError(f"shard {absent[0]}/{first.shards} is missing (given: "
                        f"{', '.join(f'{k}/{first.shards}' for k in sorted(seen))}); add its folder to --merge")
    return sorted(parts, key=lambda item: item[1].shard)


def _settings_difference(mine: dict, theirs: dict) -> str:
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    return f" ({keys[0]}: {theirs.get(keys[0])!r} vs {mine.get(keys[0])!r})" if keys else ""


def _merged(parts: list[tuple[Path, PartialProfile]], units: list) -> Profile:
    """One profile from shard 0's whole-model parts and every shard's units."""
    from .proxies import proxy_correlations  # noqa: PLC0415

    first = parts[0][1]
    base = first.profile
    meta = dict(base.meta)
    if "roles" in meta:
        assign_roles(units, meta["roles"])
    profiles = [part.profile for _, part in parts]
    stages = list(dict.fromkeys(stage for p in profiles for stage in p.meta.get("timings", {})))
    meta["timings"] = {s: max(p.meta.get("timings", {}).get(s, 0.0) for p in profiles) for s in stages}
    meta["cpu_timings"] = {s: sum(p.meta.get("cpu_timings", {}).get(s, 0.0) for p in profiles) for s in stages}
    meta["cpu_seconds"] = sum(p.meta.get("cpu_seconds", 0.0) for p in profiles)
    meta["shards"] = {"count": first.shards, "runs": [str(run) for run, _ in parts],
                      "seconds": [p.seconds for p in profiles], "additivity": ADDITIVITY_NOTE}
    proxies = first.settings.get("proxies", True)
    return dataclasses.replace(base, units=units, additivity=[],
                               proxy_spearman=proxy_correlations(units, base.labels()) if proxies else {},
                               seconds=max(p.seconds for p in profiles), meta=meta)


def _copy_codes(run: Path, out: Path) -> None:
    """Copy ``run``'s GPTQ code files into ``out/codes/`` (each a temp file, then a rename);
    files already there are kept (the cache checks every file's key when it reads it)."""
    from ..compress.code_cache import CODES_DIR  # noqa: PLC0415

    source, target = run / CODES_DIR, out / CODES_DIR
    if not source.is_dir() or (target.exists() and source.resolve() == target.resolve()):
        return
    for file in sorted(source.glob("[!.]*.safetensors")):
        if (target / file.name).exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=target)
        os.close(fd)
        try:
            shutil.copyfile(file, tmp)
            os.replace(tmp, target / file.name)
        except OSError as exc:
            raise UserError(f"cannot copy {file} into {target}: {exc.strerror or exc}; free some space") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
