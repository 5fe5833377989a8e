"""Profile SmolLM2-135M on stdlib-docs under the default space and print the figures issue 3 asks for.

    python bench/profile.py [--tokens 2048] [--threads 1] [--quick]

Prints: wall time (and per phase), the most/least sensitive blocks with their roles, the
additivity check per bit width, the proxies' Spearman correlations, the role curves, and the
agreement (Spearman at 2 and 3 bits) with a second profile on a disjoint calibration sample.
"""
from __future__ import annotations

import sys

# This file is named like the standard library's profiler (which torch imports): keep its own
# folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens measured per profile")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--role-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="three blocks only (a smoke run of this script)")
    parser.add_argument("--out", default=None, help="also save the main profile.json here")
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
    loaded = load_model("smollm2-135m")
    space = load_space("default")
    if args.quick:
        space = space_from_dict({**space.to_json(), "frozen": [r"re:model\.layers\.([3-9]|[12][0-9])"]}, "quick")
    settings = ProfileSettings(tokens=args.tokens, seq_len=args.seq_len, role_tokens=args.role_tokens,
                               progress=sys.stderr.isatty())
    first = max(args.tokens, args.role_tokens)
    stream = load_tokens("stdlib-docs", loaded.tokenizer, Split.CALIBRATION, first)
    console.print(f"[bold]profile A[/bold]: {args.tokens} tokens (rows of {args.seq_len}), space {space.name}, "
                  f"{len(space.probe_choices())} choices, {args.threads} thread(s), load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    started = time.perf_counter()
    profile = profile_model(loaded, stream, space, settings, model_name="smollm2-135m",
                            data_name="stdlib-docs (calibration)")
    wall = time.perf_counter() - started
    if args.out:
        profile.save(args.out)
    timings = profile.meta["timings"]
    console.print(f"profile A took {wall:.0f} s wall ({len(profile.units)} units x {len(profile.labels())} choices = "
                  f"{len(profile.units) * len(profile.labels())} measurements), {profile.meta['cpu_seconds']:.0f} CPU s "
                  f"on {args.threads} thread(s); phases (wall): " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    console.print(f"base loss {profile.base_loss:.4f} (perplexity {torch.tensor(profile.base_loss).exp():.2f})")
    console.print(sensitivity_table(profile, 5))
    console.print(sensitivity_table(profile, 5, "bits=2"))
    console.print(additivity_table(profile))
    console.print(proxy_table(profile))
    roles = role_curve_table(profile)
    if roles is not None:
        console.print(roles)
        middle = (len(profile.role_curves["lexical"]) * 2) // 3  # embeddings .. two thirds of the depth
        for task in ("lexical", "word_class"):
            values = [v for v in profile.role_curves[task][1:middle] if v is not None]
            console.print(f"{task}: selectivity > 0 in {sum(v > 0 for v in values)}/{len(values)} early-to-middle "
                          f"blocks (0..{middle - 2}), min {min(values):+.3f}, max {max(values):+.3f}")
        for task, curve in profile.role_curves.items():
            values = [v for v in curve if v is not None]
            console.print(f"{task}: selectivity across depth from {min(values):+.3f} to {max(values):+.3f}")

    # A second profile on disjoint calibration tokens, bit widths 2 and 3 only.
    check_space = space_from_dict({**space.to_json(), "bits": [2, 3, 16], "sparsity": [], "two_four": False,
                                   "head_ratio": [], "channel_ratio": [], "drop": False}, "agreement")
    other = load_tokens("stdlib-docs", loaded.tokenizer, Split.CALIBRATION, args.tokens, start=first)
    tick = time.perf_counter()
    second = profile_model(loaded, other, check_space,
                           dataclasses.replace(settings, roles=False, proxies=False, additivity=False),
                           model_name="smollm2-135m")
    table = Table(title=f"agreement of two profiles on disjoint calibration samples ({args.tokens} tokens each)")
    table.add_column("choice")
    table.add_column("Spearman over blocks", justify="right")
    for label in ("bits=3", "bits=2"):
        a = [profile.unit(u.name).kl[label] for u in second.units]
        b = [u.kl[label] for u in second.units]
        table.add_row(label, f"{spearman(a, b):+.3f}")
    console.print(table)
    console.print(f"second profile (2 choices) took {time.perf_counter() - tick:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
