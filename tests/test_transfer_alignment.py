"""Block alignment for transfer: a model with blocks removed maps each kept block to its own source block."""
from __future__ import annotations

import copy

import pytest
import torch

from autocompress.compress.memory import MemoryModel
from autocompress.compress.tiny_models import random_tokens, tiny_model
from autocompress.models import model_fingerprint
from autocompress.schedule import Choice, Schedule
from autocompress.search.budget import Budget
from autocompress.transfer import describe, transfer_schedule
from autocompress.transfer.alignment import align_blocks, block_signature
from space_helpers import rtn_space, space_file


def _source(seed: int = 0, vocab: int = 256):
    """A tiny 8-block Llama whose blocks write to the residual stream with different strengths
    (as real blocks do), so each block has its own influence."""
    model = tiny_model("llama", layers=8, seed=seed, vocab=vocab)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.layers:
            scale = float(torch.empty(1).uniform_(0.3, 3.0, generator=generator))
            block.self_attn.o_proj.weight.mul_(scale)
            block.mlp.down_proj.weight.mul_(scale)
    return model


def _without(model, dropped: list[int]):
    kept = copy.deepcopy(model)
    kept.model.layers = torch.nn.ModuleList([b for i, b in enumerate(kept.model.layers) if i not in dropped])
    kept.config.num_hidden_layers = len(kept.model.layers)
    return kept


def _tokens(model) -> torch.Tensor:
    return random_tokens(model.config.vocab_size, 2, 64, seed=1).flatten()


@pytest.mark.parametrize("dropped", [[3], [2, 3], [2, 5]])
def test_kept_blocks_align_to_their_own_source_blocks(dropped):
    source = _source()
    target = _without(source, dropped)
    tokens = _tokens(source)
    matched = align_blocks(block_signature(source, tokens), block_signature(target, tokens))
    assert matched == [i for i in range(8) if i not in dropped]


def test_alignment_of_identical_and_deeper_models():
    signature = [0.9, 0.2, 0.05, 0.03, 0.08, 0.4]
    assert align_blocks(signature, signature) == list(range(6))
    # a deeper target (each block doubled) maps monotonically, two target blocks per source block
    deeper = [v for v in signature for _ in range(2)]
    assert align_blocks(signature, deeper) == [i for i in range(6) for _ in range(2)]


def test_transfer_with_signature_gives_kept_blocks_their_source_choice():
    space = rtn_space("rtn-quant-only")
    source = _source()
    tokens = _tokens(source)
    bits = [4, 4, 4, 8, 2, 4, 4, 4]  # source block 3 kept at 8 bits, block 4 squeezed to 2
    schedule = Schedule(model_fingerprint(source), {f"model.layers.{i}": space.quant_choice(b)
                                                    for i, b in enumerate(bits)})
    schedule = describe(schedule, source, signature=block_signature(source, tokens))
    assert len(schedule.meta["source_signature"]["values"]) == 8
    target = _without(source, [3])
    budget = Budget.parse(["memory=100%"], MemoryModel.from_model(target))

    def mapped(result) -> list[int]:
        units = result.meta["transfer"]["units"]
        return [Choice.from_json(units[f"model.layers.{i}"]["mapped"]).bits for i in range(7)]

    aligned = transfer_schedule(schedule, target, budget, space=space, signature_tokens=tokens)
    assert aligned.meta["transfer"]["alignment"]["source_blocks"] == [0, 1, 2, 4, 5, 6, 7]
    assert mapped(aligned) == [4, 4, 4, 2, 4, 4, 4]  # block 3 of the target is block 4 of the source
    plain = transfer_schedule(schedule, target, budget, space=space)
    assert plain.meta["transfer"]["alignment"] == {"by": "relative_depth"}
    assert mapped(plain)[3] != 2  # by relative depth it sits between source blocks 3 and 4


def test_cli_transfer_aligns_blocks_when_the_source_has_a_signature(tmp_path, capsys, tokenizer):
    from autocompress.cli import main

    space = rtn_space("rtn-quant-only")
    source = _source(vocab=len(tokenizer))
    schedule = Schedule.uniform(source, space.quant_choice(3))
    schedule = describe(schedule, source, signature=block_signature(source, _tokens(source)))
    schedule.save(tmp_path / "run" / "schedule.json")
    target = _without(source, [2, 3])
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    out = tmp_path / "out"
    assert main(["transfer", str(tmp_path / "run"), str(tmp_path / "target"), "--budget", "memory=60%",
                 "--space", space_file(tmp_path, "rtn-quant-only"), "--out", str(out), "--threads", "1",
                 "--signature-tokens", "256"]) == 0
    assert "blocks aligned by block_influence" in capsys.readouterr().out
    alignment = Schedule.load(out / "schedule.json").meta["transfer"]["alignment"]
    assert alignment["by"] == "block_influence" and len(alignment["source_blocks"]) == 6
    assert alignment["source_blocks"] == sorted(set(alignment["source_blocks"]))  # monotone, distinct
    assert main(["transfer", str(tmp_path / "run"), str(tmp_path / "target"), "--budget", "memory=60%",
                 "--signature-tokens", "-1"]) == 2
