"""Reuse a schedule learned on SmolLM2-135M on a structurally different model made from it.

1. Profile SmolLM2-135M (bits 2/3/4/16, RTN g128; per linear with ``--granularity linear``, the
   default, with q/k/v and gate/up tied: 4 slots a block; per block with ``--granularity block``)
   and allocate a schedule at the size of uniform 3-bit (greedy repair under the additive profile
   model). Per linear, the schedule says which roles a block can spare bits on, which transfers.
2. Build the target: 6 blocks dropped (lowest block influence, never the first or last) and
   25% of MLP channels removed everywhere (Wanda scores), by ``apply`` + ``save_compressed``,
   loaded back with ``load_model(dir)``: 24 blocks of 1152 channels instead of 30 of 1536;
   with ``--recover-steps N``, distilled from the source for N steps first.
3. Profile the target; report the sensitivity predictor's Spearman correlation on it (trained
   on the source profile only, so the target is a model it was not trained on).
4. For each of ``--budgets`` (the size of uniform N-bit, default 3 and 4): transfer the source
   schedule allocated at that size (no profile of the target; its blocks aligned to the
   source's by block influence from one forward pass on 1,024 tokens, and, for comparison, by
   relative depth alone, checked on ``--check-tokens`` calibration tokens of the target against
   its exchanges and neighbours, and with the target's profile) and compare perplexity with uniform
   N-bit: the budget must be met exactly (bytes <= limit, no slot's upgrade fits) and the
   transfer must win. The source allocation is also measured on the source itself.
5. Cold search vs search warm-started from the source schedule on the target, same trials, for
   each of ``--seeds``: the trial at which the warm search first reaches the cold search's final
   measured KL (the acceptance: at most half the trials).

Run: ``.venv/bin/python bench/transfer.py [--granularity block] [--budgets 3] [--recover-steps 256]
[--work /tmp/transfer-block] [--trials 30] [--seeds 0,1,2]`` (artifacts and perplexities are cached in --work, per
granularity; delete it to start over).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

# bench/profile.py would shadow the standard library's profile module (torch imports cProfile).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from autocompress.compress.apply import apply  # noqa: E402
from autocompress.compress.memory import MemoryModel  # noqa: E402
from autocompress.compress.saving import save_compressed  # noqa: E402
from autocompress.data import load_tokens  # noqa: E402
from autocompress.evaluate import perplexity  # noqa: E402
from autocompress.models import load_model, model_fingerprint  # noqa: E402
from autocompress.profile.artifact import Profile  # noqa: E402
from autocompress.profile.run import ProfileSettings, profile_model  # noqa: E402
from autocompress.schedule import Choice, Schedule  # noqa: E402
from autocompress.search.budget import Budget  # noqa: E402
from autocompress.search.space import load_space  # noqa: E402
from autocompress.transfer import describe, repair, transfer_schedule  # noqa: E402
from autocompress.transfer.coordinates import model_coordinates  # noqa: E402
from autocompress.transfer.predictor import SensitivityPredictor  # noqa: E402
from autocompress.transfer.sensitivity import from_profile  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=160)  # logs keep whole rows


def log(message: str) -> None:
    console.print(f"[{time.strftime('%H:%M:%S')}] {message}")


def get_profile(loaded, path: Path, calibration, space, args) -> Profile:
    if path.exists():
        profile = Profile.load(path)
        if profile.granularity != space.granularity.value:
            raise SystemExit(f"{path} holds a {profile.granularity}-grained profile; give --granularity "
                             f"{profile.granularity} or another --work")
        missing = {label for label, _ in space.probe_choices()} - set(profile.labels())
        if missing:
            raise SystemExit(f"{path} lacks the probes {sorted(missing)}; give another --work")
        return profile
    settings = ProfileSettings(tokens=args.profile_tokens, seq_len=256, roles=False, additivity=False,
                               proxies=True, fisher_rows=4, progress=False)
    # data_name is the bare spec: the search re-reads held-aside tokens with load_tokens(profile.data)
    profile = profile_model(loaded, calibration, space, settings, data_name="stdlib-docs")
    path.parent.mkdir(parents=True, exist_ok=True)
    profile.save(path)
    return profile


def make_target(source_spec: str, profile: Profile, out: Path, calibration, recover_steps: int = 0) -> Path:
    """Drop the 6 blocks of lowest block influence (not first/last), prune 25% MLP channels, then
    (``recover_steps`` > 0) distill the result from the source for that many steps (logit KD,
    2 x 128 tokens a step, dense weights and norms trained), as a pruned model is shipped."""
    if (out / "autocompress.json").exists():
        return out
    loaded = load_model(source_spec)
    influence = {u.block: u.proxies.get("block_influence", 0.0) for u in profile.units}
    inner = [b for b in influence if 0 < b < len(influence) - 1]
    dropped = sorted(sorted(inner, key=lambda b: influence[b])[:6])
    units = {f"model.layers.{i}": Choice(drop=True) if i in dropped else Choice(channel_ratio=0.25)
             for i in range(len(influence))}
    schedule = Schedule(model_fingerprint(loaded.model), units)
    teacher = copy.deepcopy(loaded.model) if recover_steps > 0 else None
    apply(loaded.model, schedule, calibration.tokens, seq_len=256, progress=False)
    if teacher is not None:
        from autocompress.compress.calibrate import token_batch  # noqa: PLC0415
        from autocompress.compress.distill import DistillConfig, distill  # noqa: PLC0415

        config = DistillConfig(steps=recover_steps, batch_size=2, seq_len=128, lr=1e-4, hidden_weight=0.0,
                               lora_rank=0)
        result = distill(loaded.model, teacher, token_batch(calibration.tokens, 128), config, progress=False)
        log(f"target recovered: {result.steps} KD steps in {result.seconds:.0f} s, loss "
            f"{result.first_loss:.3f} -> {result.last_loss:.3f}")
        del teacher
    save_compressed(loaded.model, loaded.tokenizer, schedule, out)
    log(f"target: dropped blocks {dropped}, 25% MLP channels removed -> {out}")
    return out


def ppl(model, schedule: Schedule | None, tokens, args) -> float:
    """Perplexity of ``model`` compressed by ``schedule``, cached in WORK/perplexity.json by what
    determines it (model, schedule units, evaluation tokens, window)."""
    units = sorted((k, v.to_json()) for k, v in (schedule.units if schedule is not None else {}).items())
    key = hashlib.sha256(json.dumps([model_fingerprint(model), units, tokens.tolist(), args.window],
                                    sort_keys=True).encode()).hexdigest()
    cache_file = Path(args.work) / "perplexity.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if key not in cache:
        compressed = apply(copy.deepcopy(model), schedule, progress=False) if schedule is not None else model
        cache[key] = perplexity(compressed, tokens, window=args.window, batch_size=4)
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache[key]


def slot_roles(space, model) -> list[tuple[str, list[str]]]:
    """(label, paths inside a block) of each slot kind of ``space``: ["block"] at block granularity,
    e.g. ("q/k/v", [self_attn.q_proj, ...]) at linear granularity with ties."""
    from autocompress.models import adapter_for  # noqa: PLC0415

    if space.granularity.value == "block":
        return [("block", [""])]
    linears = adapter_for(model).linears
    tied = [list(group) for group in space.tie]
    groups = tied + [[role] for role in linears if not any(role in group for group in tied)]
    order = list(linears)
    groups.sort(key=lambda g: order.index(g[0]))
    return [("/".join(g), [linears[r] for r in g]) for g in groups]


def no_slot_upgrade_fits(schedule: Schedule, budget, space, model) -> bool:
    """Whether no slot of the space (a unit, or a tied group of linears moving together) can go one
    bit width up and still fit: the budget is met exactly at the space's granularity."""
    from autocompress.search.decisions import build_slots  # noqa: PLC0415

    bits = sorted(space.bits)
    for slot in build_slots(space, model):
        now = schedule.units.get(slot.members[0], Choice())
        if now.drop or now.bits == bits[-1]:
            continue
        up = dataclasses.replace(now, bits=next(b for b in bits if b > now.bits))
        if budget.fits(dataclasses.replace(schedule, units={**schedule.units, **{u: up for u in slot.members}})):
            return False
    return True


