"""The ``profile`` verb: measure every unit under every probe choice, add proxies and roles.

:func:`profile_model` is the library function (a loaded model, a token stream, a search
space -> :class:`~autocompress.profile.artifact.Profile`); :func:`profile_run` is the run
directory wrapper the CLI calls: it loads everything from specs, reuses ``RUN/profile.json``
when the model, data and space are unchanged, and refuses a mismatched one unless forced.
Sharded profiling (a share of the units per machine, merged afterwards) lives in
:mod:`autocompress.profile.shard` and builds on the same pieces.

Example::

    loaded = load_model("smollm2-135m")
    stream = load_tokens("stdlib-docs", loaded.tokenizer, "calibration", 4096)
    profile = profile_model(loaded, stream, load_space("default"), ProfileSettings(tokens=2048))
    profile.unit("model.layers.29").kl["bits=2"]
"""
from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..artifacts import fingerprint
from ..compress.apply import DroppedBlock, compress_block, needs_calibration
from ..compress.calibrate import BlockInputs, capture_block_inputs, run_block, token_batch
from ..errors import UserError
from ..models import LoadedModel, adapter_for, model_fingerprint
from ..progress import console, progress_bar
from ..schedule import Choice
from ..search.space import Granularity, SearchSpace, label_bits
from .additivity import ChainedRun, additivity_check
from .artifact import Profile, UnitProfile
from .checkpoint import CHECKPOINT_DIR, EXTRA, UnitCheckpoints, checkpoint_key
from .proxies import (LinearInputNorms, block_influence, fisher_score, mean_token_norm, proxy_correlations,
                      squared_gradients, weight_stats)
from .sensitivity import Trace, swapped, trace_model

if TYPE_CHECKING:
    from .shard import Shard


@dataclass(frozen=True)
class ProfileSettings:
    """How much to measure.

    ``tokens`` calibration tokens (cut into rows of ``seq_len``) are measured for every unit
    and choice; ``role_tokens`` feed the linguistic probes (the stream must hold the larger of
    the two). ``fisher_rows`` sequences get a backward pass for the Fisher proxy (None: all).
    ``calib_tokens`` in rows of ``calib_seq_len``, chosen by ``calibration`` (``curated``:
    coverage plus hard windows, or ``first``), are the run's calibration rows: GPTQ Hessians
    and Wanda norms of the profile, the search and ``apply`` all come from them. Lengths count
    text tokens: with a tokenizer that adds BOS every row is BOS plus ``seq_len`` (or
    ``calib_seq_len``) of them (see :mod:`autocompress.data`).
    """

    tokens: int = 2048
    seq_len: int = 256
    batch_size: int = 8
    roles: bool = True
    role_tokens: int = 4096
    proxies: bool = True
    fisher_rows: int | None = None
    additivity: bool = True
    seed: int = 0
    progress: bool = True
    calib_tokens: int = 4096
    calib_seq_len: int = 512
    calibration: str = "curated"


@dataclass(frozen=True)
class UnitRef:
    """One searchable unit: its name, block index and the linear's path inside the block (None: whole block)."""

    name: str
    block: int
    path: str | None
    role: str


def unit_refs(model: nn.Module, space: SearchSpace) -> list[UnitRef]:
    """The space's units of ``model`` in block order, frozen ones left out."""
    adapter = adapter_for(model)
    wanted = set(space.units(model))
    refs = []
    for index in range(len(adapter.blocks(model))):
        block = f"{adapter.blocks_path}.{index}"
        if space.granularity is Granularity.BLOCK:
            refs.append(UnitRef(block, index, None, "block"))
        else:
            refs += [UnitRef(f"{block}.{path}", index, path, role) for role, path in adapter.linears.items()]
    return [ref for ref in refs if ref.name in wanted]


