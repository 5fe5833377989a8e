"""Reuse a schedule learned on SmolLM2-135M on a structurally different model made from it.

1. Profile SmolLM2-135M (bits 2/3/4/16 per block, RTN g128) and allocate a
   schedule at the size of uniform 3-bit (greedy repair under the additive profile model).
2. Build the target: 6 blocks dropped (lowest block influence, never the first or last) and
   25% of MLP channels removed everywhere (Wanda scores), by ``apply`` + ``save_compressed``,
   loaded back with ``load_model(dir)``: 24 blocks of 1152 channels instead of 30 of 1536.
3. Transfer the schedule (no profile of the target; its blocks aligned to the source's by block
   influence from one forward pass on 1,024 tokens, and, for comparison, by relative depth
   alone) to the target's uniform-3-bit size and compare perplexity with uniform 3-bit: the
   budget must be met exactly (bytes <= limit, no single upgrade fits) and the transfer must win.
4. Profile the target; report the sensitivity predictor's Spearman correlation on it (trained
   on the source profile only, so the target is a model it was not trained on).
5. Cold search vs search warm-started from the source schedule on the target, same trials:
   the trial at which the warm search first reaches the cold search's final measured KL.

Run: ``.venv/bin/python bench/transfer.py [--work /tmp/transfer-bench] [--trials 30]``
(artifacts and perplexities are cached in --work; delete it to start over).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

# bench/profile.py would shadow the standard library's profile module (torch imports cProfile).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
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
from autocompress.transfer.repair import no_upgrade_fits  # noqa: E402
from autocompress.transfer.sensitivity import choice_labels, from_profile  # noqa: E402

console = Console()


def log(message: str) -> None:
    console.print(f"[{time.strftime('%H:%M:%S')}] {message}")


def get_profile(loaded, path: Path, calibration, space, args) -> Profile:
    if path.exists():
        return Profile.load(path)
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


def label(choice: Choice) -> str:
    return "+".join(choice_labels(choice)) or "16"


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
    parser.add_argument("--work", default="/tmp/transfer-bench")
    parser.add_argument("--profile-tokens", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--holdout-tokens", type=int, default=1024)
    parser.add_argument("--skip-search", action="store_true",
                        help="keep the search figures of the previous run in figures.json")
    parser.add_argument("--placements", default="",
                        help="comma-separated target blocks: also measure uniform 3-bit with that block at 2 bits "
                             "and the last at 4 (the one-swap schedules of this budget)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    if args.skip_search and (work / "figures.json").exists():
        previous = json.loads((work / "figures.json").read_text())
        figures.update({k: v for k, v in previous.items() if k.startswith(("search", "warm_start"))})
    # quant-only without 8 bits: the bits this model's allocation really trades, at 3/4 of the profiling cost
    space_file = work / "space.yaml"
    space_file.write_text("name: bench-transfer\ngranularity: block\ngroup_size: 128\nmethod: rtn\nbits: [2, 3, 4, 16]\n")
    space = load_space(str(space_file))

    # 1. source: profile and allocate
    source = load_model("smollm2-135m")
    calibration = load_tokens("stdlib-docs", source.tokenizer, "calibration", max(args.profile_tokens, 4096))
    evaluation = load_tokens("stdlib-docs", source.tokenizer, "evaluation", args.eval_tokens).tokens
    tick = time.perf_counter()
    source_profile = get_profile(source, work / "source" / "profile.json", calibration, space, args)
    log(f"source profile: {len(source_profile.units)} blocks ({time.perf_counter() - tick:.0f} s)")
    memory = MemoryModel.from_model(source.model)
    uniform3 = Schedule.uniform(source.model, space.quant_choice(3))
    budget = Budget.parse([f"memory={memory.schedule_bytes(uniform3)}b"], memory)
    allocated = repair(uniform3, source.model, budget, space,
                       from_profile(source_profile, model_coordinates(source.model)))
    source_schedule = describe(allocated, source.model, source_profile)
    source_schedule.save(work / "source" / "schedule.json")
    log("source schedule: " + " ".join(label(source_schedule.units.get(f"model.layers.{i}", Choice()))[5:]
                                       for i in range(30)))

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
    exact = no_upgrade_fits(transferred, target_budget, space, space.units(target.model))
    used = target_memory.schedule_bytes(transferred)
    log(f"transfer: {transfer_seconds:.2f} s, {used:,} of {limit:,} bytes, no upgrade fits: {exact}")
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
                           "bits": [transferred.units.get(f"model.layers.{i}", Choice()).bits for i in range(blocks)],
                           "bits_relative_depth": [plain.units.get(f"model.layers.{i}", Choice()).bits
                                                   for i in range(blocks)]}
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
    (work / "figures.json").write_text(json.dumps(figures, indent=1))

    # 5. cold vs warm-started search
    if not args.skip_search:
        from autocompress.search.study import SearchSettings, search  # noqa: PLC0415

        results = {}
        for name, warm in (("cold", None), ("warm", str(work / "source" / "schedule.json"))):
            tick = time.perf_counter()
            (run / f"study-{name}.db").unlink(missing_ok=True)  # a fresh study each run
            settings = SearchSettings(run_dir=str(run), budget=(f"memory={limit}b",), trials=args.trials,
                                      space=str(space_file),
                                      storage=f"sqlite:///{run}/study-{name}.db", study_name=name, warm_start=warm,
                                      progress=False, threads=args.threads, holdout_tokens=args.holdout_tokens,
                                      calibration_tokens=512)
            results[name] = search(settings, model=target.model, tokenizer=target.tokenizer)
            log(f"{name} search: {len(results[name].trials)} trials, {time.perf_counter() - tick:.0f} s")
        cold_best = min(r.measured_kl for r in results["cold"].trials
                        if r.measured_kl is not None and r.feasible and r.state == "COMPLETE")
        cold_at = first_reaching(results["cold"].trials, cold_best)
        warm_at = first_reaching(results["warm"].trials, cold_best)
        uniform_kl = next(r.measured_kl for r in results["cold"].trials if r.source == "uniform:bits=3")
        figures["search_uniform3_kl"] = uniform_kl
        figures["warm_start_trials_kl"] = [r.measured_kl for r in results["warm"].trials if r.source == "warm-start"]
        log(f"holdout KL: uniform 3-bit {uniform_kl:.4f}; warm-start trials (transfer, transfer + target profile, "
            f"neighbours) {', '.join(f'{k:.4f}' for k in figures['warm_start_trials_kl'] if k is not None)}")
        figures["search"] = {"trials": args.trials, "cold_best_kl": cold_best, "cold_reached_at": cold_at,
                             "warm_reached_at": warm_at,
                             "warm_best_kl": min(r.measured_kl for r in results["warm"].trials
                                                 if r.measured_kl is not None and r.feasible
                                                 and r.state == "COMPLETE")}
        log(f"search: cold final KL {cold_best:.4f} first at trial {cold_at}; warm reaches it at trial {warm_at} "
            f"(warm best {figures['search']['warm_best_kl']:.4f})")
    (work / "figures.json").write_text(json.dumps(figures, indent=1))
    console.print_json(json.dumps(figures))


if __name__ == "__main__":
    main()
