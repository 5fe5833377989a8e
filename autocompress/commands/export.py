"""``autocompress export RUN_OR_MODEL --format gguf|compressed-tensors --out PATH``."""
from __future__ import annotations

from .common import add_threads, non_negative_int, positive_int

RUNTIME_HINTS = {
    "gguf": ("llama.cpp:  llama-cli -m {out} -p 'Hello'   |   llama-perplexity -m {out} -f text.txt\n"
             "ollama:     FROM {out}  (in a Modelfile), then ollama create NAME -f Modelfile"),
    "compressed-tensors": ("transformers:  AutoModelForCausalLM.from_pretrained('{out}')  "
                           "(pip install compressed-tensors)\n"
                           "vLLM:          vllm serve {out}   (4- and 8-bit group-wise layouts)"),
}


def register(verbs) -> None:
    """Add the ``export`` sub-command."""
    ex = verbs.add_parser(
        "export", help="write a compressed model as GGUF (llama.cpp) or compressed-tensors (transformers, vLLM)",
        description="Export RUN/model (or a compressed model directory, or any model) for a runtime. GGUF keeps "
                    "every tensor's scheduled precision: a schedule from the gguf space is written exactly as "
                    "measured; native group-wise codes are requantized to the nearest GGUF type, and the KL "
                    "that adds is measured on held-out text. compressed-tensors writes group-wise int weights "
                    "that stock transformers and vLLM load; it cannot carry per-layer shapes.")
    ex.add_argument("source", metavar="RUN_OR_MODEL", help="run directory (uses RUN/model) or model")
    ex.add_argument("--format", required=True, choices=["gguf", "compressed-tensors"], dest="fmt")
    ex.add_argument("--out", required=True, metavar="PATH", help="output .gguf file or compressed-tensors folder")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ex.add_argument("--data", default="stdlib-docs", help="text for importance weights and the KL check")
    ex.add_argument("--kl-tokens", type=non_negative_int, default=4096,
                    help="evaluation tokens for the KL a GGUF requantization adds (0: skip; default 4096)")
    ex.add_argument("--importance-tokens", type=non_negative_int, default=4096,
                    help="calibration tokens for importance-weighted GGUF requantization, as llama.cpp's "
                         "imatrix (0: unweighted; default 4096)")
    ex.add_argument("--window", type=positive_int, default=512, help="window length (default 512)")
    ex.add_argument("--layout", choices=["auto", "standard", "portable"], default="auto",
                    help="compressed-tensors: standard packs asymmetric zero points as vLLM reads them (stock "
                         "transformers loads it only when all quantized layers share one scheme); portable loads "
                         "in transformers in any mix (asymmetric b-bit codes become symmetric (b+1)-bit ones, which "
                         "vLLM's Marlin kernels do not serve); auto: standard, else portable (default)")
    add_threads(ex)
    ex.set_defaults(run=run)


def run(args) -> int:
    """Export and print what was written and how to run it."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from ..export.run import export_run  # noqa: PLC0415

    result = export_run(args.source, args.fmt, args.out, overwrite=args.overwrite, data=args.data,
                        kl_tokens=args.kl_tokens, importance_tokens=args.importance_tokens, window=args.window,
                        layout=args.layout)
    console = Console()
    table = Table(title=f"{args.fmt} export", show_header=False)
    table.add_row("written", str(result.out))
    table.add_row("size", f"{result.bytes / 2**20:.1f} MiB ({result.bytes:,} bytes)")
    table.add_row("tensors", str(result.tensors))
    if args.fmt == "gguf":
        types: dict[str, int] = {}
        for record in result.details.records:
            types[record.type] = types.get(record.type, 0) + 1
        table.add_row("types", ", ".join(f"{t} x{n}" for t, n in sorted(types.items())))
        table.add_row("requantized", f"{result.requantized} tensors to the nearest GGUF type"
                      if result.requantized else "none: every tensor as measured")
        if result.added_kl is not None:
            table.add_row("KL added", f"{result.added_kl:.5f} (exported vs compressed model, {args.kl_tokens} tokens)")
    if args.fmt == "compressed-tensors":
        details = result.details
        table.add_row("layout", f"{details.layout.value}" + ("" if details.transformers_loadable else
                      " (stock transformers cannot load this mix; --layout portable can)"))
        notes = sorted({linear.note for linear in details.linears if linear.note})
        if details.embedding:
            notes.append(details.embedding)
        for note in notes[:6]:
            table.add_row("note", note)
    console.print(table)
    console.print(RUNTIME_HINTS[args.fmt].format(out=result.out))
    return 0
