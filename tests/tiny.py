"""Tiny randomly initialised models of every supported family, built from configs in-process."""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, GPT2Config,
                          LlamaConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config)

VOCAB = 384  # the tiny tokenizer's vocabulary, so tiny models can read real text
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=16),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                               bos_token_id=0, eos_token_id=0),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                             num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256),
    "phi3": lambda: Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=0, eos_token_id=0),
}
FAMILIES = tuple(CONFIGS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` in eval mode, its decoder linears as nn.Linear."""
    from autocompress.models import normalize

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
    return normalize(model).eval()


def random_tokens(count: int, seed: int = 0) -> torch.Tensor:
    """A reproducible 1-D stream of token ids for the tiny vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count,), generator=generator)


def tiny_tokenizer(bos: bool = False):
    """A small byte-level BPE tokenizer trained in-process on a slice of the built-in corpus.

    ``bos=True``: it also has a ``<bos>`` token and puts it before every text it encodes with
    special tokens (as Llama 3's and Gemma's do, by a post-processor).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from autocompress.data import stdlib_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<bos>"] if bos else ["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(stdlib_documents()[:200], trainer)
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")
