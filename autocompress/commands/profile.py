"""``autocompress profile MODEL --data D --space S --out RUN``: measure sensitivity, proxies and roles.

``--shard K/N`` measures one share of the units into ``RUN_K/profile.partial.json``;
``profile --merge RUN_0 RUN_1 ... --out RUN`` puts the shares together into ``RUN/profile.json``.
"""
from __future__ import annotations

import argparse

from .common import add_device_options, add_threads, add_trust_remote_code, device_options, positive_int


def register(verbs) -> None:
    """Add the ``profile`` sub-command."""
    pr = verbs.add_parser("profile", help="per-unit sensitivity, cheap proxies and linguistic roles",
                          description="Measure, for every unit of the search space and every single choice "
                                      "(bit widths, sparsity, head/channel removal, dropping the block), the KL "
                                      "to the original model's next-token distribution and the loss change; add "
                                      "cheap proxies, the additivity check and the blocks' linguistic roles. "
                                      "Writes RUN/profile.json, reused while model, data and space are unchanged. "
                                      "Each measured unit is kept in RUN/profile.units/ until then, so a run killed "
                                      "midway resumes with the units it finished (same inputs only). "
                                      "On several machines: run `profile MODEL --shard K/N --out RUN_K` on each "
                                      "(K = 0..N-1, same options everywhere), copy the RUN_K folders together, then "
                                      "`profile --merge RUN_0 ... RUN_N-1 --out RUN` writes RUN/profile.json as one "
                                      "run would (no additivity check).")
    pr.add_argument("model", metavar="MODEL", nargs="?", help="the model to profile (not with --merge)")
    pr.add_argument("--data", default="stdlib-docs", help="calibration data spec (default: stdlib-docs)")
    pr.add_argument("--space", default="default", help="search space: built-in name or YAML file (default: default)")
    pr.add_argument("--out", required=True, metavar="RUN", help="run directory (profile.json goes there)")
    pr.add_argument("--tokens", type=positive_int, default=2048, help="calibration tokens measured (default 2048)")
    pr.add_argument("--seq-len", type=positive_int, default=256, help="tokens per calibration row (default 256)")
    pr.add_argument("--calib-tokens", type=positive_int, default=4096,
                    help="the run's calibration tokens: GPTQ Hessians and Wanda norms of profile, search and apply "
                         "(default 4096)")
    pr.add_argument("--calib-seq-len", type=positive_int, default=512, help="tokens per calibration row (default 512)")
    pr.add_argument("--calibration", choices=["curated", "first"], default="curated",
                    help="how the calibration rows are chosen: curated (cover the data's variety, plus the "
                         "windows the model finds hardest) or first (the top of the split) (default: curated)")
    pr.add_argument("--granularity", choices=["block", "linear"], help="override the space's unit granularity")
    pr.add_argument("--roles", action=argparse.BooleanOptionalAction, default=True,
                    help="probe the blocks' linguistic roles (default: on)")
    pr.add_argument("--role-tokens", type=positive_int, default=4096, help="tokens for the probes (default 4096)")
    pr.add_argument("--proxies", action=argparse.BooleanOptionalAction, default=True,
                    help="compute the cheap proxies and their correlations (default: on)")
    pr.add_argument("--top", type=positive_int, default=5, help="units shown at each end of the ranking (default 5)")
    pr.add_argument("--force", action="store_true", help="re-profile even if RUN/profile.json exists, measuring every unit again")
    pr.add_argument("--predict", metavar="PREDICTOR_OR_PROFILES",
                    help="sensitivity predictor JSON (or comma-separated profile.json files to train one): "
                         "measure only the units it is unsure of, predict the rest")
    pr.add_argument("--measure-fraction", type=float, default=0.25,
                    help="with --predict: share of units measured (default 0.25)")
    pr.add_argument("--shard", metavar="K/N",
                    help="measure only shard K of N (0 <= K < N; the K-th of every N blocks, shard 0 also the "
                         "embedding and the roles) into RUN/profile.partial.json; give every shard its own RUN "
                         "and the same options, then merge them with --merge")
    pr.add_argument("--calibration-from", metavar="RUN_0",
                    help="with --shard: reuse that run's calibration.safetensors instead of choosing the rows "
                         "(rules out shards on different machines choosing different rows)")
    pr.add_argument("--merge", nargs="+", metavar="RUN_K",
                    help="merge the shards' folders (every K of one K/N split) into --out RUN/profile.json, with "
                         "RUN/calibration.safetensors and the GPTQ codes; no MODEL then")
    add_trust_remote_code(pr)
    add_threads(pr)
    add_device_options(pr)
    pr.set_defaults(run=run)


