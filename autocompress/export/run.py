"""``autocompress export``: a run's (or any model's) compressed model as GGUF or compressed-tensors.

:func:`export_run` finds the model (``RUN/model``, a compressed model directory, or any model
autocompress loads), writes the format asked for, and, when a GGUF export had to requantize
native group-wise codes to the nearest GGUF type, measures the KL to the model as compressed
that the requantization adds, on held-out evaluation text.

Example::

    result = export_run("runs/demo", "gguf", "smollm2.gguf")
    result.added_kl     # None when every tensor was written exactly as measured
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

FORMATS = ("gguf", "compressed-tensors")


@dataclass
class ExportResult:
    """What an export wrote, and what it cost in quality when it could not be exact."""

    format: str
    out: Path
    bytes: int
    tensors: int
    requantized: int  # tensors written in another type than the one measured (GGUF only)
    added_kl: float | None  # mean KL(compressed || exported) on evaluation text, when requantized
    details: object  # the format's own record (GGUFExport or CTExport)


def resolve_source(source: str | Path) -> str:
    """The model a RUN directory (its ``model/``) or a model path stands for."""
    path = Path(source)
    if (path / "model" / "autocompress.json").is_file():
        return str(path / "model")
    if path.is_dir() and (path / "schedule.json").is_file() and not (path / "config.json").is_file():
        raise UserError(f"{path} is a run without a compressed model; run `autocompress apply {path}` first, "
                        f"then export")
    return str(source)


@torch.no_grad()
def linear_importance(model: nn.Module, tokens: torch.Tensor, window: int = 512,
                      bos: int | None = None) -> dict[str, torch.Tensor]:
    """Mean square of every linear's input per column over ``tokens`` (llama.cpp's importance matrix).

    Keys are module paths; the tied head shares the embedding's blocks and gets none.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name, module in model.named_modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features") and name:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        from ..evaluate import windows  # noqa: PLC0415

        for row in windows(tokens, window, bos):
            model(input_ids=row[None], use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: total / counts[name] for name, total in sums.items()}


def export_run(source: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False,
               data: str = "stdlib-docs", kl_tokens: int = 4096, importance_tokens: int = 4096,
               window: int = 512, layout: str = "auto", progress: bool = True) -> ExportResult:
    """Export ``source`` (a RUN directory, a compressed model directory or a model) as ``fmt`` to ``out``.

    ``layout`` (compressed-tensors only): ``standard`` packs asymmetric zero points as vLLM
    reads them; stock transformers loads that only when every quantized layer shares one
    scheme. ``portable`` writes what transformers loads in any mix (asymmetric codes as
    symmetric ones a bit wider). ``auto`` writes ``standard`` and falls back to ``portable``
    when transformers could not load it.
    """
    from ..data import Split, bos_id, load_tokens  # noqa: PLC0415
    from ..models import load_model  # noqa: PLC0415

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    loaded = load_model(resolve_source(source))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{source} has no tokenizer files; a runtime needs them: save the model with its tokenizer")
    if fmt == "compressed-tensors":
        from .compressed_tensors import Layout, export_compressed_tensors  # noqa: PLC0415

        if layout not in ("auto", "standard", "portable"):
            raise UserError(f"unknown layout {layout!r}; choose auto, standard or portable")
        first = Layout.PORTABLE if layout == "portable" else Layout.STANDARD
        record = export_compressed_tensors(model, tokenizer, out, overwrite=overwrite, layout=first)
        if layout == "auto" and not record.transformers_loadable:
            record = export_compressed_tensors(model, tokenizer, out, overwrite=True, layout=Layout.PORTABLE)
        return ExportResult(fmt, out, record.total_bytes, len(record.linears), 0, None, record)

    from .gguf_writer import as_exported, export_gguf  # noqa: PLC0415

    importance = None
    if importance_tokens:
        calibration = load_tokens(data, tokenizer, Split.CALIBRATION, max(importance_tokens, window))
        importance = linear_importance(model, calibration.tokens, window, bos_id(tokenizer))
    record = export_gguf(model, tokenizer, out, importance=importance, progress=progress)
    requantized = [r for r in record.records if not r.exact]
    added_kl = None
    if requantized and kl_tokens:
        from ..evaluate import stream_metrics  # noqa: PLC0415

        evaluation = load_tokens(data, tokenizer, Split.EVALUATION, max(kl_tokens, window))
        exported = as_exported(model, record)
        metrics = stream_metrics(exported, evaluation.tokens, window=window, batch_size=1, reference=model,
                                 bos=bos_id(tokenizer), description="KL added by the GGUF types")
        added_kl = metrics["kl"]
    return ExportResult(fmt, out, out.stat().st_size, len(record.records), len(requantized), added_kl, record)


__all__ = ["ExportResult", "FORMATS", "export_run", "linear_importance", "resolve_source"]
