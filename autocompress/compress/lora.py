"""Low-rank adapters on quantized layers (QLoRA-style) for distillation recovery.

A :class:`LoRAQuantLinear` keeps its :class:`~autocompress.compress.quantize.QuantLinear`
frozen and adds a trainable fp32 low-rank update: ``y = Q(x) + (alpha / r) * x A^T B^T`` with
A [r, in] and B [out, r]. B starts at zero, so wrapping changes nothing until training moves it.

While training, the frozen base weight is dequantized once and cached in fp32 (the packed
path would unpack the codes at every forward and backward); the cache is dropped on merge.

After training, :func:`merge_lora` decides what the model keeps:

* ``keep`` (QLoRA's way): the adapters stay beside the packed codes as 16-bit tensors
  (rounded to fp16 now, so the in-memory model equals its saved form);
  :func:`~autocompress.compress.saving.save_compressed` stores them and loading rebuilds the
  wrapper. They cost ``2 * r * (in + out)`` bytes per layer on top of the schedule's size,
  and every reported size counts them. Inference runs the packed path plus the low-rank term.
* ``requantize``: ``W + (alpha/r) B A`` is quantized again with the layer's own bits and
  group size (round-to-nearest, fresh scales). The size stays exactly what the schedule
  says, but the part of the update below half a quantization step is lost; on SmolLM2 at
  3 bits most of the recovery is (``bench/staged.py``).
* ``discard``: back to the frozen base.

Example::

    wrapped = add_lora(model, rank=8)          # every QuantLinear inside the decoder blocks
    distill(model, teacher, tokens, config)    # trains the adapters (and norms)
    merge_lora(model, "requantize")            # back to plain QuantLinear modules
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import adapter_for
from .prune import set_submodule
from .quantize import QuantLinear, quantize_rtn

MERGE_MODES = ("keep", "requantize", "discard")


class LoRAQuantLinear(nn.Module):
    """A frozen :class:`QuantLinear` plus a trainable low-rank update in fp32."""

    def __init__(self, base: QuantLinear, rank: int, alpha: float | None = None, *, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        generator = torch.Generator().manual_seed(seed)
        device = base.packed.device
        # Kaiming-uniform A (as peft does), zero B: the wrapped layer starts equal to the base.
        bound = 1.0 / math.sqrt(self.in_features)
        a = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self._dense: torch.Tensor | None = None

    @property
    def bias(self):
        """The base layer's bias (None without one)."""
        return self.base.bias

    def dense_base(self) -> torch.Tensor:
        """The frozen base weight [out, in] in fp32, dequantized once and cached."""
        if self._dense is None:
            self._dense = self.base.dequantized_weight().detach()
        return self._dense

    def delta_weight(self) -> torch.Tensor:
        """The adapters' update ``(alpha / r) B A`` [out, in]."""
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the low-rank update (cached dense base only while adapters train)."""
        if torch.is_grad_enabled() and self.lora_b.requires_grad:
            base = F.linear(x, self.dense_base().to(x.dtype), self.base.bias)
        else:
            self._dense = None
            base = self.base(x)
        return base + self.scale * F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))

    def lora_record(self) -> dict:
        """What a saved model records to rebuild this wrapper (read by saving.py)."""
        return {"lora_rank": self.rank, "lora_scale": self.scale}

    @classmethod
    def empty(cls, base: QuantLinear, record: dict) -> LoRAQuantLinear:
        """A wrapper shaped as ``record`` says around ``base`` (weights still to be loaded)."""
        wrapper = cls(base, int(record["lora_rank"]))
        wrapper.scale = float(record["lora_scale"])
        return wrapper

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def _block_quant_linears(model: nn.Module) -> list[tuple[nn.Module, str, QuantLinear]]:
    """(block, path inside it, module) for every QuantLinear of the decoder blocks."""
    adapter = adapter_for(model)
    found = []
    for block in adapter.blocks(model):
        for path in adapter.linears.values():
            try:
                module = block.get_submodule(path)
            except AttributeError:
                continue  # a dropped block has no linears
            if isinstance(module, QuantLinear):
                found.append((block, path, module))
    return found


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, *, seed: int = 0) -> list[LoRAQuantLinear]:
    """Wrap every QuantLinear of the decoder blocks in a :class:`LoRAQuantLinear`; returns the wrappers."""
    wrappers = []
    for number, (block, path, module) in enumerate(_block_quant_linears(model)):
        wrapper = LoRAQuantLinear(module, rank, alpha, seed=seed + number)
        set_submodule(block, path, wrapper)
        wrappers.append(wrapper)
    return wrappers


def lora_modules(model: nn.Module) -> list[LoRAQuantLinear]:
    """Every LoRA wrapper in ``model``."""
    return [m for m in model.modules() if isinstance(m, LoRAQuantLinear)]


def lora_parameters(model: nn.Module) -> int:
    """Number of adapter parameters (A and B of every wrapper)."""
    return sum(m.lora_a.numel() + m.lora_b.numel() for m in lora_modules(model))


@torch.no_grad()
def merged_quant_linear(wrapper: LoRAQuantLinear) -> QuantLinear:
    """A plain QuantLinear holding ``W + (alpha/r) B A`` re-quantized at the base's bits and group size."""
    base = wrapper.base
    weight = wrapper.dense_base() + wrapper.delta_weight().float()
    q = quantize_rtn(weight, base.bits, base.group_size)
    return QuantLinear.from_quantized(q, base.bias)


@torch.no_grad()
def merge_lora(model: nn.Module, mode: str = "requantize") -> int:
    """Settle every LoRA wrapper after training (see the module docstring); returns how many.

    ``keep`` rounds the adapters to fp16 and leaves the wrappers; ``requantize`` folds the
    update into the weights and quantizes again (same bits and group size); ``discard``
    restores the frozen base unchanged.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRAQuantLinear):
            continue
        if mode == "keep":
            module.requires_grad_(False)
            for param in (module.lora_a, module.lora_b):
                param.data.copy_(param.data.half().float())
            module._dense = None
            count += 1
            continue
        new = merged_quant_linear(module) if mode == "requantize" else module.base
        new.requires_grad_(False)
        set_submodule(model, name, new)
        count += 1
    return count
