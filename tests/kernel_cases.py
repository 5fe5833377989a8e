"""Kernel-vs-reference cases, run by tests/test_kernels.py in a subprocess under TRITON_INTERPRET=1.

Triton decides between compiling and interpreting when a kernel is decorated, so the
variable must be set before the first import; a fresh process is the only clean way. The
process runs every case and prints one JSON object per line (a case's id and its relative
error, or the error it raised); the test file turns each line into one test.

Run by hand: ``TRITON_INTERPRET=1 .venv/bin/python tests/kernel_cases.py``.
"""
from __future__ import annotations

import itertools
import json
import sys
import traceback

import torch

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128, None)  # None: per-channel (one group spanning K)
ROWS = (1, 7, 64)  # decode (split-K) for 1 and 7, tiled GEMM for 64
# (N, K, x dtype, scale dtype): K and N are not multiples of the 64-wide interpreter blocks;
# K % 128 != 0 leaves a narrower last group, and 333 * 3 (or 5, 6) bits ends mid-byte.
SHAPES = ((72, 200, torch.float32, torch.float16), (130, 333, torch.float16, torch.bfloat16))
TOLERANCE = 1e-3


UNPACK = ("gather", "planes")  # the two ways the kernels take codes out of the bytes


def cases() -> list[tuple]:
    """Every case the subprocess runs: (bits, group, rows, shape index, unpack)."""
    return list(itertools.product(BITS, GROUPS, ROWS, range(len(SHAPES)), UNPACK))


def case_ids() -> list[str]:
    """The ids of :func:`cases`, in order."""
    return [case_id(*combo) for combo in cases()]


def case_id(bits: int, group: int | None, rows: int, shape: int, unpack: str) -> str:
    """A readable test id such as ``b3-g128-m7-n130k333-planes``."""
    n, k = SHAPES[shape][:2]
    return f"b{bits}-g{group or 'K'}-m{rows}-n{n}k{k}-{unpack}"


def random_weight(n: int, k: int, bits: int, group: int, scale_dtype: torch.dtype, seed: int):
    """Random codes (every value in range), scales and integer zeros in the packing format."""
    from autocompress.kernels import pack
    from autocompress.kernels.packing import num_groups

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    groups = num_groups(k, group)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).to(scale_dtype)
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).to(scale_dtype)
    return pack(codes, bits), scales, zeros


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Frobenius-norm relative error in fp32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def run_case(bits: int, group: int | None, rows: int, shape: int, unpack: str) -> float:
    """Relative error of the Triton backend against the reference twin for one case.

    ``gather`` goes through the dispatcher (the interpreter's default configuration);
    ``planes`` calls the kernel's launcher with the byte-plane unpacking forced.
    """
    from autocompress.kernels import quant_matmul, triton_kernels
    from autocompress.kernels.dispatch import quant_matmul_reference

    n, k, x_dtype, scale_dtype = SHAPES[shape]
    g = k if group is None else group
    seed = hash((bits, g, rows, shape)) % (2**31)
    packed, scales, zeros = random_weight(n, k, bits, g, scale_dtype, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    if unpack == "gather":
        got = quant_matmul(x, packed, scales, zeros, bits, g, k, backend="triton")
    elif rows <= triton_kernels.DECODE_MAX_M:
        config = {**triton_kernels.INTERPRET_SPLITK, "PLANES": True}
        got = triton_kernels.splitk(x, packed, scales, zeros, bits, g, k, config=config)
    else:
        config = {**triton_kernels.INTERPRET_GEMM, "PLANES": True}
        got = triton_kernels.gemm(x, packed, scales, zeros, bits, g, k, config=config)
    want = quant_matmul_reference(x, packed, scales, zeros, bits, g, k)
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}")
    return relative_error(got, want)


def run_extras() -> dict[str, float]:
    """End-to-end checks: leading batch dims, automatic choice, QuantLinear through the dispatcher."""
    from autocompress.compress.quantize import quantize_linear
    from autocompress.kernels import quant_matmul, select_backend
    from autocompress.kernels.dispatch import quant_matmul_reference

    out = {"auto_backend_is_triton": float(select_backend(torch.zeros(1)) == "triton")}
    packed, scales, zeros = random_weight(40, 96, 3, 32, torch.float16, seed=7)
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(8))
    got = quant_matmul(x, packed, scales, zeros, 3, 32, 96)
    out["leading_dims"] = relative_error(got, quant_matmul_reference(x, packed, scales, zeros, 3, 32, 96))
    # Strided inputs: x a transposed view, packed a column slice, scales column-major.
    wide = torch.zeros(40, 200, dtype=torch.uint8)
    wide[:, :packed.shape[1]] = packed
    x_t = torch.randn(96, 20, generator=torch.Generator().manual_seed(10)).t()
    col_scales = scales.t().contiguous().t()
    for rows in (5, 20):
        got = quant_matmul(x_t[:rows], wide[:, :packed.shape[1]], col_scales, zeros, 3, 32, 96)
        want = quant_matmul_reference(x_t[:rows].contiguous(), packed, scales, zeros, 3, 32, 96)
        out[f"strided_m{rows}"] = relative_error(got, want)
    torch.manual_seed(9)
    linear = torch.nn.Linear(150, 70, bias=True)
    module = quantize_linear(linear, bits=4, group_size=64)
    for rows in (3, 33):
        x = torch.randn(rows, 150)
        want = x @ module.dequantized_weight().t() + module.bias
        out[f"quantlinear_m{rows}"] = relative_error(module(x).detach(), want.detach())
    return out


def main() -> int:
    """Run every case; one JSON line each. Exit 1 when Triton is missing or not interpreting."""
    from autocompress.kernels import _triton_guard as guard

    if not guard.TRITON_AVAILABLE:
        print(json.dumps({"fatal": f"triton did not import: {guard.TRITON_IMPORT_ERROR}"}))
        return 1
    if not guard.INTERPRET:
        print(json.dumps({"fatal": "TRITON_INTERPRET=1 was not set before import"}))
        return 1
    torch.set_num_threads(1)
    for combo in cases():
        record = {"id": case_id(*combo)}
        try:
            record["error"] = run_case(*combo)
        except Exception:  # reported per case, so one failure does not hide the rest
            record["exception"] = traceback.format_exc(limit=3)
        print(json.dumps(record), flush=True)
    try:
        for name, value in run_extras().items():
            print(json.dumps({"id": name, "error": value}), flush=True)
    except Exception:
        print(json.dumps({"id": "extras", "exception": traceback.format_exc(limit=3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