def calibration_rows(tokens: torch.Tensor, settings: ProfileSettings, bos: int | None = None) -> torch.Tensor:
    """The measured calibration tokens as rows [n, seq_len] (UserError when too few), each
    starting with the tokenizer's ``bos`` id when given ([n, seq_len + 1])."""
    if tokens.numel() < settings.tokens:
        raise UserError(f"the calibration data has {tokens.numel()} tokens, fewer than the {settings.tokens} "
                        f"asked for; lower --tokens or give more text")
    if settings.tokens < settings.seq_len:
        raise UserError(f"--tokens {settings.tokens} is less than one sequence of --seq-len {settings.seq_len}")
    return token_batch(tokens[: settings.tokens], settings.seq_len, bos=bos)


def data_fingerprint(tokens: torch.Tensor, settings: ProfileSettings, bos: int | None = None) -> str:
    """Fingerprint of exactly what is measured: the token ids (BOS included), their count and the row length."""
    rows = calibration_rows(tokens, settings, bos)
    return fingerprint(hashlib.sha256(rows.numpy().tobytes()).digest(), rows.numel(), settings.seq_len)


def space_fingerprint(space: SearchSpace) -> str:
    """Fingerprint of a search space's settings (its file name and description included)."""
    return fingerprint(space.to_json())


def settings_record(settings: ProfileSettings) -> dict:
    """The settings that decide what is measured, as a plain dict (``progress`` left out)."""
    return {k: v for k, v in asdict(settings).items() if k != "progress"}


def _unit_modules(model: nn.Module, ref: UnitRef) -> dict[str, nn.Module]:
    """Full path -> linear module of every weight the unit holds."""
    adapter = adapter_for(model)
    block = adapter.blocks(model)[ref.block]
    prefix = f"{adapter.blocks_path}.{ref.block}"
    paths = [ref.path] if ref.path is not None else list(adapter.linears.values())
    return {f"{prefix}.{path}": block.get_submodule(path) for path in paths}


def _static_proxies(trace: Trace, ref: UnitRef, modules: dict[str, nn.Module], norms: LinearInputNorms) -> dict:
    weights = [m.weight for m in modules.values() if isinstance(m, nn.Linear)]
    proxies = weight_stats(weights) if weights else {}
    proxies["block_influence"] = block_influence(trace.hidden[ref.block], trace.hidden[ref.block + 1])
    if ref.path is None:
        proxies["activation_norm"] = mean_token_norm(trace.hidden[ref.block])
    else:
        proxies["activation_norm"] = norms.mean(next(iter(modules)))
    return proxies


def _role_states(loaded: LoadedModel, trace: Trace, tokens: torch.Tensor, settings: ProfileSettings,
                 bos: int | None = None):
    """Hidden states of every layer ([n, hidden] each) and the token ids the probes read
    (text tokens only: a BOS column in front of the rows is left out)."""
    skip = 0 if bos is None else 1
    if settings.role_tokens <= trace.tokens[:, skip:].numel():
        rows, hidden = trace.tokens, trace.hidden
    else:
        if tokens.numel() < settings.role_tokens:
            raise UserError(f"the calibration data has {tokens.numel()} tokens, fewer than the "
                            f"{settings.role_tokens} --role-tokens asked for")
        rows = token_batch(tokens[: settings.role_tokens], settings.seq_len, bos=bos)
        hidden = trace_model(loaded.model, rows, batch_size=settings.batch_size, reference=False).hidden
    rows = rows[:, skip:]
    n = min(settings.role_tokens, rows.numel())
    flat = [h[:, skip:].reshape(-1, h.shape[-1])[:n] for h in hidden]
    return flat, rows.reshape(-1)[:n]


