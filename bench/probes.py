"""Linguistic roles of SmolLM2-135M's layers: probe selectivity per layer and task, and the time taken.

Run: ``.venv/bin/python bench/probes.py [--tokens 8192] [--window 512] [--seed 0]``

Prints one row per layer (embeddings, then the output of each of the 30 blocks) with the
selectivity (probe accuracy - control accuracy, held-out) of each task and the dominant
role, then the accuracies against chance and the checks of issue 3 on roles.
"""
from __future__ import annotations

import argparse
import json
import time


import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from autocompress.artifacts import atomic_write_bytes
from autocompress.data import load_tokens
from autocompress.models import load_model
from autocompress.profile.probes import RoleProfile, probe_roles, role_table


def hidden_states(model, tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Every layer's hidden states over ``tokens``, run in independent windows of ``window`` tokens.

    HF returns the last layer after the final norm; the probes RMS-normalise every layer
    anyway, so the last entry stays comparable with the others.
    """
    per_layer: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for start in range(0, tokens.numel(), window):
            out = model(tokens[start:start + window][None], output_hidden_states=True)
            if not per_layer:
                per_layer = [[] for _ in out.hidden_states]
            for layer, h in enumerate(out.hidden_states):
                per_layer[layer].append(h[0].float())
    return [torch.cat(chunks) for chunks in per_layer]


def compare(console: Console, roles: RoleProfile, other: RoleProfile) -> None:
    """Agreement of two role profiles (e.g. from disjoint samples): per task, the curves' correlation over depth."""
    from scipy.stats import pearsonr, spearmanr

    table = Table(title="agreement with the saved profile (curves over depth)")
    for column in ("task", "pearson", "spearman", "mean |difference|"):
        table.add_column(column, justify="right")
    for task in roles.tasks:
        a, b = np.asarray(roles.selectivity[task]), np.asarray(other.selectivity[task])
        table.add_row(task, f"{pearsonr(a, b)[0]:+.3f}", f"{spearmanr(a, b)[0]:+.3f}", f"{np.abs(a - b).mean():.3f}")
    console.print(table)
    same = sum(x == y for x, y in zip(roles.dominant, other.dominant))
    console.print(f"same dominant role in {same} of {roles.layers} layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="skip this many calibration tokens (a disjoint sample)")
    parser.add_argument("--save", help="also write the role profile as JSON to this path")
    parser.add_argument("--compare", help="a role profile saved by --save: print how well the curves agree")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 120))

    loaded = load_model(args.model)
    stream = load_tokens("stdlib-docs", loaded.tokenizer, "calibration", args.tokens, start=args.start)
    started = time.perf_counter()
    states = hidden_states(loaded.model, stream.tokens, args.window)
    capture = time.perf_counter() - started
    roles = probe_roles(states, stream.tokens, loaded.tokenizer, seed=args.seed, progress=True)
    console.print(role_table(roles, title=f"{args.model}: selectivity per layer ({roles.tokens} stdlib-docs tokens)"))

    summary = Table(title="accuracy vs chance, best layer")
    for column in ("task", "chance", "best layer", "accuracy", "control", "selectivity", "min sel.", "mean sel.",
                   "acc. layer 0", "acc. last"):
        summary.add_column(column, justify="right")
    for task in roles.tasks:
        sel = np.asarray(roles.selectivity[task])
        best = int(np.nanargmax(sel))
        summary.add_row(task, f"{roles.chance[task]:.3f}", str(best), f"{roles.accuracy[task][best]:.3f}",
                        f"{roles.control_accuracy[task][best]:.3f}", f"{sel[best]:+.3f}", f"{np.nanmin(sel):+.3f}",
                        f"{np.nanmean(sel):+.3f}", f"{roles.accuracy[task][0]:.3f}", f"{roles.accuracy[task][-1]:.3f}")
    console.print(summary)

    # Issue 3, roles: selectivity > 0 for lexical and word class in early-to-middle blocks; not flat.
    third = roles.layers // 3
    first, last = slice(0, third), slice(roles.layers - third, roles.layers)
    early_middle = slice(1, 1 + (roles.layers - 1) * 2 // 3)
    mean = lambda values: float(np.nanmean(values))  # noqa: E731
    checks = {
        "lexical selectivity > 0 in every early-to-middle block":
            min(roles.selectivity["lexical"][early_middle]) > 0,
        "word_class selectivity > 0 in every early-to-middle block":
            min(roles.selectivity["word_class"][early_middle]) > 0,
        "probe accuracy above chance for every task at its best layer":
            all(max(roles.accuracy[t]) > roles.chance[t] for t in roles.tasks),
        "token identity fades with depth (lexical accuracy, first third > last third)":
            mean(roles.accuracy["lexical"][first]) > mean(roles.accuracy["lexical"][last]),
        "prediction grows with depth (selectivity, last third > first third)":
            mean(roles.selectivity["prediction"][last]) > mean(roles.selectivity["prediction"][first]),
        "role profile not flat (more than one dominant role)": len(set(roles.dominant)) > 1,
    }
    for name, ok in checks.items():
        console.print(f"{'PASS' if ok else 'FAIL'}  {name}")
    console.print(f"dominant roles by layer: {' '.join(roles.dominant)}")
    if args.compare:
        compare(console, roles, RoleProfile.from_json(json.loads(open(args.compare).read())))
    if args.save:
        atomic_write_bytes(args.save, json.dumps(roles.to_json(), indent=1).encode())
    console.print(f"hidden-state capture {capture:.1f} s, probes {roles.seconds:.1f} s "
                  f"({roles.layers} layers x {len(roles.tasks)} tasks x 2 fits, {torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
