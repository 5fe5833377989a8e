"""Curated vs first-N calibration at equal tokens: GPTQ 4-bit SmolLM2-135M perplexity.

    python bench/calibration.py [--rows 32] [--seq-len 512] [--eval-tokens 16384] [--threads 1]

For each calibration mode (``first``: the first rows of the calibration split of
``stdlib-docs``; ``curated``: rows chosen by :func:`autocompress.calibration.select_calibration`
from a pool ``--pool-factor`` times larger, with the original model for the hard windows), a
fresh copy of the model has its decoder linears quantized with GPTQ, 4 bits, group size 128,
act-order, calibrated on exactly ``--rows`` x ``--seq-len`` tokens; each copy's perplexity is
then measured on ``--eval-tokens`` tokens of the evaluation split (windows of 512). Prints a
table with the perplexity per mode (and of the unquantized model), the ratio curated / first,
where the curated rows lie in the pool and their mean loss under the original model.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from rich.console import Console
from rich.table import Table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec for autocompress.models.load_model")
    parser.add_argument("--data", default="stdlib-docs", help="data spec (calibration and evaluation splits)")
    parser.add_argument("--rows", type=int, default=32, help="calibration rows per mode")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration row")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens (windows of --window)")
    parser.add_argument("--window", type=int, default=512, help="evaluation window")
    parser.add_argument("--pool-factor", type=int, default=4, help="curated: candidate windows per row")
    parser.add_argument("--hard-share", type=float, default=0.25, help="curated: share of hard (high-loss) rows")
    parser.add_argument("--seed", type=int, default=0, help="curated: clustering seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unquantized model's perplexity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from autocompress.calibration import CalibrationMode, first_rows, select_windows, window_losses
    from autocompress.compress.apply import apply
    from autocompress.data import Split, load_tokens
    from autocompress.evaluate import stream_metrics
    from autocompress.models import load_model
    from autocompress.schedule import Choice, QuantMethod, Schedule

    console = Console(width=160)
    say = lambda *a: (console.print(*a), sys.stdout.flush())  # noqa: E731
    progress = sys.stderr.isatty()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    pool = load_tokens(args.data, loaded.tokenizer, Split.CALIBRATION, args.pool_factor * args.rows * args.seq_len)
    evaluation = load_tokens(args.data, loaded.tokenizer, Split.EVALUATION, args.eval_tokens)
    say(f"{args.model}, {args.data}: {args.rows} calibration rows of {args.seq_len} tokens per mode "
        f"(curated from a pool of {args.pool_factor * args.rows} windows, hard share {args.hard_share}, "
        f"seed {args.seed}); GPTQ 4-bit g128 act-order; perplexity on {args.eval_tokens} evaluation tokens "
        f"(windows of {args.window}); {args.threads} torch thread(s), load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    tick = time.perf_counter()
    selection = select_windows(pool.tokens, args.rows, args.seq_len, model=model, pool_factor=args.pool_factor,
                               hard_share=args.hard_share, seed=args.seed)
    select_seconds = time.perf_counter() - tick
    first = first_rows(pool.tokens, args.rows, args.seq_len)
    losses = selection.losses
    if losses is None:  # no hard rows asked for: measure the losses for the table anyway
        losses = window_losses(model, pool.tokens[: selection.candidates * args.seq_len].view(-1, args.seq_len))
    rows = {CalibrationMode.FIRST: (first, list(range(args.rows))),
            CalibrationMode.CURATED: (selection.rows, list(selection.indices))}

    choice = Choice(bits=4, group_size=128, method=QuantMethod.GPTQ, act_order=True)
    results: dict[str, dict] = {}
    if not args.no_baseline:
        tick = time.perf_counter()
        metrics = stream_metrics(model, evaluation.tokens, window=args.window, progress=progress,
                                 description="evaluating (unquantized)")
        results["unquantized"] = {"ppl": metrics["perplexity"], "seconds": time.perf_counter() - tick}
        say(f"unquantized: perplexity {metrics['perplexity']:.3f}")
    for mode, (calibration, indices) in rows.items():
        tick = time.perf_counter()
        quantized = copy.deepcopy(model)
        apply(quantized, Schedule.uniform(quantized, choice), calibration, progress=progress, seq_len=args.seq_len)
        metrics = stream_metrics(quantized, evaluation.tokens, window=args.window, progress=progress,
                                 description=f"evaluating ({mode.value})")
        extra = select_seconds if mode is CalibrationMode.CURATED else 0.0
        results[mode.value] = {
            "ppl": metrics["perplexity"], "seconds": time.perf_counter() - tick + extra,
            "beyond": sum(i >= args.rows for i in indices), "loss": float(losses[indices].mean()),
        }
        say(f"{mode.value}: perplexity {metrics['perplexity']:.3f}")
        del quantized

    table = Table(title=f"curated vs first-N calibration, {args.rows} x {args.seq_len} tokens, GPTQ 4-bit g128 "
                        f"act-order, {args.model} on {args.data}")
    for column, justify in (("calibration", "left"), ("perplexity", "right"), ("vs first", "right"),
                            ("rows past the first N", "right"), ("mean original loss of rows", "right"),
                            ("seconds", "right")):
        table.add_column(column, justify=justify)
    first_ppl = results["first"]["ppl"]
    for name, result in results.items():
        table.add_row(name, f"{result['ppl']:.3f}", f"{result['ppl'] / first_ppl:.4f}",
                      "-" if "beyond" not in result else f"{result['beyond']} / {args.rows}",
                      "-" if "loss" not in result else f"{result['loss']:.3f}", f"{result['seconds']:.0f}")
    say(table)
    say(f"pool: {selection.candidates} windows, mean original loss {float(losses.mean()):.3f}; curated rows: "
        f"{len(selection.coverage)} coverage + {len(selection.hard)} hard, chosen in {select_seconds:.1f} s; "
        f"ratio curated / first perplexity {results['curated']['ppl'] / first_ppl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
