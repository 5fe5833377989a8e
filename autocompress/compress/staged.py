"""Gradual compression: apply a schedule in steps, check quality gates, recover or roll back.

NVIDIA's Minitron and DistilBERT compress in steps and distill after each. Here:

1. The schedule's units (a block with its linear overrides, or the output head) are ordered
   most robust first: by the profile's measured KL for the unit's choice when a profile is
   given, else by a cheap proxy (how much the unit's own output changes on a few
   calibration rows when compressed with round-to-nearest).
2. Each step takes the next units until it would remove more than ``step_fraction`` of the
   model's current size (exact bytes from :class:`~autocompress.compress.memory.MemoryModel`;
   at least one unit per step). ``one_shot`` makes one step of everything. ``gradual``
   instead moves every unit a level at a time through intermediate choices (Minitron-style
   iterative pruning: channels 0 -> 17% -> 34% -> 51%, bits 16 -> 8 -> 4 -> 3), sub-units
   named ``block@level/levels``, weights distilled at a level carrying to the next.
3. After a step the model is measured on a validation slice (perplexity and KL to the
   original) against :class:`Gates`, per step and in total. A failed gate triggers
   distillation (:mod:`~autocompress.compress.distill`); if the gate still fails the step
   is rolled back exactly (the step's blocks, and any block recovery trained, are restored
   from copies taken before). A step of several units is then retried with its more robust
   half, halving until the offending unit is alone; that unit is frozen at its previous
   (uncompressed) choice, and the rest goes on.
4. After every step the model is checkpointed to ``RUN/staged/model`` (safetensors, via
   :func:`~autocompress.compress.saving.save_compressed`) and the history to
   ``RUN/staged.json``; ``resume=True`` continues an interrupted run from the last completed
   step. The checkpoint holds its own copy of the state, renamed into place with the weights,
   so a run killed between the two writes resumes from the checkpoint's step.

Dropped blocks stay in place as identities while staging (so block indices, calibration and
the distillation's hidden-state taps line up with the original); they are removed for
real in the checkpoint and in the final model.

``RUN/staged.json`` (type ``staged``, version 1) holds ``original`` (validation perplexity,
bytes, parameters), ``steps`` (one :class:`StepRecord` each), ``frozen``, ``accepted``,
``pending``, ``complete`` and ``final``.

Example::

    result = staged_apply(model, schedule, calib.tokens, valid.tokens, StagedConfig(), "runs/x")
    save_compressed(result.model, tokenizer, result.schedule, "runs/x/model")
"""
from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..artifacts import fingerprint as hash_parts
from ..artifacts import read_artifact, type_error, write_artifact
from ..data import bos_id
from ..errors import UserError
from ..evaluate import stream_metrics
from ..models import adapter_for, model_fingerprint
from ..progress import console
from ..schedule import Schedule
from .calibrate import token_batch
from .distill import DistillConfig, distill
from .fade import fading, linear_ramp, plan_fades
from .lora import MERGE_MODES, lora_parameters, merge_lora
from .memory import MemoryModel
from .prune import drop_blocks, set_submodule
from .saving import load_compressed, save_compressed
from .staging import (StageUnit, base_name, compress_step_, dropped_indices, gradual_levels, gradual_plan,
                      next_step, physically_dropped, profile_scores, proxy_scores, reinsert_dropped, schedule_of,
                      stage_units, unit_level, unit_weight)
from .storage import round_to_storage

__all__ = ["Recovery", "Quality", "Gates", "StagedConfig", "StepRecord", "StagedResult", "StageUnit", "staged_apply",
           "staged_table", "stage_units", "next_step", "unit_weight"]

STAGED_TYPE = "staged"
STAGED_VERSION = 1
CHECKPOINT = Path("staged") / "model"
STATE_COPY = "staged.json"  # the state as of the checkpoint, inside it


class Recovery(str, Enum):
    """When distillation runs: never, only after a failed gate, or after every step."""

    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclass(frozen=True)
