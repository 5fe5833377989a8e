"""The one entry point for low-bit matmuls: check the arguments, pick a backend, run it.

Backends:

* ``"triton"``: :mod:`.triton_kernels` (split-K for M <= 16 rows, tiled GEMM above). Runs on
  CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before import.
* ``"reference"``: :mod:`.reference`, plain PyTorch (dequantize, then an fp32 matmul).

``backend=None`` chooses per call from the tensors and the read-only flags of
:mod:`._triton_guard`; there is no process-wide switch. Tests pass ``backend=`` explicitly.
"""
from __future__ import annotations

import torch

from . import _triton_guard as guard
from .packing import SUPPORTED_BITS, num_groups, packed_row_bytes
from .reference import DECODE_MAX_M, gemm_reference, splitk_reference

BACKENDS = ("reference", "triton")


def select_backend(x: torch.Tensor) -> str:
    """The backend ``quant_matmul(x, ...)`` uses when none is named."""
    if guard.TRITON_AVAILABLE and (guard.INTERPRET or x.is_cuda):
        return "triton"
    return "reference"


def _check(x, packed, scales, zeros, bits, group_size, in_features):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if in_features <= 0 or group_size <= 0:
        raise ValueError(f"in_features and group_size must be positive, got {in_features} and {group_size}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, the weight expects {in_features}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.shape[1] != packed_row_bytes(in_features, bits):
        raise ValueError(f"packed rows hold {packed.shape[1]} bytes, expected "
                         f"{packed_row_bytes(in_features, bits)} for {in_features} values at {bits} bits")
    expected = (packed.shape[0], num_groups(in_features, group_size))
    for name, tensor in (("scales", scales), ("zeros", zeros)):
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} (out_features, groups), got {tuple(tensor.shape)}")
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {tensor.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    devices = {t.device for t in (x, packed, scales, zeros)}
    if len(devices) > 1:
        raise ValueError(f"x, packed, scales and zeros must be on one device, got {sorted(map(str, devices))}")


def quant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group_size: int, in_features: int, *, backend: str | None = None) -> torch.Tensor:
    """``x @ dequant(W).T`` for a packed weight W [N, K]; ``x`` is [..., K], the result [..., N].

    The weight is in the format of :mod:`.packing` (``packed`` uint8 [N, ceil(K*bits/8)],
    ``scales``/``zeros`` [N, ceil(K/group_size)]). Accumulation is fp32; the result has
    ``x.dtype``. ``backend`` is ``"triton"``, ``"reference"`` or None (automatic, see
    :func:`select_backend`). Raises ValueError for inconsistent shapes, types or backends.

    Example::

        q = quantize_rtn(linear.weight, bits=4, group_size=128)
        y = quant_matmul(x, q.packed, q.scales, q.zeros, 4, q.group_size, q.in_features)
    """
    _check(x, packed, scales, zeros, bits, group_size, in_features)
    chosen = select_backend(x) if backend is None else backend
    if chosen not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if chosen == "reference":
        out = gemm_reference(x2d, packed, scales, zeros, bits, group_size, in_features)
        return out.reshape(*lead, packed.shape[0])
    if not guard.TRITON_AVAILABLE:
        raise ValueError(f"backend 'triton' needs Triton, which failed to import ({guard.TRITON_IMPORT_ERROR})")
    if not (x.is_cuda or guard.INTERPRET):
        raise ValueError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                         "autocompress for CPU tensors; use backend='reference' on CPU")
    from . import triton_kernels  # noqa: PLC0415  (imports triton; only reached where it is available)

    if x2d.shape[0] == 0:
        return x.new_zeros(*lead, packed.shape[0])
    kernel = triton_kernels.splitk if x2d.shape[0] <= DECODE_MAX_M else triton_kernels.gemm
    # x may have any strides; packed rows are read as byte streams and zeros use the scales' strides.
    out = kernel(x2d, packed.contiguous(), scales.contiguous(), zeros.contiguous(), bits, group_size, in_features)
    return out.reshape(*lead, packed.shape[0])


def quant_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """The reference twin of :func:`quant_matmul` for the same rows: split-K's for M <= 16, else GEMM's."""
    _check(x, packed, scales, zeros, bits, group_size, in_features)
    x2d = x.reshape(-1, in_features)
    twin = splitk_reference if x2d.shape[0] <= DECODE_MAX_M else gemm_reference
    return twin(x2d, packed, scales, zeros, bits, group_size, in_features).reshape(*x.shape[:-1], packed.shape[0])
