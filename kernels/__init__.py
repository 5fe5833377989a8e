"""Low-bit matmul kernels (installed as ``autocompress.kernels``).

``packing`` holds the one storage format shared with the quantizer.
"""
from .packing import SUPPORTED_BITS, dequantize, pack, packed_nbytes, unpack

__all__ = ["SUPPORTED_BITS", "dequantize", "pack", "packed_nbytes", "unpack"]