class Quality:
    """Validation quality: perplexity, loss and mean KL(original || model) per token."""

    perplexity: float
    loss: float
    kl: float


@dataclass(frozen=True)
class Gates:
    """Quality limits; None switches a limit off.

    ``step_*`` compare with the model before the step, ``total_*`` with the original.
    Perplexity increases are relative (0.25 = at most 25% higher).
    """

    step_kl: float | None = None
    step_ppl_increase: float | None = 0.25
    total_kl: float | None = None
    total_ppl_increase: float | None = None

    def failures(self, before: Quality, after: Quality, original: Quality) -> list[str]:
        """Which gates ``after`` fails (empty when it passes), each as a short sentence."""
        out = []
        if self.step_kl is not None and after.kl - before.kl > self.step_kl:
            out.append(f"step KL +{after.kl - before.kl:.4f} > {self.step_kl}")
        if self.step_ppl_increase is not None and after.perplexity / before.perplexity - 1 > self.step_ppl_increase:
            out.append(f"step perplexity +{100 * (after.perplexity / before.perplexity - 1):.1f}% "
                       f"> {100 * self.step_ppl_increase:g}%")
        if self.total_kl is not None and after.kl > self.total_kl:
            out.append(f"total KL {after.kl:.4f} > {self.total_kl}")
        if self.total_ppl_increase is not None and after.perplexity / original.perplexity - 1 > self.total_ppl_increase:
            out.append(f"total perplexity +{100 * (after.perplexity / original.perplexity - 1):.1f}% "
                       f"> {100 * self.total_ppl_increase:g}%")
        return out


@dataclass(frozen=True)
class StagedConfig:
    """Settings of :func:`staged_apply`.

    ``calib_seq_len`` is the row length for calibration statistics (Wanda, GPTQ), taken from
    the first ``calib_rows`` rows (None: all); distillation cuts all the calibration tokens
    into rows of ``distill.seq_len``.
    ``final_recovery_steps``: one more distillation of the finished model (Minitron's long
    distillation after pruning), kept only if it lowers the validation KL.
    ``split_failed``: a failed step of several units is retried with its more robust half
    (halving again on failure) until the offending unit is alone and frozen; otherwise the
    whole step is frozen (a gradual unit at its previous level).
    ``gradual``: a unit whose choice prunes heads or channels or quantizes moves there
    through intermediate choices (ratios in equal shares of the final ratio, bits down the
    ladder 16 -> 8 -> 4 -> 3 -> 2), every unit one level per step, as few levels as keep each
    step within ``step_fraction``; channels and heads are re-scored on the current (distilled)
    weights at every level. ``lora_merge`` says how adapters end up in the saved model (see
    :mod:`~autocompress.compress.lora`): ``keep`` (default) stores them as 16-bit tensors,
    and every size reported includes them; ``requantize`` keeps the schedule's size exactly.
    ``fade``: the heads, channels and blocks a step removes are first scaled down to zero
    over the step's distillation (over its first ``fade_share``, see
    :mod:`~autocompress.compress.fade`) and only then cut; that distillation is the step's
    recovery, and more runs only when a gate fails.
    """

    step_fraction: float = 0.15
    one_shot: bool = False
    gates: Gates = Gates()
    recovery: Recovery = Recovery.ON_FAILURE
    distill: DistillConfig = DistillConfig(steps=100)
    lora_merge: str = "keep"
    calib_seq_len: int = 512
    calib_rows: int | None = None
    batch_size: int = 8
    eval_window: int = 256
    eval_batch_size: int = 2
    proxy_rows: int = 4
    split_failed: bool = True
    gradual: bool = False
    final_recovery_steps: int = 0
    fade: bool = False
    fade_share: float = 0.75
    resume: bool = False
    restart: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.resume and self.restart:
            raise UserError("resume and restart exclude each other; pick one")
        if not 0 < self.step_fraction <= 1:
            raise UserError(f"step fraction must be in (0, 1], got {self.step_fraction}")
        if not 0 < self.fade_share <= 1:
            raise UserError(f"fade share must be in (0, 1], got {self.fade_share}")
        if self.lora_merge not in MERGE_MODES:
            raise UserError(f"lora merge must be one of {MERGE_MODES}, got {self.lora_merge!r}")

    def to_json(self) -> dict:
        """Plain-dict form (for staged.json)."""
        data = asdict(self)
        data["recovery"] = self.recovery.value
        data["distill"] = self.distill.to_json()
        return data