def bits_by_role(schedule: Schedule, roles, blocks: int) -> dict[str, list[int]]:
    """Per slot kind, the bits of each block (the first member of a tied group stands for it)."""
    out = {}
    for name, paths in roles:
        unit = (lambda i: f"model.layers.{i}") if paths == [""] else (lambda i, p=paths[0]: f"model.layers.{i}.{p}")
        out[name] = [schedule.units.get(unit(i), Choice()).bits for i in range(blocks)]
    return out


def bits_table(title: str, schedules: dict[str, Schedule], roles, blocks: int) -> Table:
    """Bits of each block, first to last, for each schedule and slot kind (one row each)."""
    table = Table(title=title, box=box.SIMPLE)
    for column in ("schedule", "slot", f"bits of blocks 0..{blocks - 1}"):
        table.add_column(column, justify="left", no_wrap=True)
    for name, schedule in schedules.items():
        for role, bits in bits_by_role(schedule, roles, blocks).items():
            table.add_row(name, role, " ".join(f"{b:>2}" for b in bits))
    return table


def first_reaching(records, target: float) -> int | None:
    """1-based count of finished trials at which the best measured KL first is <= target."""
    best, count = float("inf"), 0
    for record in sorted(records, key=lambda r: r.number):
        if record.state not in ("COMPLETE", "PRUNED"):
            continue
        count += 1
        if record.measured_kl is not None and record.feasible and record.state == "COMPLETE":
            best = min(best, record.measured_kl)
        if best <= target:
            return count
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--granularity", choices=("block", "linear"), default="linear",
                        help="profile and allocate per block, or per linear with q/k/v and gate/up tied")
    parser.add_argument("--work", default=None, help="cache directory (default /tmp/transfer-GRANULARITY)")
    parser.add_argument("--profile-tokens", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--bits", default="2,3,4,16",
                        help="bit widths of the search space (8 lets a uniform-4-bit budget trade 3 for 8 bits)")
    parser.add_argument("--budgets", default="3,4",
                        help="comma-separated bit widths: a budget at the size of uniform N-bit each (the first is "
                             "the searches' budget)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds: a cold and a warm search each")
    parser.add_argument("--holdout-tokens", type=int, default=1024)
    parser.add_argument("--measure", type=int, default=None,
                        help="cap on measured trials per search (default: the trials; the search's own default, "
                             "trials/8 + 8, stops measuring after about trial 14 of 30, so no later trial could "
                             "count, and a warm start's enqueued trials use up the same cap)")
    parser.add_argument("--skip-search", action="store_true",
                        help="keep the search figures of the previous run in figures.json")
    parser.add_argument("--placements", default="",
                        help="comma-separated target blocks: also measure uniform 3-bit with that block at 2 bits "
                             "and the last at 4 (the one-swap schedules of this budget)")
    parser.add_argument("--recover-steps", type=int, default=0,
                        help="distill the derived target from the source for this many steps before the transfer "
                             "(0: the target straight from the operators)")
    parser.add_argument("--check-tokens", type=int, default=2048,
                        help="target calibration tokens the checked transfer measures its candidates on")
    parser.add_argument("--check-count", type=int, default=6, help="exchanges the checked transfer measures")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.placements and args.granularity != "block":
        parser.error("--placements moves whole blocks; it needs --granularity block")
    args.work = args.work or f"/tmp/transfer-{args.granularity}"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budget_bits = [int(b) for b in args.budgets.split(",") if b.strip()]
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    if args.skip_search and (work / "figures.json").exists():
        previous = json.loads((work / "figures.json").read_text())
        figures.update({k: v for k, v in previous.items() if k == "search"})
    # by default without 8 bits: at the size of uniform 3-bit the allocation trades 2/3/4 bits, at 3/4 of the
    # profiling cost; a cached profile must hold a probe for each bit width asked for
    space_file = work / "space.yaml"
    space_file.write_text(f"name: bench-transfer\ngranularity: {args.granularity}\ngroup_size: 128\nmethod: rtn\n"
                          f"bits: [{', '.join(str(int(b)) for b in args.bits.split(','))}]\n"
                          + ("tie: [[q, k, v], [gate, up]]\n" if args.granularity == "linear" else ""))
    space = load_space(str(space_file))

    # 1. source: profile and allocate
    source = load_model("smollm2-135m")
    calibration = load_tokens("stdlib-docs", source.tokenizer, "calibration", max(args.profile_tokens, 4096))
    evaluation = load_tokens("stdlib-docs", source.tokenizer, "evaluation", args.eval_tokens).tokens
    tick = time.perf_counter()
    source_profile = get_profile(source, work / "source" / "profile.json", calibration, space, args)
    log(f"source profile: {len(source_profile.units)} units ({time.perf_counter() - tick:.0f} s)")
    memory = MemoryModel.from_model(source.model)
    roles = slot_roles(space, source.model)
    source_schedules: dict[int, Schedule] = {}
    figures["source"] = {}
    for bits in budget_bits:
        uniform = Schedule.uniform(source.model, space.quant_choice(bits))
        budget = Budget.parse([f"memory={memory.schedule_bytes(uniform)}b"], memory)
        # the repair starts from uniform N-bit on the space's own units (per linear at linear granularity)
        start = Schedule(uniform.fingerprint, {u: space.quant_choice(bits) for u in space.units(source.model)})
        allocated = repair(start, source.model, budget, space,
                           from_profile(source_profile, model_coordinates(source.model)))
        source_schedules[bits] = describe(allocated, source.model, source_profile)
        source_schedules[bits].save(work / "source" / f"schedule-uniform{bits}.json")
        console.print(bits_table(f"source schedule (SmolLM2-135M) at the size of uniform {bits}-bit",
                                 {"source": source_schedules[bits]}, roles, len(memory.blocks)))
        # does the allocation beat uniform on the model it was profiled on? (transfer cannot do better)
        figures["source"][f"uniform{bits}"] = {
            "perplexity_uniform": ppl(source.model, uniform, evaluation, args),
            "perplexity_allocated": ppl(source.model, source_schedules[bits], evaluation, args),
            "bits": bits_by_role(source_schedules[bits], roles, len(memory.blocks))}
        log(f"on the source itself at uniform {bits}-bit size: uniform ppl "
            f"{figures['source'][f'uniform{bits}']['perplexity_uniform']:.2f}, profile-allocated ppl "
            f"{figures['source'][f'uniform{bits}']['perplexity_allocated']:.2f}")
    # the first budget's schedule is the one the warm-started searches start from
    source_schedule = source_schedules[budget_bits[0]]
    source_schedule.save(work / "source" / "schedule.json")

    # 2. target: a structurally different model made from the source
    target_dir = make_target("smollm2-135m", source_profile, work / "target-model", calibration,
                             args.recover_steps)
    del source
    target = load_model(str(target_dir))
    target_memory = MemoryModel.from_model(target.model)
    blocks = len(target_memory.blocks)
    channels = target_memory.blocks[0].channels
    figures["target"] = {"blocks": blocks, "mlp_channels": channels}

    # 3. target profile (only for the comparison rows, the predictor and the search) and the
    #    predictor's Spearman on it
    tick = time.perf_counter()
    run = work / "target-run"
    target_profile = get_profile(target, run / "profile.json", load_tokens(
        "stdlib-docs", target.tokenizer, "calibration", max(args.profile_tokens, 4096)), space, args)
    log(f"target profile ({time.perf_counter() - tick:.0f} s)")
    predictor = SensitivityPredictor.from_profiles([(source_profile, None)], trees=200)
    predictor.save(work / "predictor.json")
    rho = predictor.spearman(target_profile)
    figures["predictor_spearman_on_target"] = rho
    log(f"predictor (trained on SmolLM2-135M only) on the derived model: Spearman overall {rho['overall']:.3f}, "
        f"within a bit width {rho['within_label']:.3f} "
        f"({', '.join(f'{k}: {v:.2f}' for k, v in rho.items() if k.startswith('label:'))})")

    # 4. per budget: transfer without the target's profile (by block signature, and by relative
    #    depth alone), with it, and uniform of the same size
    # one forward pass of the target on 1,024 calibration tokens aligns its blocks to the source's
    # the check measures the transfer and its best exchanges on the target's calibration text (never the
    # evaluation split the perplexities below are measured on); both are prefixes of that split
    calibration_prefix = load_tokens("stdlib-docs", target.tokenizer, "calibration",
                                     max(1024, args.check_tokens)).tokens
    signature_tokens, check_tokens = calibration_prefix[:1024], calibration_prefix[:args.check_tokens]
    figures["budgets"] = {}
    table = Table(title=f"SmolLM2-135M (30 blocks) -> derived ({blocks} blocks, {channels} MLP channels), "
                        f"{args.eval_tokens} eval tokens, {args.granularity} granularity")
    for column in ("budget", "schedule", "bytes", "perplexity"):
        table.add_column(column, justify="left" if column in ("budget", "schedule") else "right")
    table.add_row("-", "original target (16-bit)", f"{target_memory.schedule_bytes(Schedule('', {})):,}",
                  f"{ppl(target.model, None, evaluation, args):.2f}")
    figures["perplexity_16bit"] = ppl(target.model, None, evaluation, args)
    for bits in budget_bits:
        uniform_t = Schedule.uniform(target.model, space.quant_choice(bits))
        limit = target_memory.schedule_bytes(uniform_t)
        target_budget = Budget.parse([f"memory={limit}b"], target_memory)
        tick = time.perf_counter()
        transferred = transfer_schedule(source_schedules[bits], target.model, target_budget, space=space,
                                        signature_tokens=signature_tokens)
        transfer_seconds = time.perf_counter() - tick
        alignment = transferred.meta["transfer"]["alignment"]
        log(f"alignment by {alignment['by']}: target block -> source block {alignment.get('source_blocks')}")
        tick = time.perf_counter()
        checked = transfer_schedule(source_schedules[bits], target.model, target_budget, space=space,
                                    target_signature=alignment.get("target_signature"), check_tokens=check_tokens,
                                    check_count=args.check_count)
        check_seconds = time.perf_counter() - tick
        check = checked.meta["transfer"]["check"]
        log(f"check ({check_seconds:.0f} s): KL on {check['tokens']} target tokens per candidate "
            f"{[round(c.get('kl', float('nan')), 4) for c in check['candidates']]}, chosen {check['chosen']} "
            f"{check['candidates'][check['chosen']]['changed'] or '(the transfer itself)'}")
        plain = transfer_schedule(source_schedules[bits], target.model, target_budget, space=space)
        with_profile = transfer_schedule(source_schedules[bits], target.model, target_budget, space=space,
                                         profile=target_profile)
        transferred.save(work / "transferred" / f"schedule-uniform{bits}.json")
        checked.save(work / "transferred" / f"schedule-uniform{bits}-checked.json")
        exact = no_slot_upgrade_fits(transferred, target_budget, space, target.model)
        used = target_memory.schedule_bytes(transferred)
        log(f"uniform {bits}-bit size: transfer ({transferred.meta['transfer']['losses']} losses) "
            f"{transfer_seconds:.2f} s, {used:,} of {limit:,} bytes, no upgrade of a slot fits: {exact}")
        console.print(bits_table(f"bits per target block at the size of uniform {bits}-bit",
                                 {"transferred": transferred, "+ check": checked, "relative depth": plain,
                                  "+ target profile": with_profile},
                                 roles, blocks))
        entry = {"limit": limit, "bytes": used, "no_upgrade_fits": exact, "seconds": transfer_seconds,
                 "alignment": alignment.get("source_blocks"), "losses": transferred.meta["transfer"]["losses"],
                 "bits": bits_by_role(transferred, roles, blocks),
                 "bits_relative_depth": bits_by_role(plain, roles, blocks),
                 "bits_with_target_profile": bits_by_role(with_profile, roles, blocks),
                 "bits_checked": bits_by_role(checked, roles, blocks), "check": check, "check_seconds": check_seconds,
                 "checked_no_upgrade_fits": no_slot_upgrade_fits(checked, target_budget, space, target.model),
                 "perplexity": {}}
        for name, schedule in ((f"uniform {bits}-bit g128", uniform_t), ("transferred, relative depth", plain),
                               ("transferred", transferred), ("transferred + check", checked),
                               ("transferred + target profile", with_profile)):
            value = ppl(target.model, schedule, evaluation, args)
            entry["perplexity"][name] = value
            table.add_row(f"uniform {bits}-bit size", name, f"{target_memory.schedule_bytes(schedule):,}",
                          f"{value:.2f}")
            log(f"uniform {bits}-bit size, {name}: ppl {value:.2f}")
        entry["transfer_beats_uniform"] = entry["perplexity"]["transferred"] < entry["perplexity"][
            f"uniform {bits}-bit g128"]
        entry["checked_transfer_beats_uniform"] = entry["perplexity"]["transferred + check"] < entry["perplexity"][
            f"uniform {bits}-bit g128"]
        figures["budgets"][f"uniform{bits}"] = entry
        (work / "figures.json").write_text(json.dumps(figures, indent=1))
    console.print(table)
    if args.placements:
        uniform_t = Schedule.uniform(target.model, space.quant_choice(3))
        swaps = Table(title="one swap at the size of uniform 3-bit: block B at 2 bits, the last block at 4")
        for column in ("block at 2 bits", "perplexity"):
            swaps.add_column(column, justify="right")
        figures["one_swap_perplexity"] = {}
        for block in (int(b) for b in args.placements.split(",")):
            units = {**uniform_t.units, f"model.layers.{block}": space.quant_choice(2),
                     f"model.layers.{blocks - 1}": space.quant_choice(4)}
            value = ppl(target.model, Schedule(uniform_t.fingerprint, units), evaluation, args)
            figures["one_swap_perplexity"][block] = value
            swaps.add_row(str(block), f"{value:.2f}")
        console.print(swaps)
    limit = figures["budgets"][f"uniform{budget_bits[0]}"]["limit"]
    (work / "figures.json").write_text(json.dumps(figures, indent=1))

    # 5. cold vs warm-started search, per seed
    if not args.skip_search:
        from autocompress.search.study import SearchSettings, search  # noqa: PLC0415

        per_seed = []
        for seed in seeds:
            results = {}
            for name, warm in (("cold", None), ("warm", str(work / "source" / "schedule.json"))):
                tick = time.perf_counter()
                study = f"{name}-seed{seed}"
                (run / f"study-{study}.db").unlink(missing_ok=True)  # a fresh study each run
                settings = SearchSettings(run_dir=str(run), budget=(f"memory={limit}b",), trials=args.trials,
                                          space=str(space_file), seed=seed,
                                          storage=f"sqlite:///{run}/study-{study}.db", study_name=study,
                                          warm_start=warm, progress=False, threads=args.threads,
                                          holdout_tokens=args.holdout_tokens, calibration_tokens=512,
                                          measure=args.measure or args.trials)
                results[name] = search(settings, model=target.model, tokenizer=target.tokenizer)
                log(f"{study} search: {len(results[name].trials)} trials, {time.perf_counter() - tick:.0f} s")

            def best(name: str) -> float:
                return min(r.measured_kl for r in results[name].trials
                           if r.measured_kl is not None and r.feasible and r.state == "COMPLETE")

            cold_best = best("cold")
            row = {"seed": seed, "cold_best_kl": cold_best,
                   "cold_reached_at": first_reaching(results["cold"].trials, cold_best),
                   "warm_reached_at": first_reaching(results["warm"].trials, cold_best),
                   "warm_best_kl": best("warm"),
                   "measured": {name: sum(r.measured_kl is not None for r in results[name].trials)
                                for name in results},
                   "uniform_kl": next((r.measured_kl for r in results["cold"].trials
                                       if r.source == f"uniform:bits={budget_bits[0]}"), None),
                   "warm_start_trials_kl": [r.measured_kl for r in results["warm"].trials
                                            if r.source == "warm-start"],
                   "warm_start_trials_at": [i + 1 for i, r in enumerate(sorted(results["warm"].trials,
                                                                               key=lambda r: r.number))
                                            if r.source == "warm-start"]}
            row["holds"] = row["warm_reached_at"] is not None and row["warm_reached_at"] <= args.trials / 2
            per_seed.append(row)
            log(f"seed {seed}: cold final KL {cold_best:.4f} first at trial {row['cold_reached_at']}; warm reaches "
                f"it at trial {row['warm_reached_at']} (warm best {row['warm_best_kl']:.4f})")
        figures["search"] = {"trials": args.trials, "measure_cap": args.measure or args.trials,
                             "granularity": args.granularity, "seeds": per_seed,
                             "holds_for_every_seed": all(r["holds"] for r in per_seed)}
        search_table = Table(title=f"cold vs warm-started search on the derived model, {args.trials} trials each, "
                                   f"holdout KL ({args.holdout_tokens} tokens)")
        for column in ("seed", f"uniform {budget_bits[0]}-bit KL", "cold final KL", "cold first at", "warm reaches it at",
                       f"<= {args.trials // 2}?", "warm final KL"):
            search_table.add_column(column, justify="right")
        for r in per_seed:
            search_table.add_row(str(r["seed"]), f"{r['uniform_kl']:.4f}" if r["uniform_kl"] is not None else "-", f"{r['cold_best_kl']:.4f}",
                                 str(r["cold_reached_at"]), str(r["warm_reached_at"]),
                                 "yes" if r["holds"] else "NO", f"{r['warm_best_kl']:.4f}")
        console.print(search_table)
    (work / "figures.json").write_text(json.dumps(figures, indent=1))
    console.print_json(json.dumps(figures))


if __name__ == "__main__":
    main()
