"""Profile SmolLM2-135M on stdlib-docs and print the figures issue 3 asks for.

    python bench/sensitivity.py [--tokens 2048] [--threads 1] [--full | --sample-blocks 0,15,29]

Prints, in this order (each part as soon as it is measured):

1. Profile A, every block at bits 2 and 3 (with proxies, the additivity check and the
   linguistic roles), and profile B, the same on a disjoint calibration sample: their
   agreement (Spearman over the 30 blocks at 3 and at 2 bits), the most/least sensitive
   blocks with their roles, the additivity check, the proxies' Spearman correlations and the
   role curves.
2. The cost of the full default space (30 blocks x 11 choices): with ``--full`` measured in
   one profile; otherwise measured on ``--sample-blocks`` (whose mean suffix length equals
   the mean over all blocks) and extrapolated per measurement, in CPU seconds of this
   process, which on a shared machine is closer than wall time to what the run costs alone.
"""
from __future__ import annotations

import sys


import argparse
import dataclasses
import os

import torch
from rich.console import Console
from rich.table import Table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens measured per profile")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--role-tokens", type=int, default=None, help="probe tokens (default: --tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="measure the whole default space in one profile")
    parser.add_argument("--sample-blocks", default="0,15,29", help="blocks whose full-space cost is measured")
    parser.add_argument("--no-sample", action="store_true", help="skip part 2 (the full-space cost)")
    parser.add_argument("--out", default=None, help="also save profile A here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from autocompress.data import Split, load_tokens
    from autocompress.models import load_model
    from autocompress.profile.proxies import spearman
    from autocompress.profile.run import ProfileSettings, profile_model
    from autocompress.profile.tables import additivity_table, proxy_table, role_curve_table, sensitivity_table
    from autocompress.search.space import load_space, space_from_dict

    console = Console(width=200)
    say = lambda *a: (console.print(*a), sys.stdout.flush())  # noqa: E731
    loaded = load_model("smollm2-135m")
    default = load_space("default")
    role_tokens = args.role_tokens or args.tokens
    settings = ProfileSettings(tokens=args.tokens, seq_len=args.seq_len, role_tokens=role_tokens,
                               progress=sys.stderr.isatty())
    first = max(args.tokens, role_tokens)
    stream = load_tokens("stdlib-docs", loaded.tokenizer, Split.CALIBRATION, first)
    other = load_tokens("stdlib-docs", loaded.tokenizer, Split.CALIBRATION, args.tokens, start=first)
    say(f"SmolLM2-135M, stdlib-docs calibration, {args.tokens} tokens per profile (rows of {args.seq_len}), "
        f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    def report(profile, name):
        t = profile.meta["timings"]
        say(f"{name}: {len(profile.units)} units x {len(profile.labels())} choices in {profile.seconds:.0f} s wall, "
            f"{profile.meta['cpu_seconds']:.0f} CPU s; phases (wall): " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))

    if args.full:
        main_space = default
    else:
        main_space = space_from_dict({"name": "bits-2-3", "group_size": default.group_size, "bits": [2, 3, 16]},
                                     "bits-2-3")
    a = profile_model(loaded, stream, main_space, settings, model_name="smollm2-135m",
                      data_name="stdlib-docs (calibration)")
    report(a, "profile A")
    if args.out:
        a.save(args.out)
    b = profile_model(loaded, other, main_space if not args.full else space_from_dict(
        {"name": "bits-2-3", "group_size": default.group_size, "bits": [2, 3, 16]}, "bits-2-3"),
        dataclasses.replace(settings, roles=False, proxies=False, additivity=False), model_name="smollm2-135m")
    report(b, "profile B (disjoint sample)")
    table = Table(title=f"agreement of two profiles on disjoint calibration samples ({args.tokens} tokens each)")
    table.add_column("choice")
    table.add_column("Spearman over blocks", justify="right")
    for label in ("bits=3", "bits=2"):
        table.add_row(label, f"{spearman([a.unit(u.name).kl[label] for u in b.units], [u.kl[label] for u in b.units]):+.3f}")
    say(table)
    say(f"base loss {a.base_loss:.4f} (perplexity {torch.tensor(a.base_loss).exp():.2f})")
    say(sensitivity_table(a, 5))
    say(sensitivity_table(a, 5, "bits=2"))
    say(additivity_table(a))
    say(proxy_table(a))
    roles = role_curve_table(a)
    if roles is not None:
        say(roles)
        middle = (len(a.role_curves["lexical"]) * 2) // 3  # embeddings .. two thirds of the depth
        for task in ("lexical", "word_class"):
            values = [v for v in a.role_curves[task][1:middle] if v is not None]
            say(f"{task}: selectivity > 0 in {sum(v > 0 for v in values)}/{len(values)} early-to-middle "
                f"blocks (0..{middle - 2}), min {min(values):+.3f}, max {max(values):+.3f}")
        for task, curve in a.role_curves.items():
            values = [v for v in curve if v is not None]
            say(f"{task}: selectivity across depth from {min(values):+.3f} to {max(values):+.3f}")
        say("dominant role per block: " + " ".join(u.dominant_role or "-" for u in a.units))

    if args.full or args.no_sample:
        return 0
    sample = [int(i) for i in args.sample_blocks.split(",")]
    frozen = [f"model.layers.{i}" for i in range(len(a.units)) if i not in sample]
    sample_space = space_from_dict({**default.to_json(), "frozen": frozen}, "default (sample blocks)")
    c = profile_model(loaded, stream, sample_space,
                      dataclasses.replace(settings, roles=False, proxies=False, additivity=False),
                      model_name="smollm2-135m")
    report(c, f"default space on blocks {sample}")
    measurements = len(c.units) * len(c.labels())
    per = c.meta["timings"]["measure"] / measurements
    per_cpu = c.meta["cpu_timings"]["measure"] / measurements
    full = 30 * len(c.labels())
    fixed_cpu = a.meta["cpu_seconds"] - a.meta["cpu_timings"]["measure"]
    say(f"full default space = {full} measurements; measured {per:.1f} s wall, about {per_cpu:.1f} CPU s each "
        f"(blocks {sample}: mean suffix {sum(30 - i for i in sample) / len(sample):.1f} blocks, all 30: 15.5)")
    say(f"estimated full profile on this machine alone: {full * per_cpu + fixed_cpu:.0f} CPU s on "
        f"{args.threads} thread(s) ({full * per_cpu / 60:.1f} min measuring + {fixed_cpu:.0f} s trace, gradients, "
        f"additivity, roles)")
    say(sensitivity_table(c, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
