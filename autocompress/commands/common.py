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
