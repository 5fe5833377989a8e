"""Packing format, round-to-nearest, GPTQ and QuantLinear."""
from __future__ import annotations

import math

import pytest
import torch

from autocompress.compress.gptq import gptq_quantize
from autocompress.compress.quantize import QuantLinear, quantize_linear, quantize_rtn
from autocompress.kernels import packing

BITS = (2, 3, 4, 8)


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented format, written the slow way: each row a little-endian bit stream."""
    rows = []
    nbytes = math.ceil(codes.shape[1] * bits / 8)
    for row in codes.tolist():
        stream = sum(int(code) << (k * bits) for k, code in enumerate(row))
        rows.append(list(stream.to_bytes(nbytes, "little")))
    return torch.tensor(rows, dtype=torch.uint8).reshape(codes.shape[0], nbytes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (1, 77), (3, 576), (2, 8), (5, 1536)])
def test_packing_round_trips_and_matches_the_documented_bit_layout(bits, n, k):
    generator = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (n, k), generator=generator, dtype=torch.uint8)
    codes[0, 0] = (1 << bits) - 1  # the top code, whose high bit lands in the sign of a 64-bit word
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, math.ceil(k * bits / 8))
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(packing.unpack(packed, bits, k), codes)


def test_unpack_refuses_a_row_of_the_wrong_length():
    with pytest.raises(ValueError, match="expected 3"):
        packing.unpack(torch.zeros(2, 4, dtype=torch.uint8), 3, 8)


@pytest.mark.parametrize("group_size,k", [(32, 576), (64, 576), (128, 576), (128, 77), (576, 576), (64, 5)])
def test_dequantize_uses_the_narrow_last_group(group_size, k):
    n, bits = 3, 4
    generator = torch.Generator().manual_seed(k + group_size)
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    groups = packing.num_groups(k, group_size)
    assert groups == -(-k // group_size)
    scales = (torch.rand(n, groups, generator=generator) + 0.1).half()
    zeros = torch.randint(0, 16, (n, groups), generator=generator).half()
    dense = packing.dequantize(packing.pack(codes, bits), scales, zeros, bits, group_size, k)
    for row in range(n):
        for col in (0, k - 1, min(k - 1, group_size), k // 2):
            g = col // group_size
            expected = (codes[row, col].item() - zeros[row, g].item()) * scales[row, g].item()
            assert dense[row, col].item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_rtn_error_is_at_most_half_a_step(bits, group_size):
    torch.manual_seed(bits)
    weight = torch.randn(24, 576) * torch.rand(24, 1) * 0.1
    weight[0, :7] = 0.05  # a constant run inside a group
    q = quantize_rtn(weight, bits, group_size)
    g = 576 if group_size is None else group_size
    assert q.group_size == g and q.scales.shape == (24, -(-576 // g)) and q.scales.dtype == torch.float16
    assert q.packed.shape == (24, math.ceil(576 * bits / 8))
    step = q.scales.float().repeat_interleave(g, dim=1)[:, :576]
    error = (weight - q.dequantize()).abs()
    assert (error <= step / 2 * (1 + 1e-4) + 1e-7).all(), (error / step).max()
    codes = packing.unpack(q.packed, bits, 576)
    assert int(codes.max()) <= (1 << bits) - 1
    # Each group's range spans the codes: its minimum maps to code 0, its maximum to the top
    # code (one below when the fp16 scale was rounded up).
    per_group = codes[:, : (576 // g) * g].reshape(24, -1, g)
    assert (per_group.amin(dim=-1) == 0).all()
    assert (per_group.amax(dim=-1) >= (1 << bits) - 2).all()


def test_rtn_keeps_pruned_weights_exactly_zero():
    torch.manual_seed(0)
    weight = torch.randn(8, 100) + 3.0  # all positive: zero lies outside the natural range
    mask = torch.rand(8, 100) < 0.5
    dense = quantize_rtn(weight, 3, 32, mask).dequantize()
    assert (dense[mask] == 0).all()
    assert (dense[~mask] != 0).float().mean() > 0.95


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, 128), (8, None)])
def test_quant_linear_equals_dequantize_then_matmul(bits, group_size):
    torch.manual_seed(1)
    linear = torch.nn.Linear(200, 48, bias=True)
    module = quantize_linear(linear, bits, group_size)
    assert isinstance(module, QuantLinear) and module.in_features == 200 and module.out_features == 48
    x = torch.randn(2, 7, 200)
    reference = x @ module.dequantized_weight().t() + module.bias
    out = module(x)
    assert out.shape == (2, 7, 48)
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
    # and it is close to the original layer, more so with more bits
    relative = (out - linear(x)).norm() / linear(x).norm()
    assert relative < {2: 0.8, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


def correlated_layer(k: int = 256, n: int = 64, tokens: int = 4096, seed: int = 0):
    """A weight and inputs with strongly correlated, unevenly scaled features (like real activations)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, k // 8, generator=generator)
    mixing = torch.randn(k // 8, k, generator=generator)
    x = latent @ mixing + 0.1 * torch.randn(tokens, k, generator=generator)
    x = x * torch.logspace(-1, 1, k)[torch.randperm(k, generator=generator)]
    weight = torch.randn(n, k, generator=generator) * 0.05
    hessian = 2 * x.t() @ x / tokens
    return weight, x, hessian


def output_error(weight: torch.Tensor, dense: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (weight - dense).t()).pow(2).sum() / (x @ weight.t()).pow(2).sum()).item()


@pytest.mark.parametrize("bits,group_size", [(3, 128), (4, 128), (3, None), (2, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    weight, x, hessian = correlated_layer()
    rtn = output_error(weight, quantize_rtn(weight, bits, group_size).dequantize(), x)
    gptq = output_error(weight, gptq_quantize(weight, hessian, bits, group_size).dequantize(), x)
    ordered = gptq_quantize(weight, hessian, bits, group_size, act_order=True)
    assert ordered.scales.shape == (64, -(-256 // (group_size or 256)))
    act = output_error(weight, ordered.dequantize(), x)
    assert gptq < 0.5 * rtn, (gptq, rtn)
    assert act < 0.5 * rtn, (act, rtn)


def test_gptq_with_narrow_last_group_and_dead_inputs():
    weight, x, _ = correlated_layer(k=200)
    x[:, 5] = 0.0  # an input that never fires
    hessian = 2 * x.t() @ x / x.shape[0]
    q = gptq_quantize(weight, hessian, 4, 128)
    assert q.scales.shape == (64, 2)
    dense = q.dequantize()
    assert (dense[:, 5] == 0).all()
    assert output_error(weight, dense, x) < 0.5 * output_error(weight, quantize_rtn(weight, 4, 128).dequantize(), x)


def test_gptq_honours_a_pruning_mask():
    weight, x, hessian = correlated_layer()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask.view(64, -1, 4)[:, :, :2] = True  # 2:4
    for act_order in (False, True):
        dense = gptq_quantize(weight, hessian, 4, 64, mask=mask, act_order=act_order).dequantize()
        assert (dense[mask] == 0).all()
        masked = weight.masked_fill(mask, 0)
        rtn = quantize_rtn(masked, 4, 64, mask).dequantize()
        # GPTQ compensates the pruning error too, so it ends closer to the dense layer
        assert output_error(weight, dense, x) < output_error(weight, rtn, x)
