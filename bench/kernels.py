"""Low-bit matmul speed: packed 2/3/4/5/6/8-bit weights against a dense 16-bit ``torch.matmul``.

For each weight shape (K -> N), row count M and bit width it prints the median time, the
effective bandwidth (bytes the call must move: packed codes, scales, zeros, x and y, over
time), the speedup over the dense matmul, and the memory-bound ceiling of that speedup
(dense bytes over packed bytes). Then the whole SmolLM2-135M decode step (batch 1, KV cache)
in tokens/s, dense vs uniformly quantized.

On a GPU: fp16, the Triton kernels (autotuned during warmup), CUDA-event timing with the L2
cache flushed before every call, SmolLM2's shapes plus 4096x4096, 4096x14336 and 14336x4096.
On CPU: the PyTorch reference path in fp32 against an fp32 ``torch.matmul`` (CPU fp16 matmul
is emulated), SmolLM2's shapes only unless ``--shapes all``; those are reference timings on
this CPU, not kernel figures.

Run: ``.venv/bin/python -m bench.kernels [--bits 2 3 4 5 6 8] [--rows 1 16 512] [--shapes all]``
"""
from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from autocompress.kernels import _triton_guard as guard
from autocompress.kernels import quant_matmul, select_backend
from autocompress.kernels.dispatch import quant_matmul_reference
from autocompress.kernels.packing import num_groups, packed_nbytes, packed_row_bytes

SMOLLM_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (in K, out N): q/o, k/v, gate/up, down
LARGE_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def timer(device: torch.device, warmup: int, repeats: int):
    """A function ``fn -> median seconds per call`` for ``device``.

    CUDA: events around each call, after zeroing a 256 MB buffer so every call starts with a
    cold L2 (a 4-bit 4096x4096 weight would otherwise sit in H100's 50 MB cache).
    """
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

        def run_cuda(fn):
            for _ in range(warmup):
                fn()
            pairs = []
            for _ in range(repeats):
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                pairs.append((start, end))
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3

        return run_cuda

    def run_cpu(fn):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            tick = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - tick)
        return statistics.median(samples)

    return run_cpu


def random_packed(n: int, k: int, bits: int, group: int, device: torch.device):
    """Random packed codes (every byte pattern is valid), fp16 scales and integer zeros."""
    gen = torch.Generator().manual_seed(n * 31 + k)
    packed = torch.randint(0, 256, (n, packed_row_bytes(k, bits)), generator=gen, dtype=torch.uint8)
    groups = num_groups(k, group)
    scales = (torch.rand(n, groups, generator=gen) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).half()
    return packed.to(device), scales.to(device), zeros.to(device)


def kernel_table(args, device: torch.device, dtype: torch.dtype, measure) -> Table:
    """Time every (shape, M, bits) case against the dense matmul of the same shape."""
    shapes = SMOLLM_SHAPES + (LARGE_SHAPES if args.shapes == "all" else [])
    backend = select_backend(torch.empty(0, device=device))
    dense_name = f"{'fp16' if dtype == torch.float16 else 'fp32'} torch.matmul"
    table = Table(title=f"y = x @ W.T, g{args.group}, backend {backend!r} ({dtype}), median of {args.repeats}, "
                        f"speedup over {dense_name}")
    for column in ("K -> N", "M", "weight", "time us", "GB/s", "speedup", "ceiling", "rel err"):
        table.add_column(column, justify="right")
    element = torch.finfo(dtype).bits // 8
    for k, n in shapes:
        dense_w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        for rows in args.rows:
            x = torch.randn(rows, k, device=device).to(dtype)
            io_bytes = (rows * k + rows * n) * element
            seconds = measure(lambda: torch.matmul(x, dense_w.t()))
            dense_bytes = n * k * element + io_bytes
            table.add_row(f"{k} -> {n}", str(rows), "dense", f"{seconds * 1e6:.1f}",
                          f"{dense_bytes / seconds / 1e9:.1f}", "1.00", "-", "-")
            for bits in args.bits:
                packed, scales, zeros = random_packed(n, k, bits, args.group, device)
                quant_seconds = measure(lambda: quant_matmul(x, packed, scales, zeros, bits, args.group, k))
                weight_bytes = packed_nbytes(n, k, bits, args.group)
                error = "-"
                if backend == "triton":  # the reference on the same data: a check that the tuned kernel is right
                    got = quant_matmul(x, packed, scales, zeros, bits, args.group, k)
                    want = quant_matmul_reference(x, packed, scales, zeros, bits, args.group, k)
                    error = f"{((got.float() - want.float()).norm() / want.float().norm()).item():.1e}"
                table.add_row("", "", f"{bits}-bit", f"{quant_seconds * 1e6:.1f}",
                              f"{(weight_bytes + io_bytes) / quant_seconds / 1e9:.1f}",
                              f"{seconds / quant_seconds:.2f}", f"{dense_bytes / (weight_bytes + io_bytes):.2f}",
                              error)
        table.add_section()
    return table


