"""Linears and embeddings whose weights are llama.cpp GGUF blocks (Q4_K, Q5_0, Q8_0...).

A schedule searched in the ``gguf`` space quantizes each weight to one of GGUF's own block
types (:mod:`autocompress.export.gguf_quants`, bit-exact with llama.cpp). These modules keep
those bytes, ``blocks`` uint8 [rows, bytes per row], exactly as a GGUF file stores them, so
``autocompress export --format gguf`` writes them verbatim: what the search measured is what
llama.cpp runs.

``forward`` needs dense weights: a linear dequantizes its blocks once and keeps the dense copy
in a non-saved cache (rebuilt when the blocks change or move); an embedding dequantizes only
the rows it looks up. A tied head shares the embedding's blocks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .row_embedding import RowEmbedding



def _quants():
    # Imported on first use: the GGUF packers are numpy code that only GGUF choices need.
    from ..export import gguf_quants  # noqa: PLC0415

    return gguf_quants

def resolved_type(gguf_type: str, row_length: int) -> str:
    """The type a ``row_length``-wide weight really gets: llama.cpp's fallback when blocks do not fit,
    and F16 when no block type fits the row at all."""
    from ..errors import UserError  # noqa: PLC0415

    try:
        return _quants().fallback_type(gguf_type, row_length)
    except UserError:
        return "F16"


def quantize_blocks(weight: torch.Tensor, gguf_type: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """GGUF blocks uint8 [rows, bytes] of ``weight`` [rows, cols] in ``gguf_type`` (already resolved)."""
    array = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    weights = None if importance is None else importance.detach().to("cpu", torch.float32).numpy()
    return torch.from_numpy(np.ascontiguousarray(_quants().quantize(array, gguf_type, weights)))


def dequantize_blocks(blocks: torch.Tensor, gguf_type: str, row_length: int) -> torch.Tensor:
    """The fp32 rows [rows, row_length] that ``blocks`` stand for (on the blocks' device)."""
    dense = _quants().dequantize(blocks.detach().cpu().numpy(), gguf_type, row_length)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).to(blocks.device)


class GGUFLinear(nn.Module):
    """A linear layer stored as GGUF blocks of one type; ``blocks`` is what the GGUF file holds."""

    def __init__(self, in_features: int, out_features: int, gguf_type: str, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.gguf_type = in_features, out_features, gguf_type
        self.register_buffer("blocks", torch.zeros(out_features, _quants().row_bytes(gguf_type, in_features),
                                                   dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._dense: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, gguf_type: str, bias: torch.Tensor | None = None,
                    importance: torch.Tensor | None = None) -> GGUFLinear:
        """Quantize ``weight`` [out, in] to ``gguf_type`` (llama.cpp's fallback applied for the row width)."""
        out_features, in_features = weight.shape
        gguf_type = resolved_type(gguf_type, in_features)
        module = cls(in_features, out_features, gguf_type, bias=bias is not None, device=weight.device,
                     dtype=bias.dtype if bias is not None else torch.float32)
        module.blocks.copy_(quantize_blocks(weight, gguf_type, importance))
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight [out, in] in fp32."""
        return dequantize_blocks(self.blocks, self.gguf_type, self.in_features)

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        blocks = self.blocks
        key = (blocks.data_ptr(), blocks._version, blocks.device, dtype)
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.dequantized_weight().to(dtype))
        return self._dense[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with W dequantized from the blocks (cached until they change)."""
        return F.linear(x, self._weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.gguf_type}, "
                f"bias={self.bias is not None}")


class GGUFEmbedding(RowEmbedding):
    """A token embedding stored as GGUF blocks; ``forward`` dequantizes only the looked-up rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, gguf_type: str, *,
                 padding_idx: int | None = None, embed_scale: float | torch.Tensor | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.gguf_type = num_embeddings, embedding_dim, gguf_type
        self.padding_idx, self.dtype = padding_idx, dtype
        self.register_buffer("blocks", torch.zeros(num_embeddings, _quants().row_bytes(gguf_type, embedding_dim),
                                                   dtype=torch.uint8, device=device))
        scale = None if embed_scale is None else torch.as_tensor(embed_scale).detach().clone().float().to(device)
        self.register_buffer("embed_scale", scale, persistent=False)

    @classmethod
    def from_embedding(cls, embedding: nn.Module, gguf_type: str) -> GGUFEmbedding:
        """Quantize an ``nn.Embedding`` (or a scaled subclass) to ``gguf_type``; the original is untouched."""
        from .quant_embedding import embedding_scale  # noqa: PLC0415  (it imports this module's peers)

        weight = embedding.weight
        gguf_type = resolved_type(gguf_type, weight.shape[1])
        module = cls(weight.shape[0], weight.shape[1], gguf_type, padding_idx=embedding.padding_idx,
                     embed_scale=embedding_scale(embedding), device=weight.device, dtype=weight.dtype)
        module.blocks.copy_(quantize_blocks(weight, gguf_type))
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The whole dense table [V, D] in fp32 (for the tied head and tests, never in ``forward``)."""
        return dequantize_blocks(self.blocks, self.gguf_type, self.embedding_dim)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The fp32 rows [len(ids), D] of the 1-D ``ids``, from their blocks alone."""
        return dequantize_blocks(self.blocks.index_select(0, ids), self.gguf_type, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.gguf_type}"


class TiedGGUFLinear(GGUFLinear):
    """The output head of a tied model over the embedding's GGUF blocks (no buffers of its own)."""

    def __init__(self, embedding: GGUFEmbedding, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.gguf_type = embedding.gguf_type
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._dense = None

    @property
    def embedding(self) -> GGUFEmbedding:
        """The embedding whose blocks this head multiplies by."""
        return self._embedding

    @property
    def blocks(self) -> torch.Tensor:
        """The embedding's GGUF blocks [V, bytes per row]."""
        return self._embedding.blocks

    def extra_repr(self) -> str:
        return super().extra_repr() + ", tied to the embedding"


__all__ = ["GGUFEmbedding", "GGUFLinear", "TiedGGUFLinear", "dequantize_blocks", "quantize_blocks", "resolved_type"]
