"""The built-in corpus and the file readers."""
from __future__ import annotations

import json

import pytest
import torch

from autocompress.data import (Split, load_tokens, read_documents, split_of, stdlib_documents)
from autocompress.errors import UserError


def test_builtin_corpus_is_prose_deduplicated_and_deterministic():
    documents = stdlib_documents()
    assert len(documents) > 1000
    assert len(set(" ".join(d.split()) for d in documents)) == len(documents)
    assert not any(line.lstrip().startswith(">>>") for doc in documents for line in doc.splitlines())
    assert documents == tuple(read_documents("stdlib-docs"))


def test_calibration_and_evaluation_never_overlap():
    documents = stdlib_documents()
    calibration = {d for d in documents if split_of(d) is Split.CALIBRATION}
    evaluation = {d for d in documents if split_of(d) is Split.EVALUATION}
    assert calibration and evaluation
    assert not calibration & evaluation
    assert len(calibration) + len(evaluation) == len(documents)
    # Roughly the intended shares.
    assert 0.1 < len(evaluation) / len(documents) < 0.3


def test_token_streams_are_reproducible_and_disjoint_by_start(tokenizer):
    first = load_tokens("stdlib-docs", tokenizer, Split.CALIBRATION, max_tokens=2000)
    again = load_tokens("stdlib-docs", tokenizer, Split.CALIBRATION, max_tokens=2000)
    second = load_tokens("stdlib-docs", tokenizer, Split.CALIBRATION, max_tokens=2000, start=2000)
    assert torch.equal(first.tokens, again.tokens) and first.fingerprint == again.fingerprint
    assert len(first) == len(second) == 2000
    both = load_tokens("stdlib-docs", tokenizer, Split.CALIBRATION, max_tokens=4000)
    assert torch.equal(both.tokens, torch.cat([first.tokens, second.tokens]))
    evaluation = load_tokens("stdlib-docs", tokenizer, Split.EVALUATION, max_tokens=2000)
    assert evaluation.fingerprint != first.fingerprint


def test_txt_and_jsonl_files(tmp_path, tokenizer):
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph about lists.\n\nSecond paragraph about dicts.\n\n\nThird one.\n")
    assert read_documents(str(txt)) == ["First paragraph about lists.", "Second paragraph about dicts.", "Third one."]
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(50)))
    docs = read_documents(str(jsonl))
    assert len(docs) == 50
    stream = load_tokens(str(jsonl), tokenizer, Split.CALIBRATION)
    assert len(stream) > 100


@pytest.mark.parametrize("content, message", [
    ("", "holds no text"),
    ("\n\n  \n", "holds no text"),
])
def test_empty_files_are_refused(tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_documents(str(path))


def test_bad_inputs_name_the_problem(tmp_path, tokenizer):
    with pytest.raises(UserError, match="not found"):
        read_documents(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        read_documents(str(bad))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        read_documents(str(binary))
    wrong = tmp_path / "data.csv"
    wrong.write_text("a,b\n")
    with pytest.raises(UserError, match=".txt or .jsonl"):
        read_documents(str(wrong))
    small = tmp_path / "small.txt"
    small.write_text("just a few words")
    with pytest.raises(UserError, match="fewer than"):
        load_tokens(str(small), tokenizer, Split.CALIBRATION, max_tokens=10_000)