class BlockStatsSource:
    """Each block's statistics on the original model's activations over calibration rows, one block at a time.

    Only the inputs of the block asked for are kept: the calibration activations are carried
    forward block by block (blocks are asked for in order; an earlier one starts again from
    the embedding), never held for every block at once.
    """

    def __init__(self, model: nn.Module, rows: torch.Tensor | None, batch_size: int, choices=(), store=None,
                 cache=None):
        self.model, self.batch_size, self.choices = model, batch_size, list(choices)
        self.store = store  # keeps every block's statistics (and GPTQ codes) when given
        self.cache = cache  # the run's CodeCache: codes on disk for the search and apply
        self.rows = rows
        self.inputs, self.position = None, 0  # the inputs of block ``position``
        self.current: tuple[int, dict] | None = None

    def block_inputs(self, index: int) -> BlockInputs:
        """The original model's inputs to block ``index`` over the calibration rows."""
        if self.inputs is None or index < self.position:
            self.inputs, self.position = capture_block_inputs(self.model, self.rows, batch_size=self.batch_size), 0
        blocks = adapter_for(self.model).blocks(self.model)
        while self.position < index:
            self.inputs = self.inputs.with_hidden(run_block(blocks[self.position], self.inputs,
                                                            batch_size=self.batch_size))
            self.position += 1
        return self.inputs

    def stats(self, index: int) -> dict | None:
        """The statistics of block ``index`` (None without calibration rows)."""
        from ..compress.apply import block_stats  # noqa: PLC0415

        if self.rows is None:
            return None
        if self.current is None or self.current[0] != index:
            block = adapter_for(self.model).blocks(self.model)[index]
            self.current = None  # the previous block's statistics go before this block's are made
            stats = block_stats(block, self.model, self.block_inputs(index), batch_size=self.batch_size,
                                choices=self.choices, cache=self.cache, index=index)
            self.current = (index, stats)
            if self.store is not None:
                self.store[index] = stats
        return self.current[1]


@contextmanager
def _timed(stage: str, timings: dict[str, float], cpu: dict[str, float]):
    """Record the wall and CPU seconds of the ``with`` body under ``stage``."""
    tick, cpu_tick = time.perf_counter(), time.process_time()
    yield
    timings[stage], cpu[stage] = time.perf_counter() - tick, time.process_time() - cpu_tick


def _measure_unit(trace: Trace, model: nn.Module, ref: UnitRef, probes, settings: ProfileSettings, stats,
                  squared: dict, norms: LinearInputNorms, keep_for_additivity: dict, advance) -> UnitProfile:
    """One unit's KL and loss change under every probe choice, with its proxies; the compressed
    replacements at the additivity labels go to ``keep_for_additivity``'s chained runs."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    modules = _unit_modules(model, ref)
    unit = UnitProfile(name=ref.name, block=ref.block, role=ref.role,
                       relative_depth=ref.block / max(len(blocks) - 1, 1),
                       parameters=sum(p.numel() for m in modules.values() for p in m.parameters()))
    if ref.path is None:
        unit.parameters = sum(p.numel() for p in blocks[ref.block].parameters())
    if settings.proxies:
        unit.proxies.update(_static_proxies(trace, ref, modules, norms))
    for label, choice in probes:
        kl, delta, changed = _measure_one(trace, model, ref, choice, stats)
        unit.kl[label], unit.loss_delta[label] = kl, delta
        if squared:
            prefix = f"{adapter.blocks_path}.{ref.block}."
            as_full = changed if isinstance(changed, DroppedBlock) else (
                {prefix + p: m for p, m in changed.items()} if isinstance(changed, dict)
                else {name: changed.get_submodule(name[len(prefix):]) for name in modules})
            score = fisher_score(squared, modules, as_full)
            if score is not None:
                unit.proxies[f"fisher:{label}"] = score
        if label in keep_for_additivity:
            _keep(keep_for_additivity, label, ref, changed)
        advance()
    return unit


def _keep(keep_for_additivity: dict, label: str, ref: UnitRef, changed) -> None:
    # A ChainedRun: the blocks before this one go through it now, so no more than one
    # block's replacements are held at a time.
    keep_for_additivity[label].add(ref.block, changed)


def _keep_replacements(trace: Trace, model: nn.Module, ref: UnitRef, probes, stats, keep_for_additivity: dict) -> None:
    """The compressed replacements of a unit measured by an earlier, interrupted run, at the
    additivity labels (compressing is deterministic per choice, so they equal the measured ones)."""
    for label, choice in probes:
        if label in keep_for_additivity:
            _keep(keep_for_additivity, label, ref, _compress_one(trace, model, ref, choice, stats))


def _embedding_units(model: nn.Module, rows: torch.Tensor, space: SearchSpace,
                     settings: ProfileSettings) -> list[UnitProfile]:
    """The token embedding's (and an untied head's) measurements under the space's embedding choices."""
    choices = space.embedding_choices()
    from ..search.decisions import embedding_slots  # noqa: PLC0415
    from .embedding import measure_embedding_units  # noqa: PLC0415

    count = len(embedding_slots(space, model))
    with progress_bar(f"measuring {count} embedding unit(s) x {len(choices)} choices", count * len(choices),
                      settings.progress) as advance:
        return measure_embedding_units(model, rows, space, batch_size=settings.batch_size, advance=advance)


