"""The 16-bit storage type of everything that is not quantized.

A compressed model stores unquantized tensors (embeddings, norms, biases, unquantized
linears) in 16 bits. :func:`round_to_storage` rounds them in memory to exactly the values the
file will hold, so a saved-and-loaded model computes what the in-memory one did.
"""
from __future__ import annotations

import torch
from torch import nn

FP16_MAX = 65504.0


def storage_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp16 for a floating tensor (bf16 if it is bf16 or does not fit fp16's range)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.dtype
    if tensor.numel() and tensor.detach().abs().max().item() > FP16_MAX:
        return torch.bfloat16
    return torch.float16


@torch.no_grad()
def round_to_storage(module: nn.Module) -> nn.Module:
    """Round every floating parameter and persistent buffer of ``module`` to its storage type, in place."""
    seen = set()
    for tensor in module.state_dict(keep_vars=True).values():
        if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
            continue
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensor.data.copy_(tensor.data.to(storage_dtype(tensor)).to(tensor.dtype))
    return module
