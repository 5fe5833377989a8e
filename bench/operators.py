"""Compression operators on the real model: quantization (RTN vs GPTQ) and pruning.

Perplexity on the ``stdlib-docs`` evaluation split (16,384 tokens, 512-token windows) of
SmolLM2-135M after each operator is applied to every decoder block (all 210 decoder linears),
with the stored parameters, the predicted size (memory model, computed before compressing)
and the saved size (the ``model.safetensors`` file). Structurally pruned models are also
timed against the original (prefill and greedy decode, batch 1, best of a few rounds taken
alternately so that a busy machine slows both alike).

Run: ``.venv/bin/python bench/operators.py [--calib-seqs 32] [--eval-tokens 16384] [--only GPTQ RTN]``
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import struct
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel, dense_bytes, stored_bytes
from autocompress.compress.saving import save_compressed
from autocompress.data import load_tokens
from autocompress.evaluate import decode_speed, perplexity
from autocompress.models import load_model, model_fingerprint, parameter_count
from autocompress.schedule import Choice, PruneScore, QuantMethod, Schedule, SparsityPattern

UNSTRUCTURED = SparsityPattern.UNSTRUCTURED
# In order of priority (a busy machine may not finish them all): the acceptance rows first.
ROWS = {
    "RTN 3-bit g128": Choice(bits=3, group_size=128, method=QuantMethod.RTN),
    "GPTQ 3-bit g128": Choice(bits=3, group_size=128, method=QuantMethod.GPTQ),
    "MLP channels -25% (Wanda)": Choice(channel_ratio=0.25, score=PruneScore.WANDA),
    "MLP channels -25% (magnitude)": Choice(channel_ratio=0.25, score=PruneScore.MAGNITUDE),
    "RTN 4-bit g128": Choice(bits=4, group_size=128, method=QuantMethod.RTN),
    "GPTQ 4-bit g128": Choice(bits=4, group_size=128, method=QuantMethod.GPTQ),
    "heads -1/3 (Wanda)": Choice(head_ratio=0.25, score=PruneScore.WANDA),
    "2:4 (Wanda)": Choice(sparsity=0.5, pattern=SparsityPattern.TWO_FOUR, score=PruneScore.WANDA),
    "sparsity 50% (Wanda)": Choice(sparsity=0.5, pattern=UNSTRUCTURED, score=PruneScore.WANDA),
    "sparsity 50% (magnitude)": Choice(sparsity=0.5, pattern=UNSTRUCTURED, score=PruneScore.MAGNITUDE),
    "heads -1/3 + channels -25%": Choice(head_ratio=0.25, channel_ratio=0.25, score=PruneScore.WANDA),
    "GPTQ 3-bit g128 act-order": Choice(bits=3, group_size=128, method=QuantMethod.GPTQ, act_order=True),
}


def safetensors_payload(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (the file minus its JSON header)."""
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    return sum(end - start for key, value in header.items() if key != "__metadata__"
               for start, end in [value["data_offsets"]])


@torch.no_grad()
def prefill_speed(model, tokens: torch.Tensor) -> float:
    """Tokens per second of one batch-1 forward over ``tokens`` (no cache)."""
    start = time.perf_counter()
    model(input_ids=tokens.view(1, -1), use_cache=False)
    return tokens.numel() / (time.perf_counter() - start)


@torch.no_grad()
def compare_speed(base, pruned, prompt: torch.Tensor, rounds: int = 3) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best (prefill, decode) tokens/s of ``base`` and of ``pruned``, measured alternately."""
    best = {id(base): [0.0, 0.0], id(pruned): [0.0, 0.0]}
    for _ in range(rounds):
        for model in (base, pruned):
            figures = best[id(model)]
            figures[0] = max(figures[0], prefill_speed(model, prompt))
            figures[1] = max(figures[1], decode_speed(model, prompt[:64], new_tokens=32))
    return tuple(best[id(base)]), tuple(best[id(pruned)])


def main() -> None:
    """Apply each operator to a fresh copy of the model, evaluate, save, and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences of 512 tokens")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows (by name prefix)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    loaded = load_model("smollm2-135m")
    base, tokenizer = loaded.model, loaded.tokenizer
    fingerprint = model_fingerprint(base)
    evaluation = load_tokens("stdlib-docs", tokenizer, "evaluation", max_tokens=args.eval_tokens).tokens
    calibration = load_tokens("stdlib-docs", tokenizer, "calibration", max_tokens=args.calib_seqs * 512).tokens
    memory = MemoryModel.from_model(base)
    prompt = evaluation[:256]
    console = Console(width=180)

    table = Table(title=f"SmolLM2-135M, stdlib-docs eval {args.eval_tokens} tokens (window 512), "
                        f"calibration {args.calib_seqs}x512 tokens, {torch.get_num_threads()} thread(s)")
    for column in ("operator", "ppl", "params", "predicted MB", "saved MB (file)", "payload = predicted",
                   "apply s", "prefill tok/s", "decode tok/s"):
        table.add_column(column, justify="left" if column == "operator" else "right")

    tick = time.perf_counter()
    table.add_row("fp32 (reference)", f"{perplexity(base, evaluation):.2f}", f"{parameter_count(base) / 1e6:.2f}M",
                  f"{dense_bytes(base) / 1e6:.2f} (16-bit)", "-", "-", "-", "-", "-")
    print(f"reference evaluated in {time.perf_counter() - tick:.0f}s", flush=True)

    for name, choice in ROWS.items():
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        schedule = Schedule.uniform(base, choice, fingerprint=fingerprint)
        predicted = memory.schedule_bytes(schedule)
        params = memory.schedule_parameters(schedule)
        model = copy.deepcopy(base)
        tick = time.perf_counter()
        apply(model, schedule, calibration, progress=False, fingerprint=fingerprint)
        seconds = time.perf_counter() - tick
        ppl = perplexity(model, evaluation)
        with tempfile.TemporaryDirectory() as tmp:
            out = save_compressed(model, None, schedule, Path(tmp) / "model")
            saved = os.path.getsize(out / "model.safetensors")
            payload = safetensors_payload(out / "model.safetensors")
        assert stored_bytes(model) == predicted == payload, (name, stored_bytes(model), predicted, payload)
        assert abs(saved - predicted) <= 0.01 * predicted, (name, saved, predicted)
        assert parameter_count(model) == params, (name, parameter_count(model), params)
        speed = ("-", "-")
        if choice.structural:
            (base_prefill, base_decode), (prefill, decode) = compare_speed(base, model, prompt)
            speed = (f"{prefill:.0f} (x{prefill / base_prefill:.2f})", f"{decode:.1f} (x{decode / base_decode:.2f})")
            print(f"{name}: original prefill {base_prefill:.0f} tok/s decode {base_decode:.1f} tok/s", flush=True)
        table.add_row(name, f"{ppl:.2f}", f"{params / 1e6:.2f}M", f"{predicted / 1e6:.3f}", f"{saved / 1e6:.3f}",
                      "yes", f"{seconds:.0f}", *speed)
        print(f"{name}: ppl {ppl:.2f}, apply {seconds:.0f}s, params {params}, predicted {predicted}, "
              f"file {saved}, speed {speed}", flush=True)
        del model
        console.print(table)  # after every row, so a run cut short still shows what it measured
    console.print(table)


if __name__ == "__main__":
    main()
