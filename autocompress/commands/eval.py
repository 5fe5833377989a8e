"""``autocompress eval MODEL``: perplexity, KL to a reference, size and speed."""
from __future__ import annotations

from pathlib import Path

from .common import add_device_options, add_threads, add_trust_remote_code, device_options, non_negative_int, positive_int


def register(verbs) -> None:
    """Add the ``eval`` sub-command."""
    ev = verbs.add_parser("eval", help="perplexity, KL to a reference, size and speed of a model",
                          description="Evaluate MODEL on DATA: perplexity over non-overlapping windows, "
                                      "KL and top-1 agreement to --reference, size as stored, tokens/s.")
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument("--data", default="stdlib-docs", help="data spec (default: stdlib-docs)")
    ev.add_argument("--split", default="evaluation", choices=["evaluation", "calibration"])
    ev.add_argument("--tokens", type=positive_int, default=16384, help="evaluation tokens (default 16384)")
    ev.add_argument("--window", type=positive_int, default=512, help="window length (default 512)")
    ev.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass")
    ev.add_argument("--reference", metavar="MODEL", help="model to compare logits with (KL, top-1)")
    ev.add_argument("--decode-tokens", type=non_negative_int, default=32,
                    help="tokens for the decode-speed check (0: skip)")
    ev.add_argument("--out", help="where to write eval.json (default: ./eval.json, or inside a compressed model dir)")
    add_trust_remote_code(ev)
    add_threads(ev)
    add_device_options(ev)
    ev.set_defaults(run=run)


def run(args) -> int:
    """Evaluate and print the table; write eval.json."""
    from rich.console import Console  # noqa: PLC0415

    from ..artifacts import check_output  # noqa: PLC0415
    from ..data import Split, bos_id, load_tokens  # noqa: PLC0415
    from ..errors import UserError  # noqa: PLC0415
    from ..evaluate import eval_table, evaluate, write_eval  # noqa: PLC0415
    from ..models import load_model  # noqa: PLC0415

    if args.tokens < args.window:
        raise UserError(f"--tokens {args.tokens} is less than one --window of {args.window}; "
                        f"raise --tokens or lower --window")
    if args.out:
        check_output(args.out, "--out")
    device, dtype = device_options(args)
    loaded = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    stream = load_tokens(args.data, loaded.tokenizer, Split(args.split), args.tokens)
    reference = None
    if args.reference:
        reference = load_model(args.reference, dtype=dtype, device=device,
                               trust_remote_code=args.trust_remote_code).model
        mine, theirs = (m.get_input_embeddings().num_embeddings for m in (loaded.model, reference))
        if mine != theirs:
            raise UserError(f"--reference {args.reference} has a vocabulary of {theirs} tokens and {args.model!r} one "
                            f"of {mine}; KL needs a shared tokenizer: give as --reference the model {args.model!r} "
                            f"was made from")
    result = evaluate(loaded.model, stream.tokens, model_name=args.model, data_name=f"{args.data} ({args.split})",
                      window=args.window, batch_size=args.batch_size, reference=reference,
                      decode_tokens=args.decode_tokens, bos=bos_id(loaded.tokenizer))
    Console().print(eval_table(result))
    out = Path(args.out) if args.out else (Path(args.model) / "eval.json" if loaded.kind == "compressed"
                                            else Path("eval.json"))
    write_eval(result, out)
    Console().print(f"wrote {out}")
    return 0