def _probe_roles(loaded: LoadedModel, trace: Trace, tokens: torch.Tensor, settings: ProfileSettings,
                 units: list[UnitProfile], meta: dict, bos: int | None = None) -> dict[str, list[float]]:
    """Linguistic-role curves of every layer; each unit gets its block's roles (``meta["roles"]`` the details)."""
    from .probes import probe_roles  # noqa: PLC0415 (scikit-learn is imported only when probing)

    states, ids = _role_states(loaded, trace, tokens, settings, bos)
    roles = probe_roles(states, ids, loaded.tokenizer, seed=settings.seed)
    data = roles.to_json()
    meta["roles"] = data
    assign_roles(units, data)
    return data["selectivity"]


def assign_roles(units: list[UnitProfile], roles: dict) -> None:
    """Give every unit its block's selectivities and dominant task from ``roles``
    (a :class:`~autocompress.profile.probes.RoleProfile` in JSON form, as ``meta["roles"]`` holds it)."""
    curves = roles["selectivity"]
    for unit in units:
        unit.roles = {task: v for task, values in curves.items() if (v := values[unit.block + 1]) is not None}
        unit.dominant_role = roles["dominant"][unit.block + 1]


def _additivity_runs(trace: Trace, probes, space: SearchSpace, settings: ProfileSettings) -> dict[str, ChainedRun]:
    """One additivity check per plain bit width at the space's first group size (none unless
    ``settings.additivity``), each a chained run fed as the units are measured."""
    if not settings.additivity:
        return {}
    return {label: ChainedRun(trace) for label, c in probes
            if label.startswith("bits=") and c.group_size == space.group_size and not c.role_bits}


@torch.no_grad()
def _measure_units(trace: Trace, model: nn.Module, refs: list[UnitRef], probes, settings: ProfileSettings,
                   stats_source, squared, norms, keep_for_additivity, checkpoint, finished: dict) -> list[UnitProfile]:
    """Every unit of ``refs``, each measured and checkpointed, or taken from ``finished`` (a killed run's)."""
    done = {ref.name: finished[ref.name][0] for ref in refs
            if [u.name for u in finished.get(ref.name, [])] == [ref.name]}
    if done:
        console.print(f"reusing {len(done)} finished units of {len(refs)} from {checkpoint.folder}", markup=False,
                      highlight=False)
    units = []
    with progress_bar(f"measuring {len(refs)} units x {len(probes)} choices", len(refs) * len(probes),
                      settings.progress) as advance:
        for ref in refs:
            if ref.name in done:
                unit = done[ref.name]
                if keep_for_additivity:
                    _keep_replacements(trace, model, ref, probes, stats_source.stats(ref.block), keep_for_additivity)
                advance(len(probes))
            else:
                unit = _measure_unit(trace, model, ref, probes, settings, stats_source.stats(ref.block), squared,
                                     norms, keep_for_additivity, advance)
                if checkpoint is not None:
                    checkpoint.save(ref.name, [unit])
            units.append(unit)
    return units


