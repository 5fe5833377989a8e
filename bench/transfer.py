"""Reuse a schedule learned on SmolLM2-135M on a structurally different model made from it.

1. Profile SmolLM2-135M (bits 2/3/4/16, RTN g128; per linear with ``--granularity linear``, the
   default, with q/k/v and gate/up tied: 4 slots a block; per block with ``--granularity block``)
   and allocate a schedule at the size of uniform 3-bit (greedy repair under the additive profile
   model). Per linear, the schedule says which roles a block can spare bits on, which transfers.
2. Build the target: 6 blocks dropped (lowest block influence, never the first or last) and
   25% of MLP channels removed everywhere (Wanda scores), by ``apply`` + ``save_compressed``,
   loaded back with ``load_model(dir)``: 24 blocks of 1152 channels instead of 30 of 1536.
3. Transfer the schedule (no profile of the target; its blocks aligned to the source's by block
   influence from one forward pass on 1,024 tokens, and, for comparison, by relative depth
   alone) to the target's uniform-3-bit size and compare perplexity with uniform 3-bit: the
   budget must be met exactly (bytes <= limit, no single upgrade fits) and the transfer must win.
4. Profile the target; report the sensitivity predictor's Spearman correlation on it (trained
   on the source profile only, so the target is a model it was not trained on).
5. Cold search vs search warm-started from the source schedule on the target, same trials, for
   each of ``--seeds``: the trial at which the warm search first reaches the cold search's final
   measured KL (the acceptance: at most half the trials).

Run: ``.venv/bin/python bench/transfer.py [--granularity linear] [--work /tmp/transfer-linear]
[--trials 30] [--seeds 0,1,2]`` (artifacts and perplexities are cached in --work, per
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
        return profile
    settings = ProfileSettings(tokens=args.profile_tokens, seq_len=256, roles=False, additivity=False,
                               proxies=True, fisher_rows=4, progress=False)
    # data_name is the bare spec: the search re-reads held-aside tokens with load_tokens(profile.data)
    profile = profile_model(loaded, calibration, space, settings, data_name="stdlib-docs")
    path.parent.mkdir(parents=True, exist_ok=True)
    profile.save(path)
    return profile


def make_target(source_spec: str, profile: Profile, out: Path, calibration) -> Path:
    """Drop the 6 blocks of lowest block influence (not first/last), prune 25% MLP channels."""
    if (out / "autocompress.json").exists():
        return out
    loaded = load_model(source_spec)
    influence = {u.block: u.proxies.get("block_influence", 0.0) for u in profile.units}
    inner = [b for b in influence if 0 < b < len(influence) - 1]
    dropped = sorted(sorted(inner, key=lambda b: influence[b])[:6])
    units = {f"model.layers.{i}": Choice(drop=True) if i in dropped else Choice(channel_ratio=0.25)
             for i in range(len(influence))}
    schedule = Schedule(model_fingerprint(loaded.model), units)
    apply(loaded.model, schedule, calibration.tokens, seq_len=256, progress=False)
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
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds: a cold and a warm search each")
    parser.add_argument("--holdout-tokens", type=int, default=1024)
    parser.add_argument("--skip-search", action="store_true",
                        help="keep the search figures of the previous run in figures.json")
    parser.add_argument("--placements", default="",
                        help="comma-separated target blocks: also measure uniform 3-bit with that block at 2 bits "
                             "and the last at 4 (the one-swap schedules of this budget)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.placements and args.granularity != "block":
        parser.error("--placements moves whole blocks; it needs --granularity block")
    args.work = args.work or f"/tmp/transfer-{args.granularity}"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    if args.skip_search and (work / "figures.json").exists():
        previous = json.loads((work / "figures.json").read_text())
        figures.update({k: v for k, v in previous.items() if k.startswith(("search", "warm_start"))})
    # quant-only without 8 bits: the bits this model's allocation really trades, at 3/4 of the profiling cost
    space_file = work / "space.yaml"
    space_file.write_text(f"name: bench-transfer\ngranularity: {args.granularity}\ngroup_size: 128\nmethod: rtn\n"
                          f"bits: [2, 3, 4, 16]\n"
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
    uniform3 = Schedule.uniform(source.model, space.quant_choice(3))
    budget = Budget.parse([f"memory={memory.schedule_bytes(uniform3)}b"], memory)
    # the repair starts from uniform 3-bit on the space's own units (per linear at linear granularity)
    start = Schedule(uniform3.fingerprint, {u: space.quant_choice(3) for u in space.units(source.model)})
    allocated = repair(start, source.model, budget, space,
                       from_profile(source_profile, model_coordinates(source.model)))
    source_schedule = describe(allocated, source.model, source_profile)
    source_schedule.save(work / "source" / "schedule.json")
    roles = slot_roles(space, source.model)
    console.print(bits_table("source schedule (SmolLM2-135M): bits per block", {"source": source_schedule},
                             roles, len(memory.blocks)))

    # 2. target: a structurally different model made from the source
    target_dir = make_target("smollm2-135m", source_profile, work / "target-model", calibration)
    del source
    target = load_model(str(target_dir))
    target_memory = MemoryModel.from_model(target.model)
    blocks = len(target_memory.blocks)
    channels = target_memory.blocks[0].channels
    figures["target"] = {"blocks": blocks, "mlp_channels": channels}

    # 3. transfer at the size of uniform 3-bit, without profiling the target
    uniform_t = Schedule.uniform(target.model, space.quant_choice(3))
    limit = target_memory.schedule_bytes(uniform_t)
    target_budget = Budget.parse([f"memory={limit}b"], target_memory)
    tick = time.perf_counter()
    # one forward pass of the target on 1,024 calibration tokens aligns its blocks to the source's
    signature_tokens = load_tokens("stdlib-docs", target.tokenizer, "calibration", 1024).tokens
    transferred = transfer_schedule(source_schedule, target.model, target_budget, space=space,
                                    signature_tokens=signature_tokens)
    transfer_seconds = time.perf_counter() - tick
    alignment = transferred.meta["transfer"]["alignment"]
    log(f"alignment by {alignment['by']}: target block -> source block {alignment.get('source_blocks')}")
    plain = transfer_schedule(source_schedule, target.model, target_budget, space=space)
    transferred.save(work / "transferred" / "schedule.json")
    exact = no_slot_upgrade_fits(transferred, target_budget, space, target.model)
    used = target_memory.schedule_bytes(transferred)
    log(f"transfer ({transferred.meta['transfer']['losses']} losses): {transfer_seconds:.2f} s, {used:,} of "
        f"{limit:,} bytes, no upgrade fits: {exact}")
    console.print(bits_table(f"bits per target block ({blocks} blocks; source block per target block: "
                             f"{alignment.get('source_blocks')})",
                             {"transferred": transferred, "relative depth": plain}, roles, blocks))
    rows = [("original target (16-bit)", None), ("uniform 3-bit g128", uniform_t),
            ("transferred, relative depth", plain), ("transferred", transferred)]
    table = Table(title=f"SmolLM2-135M (30 blocks) -> derived ({blocks} blocks, {channels} MLP channels), "
                        f"{args.eval_tokens} eval tokens")
    for column in ("schedule", "bytes", "perplexity"):
        table.add_column(column, justify="left" if column == "schedule" else "right")
    figures["perplexity"] = {}
    for name, schedule in rows:
        value = ppl(target.model, schedule, evaluation, args)
        size = target_memory.schedule_bytes(schedule or Schedule("", {}))
        figures["perplexity"][name] = value
        table.add_row(name, f"{size:,}", f"{value:.2f}")
        log(f"{name}: ppl {value:.2f}")
    console.print(table)
    if args.placements:
        swaps = Table(title="one swap at the same size: block B at 2 bits, the last block at 4")
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
    figures["transfer"] = {"bytes": used, "limit": limit, "no_upgrade_fits": exact, "seconds": transfer_seconds,
                           "alignment": alignment.get("source_blocks"),
                           "losses": transferred.meta["transfer"]["losses"],
                           "granularity": args.granularity,
                           "source_bits": bits_by_role(source_schedule, roles, len(memory.blocks)),
                           "bits": bits_by_role(transferred, roles, blocks),
                           "bits_relative_depth": bits_by_role(plain, roles, blocks)}
    (work / "figures.json").write_text(json.dumps(figures, indent=1))

    # 4. target profile and the predictor's Spearman on it
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
        f"within a bit width {rho['within_label']:.3f} ({', '.join(f'{k}: {v:.2f}' for k, v in rho.items() if k.startswith('label:'))})")
    with_profile = transfer_schedule(source_schedule, target.model, target_budget, space=space, profile=target_profile)
    figures["perplexity"]["transferred + target profile"] = ppl(target.model, with_profile, evaluation, args)
    log(f"transferred with the target's profile: ppl {figures['perplexity']['transferred + target profile']:.2f}")
    figures["transfer"]["bits_with_target_profile"] = bits_by_role(with_profile, roles, blocks)
    console.print(bits_table("bits per target block with the target's own profile", {"+ target profile": with_profile},
                             roles, blocks))
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
                                          holdout_tokens=args.holdout_tokens, calibration_tokens=512)
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
                   "uniform3_kl": next(r.measured_kl for r in results["cold"].trials if r.source == "uniform:bits=3"),
                   "warm_start_trials_kl": [r.measured_kl for r in results["warm"].trials
                                            if r.source == "warm-start"],
                   "warm_start_trials_at": [i + 1 for i, r in enumerate(sorted(results["warm"].trials,
                                                                               key=lambda r: r.number))
                                            if r.source == "warm-start"]}
            row["holds"] = row["warm_reached_at"] is not None and row["warm_reached_at"] <= args.trials / 2
            per_seed.append(row)
            log(f"seed {seed}: cold final KL {cold_best:.4f} first at trial {row['cold_reached_at']}; warm reaches "
                f"it at trial {row['warm_reached_at']} (warm best {row['warm_best_kl']:.4f})")
        figures["search"] = {"trials": args.trials, "granularity": args.granularity, "seeds": per_seed,
                             "holds_for_every_seed": all(r["holds"] for r in per_seed)}
        search_table = Table(title=f"cold vs warm-started search on the derived model, {args.trials} trials each, "
                                   f"holdout KL ({args.holdout_tokens} tokens)")
        for column in ("seed", "uniform 3-bit KL", "cold final KL", "cold first at", "warm reaches it at",
                       f"<= {args.trials // 2}?", "warm final KL"):
            search_table.add_column(column, justify="right")
        for r in per_seed:
            search_table.add_row(str(r["seed"]), f"{r['uniform3_kl']:.4f}", f"{r['cold_best_kl']:.4f}",
                                 str(r["cold_reached_at"]), str(r["warm_reached_at"]),
                                 "yes" if r["holds"] else "NO", f"{r['warm_best_kl']:.4f}")
        console.print(search_table)
    (work / "figures.json").write_text(json.dumps(figures, indent=1))
    console.print_json(json.dumps(figures))


if __name__ == "__main__":
    main()
