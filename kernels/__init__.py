"""Low-bit matmul kernels (installed as ``autocompress.kernels``).

``packing`` holds the one storage format shared with the quantizer; ``quant_matmul`` computes
``x @ dequant(W).T`` on it (Triton on CUDA or under ``TRITON_INTERPRET=1``, PyTorch otherwise).
"""
from .dispatch import quant_matmul, select_backend
from .packing import SUPPORTED_BITS, dequantize, pack, packed_nbytes, unpack

__all__ = ["SUPPORTED_BITS", "dequantize", "pack", "packed_nbytes", "quant_matmul", "select_backend", "unpack"]
