"""The tokenizer of a Hugging Face model as GGUF metadata (``tokenizer.ggml.*``), as llama.cpp reads it.

Only byte-level BPE tokenizers (GGUF model ``gpt2``: GPT-2, Llama 3, Qwen2, SmolLM...) are
written. The vocabulary and token types follow llama.cpp's converter (``convert_hf_to_gguf.py``,
``get_vocab_base``): ids the tokenizer does not fill become ``[PAD{i}]`` (unused), added tokens
that are special, or look special (``<|...|>``), are control tokens, other added tokens
user-defined, the rest normal. Merges, special ids, ``add_bos_token``/``add_eos_token`` and the
chat template are read by the ``gguf`` package's own :class:`gguf.SpecialVocab` from the files
``save_pretrained`` writes, as the converter reads them.

``tokenizer.ggml.pre`` names the regex llama.cpp splits text with before BPE. The converter
finds it by hashing a test string's tokens against a table of known models; we read it off the
pre-tokenizer's configuration instead (:data:`PRE_TOKENIZERS`), which names the regex directly.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from ..errors import UserError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Pre-tokenizer signature (see _signature) -> llama.cpp's name for the same split.
PRE_TOKENIZERS: dict[tuple, str] = {
    (("byte_level", True),): "gpt-2",
    (("digits", True), ("byte_level", True)): "smollm",  # single digits, then GPT-2's regex
    (("split", _LLAMA3_SPLIT), ("byte_level", False)): "llama-bpe",
    (("split", _QWEN2_SPLIT), ("byte_level", False)): "qwen2",
}

# A vocabulary this large whose merges never glue a digit to anything was trained on single
# digits (see _trained_on_single_digits).
_MIN_MERGES_FOR_DIGIT_EVIDENCE = 10_000
_ASCII_DIGIT = re.compile(r"[0-9]")


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json form; GGUF export "
                        f"needs a fast byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, SmolLM style)")
    return json.loads(backend.to_str())


def _signature(pre: dict | None) -> tuple:
    """The parts of a pre-tokenizer config that decide how text is split, in order."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(part for sub in pre.get("pretokenizers", []) for part in _signature(sub))
    if kind == "ByteLevel":
        return (("byte_level", bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("digits", bool(pre.get("individual_digits", False))),)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (("split", pattern.get("Regex", pattern.get("String"))),)
    return ((kind.lower() if isinstance(kind, str) else str(kind), None),)


def _trained_on_single_digits(merges: list) -> bool:
    """Whether a byte-level BPE's merges show it was trained with digits split one by one.

    A tokenizer that transformers rebuilt from a GGUF file keeps the vocabulary and merges but
    gets GPT-2's plain pre-tokenizer, so SmolLM's digit split is lost from its configuration;
    the merges keep it: none of them glues a digit to another piece.
    """
    if len(merges) < _MIN_MERGES_FOR_DIGIT_EVIDENCE:
        return False
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if _ASCII_DIGIT.match(left[-1:]) or _ASCII_DIGIT.match(right[:1]):
            return False
    return True


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for ``tokenizer``'s pre-tokenizer.

    Raises :class:`UserError` for a pre-tokenizer not in :data:`PRE_TOKENIZERS`.
    """
    data = _tokenizer_json(tokenizer)
    signature = _signature(data.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(signature)
    if name is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise UserError(f"the tokenizer's pre-tokenizer {signature!r:.120} has no known llama.cpp name; GGUF export "
                        f"supports the pre-tokenizers of {known}")
    if name == "gpt-2" and _trained_on_single_digits(data.get("model", {}).get("merges") or []):
        return "smollm"
    return name


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types for ids ``0 .. vocab_size - 1`` (llama.cpp's converter rules)."""
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(vocab.values())} but the model embeds only {vocab_size} "
                        f"tokens; export the model with its own tokenizer")
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
            continue
        kind = NORMAL
        if token in added:
            info = decoder.get(index)
            if info is not None and not info.normalized:
                # llama.cpp treats added tokens as already normalized text
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if (info is not None and info.special) or _looks_special(token):
                kind = CONTROL
            else:
                token = token.replace("\u2581", " ")
                kind = USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp's ``does_token_look_special``)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write ``tokenizer`` as ``tokenizer.*`` metadata into a :class:`gguf.GGUFWriter`.

    ``vocab_size`` is the model's embedding rows. Raises :class:`UserError` for anything but
    a byte-level BPE tokenizer.
    """
    import gguf  # noqa: PLC0415

    if tokenizer is None:
        raise UserError("the model has no tokenizer; GGUF files carry the vocabulary, so export a model saved "
                        "with its tokenizer")
    data = _tokenizer_json(tokenizer)
    model_type = data.get("model", {}).get("type")
    byte_level = any(kind == "byte_level" for kind, _ in _signature(data.get("pre_tokenizer")))
    if model_type != "BPE" or not byte_level:
        raise UserError(f"the tokenizer is {model_type or 'unknown'} without byte-level pre-tokenization; GGUF export "
                        f"supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style)")
    pre = tokenizer_pre(tokenizer)
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="autocompress-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    # Files that do not say whether BOS/EOS are added get what the tokenizer really does.
    bos, eos = _adds_bos_eos(tokenizer)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(bos)
    if "eos" not in special.add_special_token:
        writer.add_add_eos_token(eos)
    writer.add_add_space_prefix(False)  # byte-level BPE marks spaces itself


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text with special tokens puts BOS first / EOS last."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and bool(ids) and ids[0] == bos), (eos is not None and bool(ids) and ids[-1] == eos)


__all__ = ["PRE_TOKENIZERS", "add_tokenizer", "tokenizer_pre", "vocabulary"]
