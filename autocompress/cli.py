"""Command line: argument parsing and printing only; every verb calls one library function."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from .commands import VERBS
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _quiet_libraries() -> None:
    import warnings  # noqa: PLC0415

    import optuna  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # transformers warns on every forward about its own cache argument; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*past_key_values.* is deprecated", category=FutureWarning)


def _set_threads(threads: int | None) -> None:
    import torch  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    """The ``autocompress`` argument parser: one sub-command per module of :mod:`autocompress.commands`."""
    parser = _Parser(prog="autocompress", description=(
        "Make a causal LM smaller and faster under a budget. MODEL is a hub id, a local directory, "
        "a .gguf file or the alias smollm2-135m; DATA is a .txt/.jsonl file, a dataset, or stdlib-docs."))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    for verb in (*VERBS, "serve"):
        name = f"autocompress.commands.{verb}"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autocompress`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _quiet_libraries()
        _set_threads(getattr(args, "threads", None))
        return args.run(args)
    except UserError as exc:
        print(f"autocompress {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
