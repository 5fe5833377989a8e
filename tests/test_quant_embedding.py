"""The token embedding (with a tied head) and an untied head as quantizable units."""
from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel, model_bytes, stored_bytes, unit_bytes
from autocompress.compress.prune import set_submodule
from autocompress.compress.quant_embedding import (QuantEmbedding, TiedQuantLinear, embedding_replacements,
                                                   embedding_unit, head_is_tied, quantize_embeddings_)
from autocompress.compress.quantize import QuantLinear
from autocompress.compress.saving import load_compressed, save_compressed
from autocompress.compress.storage import round_to_storage
from autocompress.errors import UserError
from autocompress.kernels import SUPPORTED_BITS, packing, reference
from autocompress.models import adapter_for, model_fingerprint, parameter_count
from autocompress.schedule import Choice, QuantMethod, Schedule, SparsityPattern
from autocompress.search.cost import CostModel
from autocompress.search.decisions import Option, Slot
from tiny import VOCAB, random_tokens, tiny_model

EXTRA_BITS = tuple(b for b in (3, 5, 6) if b in SUPPORTED_BITS)


def payload(path) -> tuple[int, set[str]]:
    """Tensor bytes and tensor names of a safetensors file."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    header.pop("__metadata__", None)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values()), set(header)


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def kl_to(reference_logits, logits_):
    """Mean KL(reference || compressed) per position."""
    p = torch.log_softmax(reference_logits.double(), -1)
    q = torch.log_softmax(logits_.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("bits", (4, 8) + EXTRA_BITS)
def test_forward_is_the_rows_of_the_dequantized_table(family, bits):
    model = tiny_model(family)
    original = model.get_submodule(embedding_unit(model))
    module = QuantEmbedding.from_embedding(original, Choice(bits=bits, group_size=24))  # 64 = 24 + 24 + 16
    assert module.packed.shape == (VOCAB, packing.packed_row_bytes(64, bits)) and module.packed.dtype == torch.uint8
    assert module.scales.shape == module.zeros.shape == (VOCAB, 3) and module.scales.dtype == torch.float16
    ids = random_tokens(21).view(3, 7)
    table = module.dequantized_weight()
    scale = 64 ** 0.5 if family == "gemma" else 1.0  # Gemma's embedding scales its rows by sqrt(hidden)
    assert (family == "gemma") == (module.embed_scale is not None)
    assert torch.equal(module(ids), table[ids] * torch.tensor(scale, dtype=torch.float32))
    # the original module computes the same on the dequantized table
    with torch.no_grad():
        original.weight.copy_(table)
    assert torch.equal(module(ids), original(ids))
    assert module(ids).dtype == torch.float32 and module.to(torch.float16)(ids).dtype == torch.float16


def test_forward_never_dequantizes_the_whole_table(monkeypatch):
    rows_seen = []
    real = reference.dequantize_fp32

    def recording(packed, *args):
        rows_seen.append(packed.shape[0])
        return real(packed, *args)

    monkeypatch.setattr(reference, "dequantize_fp32", recording)
    weight = torch.randn(200_000, 64)
    module = QuantEmbedding.from_embedding(torch.nn.Embedding.from_pretrained(weight), Choice(bits=4, group_size=32))
    ids = torch.tensor([[5, 199_999, 5], [0, 17, 123_456]])
    out = module(ids)
    assert rows_seen == [6] and out.shape == (2, 3, 64)
    assert torch.equal(out[0, 0], out[0, 2])


@pytest.mark.parametrize("family", ["gpt2", "gemma", "opt", "llama"])  # tied, tied, tied, untied
@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_unit_bytes_save_and_load(family, bits, tmp_path):
    model = tiny_model(family)
    tied = head_is_tied(model)
    assert tied == (family != "llama")
    adapter = adapter_for(model)
    name = embedding_unit(model)
    assert name == adapter.embeddings[0]
    choice = Choice(bits=bits, group_size=48)
    schedule = Schedule(model_fingerprint(model), {name: choice, f"{adapter.blocks_path}.1": Choice(bits=4)})
    memory = MemoryModel.from_model(model)
    predicted = model_bytes(model, schedule)
    parameters = memory.schedule_parameters(schedule)
    table_bytes = VOCAB * (packing.packed_row_bytes(64, bits) + 2 * 2 * 2)  # two groups: 48 + 16
    assert memory.embedding_name == name
    assert memory.embedding_bytes(choice) == unit_bytes(memory, name, choice) == table_bytes
    assert memory.embedding_bytes() == VOCAB * 64 * 2
    assert predicted == model_bytes(model, Schedule("", {f"{adapter.blocks_path}.1": Choice(bits=4)})) \
        - VOCAB * 64 * 2 + table_bytes
    tokens = random_tokens(2 * 24).view(2, 24)

    apply(model, schedule, None, progress=False)
    embedding, head = model.get_submodule(name), model.get_submodule(adapter.lm_head)
    assert isinstance(embedding, QuantEmbedding) and embedding.bits == bits
    if tied:
        assert isinstance(head, TiedQuantLinear) and head.packed is embedding.packed
        assert head.scales is embedding.scales and head.zeros is embedding.zeros
    else:
        assert type(head) is torch.nn.Linear
    assert stored_bytes(model) == predicted
    assert parameter_count(model) == parameters
    compressed = logits(model, tokens)

    out = save_compressed(model, None, schedule, tmp_path / "m")
    size, names = payload(out / "model.safetensors")
    assert size == predicted
    assert sum(n.endswith(".packed") and n.startswith(name) for n in names) == 1
    head_names = [n for n in names if n.startswith(adapter.lm_head + ".")]
    assert head_names == ([] if tied else [f"{adapter.lm_head}.weight"])
    loaded, _ = load_compressed(out)
    assert torch.equal(logits(loaded, tokens), compressed)
    assert head_is_tied(loaded) == tied
    loaded_embedding = loaded.get_submodule(name)
    assert isinstance(loaded_embedding, QuantEmbedding)
    if tied:
        assert loaded.get_submodule(adapter.lm_head).packed is loaded_embedding.packed
    assert stored_bytes(loaded) == predicted


def test_the_tied_head_stays_on_the_embedding_codes_through_copies_and_casts():
    import copy

    model = tiny_model("gpt2")
    quantize_embeddings_(model, Choice(bits=4, group_size=32), None)
    assert model.config.tie_word_embeddings is False  # the record, not the config, restores the tie
    tokens = random_tokens(16).view(1, 16)
    expected = logits(model, tokens)
    twin = copy.deepcopy(model)
    embedding, head = twin.transformer.wte, twin.lm_head
    assert head.embedding is embedding and head.packed is embedding.packed and head_is_tied(twin)
    assert not any(name.startswith("lm_head.") for name in twin.state_dict())
    assert torch.equal(logits(twin, tokens), expected)
    twin.to(torch.bfloat16)  # buffers are replaced by the cast: the head still reads the embedding's
    assert head.packed is embedding.packed and head.scales is embedding.scales
    assert embedding.dtype == torch.bfloat16 and logits(twin, tokens).dtype == torch.bfloat16


@pytest.mark.parametrize("family,unit", [("gemma", "model.embed_tokens"), ("qwen2", "model.embed_tokens"),
                                         ("qwen2", "lm_head")])
def test_swapped_replacements_compute_what_apply_ships(family, unit):
    model = round_to_storage(tiny_model(family))  # as apply() leaves what it does not quantize
    choice = Choice(bits=4, group_size=32)
    tokens = random_tokens(2 * 16).view(2, 16)
    replacements = embedding_replacements(model, unit, choice)
    assert set(replacements) == ({unit, "lm_head"} if family == "gemma" else {unit})
    kept = {path: model.get_submodule(path) for path in replacements}
    for path, module in replacements.items():
        set_submodule(model, path, module)
    swapped = logits(model, tokens)
    for path, module in kept.items():
        set_submodule(model, path, module)
    assert embedding_replacements(model, unit, Choice()) == {}
    apply(model, Schedule(model_fingerprint(model), {unit: choice}), None, progress=False)
    assert torch.equal(logits(model, tokens), swapped)


def test_the_8_bit_embedding_is_close_and_4_bits_further():
    model = tiny_model("gemma")  # tied: the head reads the same codes
    with torch.no_grad():  # a trained-looking table: rows of different norms
        model.get_submodule("model.embed_tokens").weight.mul_(torch.logspace(-0.5, 0.5, VOCAB).unsqueeze(1))
    tokens = random_tokens(4 * 32, seed=3).view(4, 32)
    reference_logits = logits(model, tokens)
    kl = {}
    for bits in (4, 8):
        copy = tiny_model("gemma")
        copy.load_state_dict(model.state_dict())
        apply(copy, Schedule(model_fingerprint(copy), {"model.embed_tokens": Choice(bits=bits, group_size=32)}),
              None, progress=False)
        kl[bits] = kl_to(reference_logits, logits(copy, tokens))
    assert kl[8] < 1e-3 and kl[4] > kl[8], kl


def test_lm_head_on_a_tied_model_is_refused():
    model = tiny_model("gpt2")
    fingerprint = model_fingerprint(model)
    with pytest.raises(UserError, match="name the embedding unit 'transformer.wte' instead") as error:
        apply(model, Schedule(fingerprint, {"lm_head": Choice(bits=4)}), None, progress=False)
    assert "\n" not in str(error.value)
    for bad, message in [(Choice(bits=4, head_ratio=0.5), "only be set on a block"),
                         (Choice(bits=4, method=QuantMethod.GPTQ), "use method 'rtn'"),
                         (Choice(sparsity=0.5, pattern=SparsityPattern.TWO_FOUR), "cannot be pruned"),
                         (Choice(bits=7), "bits must be one of")]:
        with pytest.raises(UserError, match=message):
            Schedule(fingerprint, {"transformer.wte": bad}).validate(model, fingerprint=fingerprint)
    assert model_fingerprint(model) == fingerprint
    with pytest.raises(ValueError, match="covers both"):
        quantize_embeddings_(model, None, Choice(bits=4))


@pytest.mark.parametrize("head", [Choice(bits=4, group_size=32),
                                  Choice(bits=3, group_size=32, method=QuantMethod.GPTQ)])
@pytest.mark.parametrize("family", ["qwen2", "phi3"])  # untied
def test_an_untied_model_quantizes_both_units(family, head, tmp_path):
    model = tiny_model(family)
    assert not head_is_tied(model)
    name = embedding_unit(model)
    schedule = Schedule(model_fingerprint(model), {name: Choice(bits=8, group_size=64), "lm_head": head})
    memory = MemoryModel.from_model(model)
    predicted = memory.schedule_bytes(schedule)
    assert predicted == memory.schedule_bytes(Schedule("", {name: Choice(bits=8, group_size=64)})) \
        - VOCAB * 64 * 2 + unit_bytes(memory, "lm_head", head)
    tokens = random_tokens(4 * 32).view(4, 32)
    apply(model, schedule, tokens, progress=False)
    embedding, lm_head = model.get_submodule(name), model.get_submodule("lm_head")
    assert isinstance(embedding, QuantEmbedding) and embedding.bits == 8
    assert type(lm_head) is QuantLinear and lm_head.bits == head.bits and lm_head.packed is not embedding.packed
    assert stored_bytes(model) == predicted and parameter_count(model) == memory.schedule_parameters(schedule)
    out = save_compressed(model, None, schedule, tmp_path / "m")
    assert payload(out / "model.safetensors")[0] == predicted
    loaded, _ = load_compressed(out)
    assert torch.equal(logits(loaded, tokens[:2]), logits(model, tokens[:2]))


def test_cost_model_prices_the_embedding_unit():
    model = tiny_model("gpt2")  # tied
    memory = MemoryModel.from_model(model)
    cost = CostModel(memory, device="h100", measure=False)
    name = embedding_unit(model)
    choice = Choice(bits=4, group_size=32)
    schedule = Schedule("", {name: choice})
    figures, plain = cost.figures(schedule), cost.original()
    assert figures["memory_bytes"] == memory.schedule_bytes(schedule) == int(round(cost.raw(schedule)[0]))
    assert figures["params"] == plain["params"]  # codes count one parameter each
    assert figures["latency_ms"] < plain["latency_ms"]  # the tied head's matmul reads 4-bit codes
    assert figures["avg_bits"] == plain["avg_bits"]  # decoder linears only
    options = (Option("embed:bits=16", 16, None, Choice()), Option("embed:bits=4", 4, None, choice))
    slot = Slot(name, -1, (name,), options)
    base, tables = cost.slot_costs([slot])
    assert not tables[0][0].any()
    assert torch.allclose(torch.tensor(base + tables[0][1]), torch.tensor(cost.raw(schedule)))