def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Greedy batch-1 decoding speed with the KV cache, after a warmup of a few steps."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # transformers 5 renamed past_key_values to cache (argument and output field).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, next_id = getattr(out, name), out.logits[:, -1:].argmax(-1)
        for step in range(new_tokens + 3):
            if step == 3:
                sync()
                start = time.perf_counter()
            out = model(input_ids=next_id, use_cache=True, **{name: cache})
            cache, next_id = getattr(out, name), out.logits[:, -1:].argmax(-1)
        sync()
    return new_tokens / (time.perf_counter() - start)


def model_table(args, device: torch.device, dtype: torch.dtype) -> Table:
    """SmolLM2-135M decode step, dense vs quantized with the compress operators (RTN, uniform)."""
    from autocompress.compress.apply import apply
    from autocompress.models import load_model
    from autocompress.schedule import Choice, Schedule

    base = load_model(args.model).model.eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    table = Table(title=f"{args.model} decode, batch 1, {args.decode_tokens} new tokens after a 32-token prompt, "
                        f"{dtype}, {device.type}")
    for column in ("model", "tokens/s", "speedup"):
        table.add_column(column, justify="right")
    dense = copy.deepcopy(base).to(device=device, dtype=dtype)
    dense_speed = decode_tokens_per_second(dense, prompt.to(device), args.decode_tokens, device)
    table.add_row("dense", f"{dense_speed:.1f}", "1.00")
    del dense
    for bits in args.model_bits:
        model = copy.deepcopy(base)
        apply(model, Schedule.uniform(model, Choice(bits=bits, group_size=args.group)), None, progress=False)
        model.to(device=device, dtype=dtype)
        speed = decode_tokens_per_second(model, prompt.to(device), args.decode_tokens, device)
        table.add_row(f"{bits}-bit g{args.group} (RTN)", f"{speed:.1f}", f"{speed / dense_speed:.2f}")
        del model
    return table


def main() -> None:
    """Parse flags, print the kernel table and the model decode table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512], help="M values")
    parser.add_argument("--shapes", choices=("smollm", "all"), default=None,
                        help="smollm: SmolLM2's four layer shapes; all: plus the 4096/14336 ones "
                             "(default: all on CUDA, smollm on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 100 CUDA, 5 CPU)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-bits", type=int, nargs="*", default=[4], help="bit widths for the decode table")
    parser.add_argument("--decode-tokens", type=int, default=None, help="default 128 CUDA, 16 CPU")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model decode table")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.shapes = args.shapes or ("all" if cuda else "smollm")
    args.repeats = args.repeats or (100 if cuda else 5)
    args.decode_tokens = args.decode_tokens or (128 if cuda else 16)
    dtype = torch.float16 if cuda else torch.float32
    if cuda:
        name = torch.cuda.get_device_name(device)
        console.print(f"[bold]GPU: {name}[/bold]; Triton {'available' if guard.TRITON_AVAILABLE else 'MISSING'}; "
                      "first call per shape autotunes (in the warmup).")
    else:
        console.print("[bold yellow]CPU: these are timings of the PyTorch reference path (dequantize, then an "
                      f"fp32 matmul) on this CPU with {args.threads} thread(s), not of the Triton kernels; "
                      "GPU figures need a CUDA device.[/bold yellow]")
    measure = timer(device, warmup=10 if cuda else 2, repeats=args.repeats)
    console.print(kernel_table(args, device, dtype, measure))
    if not args.no_model:
        console.print(model_table(args, device, dtype))


if __name__ == "__main__":
    main()