@dataclass
class StepRecord:
    """One step of a staged run, as logged in ``staged.json``."""

    index: int
    units: list[str]
    bytes_before: int
    bytes_after: int
    parameters_after: int
    before: dict
    after: dict
    recovered: dict | None
    recovery: dict | None
    gate: str  # "passed", "passed after recovery" or "rolled back"
    failures: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class StagedResult:
    """The compressed model (dropped blocks removed), the schedule it really got, and the history."""

    model: nn.Module
    schedule: Schedule
    steps: list[StepRecord]
    frozen: list[str]
    original: Quality
    final: Quality
    original_bytes: int
    final_bytes: int
    seconds: float


# ---------------------------------------------------------------------------------------
# The staged run


def _quality(model: nn.Module, teacher: nn.Module | None, tokens: torch.Tensor, config: StagedConfig,
             bos: int | None = None) -> Quality:
    """Validation quality of ``model``; KL to ``teacher`` (0 without one: the teacher itself)."""
    m = stream_metrics(model, tokens, window=config.eval_window, batch_size=config.eval_batch_size,
                       reference=teacher, progress=False, bos=bos)
    return Quality(m["perplexity"], m["loss"], m["kl"] if teacher is not None else 0.0)


def _ends(model: nn.Module) -> tuple[nn.Module, bool, nn.Module]:
    """The model's output head, its tie flag and its token embedding, as :func:`_restore` puts them back."""
    adapter = adapter_for(model)
    return (model.get_submodule(adapter.lm_head), model.config.tie_word_embeddings,
            model.get_submodule(adapter.embeddings[0]))


def _choose_step(state: dict, by_name: dict, weights: dict[str, float], bytes_before: int,
                 config: StagedConfig) -> list:
    """The next step's units: the pending ones in order, within ``step_fraction`` of the size
    (all at once with ``one_shot``; one level at a time when gradual; the kept half of a
    failed step when retrying)."""
    pending = [by_name[n] for n in state["pending"]]
    if state.get("levels"):  # one level per step: every unit moves together
        pending = [u for u in pending if unit_level(u.name) == unit_level(pending[0].name)]
    step = pending if config.one_shot else next_step(pending, weights, bytes_before, config.step_fraction)
    if state.get("max_units"):  # retrying the more robust half of a failed step
        step = step[: state["max_units"]]
    return step


def _restore(model: nn.Module, saved_blocks: dict[int, nn.Module], ends: tuple[nn.Module, bool, nn.Module]) -> None:
    """Put back the blocks and the model's ends (output head, its tie flag, token embedding)
    saved before a step (exact rollback)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    for index, block in saved_blocks.items():
        blocks[index] = block
    head, tied, embedding = ends
    set_submodule(model, adapter.lm_head, head)
    model.config.tie_word_embeddings = tied
    set_submodule(model, adapter.embeddings[0], embedding)


def _save_all(saved: dict[int, nn.Module], blocks) -> None:
    """Add copies of the blocks not saved yet (distillation is about to train them all)."""
    saved.update({i: copy.deepcopy(block) for i, block in enumerate(blocks) if i not in saved})


def _flat(tokens) -> torch.Tensor:
    tokens = getattr(tokens, "tokens", tokens)
    return tokens.reshape(-1)


def schedule_hash(schedule: Schedule) -> str:
    """A short hash of a schedule's units and fingerprint (meta left out)."""
    return hash_parts(schedule.fingerprint, {k: v.to_json() for k, v in sorted(schedule.units.items())})


def _fmt(q: Quality | None) -> dict | None:
    return None if q is None else {k: round(v, 6) for k, v in asdict(q).items()}


