"""Streamed evaluation against a hand computation and against a reference."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tiny import random_tokens, tiny_model

from autocompress.artifacts import read_artifact
from autocompress.evaluate import evaluate, stream_metrics, windows, write_eval


def test_perplexity_matches_a_direct_computation():
    model = tiny_model("llama")
    tokens = random_tokens(300)
    metrics = stream_metrics(model, tokens, window=64, batch_size=3, progress=False)
    batch = windows(tokens, 64)
    assert batch.shape == (4, 64)
    with torch.no_grad():
        logits = model(input_ids=batch).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert math.isclose(metrics["loss"], loss.item(), rel_tol=1e-5)
    assert math.isclose(metrics["perplexity"], math.exp(loss.item()), rel_tol=1e-4)


def test_kl_to_itself_is_zero_and_to_another_model_is_not():
    model = tiny_model("qwen2", seed=0)
    tokens = random_tokens(256)
    same = stream_metrics(model, tokens, window=64, reference=model, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["top1"] == 1.0
    other = stream_metrics(model, tokens, window=64, reference=tiny_model("qwen2", seed=1), progress=False)
    assert other["kl"] > 1e-3 and other["top1"] < 1.0


def test_evaluate_writes_a_versioned_eval_json(tmp_path):
    model = tiny_model("opt")
    result = evaluate(model, random_tokens(256), model_name="tiny-opt", data_name="random", window=64,
                      decode_tokens=4, progress=False)
    assert result.tokens == 256 and result.size_bytes == 2 * sum(p.numel() for p in model.parameters())
    # As stored: 16-bit floats, the tied embedding/head once (not the fp32 bytes in memory).
    assert result.size_bytes == 2 * (sum(p.numel() for p in model.state_dict().values())
                                     - model.lm_head.weight.numel())
    path = write_eval(result, tmp_path / "eval.json")
    data = read_artifact(path, "eval", 1)
    assert data["perplexity"] == result.perplexity and data["decode_tokens_per_second"] > 0
