"""The token embedding as a quantizable unit, and a tied output head that shares its codes.

The embedding table E [V, D] is quantized like a linear weight with rows = vocabulary entries
and K = the hidden size (group-wise along D, our packed format of
:mod:`autocompress.kernels.packing`). :class:`QuantEmbedding` looks ids up by gathering only
their packed rows and dequantizing those, never the whole table.

When the model ties its output head to the embedding, the embedding unit
(``adapter.embeddings[0]``, e.g. ``model.embed_tokens``) covers both: the head becomes a
:class:`TiedQuantLinear`, a :class:`~.quantize.QuantLinear` whose ``packed``/``scales``/``zeros``
*are* the embedding's tensors (read through the embedding module, so they stay one copy in
memory, across ``model.to(device)``, and in the saved file). An untied head is its own unit
(``lm_head``).

Example::

    quantize_embeddings_(model, Choice(bits=8, group_size=64), None)
    model.get_submodule(embedding_unit(model))   # QuantEmbedding
"""
from __future__ import annotations

import torch
from torch import nn

from autocompress.kernels import packing, reference

from ..models import adapter_for
from ..schedule import Choice, QuantMethod, SparsityPattern
from .gguf_linear import GGUFEmbedding, GGUFLinear, TiedGGUFLinear
from .gptq import quantize_observed
from .prune import set_submodule
from .quantize import SCALE_DTYPE, QuantizedWeight, QuantLinear
from .row_embedding import RowEmbedding


class QuantEmbedding(RowEmbedding):
    """A token embedding with packed integer rows; ``forward`` dequantizes only the looked-up rows.

    Buffers: ``packed`` uint8 [V, ceil(D * bits / 8)], ``scales`` and ``zeros`` fp16 [V, groups].
    ``embed_scale`` (a non-persistent scalar buffer, or None) multiplies the rows, as Gemma's
    scaled embedding does; ``dtype`` is the output dtype (the model's), kept in step with
    ``module.to(dtype)``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int, *,
                 padding_idx: int | None = None, embed_scale: float | torch.Tensor | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx
        self.dtype = dtype
        groups = packing.num_groups(embedding_dim, group_size)
        self.register_buffer("packed", torch.zeros(num_embeddings, packing.packed_row_bytes(embedding_dim, bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.zeros(num_embeddings, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("embed_scale", _scale_buffer(embed_scale, device), persistent=False)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, *, padding_idx: int | None = None,
                       embed_scale: float | torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> QuantEmbedding:
        """Wrap a :class:`~.quantize.QuantizedWeight` of the table [V, D] (its tensors are taken, not copied)."""
        module = cls(q.packed.shape[0], q.in_features, q.bits, q.group_size, padding_idx=padding_idx,
                     device="meta", dtype=dtype)
        module.packed, module.scales, module.zeros = q.packed, q.scales, q.zeros
        module.embed_scale = _scale_buffer(embed_scale, q.packed.device)
        return module

    @classmethod
    def from_embedding(cls, embedding: nn.Module, choice: Choice) -> QuantEmbedding:
        """Quantize an ``nn.Embedding`` (or a scaled subclass) as ``choice`` says; the original is untouched."""
        weight = embedding.weight
        return cls.from_quantized(quantize_weight_for(choice, weight), padding_idx=embedding.padding_idx,
                                  embed_scale=embedding_scale(embedding), dtype=weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole dense table [V, D] in fp32 (for inspection and tests, never in ``forward``)."""
        return reference.dequantize_fp32(self.packed, self.scales, self.zeros, self.bits, self.group_size,
                                         self.embedding_dim)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The fp32 rows [len(ids), D] of the 1-D ``ids``, unpacked from their codes alone."""
        return reference.dequantize_fp32(self.packed.index_select(0, ids), self.scales.index_select(0, ids),
                                         self.zeros.index_select(0, ids), self.bits, self.group_size,
                                         self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + (", scaled" if self.embed_scale is not None else ""))


class TiedQuantLinear(QuantLinear):
    """The output head of a tied model: a :class:`~.quantize.QuantLinear` over the embedding's codes.

    ``packed``, ``scales`` and ``zeros`` are the tensors of ``embedding`` (a
    :class:`QuantEmbedding`) itself, read at every access: the head holds no buffers, so the
    state dict, the saved file and device moves keep one copy. ``bias`` is the head's own.
    """

    def __init__(self, embedding: QuantEmbedding, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bits, self.group_size = embedding.bits, embedding.group_size
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def embedding(self) -> QuantEmbedding:
        """The embedding whose codes this head multiplies by."""
        return self._embedding

    @property
    def packed(self) -> torch.Tensor:
        """The embedding's packed codes [V, ceil(D * bits / 8)]."""
        return self._embedding.packed

    @property
    def scales(self) -> torch.Tensor:
        """The embedding's fp16 scales [V, groups]."""
        return self._embedding.scales

    @property
    def zeros(self) -> torch.Tensor:
        """The embedding's fp16 zero points [V, groups]."""
        return self._embedding.zeros

    def extra_repr(self) -> str:
        return super().extra_repr() + ", tied to the embedding"


def _scale_buffer(value: float | torch.Tensor | None, device) -> torch.Tensor | None:
    """A scalar float tensor of ``value`` on ``device`` (None stays None)."""
    if value is None:
        return None
    scale = torch.as_tensor(value).detach().clone().to(device=device)
    return scale if scale.is_floating_point() else scale.to(torch.float32)


