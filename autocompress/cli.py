"""Command line: argument parsing and printing only; every verb calls one library function."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _quiet_libraries() -> None:
    import optuna  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _set_threads(threads: int | None) -> None:
    import torch  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores)")


def _cmd_eval(args) -> int:
    from rich.console import Console  # noqa: PLC0415

    from .data import Split, load_tokens  # noqa: PLC0415
    from .evaluate import eval_table, evaluate, write_eval  # noqa: PLC0415
    from .models import load_model  # noqa: PLC0415

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    stream = load_tokens(args.data, loaded.tokenizer, Split(args.split), args.tokens)
    reference = None
    if args.reference:
        reference = load_model(args.reference, trust_remote_code=args.trust_remote_code).model
    result = evaluate(loaded.model, stream.tokens, model_name=args.model, data_name=f"{args.data} ({args.split})",
                      window=args.window, batch_size=args.batch_size, reference=reference,
                      decode_tokens=args.decode_tokens)
    Console().print(eval_table(result))
    out = Path(args.out) if args.out else (Path(args.model) / "eval.json" if loaded.kind == "compressed"
                                            else Path("eval.json"))
    write_eval(result, out)
    Console().print(f"wrote {out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo  # noqa: PLC0415

    run_demo(DemoConfig(out=Path(args.out), eval_tokens=args.tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``autocompress`` argument parser with one sub-command per verb."""
    parser = _Parser(prog="autocompress", description=(
        "Make a causal LM smaller and faster under a budget. MODEL is a hub id, a local directory, "
        "a .gguf file or the alias smollm2-135m; DATA is a .txt/.jsonl file, a dataset, or stdlib-docs."))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)

    ev = verbs.add_parser("eval", help="perplexity, KL to a reference, size and speed of a model",
                          description="Evaluate MODEL on DATA: perplexity over non-overlapping windows, "
                                      "KL and top-1 agreement to --reference, size as stored, tokens/s.")
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument("--data", default="stdlib-docs", help="data spec (default: stdlib-docs)")
    ev.add_argument("--split", default="evaluation", choices=["evaluation", "calibration"])
    ev.add_argument("--tokens", type=_positive_int, default=16384, help="evaluation tokens (default 16384)")
    ev.add_argument("--window", type=_positive_int, default=512, help="window length (default 512)")
    ev.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass")
    ev.add_argument("--reference", metavar="MODEL", help="model to compare logits with (KL, top-1)")
    ev.add_argument("--decode-tokens", type=int, default=32, help="tokens for the decode-speed check (0: skip)")
    ev.add_argument("--out", help="where to write eval.json (default: ./eval.json, or inside a compressed model dir)")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    _add_common(ev)
    ev.set_defaults(run=_cmd_eval)

    demo = verbs.add_parser("demo", help="the whole job on the demo model (what `make demo` runs)",
                            description="Fetch SmolLM2-135M, evaluate it on stdlib-docs and write runs/demo.")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--tokens", type=_positive_int, default=16384, help="evaluation tokens (default 16384)")
    _add_common(demo)
    demo.set_defaults(run=_cmd_demo)
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