_STATE_FIELDS = {"schedule": str, "model": str, "order": list[str], "original": dict[str, float | int | None],
                 "steps": list[dict[str, Any]], "accepted": list[str], "frozen": list[str],
                 "pending": list[str] | None, "dropped": list[int]}


def _load_state(path: Path) -> dict:
    data = read_artifact(path, STAGED_TYPE, STAGED_VERSION)
    for key, hint in _STATE_FIELDS.items():
        if key not in data:
            raise UserError(f"{path}: field {key!r} is missing; start over with --restart")
        if (error := type_error(data[key], hint, key)) is not None:
            raise UserError(f"{path}: {error}; start over with --restart")
    return data


def staged_apply(model: nn.Module, schedule: Schedule, calibration, validation, config: StagedConfig,
                 run_dir, *, tokenizer=None, profile=None, fingerprint: str | None = None,
                 on_step: Callable[[StepRecord], None] | None = None) -> StagedResult:
    """Apply ``schedule`` to ``model`` in gated steps with distillation recovery.

    ``model`` is the original (uncompressed) model; it is compressed in place on a fresh run
    and serves as the teacher on a resumed one. ``calibration`` (1-D tokens or a
    :class:`~autocompress.data.TokenStream`) feeds calibration statistics and distillation;
    ``validation`` (1-D tokens held aside from it) feeds the gates. ``profile`` (a
    :class:`~autocompress.profile.artifact.Profile`) orders units by measured KL.
    ``run_dir`` receives ``staged.json`` and the per-step checkpoint ``staged/model``.
    ``on_step`` is called with each finished step's record (after its checkpoint).
    When ``tokenizer`` adds BOS, every calibration, distillation and validation window starts
    with it (``calib_seq_len``, ``distill.seq_len`` and ``eval_window`` count text tokens).

    Returns the compressed model with dropped blocks removed.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    state_path = run_dir / "staged.json"
    fingerprint = fingerprint or model_fingerprint(model)
    schedule.validate(model, fingerprint=fingerprint)
    units = stage_units(model, schedule)
    by_name = {u.name: u for u in units}
    memory = MemoryModel.from_model(model)
    weights = {u.name: unit_weight(memory, u, fingerprint) for u in units}
    calib = _flat(calibration)
    valid = _flat(validation)
    bos = bos_id(tokenizer)
    stat_rows = token_batch(calib, min(config.calib_seq_len, calib.numel()), config.calib_rows, bos=bos)
    train_rows = token_batch(calib, min(config.distill.seq_len, calib.numel()), bos=bos)

    state = _open_state(state_path, run_dir, schedule, fingerprint, config)
    if state is not None and state["steps"]:
        teacher = model
        student, _ = load_compressed(run_dir / CHECKPOINT)
        student = reinsert_dropped(student, state["dropped"], teacher)
        console.print(f"resuming staged run after step {len(state['steps'])} of {state_path}")
    else:
        teacher = copy.deepcopy(model)
        student = model
        round_to_storage(student)
    teacher.eval().requires_grad_(False)
    student.eval()

    if state is None or not state["steps"]:
        state = _fresh_state(teacher, schedule, units, memory, calib, valid, config, profile, fingerprint, bos)
        write_artifact(state_path, STAGED_TYPE, STAGED_VERSION, state)
    if bool(state.get("levels")) != (config.gradual and not config.one_shot):
        raise UserError(f"{state_path} was made {'with' if state.get('levels') else 'without'} --gradual; "
                        f"resume it the same way, or pass --restart")
    if state.get("levels"):
        plan, weights = gradual_plan(memory, [by_name[n] for n in state["order"]], fingerprint, state["levels"])
        by_name.update({u.name: u for u in plan})
    if state["pending"] is None:
        state["pending"] = [u.name for u in plan] if state.get("levels") else list(state["order"])
    original = Quality(**{k: state["original"][k] for k in ("perplexity", "loss", "kl")})
    current = Quality(**state["current"])
    steps = [StepRecord(**s) for s in state["steps"]]

    while state["pending"]:
        tick = time.perf_counter()
        before = current
        accepted = [by_name[n] for n in state["accepted"]]
        adapter_bytes = 2 * lora_parameters(student)  # kept LoRA adapters, stored in 16 bits
        bytes_before = memory.schedule_bytes(schedule_of(fingerprint, accepted)) + adapter_bytes
        step = _choose_step(state, by_name, weights, bytes_before, config)
        number = len(steps) + 1
        console.print(f"step {number}: {len(step)} unit(s), {', '.join(u.name for u in step[:4])}"
                      f"{' ...' if len(step) > 4 else ''}")

        blocks = adapter_for(student).blocks(student)
        step_blocks = {u.index for u in step if u.index is not None}
        saved = {i: copy.deepcopy(blocks[i]) for i in step_blocks}
        saved_head = _ends(student)
        after, recovered, recovery, failures = _compress_and_recover(
            student, teacher, step, saved, stat_rows, train_rows, valid, config, fingerprint, before, original, bos)

        frozen, settled = [], [u.name for u in step]
        if failures:
            _restore(student, saved, saved_head)
            gate = "rolled back"
            frozen, settled = _after_failed_gate(state, step, failures, config, number)
        else:
            state["accepted"] += settled
            state["max_units"] = None
            current = recovered or after
            gate = "passed after recovery" if recovered is not None else "passed"
        state["pending"] = [n for n in state["pending"] if n not in set(settled)]
        accepted_now = [by_name[n] for n in state["accepted"]]
        applied = schedule_of(fingerprint, accepted_now)
        record = StepRecord(
            index=number, units=[u.name for u in step], bytes_before=bytes_before,
            bytes_after=memory.schedule_bytes(applied) + 2 * lora_parameters(student),
            parameters_after=memory.schedule_parameters(applied) + lora_parameters(student),
            before=_fmt(before), after=_fmt(after),
            recovered=_fmt(recovered), recovery=recovery, gate=gate, failures=failures, frozen=frozen,
            seconds=round(time.perf_counter() - tick, 2))
        steps.append(record)
        state["steps"].append(asdict(record))
        state["current"] = _fmt(current)
        state["dropped"] = dropped_indices(student)
        with physically_dropped(student):
            # The state goes into the checkpoint too: one rename commits both (see _open_state).
            save_compressed(student, tokenizer, applied, run_dir / CHECKPOINT, overwrite=True,
                            artifacts={STATE_COPY: (STAGED_TYPE, STAGED_VERSION, state)})
        write_artifact(state_path, STAGED_TYPE, STAGED_VERSION, state)
        if on_step is not None:
            on_step(record)

    if config.final_recovery_steps > 0 and state["accepted"]:
        current = _final_recovery(student, teacher, train_rows, valid, config, current, state, bos)
    accepted_now = [by_name[n] for n in state["accepted"]]
    applied = schedule_of(fingerprint, accepted_now, {**schedule.meta, "staged": {
        "frozen": list(state["frozen"]), "steps": len(steps)}})
    if dropped_indices(student):
        drop_blocks(student, dropped_indices(student))
    final_bytes = memory.schedule_bytes(applied) + 2 * lora_parameters(student)
    state["complete"] = True
    state["final"] = {**_fmt(current), "bytes": final_bytes,
                      "parameters": memory.schedule_parameters(applied) + lora_parameters(student),
                      "lora_parameters": lora_parameters(student)}
    write_artifact(state_path, STAGED_TYPE, STAGED_VERSION, state)
    return StagedResult(student, applied, steps, list(state["frozen"]), original, current,
                        state["original"]["bytes"], final_bytes, time.perf_counter() - started)


def _compress_and_recover(student: nn.Module, teacher: nn.Module, step: list, saved: dict[int, nn.Module],
                          stat_rows: torch.Tensor, train_rows: torch.Tensor, valid: torch.Tensor, config: StagedConfig,
                          fingerprint: str, before: Quality, original: Quality, bos: int | None = None):
    """Compress one step's units (faded out first with ``--fade``), check the gates, distill when
    the recovery setting asks; returns (quality after, after recovery or None, the recovery's
    record or None, the failed gates). Blocks distillation will train are added to ``saved``;
    ``bos`` is the tokenizer's BOS id when the rows start with it."""
    blocks = adapter_for(student).blocks(student)
    faded = None
    if config.fade:
        fades = plan_fades(student, step, stat_rows, fingerprint, teacher, config.batch_size)
        if fades:
            _save_all(saved, blocks)  # distillation trains every block
            with fading(student, fades) as set_alpha:
                result = distill(student, teacher, train_rows, config.distill, progress=config.progress,
                                 before_step=lambda i, n: set_alpha(linear_ramp(i, n, config.fade_share)),
                                 bos=bos is not None)
            merge_lora(student, config.lora_merge)
            faded = {**result.to_json(), "fade": True}
    compress_step_(student, step, stat_rows, fingerprint, teacher, config.batch_size)
    after = _quality(student, teacher, valid, config, bos)
    failures = config.gates.failures(before, after, original)
    recovered, recovery = None, faded
    if faded is not None:  # the fading distillation was this step's recovery; more only on a failed gate
        recover = bool(failures) and config.recovery is not Recovery.NEVER
    else:
        recover = config.recovery is Recovery.ALWAYS or (config.recovery is Recovery.ON_FAILURE and bool(failures))
    if recover:
        _save_all(saved, blocks)
        result = distill(student, teacher, train_rows, config.distill, progress=config.progress, bos=bos is not None)
        merge_lora(student, config.lora_merge)
        recovery = {**result.to_json(), **({"fade_steps": faded["steps"]} if faded else {})}
        recovered = _quality(student, teacher, valid, config, bos)
        failures = config.gates.failures(before, recovered, original)
    return after, recovered, recovery, failures


