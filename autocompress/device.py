"""Where the model runs and in what dtype it is stored: ``--device`` and ``--dtype``.

``auto`` means CUDA with bfloat16 where a GPU is present, otherwise the CPU with float32.
The dtype is only how weights and activations are stored: statistics and quantizer
arithmetic (Hessians, Wanda norms, GPTQ, KL and losses) are computed in float32 whatever it is.

Example::

    device = resolve_device("auto")           # cuda:0 with a GPU, else cpu
    dtype = resolve_dtype("auto", device)     # bfloat16 on cuda, else float32
    model = place(loaded.model, device, dtype)
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names (``auto``, ``cpu``, ``cuda``, ``cuda:N``); a UserError
    for another spelling, for CUDA without a GPU, or for a GPU index that is not there."""
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    head, _, index = text.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {spec!r} is not a device; expected {DEVICES}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
    number = int(index) if index else torch.cuda.current_device()
    if number >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", number)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The storage dtype ``spec`` names (``auto``, ``bfloat16``, ``float16``, ``float32``);
    ``auto`` is bfloat16 on CUDA and float32 elsewhere. A UserError for another spelling."""
    text = spec.strip().lower()
    if text == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if text not in DTYPES:
        raise UserError(f"--dtype {spec!r} is not a storage dtype; expected auto, {', '.join(DTYPES)}")
    return DTYPES[text]


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """:func:`resolve_device` and :func:`resolve_dtype` together (the CLI's two flags)."""
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def model_device(model: nn.Module) -> torch.device:
    """The device ``model``'s parameters live on (token tensors are moved there)."""
    return next(model.parameters()).device


def place(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Move ``model`` to ``device`` and store its floating-point parameters in ``dtype`` (in place).

    Buffers keep their dtype: a compressed model's fp16 scales and zeros, and the rotary
    frequencies, are not storage the dtype choice is about.
    """
    model.to(device)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model