def run(args) -> int:
    """Profile (or reuse the profile, measure a shard, merge shards) and print the tables."""
    from rich.console import Console  # noqa: PLC0415

    from ..artifacts import check_output  # noqa: PLC0415
    from ..errors import UserError  # noqa: PLC0415
    from ..profile.run import ProfileSettings, profile_run  # noqa: PLC0415

    check_output(args.out, "--out", directory=True)
    if args.merge and args.model:
        raise UserError(f"give either MODEL or --merge RUN_0 RUN_1 ..., not both (MODEL {args.model})")
    if not args.merge and not args.model:
        raise UserError("MODEL is missing; give the model to profile, or --merge RUN_0 RUN_1 ... to merge shards")
    if args.calibration_from and not args.shard:
        raise UserError("--calibration-from works with --shard K/N only")
    if args.shard and args.predict:
        raise UserError("--shard and --predict do not combine; profile the shards without --predict")
    device, dtype = device_options(args)
    console = Console()
    if args.merge:
        from ..profile.shard import merge_profiles  # noqa: PLC0415

        profile = merge_profiles(args.merge, args.out, force=args.force)
        _print_tables(console, profile, args.top)
        console.print(f"wrote {args.out}/profile.json (merged {len(args.merge)} shards: {len(profile.units)} units x "
                      f"{len(profile.labels())} choices; no additivity check)", markup=False, highlight=False)
        return 0
    settings = ProfileSettings(tokens=args.tokens, seq_len=args.seq_len, roles=args.roles,
                               role_tokens=args.role_tokens, proxies=args.proxies, calib_tokens=args.calib_tokens,
                               calib_seq_len=args.calib_seq_len, calibration=args.calibration)
    if args.shard:
        from ..profile.shard import Shard, profile_shard  # noqa: PLC0415

        shard = Shard.parse(args.shard)
        done = profile_shard(args.model, args.out, shard, data=args.data, space=args.space,
                             granularity=args.granularity, settings=settings, calibration_from=args.calibration_from,
                             force=args.force, trust_remote_code=args.trust_remote_code, device=device, dtype=dtype)
        part = done.partial
        verb = "reused" if done.reused else "wrote"
        console.print(f"{verb} {done.path} (shard {shard}: {len(part.measured)} of {len(part.unit_names)} units x "
                      f"{len(part.profile.labels())} choices in {part.profile.seconds:.0f} s); once every shard is "
                      f"done: autocompress profile --merge RUN_0 ... RUN_{shard.count - 1} --out RUN",
                      markup=False, highlight=False)
        return 0
    if args.predict:
        from ..transfer.guided import guided_profile_run  # noqa: PLC0415

        outcome = guided_profile_run(args.model, args.out, args.predict, fraction=args.measure_fraction,
                                     data=args.data, space=args.space, granularity=args.granularity,
                                     settings=settings, force=args.force, trust_remote_code=args.trust_remote_code,
                                     device=device, dtype=dtype)
    else:
        outcome = profile_run(args.model, args.out, data=args.data, space=args.space,
                              granularity=args.granularity, settings=settings, force=args.force,
                              trust_remote_code=args.trust_remote_code, device=device, dtype=dtype)
    profile = outcome.profile
    _print_tables(console, profile, args.top)
    if profile.meta.get("predicted_units"):
        console.print(f"measured {len(profile.meta['measured_units'])} units; predicted "
                      f"{len(profile.meta['predicted_units'])} (--predict)")
    if outcome.reused:
        console.print(f"reused {outcome.path} (model, data and space unchanged; --force to re-measure)")
    else:
        console.print(f"wrote {outcome.path} ({len(profile.units)} units x {len(profile.labels())} choices "
                      f"on {profile.calibration_tokens} tokens in {profile.seconds:.0f} s)")
    return 0


def _print_tables(console, profile, top: int) -> None:
    from ..profile.tables import additivity_table, proxy_table, role_curve_table, sensitivity_table  # noqa: PLC0415

    console.print(sensitivity_table(profile, top))
    if profile.additivity:
        console.print(additivity_table(profile))
    if profile.proxy_spearman:
        console.print(proxy_table(profile))
    roles = role_curve_table(profile)
    if roles is not None:
        console.print(roles)