def _open_state(state_path: Path, run_dir: Path, schedule: Schedule, fingerprint: str,
                config: StagedConfig) -> dict | None:
    """The state of an earlier run to resume (None to start afresh; ``--restart`` clears it)."""
    if state_path.exists() and config.restart:
        state_path.unlink()
        shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)
    if not state_path.exists():
        return None
    if not config.resume:
        raise UserError(f"{state_path} exists from an earlier staged run; pass --resume to continue it, "
                        f"or --restart to start over")
    state = _load_state(state_path)
    if state["schedule"] != schedule_hash(schedule) or state["model"] != fingerprint:
        raise UserError(f"{state_path} belongs to another schedule or model; pass --restart to start over")
    copy_path = run_dir / CHECKPOINT / STATE_COPY
    if not state.get("complete") and copy_path.exists():
        # Killed after a step's checkpoint was renamed into place, before staged.json was written:
        # the checkpoint's own copy of the state is the one that matches its weights.
        saved = _load_state(copy_path)
        if len(saved["steps"]) > len(state["steps"]):
            state = saved
    if state.get("complete"):
        # Killed after the last step and before the model was saved: finish again from the
        # checkpoint (the final recovery, if any, is redone from the same start).
        state["complete"], state["final"] = False, None
        state.pop("final_recovery", None)
    return state


