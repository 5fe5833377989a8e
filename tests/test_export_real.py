"""GGUF export of the real SmolLM2-135M: read back through the gguf package, the logits are autocompress's."""
from __future__ import annotations

import pytest
import torch

from autocompress.compress.apply import apply
from autocompress.data import Split, load_tokens
from autocompress.export.gguf_reader import gguf_to_torch
from autocompress.export.gguf_writer import as_exported, export_gguf
from autocompress.models import adapter_for, load_model, model_fingerprint
from autocompress.schedule import Choice, Observer, Schedule

pytestmark = pytest.mark.real


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.fixture(scope="module")
def text(smollm2):
    calibration = load_tokens("stdlib-docs", smollm2.tokenizer, Split.CALIBRATION, 4 * 256).tokens.view(4, 256)
    evaluation = load_tokens("stdlib-docs", smollm2.tokenizer, Split.EVALUATION, 128).tokens.view(2, 64)
    return calibration, evaluation


def test_a_gguf_space_schedule_with_pruning_reads_back_to_autocompress_logits(smollm2, text, tmp_path):
    model = load_model("smollm2-135m").model
    path = adapter_for(model).blocks_path
    types = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K")
    units = {f"{path}.{i}": Choice(gguf=types[i % len(types)]) for i in range(30)}
    units.update({f"{path}.4": Choice(gguf="Q5_0", head_ratio=0.34), f"{path}.9": Choice(gguf="Q4_K", channel_ratio=0.25),
                  f"{path}.20": Choice(drop=True), "model.embed_tokens": Choice(gguf="Q8_0")})
    calibration, evaluation = text
    apply(model, Schedule(model_fingerprint(model), units), calibration, progress=False)
    export = export_gguf(model, smollm2.tokenizer, tmp_path / "mixed.gguf", progress=False)
    assert export.arch == "deci" and len(export.blocks) == 29
    assert all(record.exact for record in export.records)  # written as measured, nothing requantized
    assert relative(logits(gguf_to_torch(export.path), evaluation), logits(model, evaluation)) <= 1e-4


def test_the_demo_schedule_is_requantized_and_reads_back_to_what_llamacpp_computes(smollm2, text, tmp_path):
    """The demo's space (quant-high: 5/6/8-bit g128, embedding 8-bit) has no exact GGUF type:
    its tensors are requantized, and the file reads back to :func:`as_exported`'s model."""
    model = load_model("smollm2-135m").model
    path = adapter_for(model).blocks_path
    bits = (5, 6, 8)
    units = {f"{path}.{i}": Choice(bits=bits[i % 3], group_size=128, observer=Observer.MSE) for i in range(30)}
    units["model.embed_tokens"] = Choice(bits=8, group_size=128, observer=Observer.MSE)
    calibration, evaluation = text
    apply(model, Schedule(model_fingerprint(model), units), calibration, progress=False)
    export = export_gguf(model, smollm2.tokenizer, tmp_path / "demo.gguf", progress=False)
    assert export.arch == "llama" and export.requantized
    exported = as_exported(model, export)
    expected = logits(exported, evaluation)
    assert relative(logits(gguf_to_torch(export.path), evaluation), expected) <= 1e-4
    assert 0 < relative(expected, logits(model, evaluation)) < 0.2  # requantization moves the logits a little
