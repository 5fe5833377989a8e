"""The search's evaluator keeps compressed blocks and GPTQ statistics within a byte budget, and
what it computes again after an eviction gives the very same measurements."""
from __future__ import annotations

import os

import pytest
import torch

from autocompress.search.decisions import build_slots
from autocompress.search.byte_cache import ByteLRU, default_cache_bytes, tensor_bytes
from autocompress.search.measure import SwapEvaluator
from autocompress.search.space import space_from_dict
from tiny import random_tokens, tiny_model

SPACE = {"name": "m", "bits": [3, 4, 16], "group_size": [32], "method": "gptq", "act_order": True,
         "embedding_bits": [8]}


def test_byte_lru_drops_the_least_recently_used_past_its_bound():
    cache = ByteLRU(100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3, 40)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert (cache.bytes, cache.evictions) == (80, 1)
    cache.put("big", 4, 500)  # larger than the bound: kept alone, until the next entry
    assert list(cache.entries) == ["big"] and cache.bytes == 500
    cache.put("a", 5, 10)
    assert list(cache.entries) == ["a"] and cache.bytes == 10


def test_transient_entries_leave_before_the_rest():
    cache = ByteLRU(100)
    cache.put("block-1", 1, 30)
    cache.put("stats-1", 2, 40, transient=True)
    cache.put("block-2", 3, 30)
    cache.put("block-3", 4, 30)  # over by 30: the statistics go, though block-1 is older
    assert list(cache.entries) == ["block-1", "block-2", "block-3"] and cache.bytes == 90
    cache.put("block-4", 5, 30)  # no transient entry left: the least recently used block goes
    assert list(cache.entries) == ["block-2", "block-3", "block-4"]
    cache.put("stats-2", 6, 90, transient=True)  # the one just put never leaves at once
    assert list(cache.entries) == ["stats-2"] and cache.transient == {"stats-2"}


def test_the_default_budget_is_half_the_16_bit_model_within_bounds():
    small, large = torch.nn.Linear(100, 100), torch.nn.Linear(65536, 65536, bias=False, device="meta")
    assert default_cache_bytes(small) == 1 << 30
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert default_cache_bytes(large) == min(65536 * 65536, ram // 4)  # 4 GiB, or what the machine allows


def test_tensor_bytes_counts_each_storage_once_and_skips_shared_ones():
    weight = torch.zeros(10, 10)
    module = torch.nn.Linear(10, 10, bias=False)
    assert tensor_bytes({"x": weight, "y": [weight, weight[:2]]}) == 400
    assert tensor_bytes([module, weight]) == 800
    assert tensor_bytes([module, weight], frozenset({weight.untyped_storage().data_ptr()})) == 400


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_small_budget_evicts_and_measures_the_same(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    slots = build_slots(space_from_dict(SPACE, "m"), model)
    calibration = random_tokens(4 * 64, seed=1).view(4, 64)
    holdout = random_tokens(2 * 64, seed=2).view(2, 64)
    blocks = [s.name for s in slots if s.block >= 0]
    picks = [{s.name: s.options[(i + k) % len(s.options)].label for i, s in enumerate(slots)} for k in range(4)]
    picks += picks[:2]  # measured again: from the cache when it kept them, computed again when not

    roomy = SwapEvaluator(model, slots, holdout, calibration)
    wanted = [roomy.measure(p) for p in picks]
    assert roomy.cache.evictions == 0 and roomy.stats_computed == len(blocks)
    one_block = max(roomy.cache.sizes[k] for k in roomy.cache.entries if k[0] == "block")

    tight = SwapEvaluator(model, slots, holdout, calibration, max_bytes=one_block)
    got = [tight.measure(p) for p in picks]
    assert [g["kl"] for g in got] == [w["kl"] for w in wanted]
    assert [g["window_loss"] for g in got] == [w["window_loss"] for w in wanted]
    assert tight.cache.evictions > 0 and tight.stats_computed > len(blocks)
    assert tight.cache.bytes <= one_block or len(tight.cache) == 1
    assert roomy.cache.bytes > 2 * one_block  # the bound did bind