def _fresh_state(teacher: nn.Module, schedule: Schedule, units: list, memory: MemoryModel, calib: torch.Tensor,
                 valid: torch.Tensor, config: StagedConfig, profile, fingerprint: str, bos: int | None = None) -> dict:
    """A new run's state: the original's quality and size, and the units ordered most robust first."""
    by_name = {u.name: u for u in units}
    original = _quality(teacher, None, valid, config, bos)
    if profile is not None and (scores := profile_scores(profile, units)) is not None:
        source = "profile"
    else:
        rows = token_batch(calib, min(128, calib.numel()), config.proxy_rows, bos=bos)
        scores, source = proxy_scores(teacher, units, rows, fingerprint, config.batch_size), "proxy"
    order = sorted((u.name for u in units), key=lambda n: (scores[n], n))
    levels = gradual_levels(memory, [by_name[n] for n in order], fingerprint, config.step_fraction) \
        if config.gradual and not config.one_shot else 0
    return {"schedule": schedule_hash(schedule), "model": fingerprint, "config": config.to_json(),
            "order": order, "order_source": source, "levels": levels,
            "scores": {n: (None if math.isinf(s) else s) for n, s in scores.items()},
            "original": {**_fmt(original), "bytes": memory.schedule_bytes(Schedule(fingerprint)),
                         "parameters": memory.schedule_parameters(Schedule(fingerprint))},
            "steps": [], "accepted": [], "frozen": [], "pending": None, "dropped": [],
            "current": _fmt(original), "complete": False, "final": None}


