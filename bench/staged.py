"""Staged compression and distillation recovery on SmolLM2-135M (stdlib-docs).

(a) Structured pruning of about 30% of the parameters (the same MLP-channel ratio in every
    block, Wanda importance): one shot without recovery, one shot followed by a distillation
    budget of B steps, and staged (at most --step-fraction of the size per step, most robust
    blocks first; or --gradual: every block moves through intermediate channel ratios, one
    level per step) with the same B steps split over its steps. Gates are off here so all three
    end at exactly the same size.
(b) Quantization at 3 bits (uniform RTN, group 128): no recovery vs LoRA recovery (rank 8,
    B steps, norms trained too), with the adapters kept in 16 bits (their bytes counted) and
    merged by re-quantization (what `autocompress apply` saves).

Evaluation perplexity on the evaluation split (--eval-tokens, windows of 512). Distillation
and the staged gates use the calibration split only (validation slice held aside).

    .venv/bin/python bench/staged.py --threads 1                 # both parts
    .venv/bin/python bench/staged.py --part b --kd-steps 30      # smaller
    .venv/bin/python bench/staged.py --part a --gradual --final-share 0.5 --kd-steps 384 --seed 0
        # the README's figures: one shot, one shot + 384 KD steps, staged gradual + the same 384
    .venv/bin/python bench/staged.py --part a-staged --gradual --final-share 0.5 --kd-steps 48
        # staged variant only, every block through channel ratios 17% -> 34% -> 51%
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# bench/ holds scripts named like stdlib modules (profile.py): keep them from shadowing the
# stdlib when this file is run as a script.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
from rich.console import Console
from rich.table import Table

from autocompress.compress.apply import apply
from autocompress.compress.calibrate import token_batch
from autocompress.compress.distill import DistillConfig, distill
from autocompress.compress.lora import lora_parameters, merge_lora
from autocompress.compress.memory import MemoryModel, stored_bytes
from autocompress.compress.staged import Gates, Recovery, StagedConfig, staged_apply
from autocompress.compress.staging import gradual_levels, next_step, stage_units, unit_weight
from autocompress.data import load_tokens
from autocompress.evaluate import perplexity
from autocompress.models import load_model, model_fingerprint, parameter_count
from autocompress.schedule import Choice, PruneScore, Schedule

console = Console()


def step_count(model, schedule: Schedule, fraction: float, gradual: bool = False) -> int:
    """How many steps staging will take (gates off): the planner run on sizes alone."""
    fp = schedule.fingerprint
    memory = MemoryModel.from_model(model)
    units = stage_units(model, schedule)
    if gradual:  # one level per step (each level within the fraction by construction)
        return gradual_levels(memory, units, fp, fraction)
    weights = {u.name: unit_weight(memory, u, fp) for u in units}
    done, count = [], 0
    while len(done) < len(units):
        current = memory.schedule_bytes(Schedule(fp, {k: v for u in done for k, v in u.entries.items()}))
        step = next_step(units[len(done):], weights, current, fraction)
        done += step
        count += 1
    return count


def pruning_schedule(model, fp: str, target: float) -> tuple[Schedule, float]:
    """The smallest uniform MLP-channel ratio removing at least ``target`` of the parameters."""
    memory = MemoryModel.from_model(model)
    dense = memory.schedule_parameters(Schedule(fp))
    for ratio in [r / 100 for r in range(20, 90)]:
        schedule = Schedule.uniform(model, Choice(channel_ratio=ratio, score=PruneScore.WANDA), fingerprint=fp)
        removed = 1 - memory.schedule_parameters(schedule) / dense
        if removed >= target:
            return schedule, removed
    raise SystemExit("no channel ratio reaches the target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "a-staged", "a-one-shot", "b", "all"], default="all",
                        help="a-staged / a-one-shot: only the staged / one-shot variants of (a)")
    parser.add_argument("--final-share", type=float, default=0.0,
                        help="share of the staged budget kept for a final recovery after the last step")
    parser.add_argument("--gradual", action="store_true",
                        help="staged variant moves every block through intermediate channel ratios")
    parser.add_argument("--fade", action="store_true",
                        help="staged variant fades what each step removes over its distillation, then cuts it")
    parser.add_argument("--skip-original", action="store_true", help="do not evaluate the original")
    parser.add_argument("--kd-steps", type=int, default=60, help="distillation budget B (steps)")
    parser.add_argument("--kd-batch", type=int, default=2)
    parser.add_argument("--kd-seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--valid-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--target", type=float, default=0.30, help="share of parameters to remove in (a)")
    parser.add_argument("--step-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0, help="seed of the distillation's batch order and adapters")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="/tmp/bench_staged.json", help="where to write the figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    original = loaded.model
    fp = model_fingerprint(original)
    calib = load_tokens("stdlib-docs", loaded.tokenizer, "calibration", args.calib_tokens).tokens
    valid = load_tokens("stdlib-docs", loaded.tokenizer, "calibration", args.valid_tokens,
                        start=args.calib_tokens).tokens
    evaluation = load_tokens("stdlib-docs", loaded.tokenizer, "evaluation", args.eval_tokens).tokens
    stat_rows = token_batch(calib, 256, 16)
    train_rows = token_batch(calib, args.kd_seq)
    kd = DistillConfig(steps=args.kd_steps, batch_size=args.kd_batch, seq_len=args.kd_seq, lr=args.lr,
                       lora_lr=args.lora_lr, lora_rank=args.lora_rank, seed=args.seed)
    results: dict = {"settings": vars(args), "rows": []}

    def ppl(model) -> float:
        return perplexity(model, evaluation, window=512, batch_size=1)

    def record(part: str, name: str, model, value: float, seconds: float, extra: dict | None = None) -> None:
        # Packed codes are buffers, not parameters: the count means something for pruning only.
        count = parameter_count(model) if part != "b" else None
        row = {"part": part, "variant": name, "perplexity": round(value, 3), "parameters": count,
               "bytes": stored_bytes(model), "seconds": round(seconds, 1), **(extra or {})}
        results["rows"].append(row)
        console.print(row)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)

    if not args.skip_original:
        tick = time.perf_counter()
        record("-", "original fp32 (16-bit size)", original, ppl(original), time.perf_counter() - tick)

    if args.part in ("a", "a-staged", "a-one-shot", "all"):
        schedule, removed = pruning_schedule(original, fp, args.target)
        ratio = next(iter(schedule.units.values())).channel_ratio
        steps = step_count(original, schedule, args.step_fraction, args.gradual)
        console.print(f"(a) MLP channels {ratio:.2f} in every block: {100 * removed:.1f}% of parameters; "
                      f"staged in {steps} steps")
        if args.part != "a-staged":
            tick = time.perf_counter()
            student = copy.deepcopy(original)
            apply(student, schedule, stat_rows, progress=False, fingerprint=fp)
            one_shot = copy.deepcopy(student)
            record("a", "one shot, no recovery", student, ppl(student), time.perf_counter() - tick)

            tick = time.perf_counter()
            result = distill(one_shot, original, train_rows, kd)
            record("a", f"one shot + KD ({result.steps} steps)", one_shot, ppl(one_shot), time.perf_counter() - tick,
                   {"kd_first_loss": result.first_loss, "kd_last_loss": result.last_loss})
            del one_shot, student

    if args.part in ("a", "a-staged", "all"):
        tick = time.perf_counter()
        final = int(round(args.kd_steps * args.final_share))
        per_step = max(1, (args.kd_steps - final) // steps)
        config = StagedConfig(step_fraction=args.step_fraction, gates=Gates(step_ppl_increase=None),
                              recovery=Recovery.ALWAYS, distill=replace(kd, steps=per_step), calib_seq_len=256,
                              calib_rows=16, eval_window=256, final_recovery_steps=final,
                              gradual=args.gradual, fade=args.fade)
        with tempfile.TemporaryDirectory() as run_dir:
            staged = staged_apply(copy.deepcopy(original), schedule, calib, valid, config, run_dir, fingerprint=fp)
        budget = f"{steps} x {per_step}" + (f" + final {final}" if final else "")
        kind = " ".join(k for k, on in (("gradual", args.gradual), ("faded", args.fade)) if on)
        name = f"staged{' ' + kind if kind else ''} ({len(staged.steps)} steps) + KD ({budget} steps)"
        record("a", name, staged.model,
               ppl(staged.model), time.perf_counter() - tick,
               {"steps": [{"units": len(s.units), "first_unit": s.units[0], "valid_ppl_after": s.after["perplexity"],
                           "valid_ppl_recovered": (s.recovered or {}).get("perplexity")} for s in staged.steps]})
        del staged

    if args.part in ("b", "all"):
        schedule = Schedule.uniform(original, Choice(bits=3, group_size=128), fingerprint=fp)
        tick = time.perf_counter()
        student = copy.deepcopy(original)
        apply(student, schedule, progress=False, fingerprint=fp)
        record("b", "3-bit g128 RTN, no recovery", student, ppl(student), time.perf_counter() - tick)

        tick = time.perf_counter()
        result = distill(student, original, train_rows, replace(kd, train_dense=False))
        adapters = lora_parameters(student)
        record("b", f"+ LoRA r{args.lora_rank} KD ({result.steps} steps), adapters kept 16-bit", student,
               ppl(student), time.perf_counter() - tick,
               {"lora_parameters": adapters,
                "kd_first_loss": result.first_loss, "kd_last_loss": result.last_loss})
        tick = time.perf_counter()
        merge_lora(student, "requantize")
        record("b", "+ LoRA merged, re-quantized 3-bit (saved form)", student, ppl(student),
               time.perf_counter() - tick)

    table = Table(title=f"staged / distillation on SmolLM2-135M, stdlib-docs evaluation ({args.eval_tokens} tokens, "
                        f"windows of 512), {args.threads} thread(s)")
    for column in ("part", "variant", "perplexity", "parameters", "MiB", "seconds"):
        table.add_column(column, justify="left" if column in ("part", "variant") else "right")
    for row in results["rows"]:
        table.add_row(row["part"], row["variant"], f"{row['perplexity']:.2f}", "-" if row["parameters"] is None else f"{row['parameters']:,}",
                      f"{row['bytes'] / 2**20:.1f}", f"{row['seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
