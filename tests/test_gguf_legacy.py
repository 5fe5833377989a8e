"""llama.cpp legacy block types through the gguf package: exact sizes and faithful reconstruction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from autocompress.compress.gguf_legacy import GGUF_LEGACY, gguf_fake_quantize, gguf_tensor_bytes


def gaussian(n: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=generator) * 0.02


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("type_name", GGUF_LEGACY)
def test_bytes_match_what_gguf_writes(type_name):
    weight = gaussian(64, 576)
    blob = quantize(weight.numpy(), GGMLQuantizationType[type_name])
    assert blob.dtype == np.uint8
    assert gguf_tensor_bytes((64, 576), type_name) == blob.nbytes
    assert gguf_tensor_bytes(torch.Size([2, 64, 576]), type_name) == 2 * blob.nbytes


def test_bytes_per_weight_order_and_errors():
    sizes = [gguf_tensor_bytes((1, 32), name) for name in GGUF_LEGACY]
    assert sizes == [34, 24, 22, 20, 18]
    with pytest.raises(ValueError, match="divisible by 32"):
        gguf_tensor_bytes((64, 100), "Q4_0")
    with pytest.raises(ValueError, match="unknown GGUF legacy type"):
        gguf_tensor_bytes((64, 64), "Q4_K")
    with pytest.raises(ValueError, match="divisible by 32"):
        gguf_fake_quantize(torch.zeros(2, 48), "Q8_0")


@pytest.mark.parametrize("type_name", GGUF_LEGACY)
def test_fake_quantize_keeps_shape_and_dtype(type_name):
    weight = gaussian(8, 96).to(torch.bfloat16)
    dense = gguf_fake_quantize(weight, type_name)
    assert dense.shape == weight.shape and dense.dtype == torch.float32
    # Idempotent: a reconstructed weight is already on its own grid (up to the fp32 reciprocal).
    assert relative_error(gguf_fake_quantize(dense, type_name), dense) < 1e-3


def test_q8_0_round_trip_is_tiny_and_q4_0_is_coarser():
    weight = gaussian(64, 576)
    errors = {name: relative_error(gguf_fake_quantize(weight, name), weight) for name in GGUF_LEGACY}
    assert errors["Q8_0"] < 0.01
    assert errors["Q4_0"] > 4 * errors["Q8_0"]
    assert errors["Q5_1"] < errors["Q4_1"] and errors["Q5_0"] < errors["Q4_0"]


def test_q4_1_reproduces_a_weight_on_its_grid():
    # Per block of 32: m + d * q with q in [0, 15] (both ends present), d and m exact in fp16.
    generator = torch.Generator().manual_seed(1)
    n, k = 16, 256
    blocks = k // 32
    d = torch.randint(1, 64, (n, blocks, 1), generator=generator).float() * 2.0 ** -12
    m = -torch.randint(0, 512, (n, blocks, 1), generator=generator).float() * 2.0 ** -12
    q = torch.randint(0, 16, (n, blocks, 32), generator=generator).float()
    q[..., 0], q[..., 1] = 0.0, 15.0
    weight = (m + d * q).reshape(n, k)
    assert torch.equal(gguf_fake_quantize(weight, "Q4_1"), weight)
