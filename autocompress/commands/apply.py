"""``autocompress apply RUN``: the run's schedule -> a saved compressed model (optionally staged)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import (add_device_options, add_threads, add_trust_remote_code, bounded, device_options,
                     non_negative_float, non_negative_int, positive_int)


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    return bounded(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def register(verbs) -> None:
    """Add the ``apply`` sub-command."""
    ap = verbs.add_parser(
        "apply", help="compress the model as RUN/schedule.json says and save it",
        description="Apply RUN/schedule.json to its model and save the compressed model (RUN/model). "
                    "With --staged: in steps of at most --step-fraction of the size, most robust units first, "
                    "each checked against quality gates on a validation slice, recovered by distillation "
                    "from the original when a gate fails, rolled back and frozen when it still fails; "
                    "the history goes to RUN/staged.json.")
    ap.add_argument("run_dir", metavar="RUN", help="run directory holding schedule.json")
    ap.add_argument("--schedule", metavar="PATH", help="schedule to apply (default RUN/schedule.json)")
    ap.add_argument("--out", metavar="DIR", help="where to save the compressed model (default RUN/model)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--model", metavar="MODEL", help="model to compress (default: the schedule's meta.model)")
    ap.add_argument("--data", help="calibration data (default: the schedule's meta.data or stdlib-docs)")
    ap.add_argument("--calib-tokens", type=positive_int, default=None,
                    help="calibrate on this many tokens from the start of the calibration split instead of the "
                         "run's calibration rows (default: the run's rows, so the model shipped is the one the "
                         "search measured; distillation reads 8192)")
    ap.add_argument("--sequential", action="store_true",
                    help="calibrate each block on the compressed blocks' outputs (GPTQ's reference order) "
                         "instead of the original model's, as the profile and search measured")
    ap.add_argument("--valid-tokens", type=positive_int, default=2048,
                    help="validation tokens held aside from calibration (default 2048)")
    ap.add_argument("--seq-len", type=positive_int, default=512, help="calibration row length (default 512)")
    staged = ap.add_argument_group("staged compression")
    staged.add_argument("--staged", action="store_true", help="compress in gated steps with recovery")
    staged.add_argument("--resume", action="store_true", help="continue an interrupted staged run")
    staged.add_argument("--restart", action="store_true", help="discard an earlier staged run and start over")
    staged.add_argument("--step-fraction", type=_fraction, default=0.15,
                        help="most of the current size one step may remove (default 0.15)")
    staged.add_argument("--one-shot", action="store_true", help="one step with everything (gates still apply)")
    staged.add_argument("--gradual", action="store_true",
                        help="move every unit through intermediate head/channel ratios and bits, one level per step")
    staged.add_argument("--fade", action="store_true",
                        help="scale what a step removes (heads, channels, blocks) down to zero over its "
                             "distillation before cutting it; that distillation is the step's recovery")
    staged.add_argument("--gate-kl", type=non_negative_float, help="max KL-to-original increase per step")
    staged.add_argument("--gate-ppl-increase", type=non_negative_float, default=0.25,
                        help="max relative perplexity increase per step (default 0.25; 0 with --no-step-gate)")
    staged.add_argument("--no-step-gate", action="store_true", help="no per-step perplexity gate")
    staged.add_argument("--total-kl", type=non_negative_float, help="max KL to the original in total")
    staged.add_argument("--total-ppl-increase", type=non_negative_float, help="max relative perplexity increase in total")
    staged.add_argument("--recovery", choices=["never", "on-failure", "always"], default="on-failure",
                        help="when to distill (default on-failure)")
    staged.add_argument("--recovery-steps", type=non_negative_int, default=100,
                        help="distillation steps per recovery (default 100)")
    staged.add_argument("--final-recovery-steps", type=non_negative_int, default=0,
                        help="distillation steps on the finished model (kept if it helps; default 0)")
    staged.add_argument("--recovery-seconds", type=non_negative_float, help="time limit per recovery")
    staged.add_argument("--lr", type=non_negative_float, default=5e-5, help="learning rate of dense weights and norms")
    staged.add_argument("--lora-lr", type=non_negative_float, default=1e-3, help="learning rate of LoRA adapters")
    staged.add_argument("--lora-rank", type=non_negative_int, default=8, help="LoRA rank on quantized layers (0: none)")
    staged.add_argument("--lora-merge", choices=["keep", "requantize", "discard"], default="keep",
                        help="adapters after recovery: keep as 16-bit tensors (counted in the size; default), "
                             "fold in and re-quantize (size exactly as scheduled), or discard")
    staged.add_argument("--kd-batch", type=positive_int, default=4, help="distillation batch size (default 4)")
    staged.add_argument("--kd-seq-len", type=positive_int, default=256, help="distillation row length (default 256)")
    staged.add_argument("--temperature", type=non_negative_float, default=1.0, help="distillation temperature (default 1)")
    add_trust_remote_code(ap)
    add_threads(ap)
    add_device_options(ap)
    ap.set_defaults(run=run)


def run(args) -> int:
    """Apply, save, print the table (and the staged history)."""
    from rich.console import Console  # noqa: PLC0415

    from ..artifacts import check_output  # noqa: PLC0415
    from ..compress.apply_run import ApplyConfig, apply_run, apply_table  # noqa: PLC0415
    from ..compress.distill import DistillConfig  # noqa: PLC0415
    from ..compress.staged import Gates, Recovery, StagedConfig, staged_table  # noqa: PLC0415
    from ..errors import UserError  # noqa: PLC0415

    if args.out:
        check_output(args.out, "--out", directory=True)
    device, dtype = device_options(args)
    staged = None
    if args.staged:
        gates = Gates(step_kl=args.gate_kl, step_ppl_increase=None if args.no_step_gate else args.gate_ppl_increase,
                      total_kl=args.total_kl, total_ppl_increase=args.total_ppl_increase)
        distill = DistillConfig(steps=args.recovery_steps, seconds=args.recovery_seconds, lr=args.lr,
                                lora_lr=args.lora_lr, lora_rank=args.lora_rank, batch_size=args.kd_batch,
                                seq_len=args.kd_seq_len, temperature=args.temperature or 1.0)
        staged = StagedConfig(step_fraction=args.step_fraction, one_shot=args.one_shot, gradual=args.gradual,
                              gates=gates, recovery=Recovery(args.recovery), distill=distill,
                              calib_seq_len=args.seq_len,
                              lora_merge=args.lora_merge, restart=args.restart,
                              final_recovery_steps=max(0, args.final_recovery_steps),
                              resume=args.resume, fade=args.fade)
    elif args.resume or args.restart or args.fade:
        raise UserError("--resume, --restart and --fade are about staged runs; add --staged")
    result = apply_run(ApplyConfig(run_dir=Path(args.run_dir), schedule=Path(args.schedule) if args.schedule else None,
                                   out=Path(args.out) if args.out else None, model=args.model, data=args.data,
                                   calib_tokens=args.calib_tokens, valid_tokens=args.valid_tokens,
                                   sequential=args.sequential,
                                   seq_len=args.seq_len, staged=staged, overwrite=args.overwrite,
                                   trust_remote_code=args.trust_remote_code, device=device, dtype=dtype))
    console = Console()
    if result.staged is not None:
        console.print(staged_table(result.staged.steps, result.staged.original_bytes,
                                   result.staged.original.perplexity))
        if result.staged.frozen:
            console.print(f"frozen at their previous choice: {', '.join(result.staged.frozen)}")
    console.print(apply_table(result))
    console.print(f"wrote {result.out}")
    return 0
