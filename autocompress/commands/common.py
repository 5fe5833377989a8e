"""Argument types and options shared by several verbs."""
from __future__ import annotations

import argparse


def bounded(text: str, convert, ok, expected: str):
    """``convert(text)`` when it parses and passes ``ok``; else argparse's error naming ``expected``
    (the body of every numeric argparse type)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return bounded(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return bounded(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return bounded(text, float, lambda v: v >= 0, "a number >= 0")


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch CPU threads (set by the CLI before the verb runs)."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores)")


def add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``: only on request, never by default."""
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where the model runs and how it is stored (resolved by the verb)."""
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where the model runs (default auto: CUDA when a GPU is present, else the CPU)")
    parser.add_argument("--dtype", default="auto", metavar="auto|bfloat16|float16|float32",
                        help="how the weights and activations are stored (default auto: bfloat16 on CUDA, "
                             "float32 on the CPU); statistics, GPTQ and KL are computed in float32 regardless")


def device_options(args) -> tuple:
    """The ``(torch.device, torch.dtype)`` of ``--device`` and ``--dtype`` (a one-line UserError when wrong)."""
    from ..device import resolve  # noqa: PLC0415

    return resolve(args.device, args.dtype)
