"""Tiny random models of every supported family, built in-process from configs (for tests).

Sizes are small but not degenerate: grouped-query attention where the family has it, group
sizes that do not divide the hidden size, a few blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import normalize

FAMILIES = ("llama", "qwen2", "gpt2", "opt", "phi3")


def tiny_config(family: str, *, hidden: int = 96, layers: int = 3, vocab: int = 256, intermediate: int = 160):
    """A transformers config of ``family`` with ``hidden`` width (4 heads of hidden/4, GQA 2 where possible)."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Phi3Config, Qwen2Config  # noqa: PLC0415

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, intermediate_size=intermediate, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, intermediate_size=intermediate, tie_word_embeddings=False)
    if family == "phi3":
        return Phi3Config(**common, num_key_value_heads=2, intermediate_size=intermediate, pad_token_id=0,
                          tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                          n_inner=intermediate, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return OPTConfig(**common, ffn_dim=intermediate, max_position_embeddings=128, word_embed_proj_dim=hidden,
                         pad_token_id=1)
    raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES}")


def tiny_model(family: str, *, seed: int = 0, **sizes) -> nn.Module:
    """A randomly initialised, normalized, eval-mode model of ``family`` (weights scaled up a bit
    so activations are not all tiny)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **sizes))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                param.normal_(0.0, 0.08)
    return normalize(model).eval()


def random_tokens(vocab: int, rows: int, seq: int, *, seed: int = 0) -> torch.Tensor:
    """Random token ids [rows, seq]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq), generator=generator)


@torch.no_grad()
def sampled_tokens(model: nn.Module, rows: int = 4, length: int = 96, *, seed: int = 0) -> torch.Tensor:
    """Token ids [rows * length] sampled from ``model``'s own next-token distribution, from a random
    first token: text on which a random model's perplexity means something (its exp is the
    model's entropy plus the KL of a compressed copy to it)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (rows, 1), generator=generator)
    for _ in range(length - 1):
        probs = torch.softmax(model(ids).logits[:, -1].float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids.reshape(-1)
