"""A cache bounded in bytes, for what the search's evaluator keeps between trials.

Compressed blocks are reused from trial to trial; block statistics (GPTQ Hessians, Wanda norms,
GPTQ codes) are needed only while a block is compressed and are cheap to make again from the
run's code cache, so they are *transient* and leave first.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import nn

from ..compress.memory import dense_bytes


def default_cache_bytes(model: nn.Module) -> int:
    """Half the model's 16-bit size (about one trial's compressed blocks at 8 bits: a smaller
    bound makes each trial compress again blocks the last one had), at least 1 GiB (a small
    model keeps everything) and at most a quarter of the machine's memory."""
    try:
        ceiling = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        ceiling = 4 << 30
    return min(max(dense_bytes(model) // 2, 1 << 30), ceiling)


def tensor_bytes(value, shared: frozenset[int] = frozenset()) -> int:
    """Bytes of the tensors in ``value`` (a module, tensor, dict, list or dataclass, nested),
    each storage counted once and those whose data pointer is in ``shared`` not at all."""
    seen, total, todo = set(shared), 0, [value]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, nn.Module):
            todo += [*item.parameters(), *item.buffers()]
        elif isinstance(item, dict):
            todo += list(item.values())
        elif isinstance(item, (list, tuple)):
            todo += list(item)
        elif hasattr(item, "__dataclass_fields__"):
            todo += [getattr(item, name) for name in item.__dataclass_fields__]
    return total


class ByteLRU:
    """A map bounded in bytes: past ``max_bytes`` entries leave, the least recently used
    *transient* ones first (cheap to make again, seldom needed again), then the least recently
    used of the rest; never the one just put, so an entry larger than the bound stays until the next."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict = OrderedDict()
        self.sizes: dict = {}
        self.transient: set = set()
        self.bytes = 0
        self.evictions = 0

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key):
        """The entry (now the most recently used), or None."""
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key, value, nbytes: int, *, transient: bool = False) -> None:
        """Keep ``value`` under ``key``, then drop entries past the bound (see the class)."""
        if key in self.entries:
            self.bytes -= self.sizes[key]
        self.entries[key], self.sizes[key] = value, nbytes
        self.entries.move_to_end(key)
        (self.transient.add if transient else self.transient.discard)(key)
        self.bytes += nbytes
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            old = next((k for k in self.entries if k in self.transient and k != key), next(iter(self.entries)))
            del self.entries[old]
            self.transient.discard(old)
            self.bytes -= self.sizes.pop(old)
            self.evictions += 1
