"""Quick integration checks on the real SmolLM2-135M (fetched once into the cache)."""
from __future__ import annotations

import pytest

from autocompress.data import Split, load_tokens
from autocompress.evaluate import perplexity
from autocompress.models import head_layout, load_model, parameter_count

pytestmark = pytest.mark.real


def test_alias_loads_the_llama_and_its_structure(smollm2):
    adapter = smollm2.adapter
    assert adapter.family == "llama"
    assert len(adapter.blocks(smollm2.model)) == 30
    layout = head_layout(smollm2.model, 0)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim) == (9, 3, 64)
    assert adapter.mlp_channels(adapter.blocks(smollm2.model)[0]) == 1536
    assert parameter_count(smollm2.model) == 134_515_008


def test_second_load_uses_the_cache(smollm2):
    from autocompress.models import cache_dir

    again = load_model("smollm2-135m")
    assert (cache_dir() / "models" / "smollm2-135m" / "hf" / "model.safetensors").exists()
    assert again.path == smollm2.path


def test_perplexity_on_stdlib_docs_is_sane(smollm2):
    stream = load_tokens("stdlib-docs", smollm2.tokenizer, Split.EVALUATION, 2048)
    ppl = perplexity(smollm2.model, stream.tokens, window=512)
    assert 10 < ppl < 40