def embedding_scale(embedding: nn.Module) -> float | torch.Tensor | None:
    """The multiplier a scaled embedding class (Gemma) applies to its rows, or None."""
    scalar = getattr(embedding, "scalar_embed_scale", None)
    if scalar is not None:
        return float(scalar)
    scale = getattr(embedding, "embed_scale", None)
    return scale if scale is None or isinstance(scale, (float, int)) else scale.detach().clone()


def embedding_unit(model: nn.Module) -> str:
    """The schedule unit name of ``model``'s token embedding (``adapter.embeddings[0]``)."""
    return adapter_for(model).embeddings[0]


def _same_storage(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return False
    return a is b or (a.device == b.device and a.device.type != "meta" and a.shape == b.shape
                      and a.data_ptr() == b.data_ptr())


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output head shares its weight (or its packed codes) with the token embedding."""
    adapter = adapter_for(model)
    head = model.get_submodule(adapter.lm_head)
    embedding = model.get_submodule(adapter.embeddings[0])
    if isinstance(head, (TiedQuantLinear, TiedGGUFLinear)):
        return head.embedding is embedding
    if isinstance(embedding, QuantEmbedding):
        return _same_storage(getattr(head, "packed", None), embedding.packed)
    return _same_storage(getattr(head, "weight", None), getattr(embedding, "weight", None))


def quantize_weight_for(choice: Choice, weight: torch.Tensor) -> QuantizedWeight:
    """Quantize a table or head weight [N, K] as ``choice`` says, without calibration data:
    round-to-nearest with the choice's observer; GPTQ and sparsity need activations and are
    refused here."""
    if choice.pattern is not SparsityPattern.NONE:
        raise ValueError("an embedding or head weight is quantized without pruning here; use apply() to prune a head")
    if choice.method is not QuantMethod.RTN:
        raise ValueError(f"method {choice.method.value!r} needs calibration statistics; an embedding is quantized "
                         f"with 'rtn'")
    return quantize_observed(weight, choice.bits, choice.group_size, choice.observer.value)


@torch.no_grad()
def embedding_replacements(model: nn.Module, unit: str, choice: Choice) -> dict[str, nn.Module]:
    """The modules that compress ``unit`` as ``choice`` says, by path; ``model`` is untouched.

    ``unit`` is the token embedding (a :class:`QuantEmbedding`, plus a :class:`TiedQuantLinear`
    for a tied head) or an untied head (a :class:`~.quantize.QuantLinear`, RTN). A choice that
    does not quantize gives ``{}``. :func:`quantize_embeddings_` puts exactly these modules in
    place, so a search that swaps them in measures what ``apply`` ships.
    """
    adapter = adapter_for(model)
    name, head_name = adapter.embeddings[0], adapter.lm_head
    if unit not in (name, head_name):
        raise ValueError(f"{unit!r} is neither the token embedding {name!r} nor the head {head_name!r}")
    tied = head_is_tied(model)
    if unit == head_name and tied:
        raise ValueError(f"the output head is tied to the embedding: quantize the unit {name!r}, which covers both")
    if choice.pattern is not SparsityPattern.NONE:
        raise ValueError(f"{unit}: pruning is not done here; apply() prunes an untied head")
    if not choice.quantized:
        return {}
    head = model.get_submodule(head_name)
    if choice.gguf is not None:
        return _gguf_replacements(model, unit, choice, tied)
    if unit == head_name:
        return {head_name: QuantLinear.from_quantized(quantize_weight_for(choice, head.weight), head.bias)}
    embedding = QuantEmbedding.from_embedding(model.get_submodule(name), choice)
    if not tied:
        return {name: embedding}
    return {name: embedding, head_name: TiedQuantLinear(embedding, getattr(head, "bias", None))}


def _gguf_replacements(model: nn.Module, unit: str, choice: Choice, tied: bool) -> dict[str, nn.Module]:
    """The GGUF-block modules of :func:`embedding_replacements` (no importance: the table has no inputs)."""
    adapter = adapter_for(model)
    name, head_name = adapter.embeddings[0], adapter.lm_head
    head = model.get_submodule(head_name)
    if unit == head_name:
        return {head_name: GGUFLinear.from_weight(head.weight, choice.gguf, head.bias)}
    embedding = GGUFEmbedding.from_embedding(model.get_submodule(name), choice.gguf)
    if not tied:
        return {name: embedding}
    return {name: embedding, head_name: TiedGGUFLinear(embedding, getattr(head, "bias", None))}


@torch.no_grad()
def quantize_embeddings_(model: nn.Module, embed_choice: Choice | None, head_choice: Choice | None) -> None:
    """Quantize the token embedding and the output head of ``model`` in place.

    A quantizing ``embed_choice`` turns the embedding into a :class:`QuantEmbedding`; when the
    head is tied, the head becomes a :class:`TiedQuantLinear` on the same codes (and
    ``head_choice`` must be None: the embedding unit covers it). An untied head is quantized
    by ``head_choice`` (RTN). ``config.tie_word_embeddings`` becomes False once either is
    quantized, so rebuilding from the config makes no tie of its own (the saved record
    restores the shared codes).
    """
    adapter = adapter_for(model)
    replacements = {}
    if head_choice is not None and head_choice.changes_weights:
        replacements.update(embedding_replacements(model, adapter.lm_head, head_choice))
    if embed_choice is not None:
        replacements.update(embedding_replacements(model, adapter.embeddings[0], embed_choice))
    for path, module in replacements.items():
        set_submodule(model, path, module)
    if replacements:
        model.config.tie_word_embeddings = False


__all__ = ["QuantEmbedding", "TiedQuantLinear", "embedding_replacements", "embedding_scale", "embedding_unit",
           "head_is_tied", "quantize_weight_for", "quantize_embeddings_"]
