"""Low-bit matmul kernels: Triton (interpreted on CPU) against the PyTorch reference, the
reference against a hand-written dequantization, and the dispatcher's choices and errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernel_cases
from autocompress.compress.quantize import QuantLinear, quantize_linear, quantize_rtn
from autocompress.kernels import _triton_guard as guard
from autocompress.kernels import SUPPORTED_BITS, dequantize, pack, packed_nbytes, quant_matmul, select_backend, unpack
from autocompress.kernels.reference import dequantize_fp32, gemm_reference, splitk_reference, unpack_codes

# --- Triton under the interpreter (one subprocess for every case) ---------------------------


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    """Run tests/kernel_cases.py once with TRITON_INTERPRET=1; results keyed by case id."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(kernel_cases.__file__))], env=env,
                          capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    fatal = [r["fatal"] for r in records if "fatal" in r]
    if proc.returncode != 0 or fatal:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}): {fatal or ''}\n{proc.stderr[-3000:]}")
    return {r["id"]: r for r in records}


def _result(results: dict[str, dict], case: str) -> float:
    assert case in results, f"case {case} produced no result"
    record = results[case]
    assert "exception" not in record, record.get("exception")
    return record["error"]


@pytest.mark.parametrize("case", kernel_cases.case_ids())
def test_triton_matches_reference(interpreter_results, case):
    assert _result(interpreter_results, case) <= kernel_cases.TOLERANCE


def test_interpreter_end_to_end(interpreter_results):
    assert _result(interpreter_results, "auto_backend_is_triton") == 1.0  # auto picks Triton when interpreting
    assert _result(interpreter_results, "leading_dims") <= kernel_cases.TOLERANCE
    assert _result(interpreter_results, "quantlinear_m3") <= kernel_cases.TOLERANCE
    assert _result(interpreter_results, "quantlinear_m33") <= kernel_cases.TOLERANCE
    assert _result(interpreter_results, "strided_m5") <= kernel_cases.TOLERANCE
    assert _result(interpreter_results, "strided_m20") <= kernel_cases.TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the interpreter cases run on CPU)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", kernel_cases.BITS)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_triton_on_cuda_matches_reference(dtype, bits, rows):
    """The compiled, autotuned kernels on a GPU (bf16 included, which the interpreter gets wrong)."""
    packed, scales, zeros = (t.cuda() for t in kernel_cases.random_weight(1000, 1100, bits, 128, dtype, seed=bits))
    x = torch.randn(rows, 1100, device="cuda").to(dtype)
    got = quant_matmul(x, packed, scales, zeros, bits, 128, 1100)
    want = quant_matmul(x, packed, scales, zeros, bits, 128, 1100, backend="reference")
    # bf16 keeps 8 mantissa bits: rounding W and y alone costs a few 1e-3.
    tolerance = 1e-2 if dtype == torch.bfloat16 else kernel_cases.TOLERANCE
    assert got.dtype == dtype
    assert kernel_cases.relative_error(got, want) <= tolerance


# --- the reference, in process --------------------------------------------------------------


def _handmade_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """W[n, k] = (q - z) * s written out element by element, independent of packing.dequantize."""
    n, k = codes.shape
    weight = torch.empty(n, k)
    for row in range(n):
        for col in range(k):
            g = col // group
            weight[row, col] = (float(codes[row, col]) - float(zeros[row, g])) * float(scales[row, g])
    return weight


@pytest.mark.parametrize("bits", kernel_cases.BITS)
@pytest.mark.parametrize("group", [4, 16])
def test_reference_matches_handmade_dequantization(bits, group):
    n, k = 5, 27  # odd K: a narrower last group and (for 3, 5, 6 bits) a row ending mid-byte
    _, scales, zeros = kernel_cases.random_weight(n, k, bits, group, torch.float16, seed=bits * 100 + group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack(codes, bits)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    want = x.double() @ _handmade_weight(codes, scales, zeros, group).double().t()
    for twin in (gemm_reference, splitk_reference):
        got = twin(x, packed, scales, zeros, bits, group, k)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), twin.__name__


@pytest.mark.parametrize("bits", kernel_cases.BITS)
@pytest.mark.parametrize("n, k, group", [(6, 256, 128), (5, 333, 64), (3, 77, 77), (4, 13, 32)])
def test_reference_dequantization_is_bitwise_packing_dequantize(bits, n, k, group):
    packed, scales, zeros = kernel_cases.random_weight(n, k, bits, group, torch.float16, seed=n * k + bits)
    assert torch.equal(unpack_codes(packed, bits, k), unpack(packed, bits, k))
    assert torch.equal(dequantize_fp32(packed, scales, zeros, bits, group, k),
                       dequantize(packed, scales, zeros, bits, group, k))


