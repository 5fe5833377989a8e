"""Host memory given back between blocks: the C allocator's settings and file-mapped pages.

Working block by block frees a block's weights, statistics and activations again and again;
these helpers make the resident size follow what is alive (glibc on Linux; elsewhere they do
nothing and memory is still correct, only less tightly bounded). No value ever changes.
"""
from __future__ import annotations

from torch import nn

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HOST_MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Have the C allocator give large freed blocks back to the system at once (glibc only;
    elsewhere nothing). Returns whether the setting took.

    glibc raises its mmap threshold each time a mapped block is freed, up to 32 MiB; from
    then on every tensor below that comes from the heap, and the heap keeps what is freed.
    Working block by block frees a block's weights, statistics and activations again and
    again, and the resident size crept up by about a model's worth that way. A fixed 1 MiB
    threshold puts every larger tensor in a mapping of its own, unmapped when it is freed.
    Only where memory comes from changes, never a value computed.
    """
    import ctypes  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, 4 * HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, say): its own policy stands
        return False


def trim_host_heap() -> None:
    """Hand the C heap's free pages back to the system now (glibc ``malloc_trim``; elsewhere
    nothing). Called between blocks, before the largest transient allocations (GPTQ), so the
    small tensors of the block before do not stay counted in the resident size."""
    import ctypes  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


_MADV_PAGEOUT = 21  # Linux 5.4+


def page_out(module: nn.Module) -> None:
    """Drop the resident pages of ``module``'s file-mapped weights (those :func:`~.models.load_model`
    maps from safetensors); they are read again, from the page cache, when next touched.

    Between blocks this leaves only the weights in use resident: the block being calibrated
    and its GPTQ work are then not on top of a whole model. Only file pages go (Linux
    ``MADV_PAGEOUT``); memory of a process's own (copies, written pages) stays as it is, and
    no value ever changes. Elsewhere nothing happens.
    """
    import ctypes  # noqa: PLC0415
    import mmap  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if not sys.platform.startswith("linux"):
        return
    try:
        madvise = ctypes.CDLL("libc.so.6").madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "cpu" or not tensor.numel():
            continue
        start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
        if end > start:
            madvise(start, end - start, _MADV_PAGEOUT)