def profile_model(loaded: LoadedModel, stream, space: SearchSpace, settings: ProfileSettings = ProfileSettings(), *,
                  model_name: str | None = None, data_name: str | None = None,
                  model_fp: str | None = None, calibration=None, stats_store: dict | None = None,
                  code_cache=None, checkpoint: UnitCheckpoints | None = None, shard: Shard | None = None) -> Profile:
    """Profile ``loaded.model`` on the calibration ``stream`` under ``space``.

    ``stream`` is a :class:`~autocompress.data.TokenStream` or a 1-D LongTensor. For every
    unit of the space and every probe choice (:meth:`SearchSpace.probe_choices`), the mean
    KL(original || changed) of next-token distributions and the loss change are measured with
    only that unit changed; then, as settings ask, the proxies with their Spearman
    correlations, the additivity check per bit width and the linguistic roles of every block.
    ``calibration`` (a :class:`~autocompress.run_calibration.CalibrationSet`) supplies the
    GPTQ Hessians and Wanda norms; without it they come from the measured rows themselves.
    ``stats_store`` (a dict) receives every block's statistics and GPTQ codes, for a search in
    the same process to reuse (``SwapEvaluator.reuse_stats``) instead of computing them again;
    ``code_cache`` (a :class:`~autocompress.compress.code_cache.CodeCache` for the calibration
    rows) keeps the GPTQ codes on disk for later processes. ``checkpoint`` (a
    :class:`~autocompress.profile.checkpoint.UnitCheckpoints` keyed for exactly these inputs)
    receives every unit as soon as it is measured; the units it already holds are reused,
    not measured again (a killed run resumes where it stopped, to the same numbers).
    When ``loaded.tokenizer`` adds BOS, every measured row starts with it (never scored; see
    :mod:`autocompress.data`). The model is left as it was.

    ``shard`` (a :class:`~autocompress.profile.shard.Shard`) measures only its share of the
    units, the embedding units and the roles only in shard 0, and neither the additivity check
    nor the proxy correlations (they need every unit: :func:`~autocompress.profile.shard.merge_profiles`
    computes the correlations; sharded profiles have no additivity check).
    """
    from ..data import bos_id  # noqa: PLC0415

    started, cpu_started = time.perf_counter(), time.process_time()
    model = loaded.model
    tokens = getattr(stream, "tokens", stream)
    bos = bos_id(loaded.tokenizer)
    rows = calibration_rows(tokens, settings, bos)
    refs = unit_refs(model, space)
    if not refs:
        raise UserError(f"search space {space.name!r} leaves no unit of this model unfrozen")
    whole = shard is None or shard.index == 0  # this process measures the once-per-model parts
    if shard is not None:
        refs = shard.take(refs)
    probes = space.probe_choices()
    adapter = adapter_for(model)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}

    norms = LinearInputNorms()
    with _timed("trace", timings, cpu):
        trace = _trace(model, rows, space, settings, norms)

    needs_stats = any(needs_calibration(c, {p: c for p in adapter.linears.values()}) for _, c in probes)
    calib_rows = calibration.rows if calibration is not None else rows
    stats_source = BlockStatsSource(model, calib_rows if needs_stats else None, settings.batch_size,
                                    [c for _, c in probes], stats_store, code_cache)

    squared = {}
    if settings.proxies:
        with _timed("gradients", timings, cpu):
            squared = squared_gradients(model, rows, rows=settings.fisher_rows)

    keep_for_additivity = _additivity_runs(trace, probes, space, settings) if shard is None else {}
    finished = checkpoint.load() if checkpoint is not None else {}
    with _timed("measure", timings, cpu):
        units = _measure_units(trace, model, refs, probes, settings, stats_source, squared, norms,
                               keep_for_additivity, checkpoint, finished)
    del squared
    extra_units = []
    if space.embedding_choices() and whole:
        with _timed("embedding", timings, cpu):
            extra_units = _embedding_units_once(model, rows, space, settings, checkpoint, finished)

    additivity = []
    if keep_for_additivity:
        with _timed("additivity", timings, cpu):
            additivity = [additivity_check(trace, units, label_bits(label), replacements, label)
                          for label, replacements in keep_for_additivity.items()]
    del keep_for_additivity

    role_curves: dict[str, list[float]] = {}
    meta: dict = {"seq_len": settings.seq_len, "rows": rows.shape[0], "threads": torch.get_num_threads(),
                  "space_source": space.source}
    if settings.roles and whole:
        with _timed("roles", timings, cpu):
            role_curves = _probe_roles(loaded, trace, tokens, settings, units, meta, bos)
    _finish_meta(meta, timings, cpu, stream, calibration, cpu_started)

    return Profile(
        model=model_name or loaded.spec,
        model_fingerprint=model_fp or model_fingerprint(model),
        data=data_name or _describe_stream(stream),
        data_fingerprint=data_fingerprint(tokens, settings, bos),
        space=space.name, space_fingerprint=space_fingerprint(space), granularity=space.granularity.value,
        calibration_tokens=rows.shape[0] * settings.seq_len, base_loss=trace.reference.loss,
        choices={label: choice.to_json() for label, choice in probes + space.embedding_choices()},
        units=units, additivity=additivity, extra_units=extra_units,
        proxy_spearman=proxy_correlations(units, [label for label, _ in probes])
        if settings.proxies and shard is None else {},
        role_curves=role_curves, seconds=time.perf_counter() - started, meta=meta)