def _after_failed_gate(state: dict, step: list, failures: list[str], config: StagedConfig,
                       number: int) -> tuple[list[str], list[str]]:
    """(frozen, settled) unit names after a rolled-back step: retry the more robust half, or freeze
    the step's units (a gradual unit's later levels with them); ``state`` is updated."""
    settled = [u.name for u in step]
    if config.split_failed and len(step) > 1 and not config.one_shot:
        # Find the offending units by halving: retry the more robust half first.
        state["max_units"] = len(step) // 2
        console.print(f"step {number}: gate failed ({'; '.join(failures)}); rolled back, "
                      f"retrying {len(step) // 2} unit(s)")
        return [], []
    frozen = settled
    state["frozen"] += frozen
    state["max_units"] = None
    # A gradual unit stays at its previous level: its later levels go too.
    settled = settled + [n for n in state["pending"] if base_name(n) in {base_name(f) for f in frozen}]
    console.print(f"step {number}: gate failed ({'; '.join(failures)}); rolled back, froze {len(frozen)}")
    return frozen, settled


def _final_recovery(student: nn.Module, teacher: nn.Module, rows: torch.Tensor, valid: torch.Tensor,
                    config: StagedConfig, current: Quality, state: dict, bos: int | None = None) -> Quality:
    """Distill the finished model once more (kept only if the validation KL improves); logs to ``state``."""
    blocks = adapter_for(student).blocks(student)
    saved = {i: copy.deepcopy(block) for i, block in enumerate(blocks)}
    result = distill(student, teacher, rows, replace(config.distill, steps=config.final_recovery_steps),
                     progress=config.progress, bos=bos is not None)
    merge_lora(student, config.lora_merge)
    after = _quality(student, teacher, valid, config, bos)
    kept = after.kl <= current.kl
    if not kept:
        for index, block in saved.items():
            blocks[index] = block
    state["final_recovery"] = {**result.to_json(), "before": _fmt(current), "after": _fmt(after), "kept": kept}
    console.print(f"final recovery: validation perplexity {current.perplexity:.2f} -> {after.perplexity:.2f}"
                  f"{'' if kept else ' (worse KL: undone)'}")
    return after if kept else current


def staged_table(steps: list[StepRecord], original_bytes: int, original_ppl: float):
    """A rich table of a staged run's history."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="staged compression")
    for name in ("step", "units", "size MiB", "ppl before", "ppl after", "ppl recovered", "KL after",
                 "gate", "seconds"):
        table.add_column(name, justify="left" if name in ("units", "gate") else "right")
    table.add_row("0", "original", f"{original_bytes / 2**20:.1f}", "-", f"{original_ppl:.2f}", "-", "0",
                  "-", "-")
    for s in steps:
        recovered = s.recovered
        table.add_row(str(s.index), f"{len(s.units)}: {s.units[0]}{' ...' if len(s.units) > 1 else ''}",
                      f"{s.bytes_after / 2**20:.1f}", f"{s.before['perplexity']:.2f}", f"{s.after['perplexity']:.2f}",
                      "-" if recovered is None else f"{recovered['perplexity']:.2f}",
                      f"{(recovered or s.after)['kl']:.4f}", s.gate, f"{s.seconds:.0f}")
    return table