def test_supported_bits_are_the_tested_ones():
    assert SUPPORTED_BITS == kernel_cases.BITS == (2, 3, 4, 5, 6, 8)


@pytest.mark.parametrize("bits", kernel_cases.BITS)
@pytest.mark.parametrize("k", [1, 5, 8, 13, 27, 333])
def test_pack_unpack_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (7, k), generator=torch.Generator().manual_seed(bits * 1000 + k),
                          dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (7, -(-k * bits // 8))
    assert torch.equal(unpack(packed, bits, k), codes)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@pytest.mark.parametrize("bits, k, stream", [
    # Bit streams written by hand: element j at bits [j*b, (j+1)*b), little-endian.
    (5, 8, [0b00100001, 0b00001100, 0b01010010, 0b11010000, 0b11111011]),  # codes 1, 1, 3, 4, 5, 8, 15, 31
    (5, 2, [0b11111111, 0b00000011]),                                     # codes 31, 31
    (6, 4, [0b01000001, 0b00110000, 0b11111100]),                          # codes 1, 1, 3, 63
    (6, 3, [0b00000010, 0b11110000, 0b00000011]),                          # codes 2, 0, 63
])
def test_5_and_6_bit_streams_by_hand(bits, k, stream):
    codes = {(5, 8): [1, 1, 3, 4, 5, 8, 15, 31], (5, 2): [31, 31], (6, 4): [1, 1, 3, 63], (6, 3): [2, 0, 63]}
    want = torch.tensor([codes[bits, k]], dtype=torch.uint8)
    packed = torch.tensor([stream], dtype=torch.uint8)
    assert torch.equal(pack(want, bits), packed)
    assert torch.equal(unpack(packed, bits, k), want)
    assert torch.equal(unpack_codes(packed, bits, k), want)


@pytest.mark.parametrize("bits", kernel_cases.BITS)
@pytest.mark.parametrize("n, k, group", [(6, 256, 128), (5, 333, 64), (3, 77, 77)])
def test_packed_nbytes_is_the_tensor_bytes(bits, n, k, group):
    packed, scales, zeros = kernel_cases.random_weight(n, k, bits, group, torch.float16, seed=bits)
    actual = sum(t.numel() * t.element_size() for t in (packed, scales, zeros))
    assert packed_nbytes(n, k, bits, group) == actual


def test_splitk_twin_sums_to_gemm_twin():
    packed, scales, zeros = kernel_cases.random_weight(33, 517, 3, 64, torch.float16, seed=3)
    x = torch.randn(5, 517, generator=torch.Generator().manual_seed(4))
    for split in (1, 2, 3, 7):
        got = splitk_reference(x, packed, scales, zeros, 3, 64, 517, split_k=split)
        assert kernel_cases.relative_error(got, gemm_reference(x, packed, scales, zeros, 3, 64, 517)) < 1e-6


def test_reference_half_inputs_accumulate_in_fp32():
    packed, scales, zeros = kernel_cases.random_weight(16, 4096, 4, 128, torch.float16, seed=5)
    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(6)).half()
    got = quant_matmul(x, packed, scales, zeros, 4, 128, 4096, backend="reference")
    exact = x.double() @ dequantize(packed, scales, zeros, 4, 128, 4096, torch.float64).t()
    assert got.dtype == torch.float16
    assert kernel_cases.relative_error(got, exact) < 1e-3  # only the final fp16 rounding


def test_quantlinear_forward_is_dequantize_then_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 48, bias=True)
    module = quantize_linear(linear, bits=3, group_size=64)
    x = torch.randn(2, 5, 200)
    want = x @ module.dequantized_weight().t() + module.bias
    assert torch.equal(module(x), want)  # the CPU path is bit-for-bit the old one in fp32
    assert kernel_cases.relative_error(module(x), linear(x)) < 0.2  # and still close to the dense layer


# --- the dispatcher -------------------------------------------------------------------------


def _small_weight(bits=4, group=32, n=8, k=64):
    q = quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), bits, group)
    return q.packed, q.scales, q.zeros


