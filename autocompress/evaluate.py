"""Evaluation: perplexity, KL and top-1 agreement to a reference, size and speed.

Everything is streamed window by window: at most one batch of logits per model is alive,
never the logits of the whole evaluation set.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import write_artifact
from .data import with_bos
from .progress import progress_bar

EVAL_VERSION = 1


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured. ``kl`` and ``top1`` are None without a reference."""

    model: str
    data: str
    tokens: int
    window: int
    perplexity: float
    loss: float
    kl: float | None
    top1: float | None
    size_bytes: int
    parameters: int
    tokens_per_second: float
    decode_tokens_per_second: float | None
    wall_seconds: float
    threads: int

    def to_json(self) -> dict:
        """Plain-dict form for ``eval.json``."""
        return asdict(self)


def windows(tokens: torch.Tensor, window: int, bos: int | None = None) -> torch.Tensor:
    """Cut a 1-D stream into non-overlapping windows [n, window] (a short tail is dropped);
    with a ``bos`` id each starts with it ([n, window + 1], see :mod:`autocompress.data`)."""
    count = tokens.numel() // window
    if count == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {window}")
    return with_bos(tokens[: count * window].view(count, window), bos)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # float32 logits whatever the model's dtype: losses and KL are accumulated in float32.
    return model(input_ids=batch, use_cache=False).logits.float()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def stream_metrics(model: nn.Module, tokens: torch.Tensor, *, window: int = 512, batch_size: int = 2,
                   reference: nn.Module | None = None, description: str = "evaluating",
                   progress: bool = True, bos: int | None = None) -> dict[str, float]:
    """Loss, perplexity and (with a reference) mean KL(reference || model) and top-1 agreement.

    The next-token loss is averaged over every position of every window but the last one
    of each window (its target lies in the next window). With the tokenizer's ``bos`` id
    (:func:`~autocompress.data.bos_id`) every window starts with BOS, and the scored targets
    are then all of the window's text tokens, BOS never among them.
    """
    batches = windows(tokens, window, bos).to(_device(model)).split(batch_size)
    nll_sum, kl_sum, agree, counted = 0.0, 0.0, 0, 0
    start = time.perf_counter()
    model_seconds = 0.0
    with progress_bar(description, total=len(batches), enabled=progress) as advance:
        for batch in batches:
            tick = time.perf_counter()
            logits = _logits(model, batch)[:, :-1]
            model_seconds += time.perf_counter() - tick
            targets = batch[:, 1:]
            log_probs = F.log_softmax(logits, dim=-1)
            nll_sum += -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
            counted += targets.numel()
            if reference is not None:
                ref_log_probs = F.log_softmax(_logits(reference, batch)[:, :-1], dim=-1)
                kl_sum += F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="sum").item()
                agree += (log_probs.argmax(-1) == ref_log_probs.argmax(-1)).sum().item()
            advance()
    loss = nll_sum / counted
    return {
        "loss": loss,
        "perplexity": float(torch.tensor(loss).exp()),
        "kl": kl_sum / counted if reference is not None else None,
        "top1": agree / counted if reference is not None else None,
        "tokens_per_second": batches_tokens(batches) / model_seconds,
        "seconds": time.perf_counter() - start,
    }


def batches_tokens(batches) -> int:
    """Number of tokens in a sequence of token batches."""
    return sum(batch.numel() for batch in batches)


def perplexity(model: nn.Module, tokens: torch.Tensor, window: int = 512, batch_size: int = 2,
               progress: bool = False, bos: int | None = None) -> float:
    """Perplexity of ``model`` over non-overlapping windows of ``tokens`` (BOS first with ``bos``)."""
    return stream_metrics(model, tokens, window=window, batch_size=batch_size, progress=progress,
                          bos=bos)["perplexity"]


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Greedy decoding speed in tokens per second with the KV cache (batch 1)."""
    ids = prompt.view(1, -1).to(_device(model))
    out = model(input_ids=ids, use_cache=True)
    cache, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_id, past_key_values=cache, use_cache=True)
        cache, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - start)


def evaluate(model: nn.Module, tokens: torch.Tensor, *, model_name: str, data_name: str, window: int = 512,
             batch_size: int = 2, reference: nn.Module | None = None, decode_tokens: int = 32,
             progress: bool = True, bos: int | None = None) -> EvalResult:
    """Evaluate ``model`` on ``tokens``: perplexity, KL/top-1 to ``reference``, size, speed.

    ``bos`` is the tokenizer's BOS id when it adds one (:func:`~autocompress.data.bos_id`):
    every window, and the decoding prompt, then start with it. ``tokens`` in the result
    counts the text tokens of the windows.
    """
    from .compress.memory import stored_bytes  # noqa: PLC0415 (avoid an import cycle)
    from .models import parameter_count  # noqa: PLC0415

    wall = time.perf_counter()
    metrics = stream_metrics(model, tokens, window=window, batch_size=batch_size, reference=reference,
                             progress=progress, bos=bos)
    prompt = with_bos(tokens[:64].view(1, -1), bos)
    decode = decode_speed(model, prompt, decode_tokens) if decode_tokens > 0 else None
    return EvalResult(
        model=model_name, data=data_name, tokens=windows(tokens, window).numel(), window=window,
        perplexity=metrics["perplexity"], loss=metrics["loss"], kl=metrics["kl"], top1=metrics["top1"],
        size_bytes=stored_bytes(model), parameters=parameter_count(model),
        tokens_per_second=metrics["tokens_per_second"], decode_tokens_per_second=decode,
        wall_seconds=time.perf_counter() - wall, threads=torch.get_num_threads(),
    )


def write_eval(result: EvalResult, path: str | Path) -> Path:
    """Write ``eval.json`` (versioned, atomic)."""
    return write_artifact(path, "eval", EVAL_VERSION, result.to_json())


def eval_table(result: EvalResult):
    """A rich table of one evaluation."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"evaluation of {result.model} on {result.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("perplexity", f"{result.perplexity:.3f}"),
        ("loss (nats/token)", f"{result.loss:.4f}"),
        ("KL to reference", "-" if result.kl is None else f"{result.kl:.4f}"),
        ("top-1 agreement", "-" if result.top1 is None else f"{100 * result.top1:.2f}%"),
        ("tokens (windows of {})".format(result.window), f"{result.tokens:,}"),
        ("size as stored", f"{result.size_bytes / 2**20:.1f} MiB"),
        ("parameters", f"{result.parameters:,}"),
        ("prefill tokens/s", f"{result.tokens_per_second:,.0f}"),
        ("decode tokens/s (batch 1)", "-" if result.decode_tokens_per_second is None
         else f"{result.decode_tokens_per_second:.1f}"),
        ("torch threads", str(result.threads)),
        ("wall time", f"{result.wall_seconds:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
