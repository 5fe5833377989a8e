"""The run's GPTQ codes on disk (RUN/codes/): written once, read back bit-exact, never trusted
when made for other weights or rows, and shared by profile, search and apply."""
from __future__ import annotations

import pytest
import torch

from autocompress.compress import apply as apply_module
from autocompress.compress.apply import block_stats, compress_block
from autocompress.compress.calibrate import capture_block_inputs
from autocompress.compress.code_cache import CodeCache
from autocompress.models import adapter_for, model_fingerprint
from autocompress.schedule import Choice, Observer, QuantMethod
from tiny import random_tokens, tiny_model

CHOICES = [Choice(bits=b, group_size=g, method=QuantMethod.GPTQ, act_order=True, observer=Observer.MSE)
           for b in (3, 5) for g in (32, 64)]


def _setup(tmp_path):
    model = tiny_model("llama")
    rows = random_tokens(4 * 64).view(4, 64)
    inputs = capture_block_inputs(model, rows)
    block = adapter_for(model).blocks(model)[1]
    return model, rows, inputs, block, CodeCache.for_run(tmp_path, model_fingerprint(model), rows)


def _no_gptq(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("GPTQ ran although the codes were cached")
    monkeypatch.setattr(apply_module, "gptq_quantize_many", refuse)
    monkeypatch.setattr(apply_module, "gptq_quantize", refuse)


def test_cached_codes_are_read_back_bit_exact_without_running_gptq(tmp_path, monkeypatch):
    model, rows, inputs, block, cache = _setup(tmp_path)
    first = block_stats(block, model, inputs, choices=CHOICES, cache=cache, index=1)
    assert cache.path(1).exists() and not list(cache.directory.glob(".*"))  # no temp file left
    _no_gptq(monkeypatch)
    again = block_stats(block, model, inputs, choices=CHOICES, cache=CodeCache.for_run(tmp_path, cache.key.split(":")[0],
                                                                                      rows), index=1)
    for path, stats in first.items():
        assert stats.memo.keys() == again[path].memo.keys() and len(stats.memo) == len(CHOICES)
        for key, q in stats.memo.items():
            other = again[path].memo[key]
            assert torch.equal(q.packed, other.packed) and torch.equal(q.scales, other.scales)
            assert torch.equal(q.zeros, other.zeros) and (q.bits, q.group_size) == (other.bits, other.group_size)
    for choice in CHOICES:  # a block compressed from the cached codes equals one from fresh codes
        cached = compress_block(block, 1, model, choice, inputs, stats=again)
        fresh = compress_block(block, 1, model, choice, inputs, stats=first)
        for path in adapter_for(model).linears.values():
            assert torch.equal(cached.get_submodule(path).packed, fresh.get_submodule(path).packed)


def test_codes_for_other_rows_or_a_torn_file_are_recomputed(tmp_path, monkeypatch):
    model, rows, inputs, block, cache = _setup(tmp_path)
    block_stats(block, model, inputs, choices=CHOICES[:1], cache=cache, index=1)
    other_rows = CodeCache.for_run(tmp_path, model_fingerprint(model), rows.flip(0))
    assert other_rows.load(1) == {}  # same file, other key: a miss
    cache.path(1).write_bytes(cache.path(1).read_bytes()[:100])
    assert cache.load(1) == {}
    stats = block_stats(block, model, inputs, choices=CHOICES[:1], cache=cache, index=1)
    assert len(cache.load(1)["mlp.down_proj"]) == 1 and len(stats["mlp.down_proj"].memo) == 1


def test_new_choices_are_added_to_the_block_file(tmp_path):
    model, rows, inputs, block, cache = _setup(tmp_path)
    block_stats(block, model, inputs, choices=CHOICES[:2], cache=cache, index=1)
    block_stats(block, model, inputs, choices=CHOICES[2:], cache=cache, index=1)
    assert len(cache.load(1)["self_attn.q_proj"]) == len(CHOICES)


@pytest.mark.parametrize("index", [0, 7])
def test_each_block_has_its_own_file(tmp_path, index):
    cache = CodeCache(tmp_path / "codes", "k")
    assert cache.path(index).name == f"block-{index:04d}.safetensors"
    assert cache.load(index) == {}