def test_auto_backend_on_cpu():
    expected = "triton" if guard.TRITON_AVAILABLE and guard.INTERPRET else "reference"
    assert select_backend(torch.zeros(2, 3)) == expected
    if torch.cuda.is_available() and guard.TRITON_AVAILABLE:
        assert select_backend(torch.zeros(2, 3, device="cuda")) == "triton"


def test_explicit_triton_on_cpu_without_interpreter_is_a_clear_error():
    if guard.INTERPRET:
        pytest.fail("run the in-process tests without TRITON_INTERPRET=1 (the interpreter cases set it themselves)")
    packed, scales, zeros = _small_weight()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|failed to import"):
        quant_matmul(torch.randn(2, 64), packed, scales, zeros, 4, 32, 64, backend="triton")


def test_explicit_reference_override():
    packed, scales, zeros = _small_weight()
    x = torch.randn(4, 64)
    got = quant_matmul(x, packed, scales, zeros, 4, 32, 64, backend="reference")
    assert torch.equal(got, gemm_reference(x, packed, scales, zeros, 4, 32, 64))


@pytest.mark.parametrize("change, message", [
    ({"bits": 7}, "bits must be one of"),
    ({"in_features": 65}, "last dimension"),
    ({"x": torch.randn(2, 63)}, "last dimension"),
    ({"group_size": 16}, "scales must have shape"),
    ({"group_size": 0}, "must be positive"),
    ({"packed": torch.zeros(8, 31, dtype=torch.uint8)}, "packed rows hold 31 bytes"),
    ({"packed": torch.zeros(8, 32, dtype=torch.int32)}, "2-D uint8"),
    ({"scales": torch.ones(8, 1, dtype=torch.float16)}, "scales must have shape"),
    ({"x": torch.zeros(2, 64, dtype=torch.int64)}, "x must be fp16, bf16 or fp32"),
    ({"backend": "cuda"}, "backend must be one of"),
])
def test_bad_arguments_raise_clear_value_errors(change, message):
    packed, scales, zeros = _small_weight()
    args = {"x": torch.randn(2, 64), "packed": packed, "scales": scales, "zeros": zeros,
            "bits": 4, "group_size": 32, "in_features": 64, "backend": "reference"}
    args.update(change)
    if "in_features" in change:
        args["x"] = torch.randn(2, 64)
    with pytest.raises(ValueError, match=message):
        quant_matmul(**args)


def test_quantlinear_uses_the_dispatcher():
    module = QuantLinear(64, 8, bits=4, group_size=32)
    packed, scales, zeros = _small_weight()
    module.packed.copy_(packed)
    module.scales.copy_(scales)
    module.zeros.copy_(zeros)
    x = torch.randn(3, 64)
    assert torch.equal(module(x), quant_matmul(x, packed, scales, zeros, 4, 32, 64))


# --- the GPU path compiles (no GPU needed: Triton's ahead-of-time compiler and its bundled ptxas) --


@pytest.mark.parametrize("kernel, bits, dtype, group, planes", [
    ("gemm", 3, "fp16", 32, False), ("gemm", 4, "bf16", 128, True),
    ("splitk", 4, "bf16", 128, False), ("splitk", 3, "fp16", 64, True),
    ("gemm", 5, "fp16", 128, True), ("splitk", 6, "bf16", 32, True),
    ("gemm", 6, "bf16", 64, False), ("splitk", 5, "fp16", 128, False),
])
def test_kernels_compile_for_hopper(kernel, bits, dtype, group, planes):
    """Lowering to sm_90 machine code catches what the interpreter cannot (layouts, dot shapes, dtypes)."""
    if guard.INTERPRET:
        pytest.fail("run the in-process tests without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from autocompress.kernels import triton_kernels

    fn = triton_kernels._gemm_kernel if kernel == "gemm" else triton_kernels._splitk_kernel
    configs = triton_kernels._GEMM_CONFIGS if kernel == "gemm" else triton_kernels._SPLITK_CONFIGS
    config = next(c for c in configs if c.kwargs["PLANES"] == planes)
    constants = {**config.kwargs, "BITS": bits, "GROUP_SIZE": group, "IEEE_FP32": False}
    if kernel == "splitk":
        constants["BLOCK_M"] = triton_kernels.DECODE_MAX_M
    pointers = {"x_ptr": f"*{dtype}", "packed_ptr": "*u8", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
                "out_ptr": "*fp32" if kernel == "splitk" else f"*{dtype}"}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    assert len(compiled.asm["cubin"]) > 10_000
    assert "mma" in compiled.asm["ptx"]  # the dot became tensor-core instructions
