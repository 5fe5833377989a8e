"""The lookup shared by the quantized embeddings: dequantize only the rows the ids name."""
from __future__ import annotations

import torch
from torch import nn


class RowEmbedding(nn.Module):
    """Base of an embedding stored in packed rows; a subclass says how to dequantize some rows.

    ``embed_scale`` (a non-persistent buffer, or None) multiplies the rows, as Gemma's scaled
    embedding does; ``dtype`` is the output dtype (the model's), kept in step with
    ``module.to(dtype)``.
    """

    embedding_dim: int
    dtype: torch.dtype
    embed_scale: torch.Tensor | None

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The fp32 rows [len(ids), D] of the 1-D ``ids``."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the ids [...] as [..., D]: gathers and dequantizes only those rows."""
        rows = self.dequantize_rows(input_ids.reshape(-1))
        out = rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        return out

    def _apply(self, fn, recurse=True):
        # ``module.to(dtype)``/``.half()`` change the output dtype as they would a float weight's.
        result = super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return result