def _trace(model, rows, space: SearchSpace, settings: ProfileSettings, norms: LinearInputNorms):
    """The original model's trace on ``rows``; linear-grained spaces with proxies also fill ``norms``."""
    adapter = adapter_for(model)
    linear_paths = list(adapter.linears.values())
    hook = (lambda i, b: norms.hook_block(b, linear_paths, f"{adapter.blocks_path}.{i}")) \
        if space.granularity is Granularity.LINEAR and settings.proxies else None
    return trace_model(model, rows, batch_size=settings.batch_size, hook=hook)


def _embedding_units_once(model, rows, space: SearchSpace, settings: ProfileSettings,
                          checkpoint: UnitCheckpoints | None, finished: dict) -> list:
    """The embedding (and untied head) units: from the checkpoint when it holds them, else
    measured and saved to it."""
    if EXTRA in finished:
        return finished[EXTRA]
    units = _embedding_units(model, rows, space, settings)
    if checkpoint is not None:
        checkpoint.save(EXTRA, units)
    return units


def _finish_meta(meta: dict, timings: dict, cpu: dict, stream, calibration, cpu_started: float) -> None:
    """Add the step timings, the data split, the calibration rows and this process's CPU seconds."""
    meta["timings"], meta["cpu_timings"] = timings, cpu
    meta["data_split"] = getattr(getattr(stream, "split", None), "value", None)
    if calibration is not None:
        meta["calibration"] = calibration.describe()
    # CPU seconds of this process: on a shared machine, closer than wall time to what it costs alone.
    meta["cpu_seconds"] = time.process_time() - cpu_started


def _describe_stream(stream) -> str:
    # The data *spec* (later stages load more tokens from it); the split goes to meta.
    return getattr(stream, "spec", None) or "tokens"


def _measure_one(trace: Trace, model: nn.Module, ref: UnitRef, choice: Choice, stats: dict | None = None):
    """KL, loss delta and the compressed replacement (a block, or {path: linear}) of one unit."""
    changed = _compress_one(trace, model, ref, choice, stats)
    if ref.path is None:
        kl, delta = trace.measure_block(ref.block, changed)
        return kl, delta, changed
    block = trace.blocks[ref.block]
    with swapped(block, changed):
        kl, delta = trace.measure_block(ref.block, block)
    return kl, delta, changed


def _compress_one(trace: Trace, model: nn.Module, ref: UnitRef, choice: Choice, stats: dict | None = None):
    """One unit under ``choice``: a compressed copy of its block, or {path: compressed linear}."""
    block = trace.blocks[ref.block]
    inputs = trace.block_inputs(ref.block)
    if ref.path is None:
        return compress_block(block, ref.block, model, choice, inputs, stats=stats)
    compressed = compress_block(block, ref.block, model, Choice(), inputs, linear_choices={ref.path: choice},
                                stats=stats)
    return {ref.path: compressed.get_submodule(ref.path)}


@dataclass(frozen=True)
class ProfileOutcome:
    """What :func:`profile_run` did: the profile, where it lives, and whether it was reused."""

    profile: Profile
    path: Path
    reused: bool


def profile_run(model_spec: str, out_dir: str | Path, *, data: str = "stdlib-docs", space: str | SearchSpace = "default",
                granularity: str | None = None, settings: ProfileSettings = ProfileSettings(), force: bool = False,
                trust_remote_code: bool = False, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> ProfileOutcome:
    """Profile ``model_spec`` into ``out_dir/profile.json``, or reuse the one there.

    An existing profile whose model, data and space fingerprints all match is returned as is;
    one that differs is refused with a message naming the difference, unless ``force``.
    Every unit is kept in ``out_dir/profile.units/`` as soon as it is measured, so a run killed
    midway resumes with the units it finished (same inputs only; ``force`` measures all again);
    the folder is removed once ``profile.json`` is written.
    ``granularity`` ("block" or "linear") overrides the space's. The model runs on ``device``
    stored in ``dtype`` (see :mod:`autocompress.device`); statistics and KL stay float32.
    """
    from ..run_calibration import load_calibration, save_calibration  # noqa: PLC0415

    inputs = load_inputs(model_spec, data=data, space=space, granularity=granularity, settings=settings,
                         trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    path = Path(out_dir) / "profile.json"
    if path.exists() and not force:
        existing = Profile.load(path)
        try:
            existing.check_matches(inputs.model_fp, inputs.data_fp, inputs.space_fp, path=path)
            recorded = existing.meta.get("calibration", {})
            if not calibration_fits(recorded, settings, inputs.bos):
                raise UserError(f"{path} was made with other calibration rows ({recorded or 'none'})")
            load_calibration(out_dir, recorded.get("fingerprint"))
        except UserError as exc:
            raise UserError(f"{exc} (or pass --force to replace it)") from None
        # Left by a run killed after writing profile.json, before removing them.
        shutil.rmtree(Path(out_dir) / CHECKPOINT_DIR, ignore_errors=True)
        return ProfileOutcome(existing, path, True)
    calibration = choose_calibration(inputs.loaded, data, settings)
    save_calibration(out_dir, calibration)  # first: other processes may calibrate on it meanwhile
    profile, checkpoint = measure_run(inputs, out_dir, settings, calibration, force=force)
    profile.save(path)
    checkpoint.clear()
    return ProfileOutcome(profile, path, False)


@dataclass(frozen=True)
class RunInputs:
    """What a profile run measures, loaded from specs: the model, the space, the token stream
    (``spec`` and ``data``: what the model and the data were called) and their fingerprints."""

    spec: str
    data: str
    loaded: LoadedModel
    space: SearchSpace
    stream: object  # a TokenStream
    bos: int | None
    model_fp: str
    data_fp: str
    space_fp: str


def load_inputs(model_spec: str, *, data: str, space: str | SearchSpace, granularity: str | None,
                settings: ProfileSettings, trust_remote_code: bool = False, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> RunInputs:
    """Check ``settings``, then load the space, the model (on ``device``, in ``dtype``) and the
    calibration tokens (a UserError, before anything is written, when they do not fit together)."""
    from ..data import Split, bos_id, load_tokens  # noqa: PLC0415
    from ..models import load_model  # noqa: PLC0415

    # Settings and space first: a run directory is only written once everything is known to fit.
    if settings.tokens < settings.seq_len:
        raise UserError(f"--tokens {settings.tokens} is less than one sequence of --seq-len {settings.seq_len}; "
                        f"raise --tokens or lower --seq-len")
    if settings.calib_tokens < settings.calib_seq_len:
        raise UserError(f"--calib-tokens {settings.calib_tokens} is less than one row of --calib-seq-len "
                        f"{settings.calib_seq_len}; raise --calib-tokens or lower --calib-seq-len")
    space = resolve_space(space, granularity)
    loaded = load_model(model_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if not unit_refs(loaded.model, space):
        raise UserError(f"search space {space.name!r} leaves no unit of {model_spec} unfrozen; "
                        f"remove some 'frozen' entries")
    wanted = max(settings.tokens, settings.role_tokens if settings.roles else 0)
    stream = load_tokens(data, loaded.tokenizer, Split.CALIBRATION, wanted)
    bos = bos_id(loaded.tokenizer)
    return RunInputs(model_spec, data, loaded, space, stream, bos, model_fingerprint(loaded.model),
                     data_fingerprint(stream.tokens, settings, bos), space_fingerprint(space))


def calibration_fits(recorded: dict, settings: ProfileSettings, bos: int | None) -> bool:
    """Whether the calibration rows ``recorded`` describes (:meth:`CalibrationSet.describe`) are
    what ``settings`` ask for: the same mode, number of rows and row length."""
    row_length = settings.calib_seq_len + (bos is not None)  # the recorded length counts BOS
    expected = (settings.calibration, settings.calib_tokens // settings.calib_seq_len, row_length)
    return (recorded.get("mode"), recorded.get("rows"), recorded.get("seq_len")) == expected


def measure_run(inputs: RunInputs, out_dir: str | Path, settings: ProfileSettings, calibration, *,
                force: bool = False, shard: Shard | None = None) -> tuple[Profile, UnitCheckpoints]:
    """:func:`profile_model` in a run directory: each unit checkpointed in ``out_dir/profile.units/``
    (cleared first with ``force``), GPTQ codes in ``out_dir/codes/``. Returns the profile and the
    checkpoints, for the caller to clear once its artifact is written."""
    from ..compress.code_cache import CodeCache  # noqa: PLC0415

    checkpoint = UnitCheckpoints(Path(out_dir) / CHECKPOINT_DIR,
                                 checkpoint_key(inputs.model_fp, inputs.data_fp, inputs.space_fp, settings,
                                                calibration.fingerprint))
    if force:
        checkpoint.clear()
    profile = profile_model(inputs.loaded, inputs.stream, inputs.space, settings, model_name=inputs.spec,
                            data_name=inputs.data, model_fp=inputs.model_fp, calibration=calibration,
                            code_cache=CodeCache.for_run(out_dir, inputs.model_fp, calibration.rows),
                            checkpoint=checkpoint, shard=shard)
    return profile, checkpoint


def choose_calibration(loaded: LoadedModel, data: str, settings: ProfileSettings):
    """The run's calibration rows from the calibration split (see :mod:`autocompress.calibration`)."""
    from ..calibration import calibration_rows, pool_tokens  # noqa: PLC0415
    from ..data import Split, bos_id, load_tokens  # noqa: PLC0415
    from ..run_calibration import CalibrationSet  # noqa: PLC0415

    if settings.calib_tokens < settings.calib_seq_len:
        raise UserError(f"--calib-tokens {settings.calib_tokens} is less than one row of --calib-seq-len "
                        f"{settings.calib_seq_len}")
    count = settings.calib_tokens // settings.calib_seq_len
    span = pool_tokens(count, settings.calib_seq_len, settings.calibration)
    try:
        pool = load_tokens(data, loaded.tokenizer, Split.CALIBRATION, span).tokens
    except UserError:  # a small split: draw from all of it (too small for the rows themselves is refused below)
        pool = load_tokens(data, loaded.tokenizer, Split.CALIBRATION, None).tokens
    rows = calibration_rows(settings.calibration, pool, count, settings.calib_seq_len, model=loaded.model,
                            seed=settings.seed, bos=bos_id(loaded.tokenizer))
    return CalibrationSet(rows, settings.calibration, int(pool.numel()))


def resolve_space(space: str | SearchSpace, granularity: str | None = None) -> SearchSpace:
    """A space by name/path (or as given) with an optional granularity override, validated."""
    from ..search.space import load_space, space_from_dict  # noqa: PLC0415

    if isinstance(space, str):
        space = load_space(space)
    if granularity is not None and granularity != space.granularity.value:
        data = {**space.to_json(), "granularity": granularity}
        space = space_from_dict(data, f"{space.source or space.name} with granularity {granularity}")
    return space
