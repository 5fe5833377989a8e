"""Token streams for calibration and evaluation.

A data spec is one of:

* ``stdlib-docs``: the built-in offline corpus, the docstrings of the running Python's
  standard library (read with ``ast``, never imported), deduplicated and filtered to
  prose; every installation has it, so it needs no network;
* a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file (one object per
  line with a ``text`` field);
* a local dataset directory saved by ``datasets`` (``save_to_disk``) or ``hf:NAME[:CONFIG]``
  for a hub dataset (needs the optional ``datasets`` package and a reachable hub).

Documents are assigned to the calibration or the evaluation split by a hash of their text,
so the two never overlap and the assignment does not depend on the order they were read in.

Streams hold text tokens only. A *window* of W tokens is W consecutive tokens of a stream;
when the tokenizer puts a BOS token before the text it encodes (Llama 3, Gemma: see
:func:`bos_id`), every window fed to the model starts with it, as the model's training text
did: the row is BOS then the W text tokens, W + 1 ids (:func:`with_bos`). Scoring needs no
change for it: position i predicts id i + 1, so the scored targets are exactly the window's
text tokens (all W of them; nothing predicts BOS, and BOS is never a target). Without BOS the
row is the W text tokens and the first has nothing before it, so W - 1 are scored. Either way
a stream gives the same windows, and token counts (an evaluation's ``tokens``, a profile's
``calibration_tokens``) count text tokens.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

import torch

from .errors import UserError

BUILTIN_CORPUS = "stdlib-docs"
EVAL_PERCENT = 20  # share of documents hashed into the evaluation split
_BOS_PROBE = "Text"  # what bos_id encodes to see whether the tokenizer adds BOS


class Split(str, Enum):
    """Which part of a corpus to read."""

    CALIBRATION = "calibration"
    EVALUATION = "evaluation"


@dataclass(frozen=True)
class TokenStream:
    """A 1-D stream of token ids and where it came from (for fingerprints and reports)."""

    tokens: torch.Tensor
    spec: str
    split: Split
    documents: int
    fingerprint: str

    def __len__(self) -> int:
        return int(self.tokens.numel())


def split_of(text: str) -> Split:
    """The split a document belongs to: a stable hash of its text decides."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100
    return Split.EVALUATION if bucket < EVAL_PERCENT else Split.CALIBRATION


# ---------------------------------------------------------------------------------------
# The built-in corpus

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
              "__pycache__", "ensurepip", "venv", "pydoc_data", "tkinter", "unittest"}
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)")


def _prose(docstring: str) -> str | None:
    """Keep a docstring when it reads like English prose; drop doctests and code-like lines."""
    lines = [line for line in docstring.splitlines() if not _DOCTEST.match(line)]
    text = "\n".join(lines).strip()
    if len(text) < 200:
        return None
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    words = text.split()
    if letters / len(text) < 0.85 or len(words) < 30:
        return None
    # Prose has mostly short lowercase-ish words, code and tables do not.
    if sum(w.isalpha() and w.islower() for w in words) / len(words) < 0.5:
        return None
    return text


@lru_cache(maxsize=1)
def stdlib_documents() -> tuple[str, ...]:
    """The prose docstrings of the running Python's standard library, deduplicated, sorted.

    Parsing the library takes a few seconds, so the result is cached per Python version.
    """
    from .artifacts import atomic_write_bytes  # noqa: PLC0415
    from .models import cache_dir  # noqa: PLC0415

    cached = cache_dir() / "corpus" / f"stdlib-docs-{python_version()}-{sys.implementation.name}.json"
    if cached.exists():
        try:
            return tuple(json.loads(cached.read_text()))
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt below
    documents = _collect_stdlib_documents()
    atomic_write_bytes(cached, json.dumps(documents).encode())
    return tuple(documents)


def _collect_stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    documents: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            docstring = ast.get_docstring(node, clean=True)
            text = _prose(docstring) if docstring else None
            key = " ".join(text.split()) if text else None
            if key and key not in seen:
                seen.add(key)
                documents.append(text)
    # A stable order that mixes modules, so a prefix of a split is a varied sample.
    documents.sort(key=lambda text: hashlib.sha256(text.encode()).hexdigest())
    return documents


# ---------------------------------------------------------------------------------------
# Files and datasets


def _read_text_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror}") from None
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number}: not a JSON object (expected one {{\"text\": ...}} per line)") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{number}: expected an object with a string field 'text'")
            documents.append(record["text"])
    else:
        documents = [part.strip() for part in re.split(r"\n\s*\n", raw)]
    return [doc for doc in documents if doc.strip()]


def _read_dataset(spec: str) -> list[str]:
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise UserError(f"data {spec!r} is a dataset, which needs the optional package 'datasets' "
                        "(pip install datasets); or give a .txt/.jsonl file or 'stdlib-docs'") from None
    try:
        if spec.startswith("hf:"):
            name, _, config = spec[3:].partition(":")
            loaded = datasets.load_dataset(name, config or None, split="train")
        else:
            loaded = datasets.load_from_disk(spec)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[next(iter(loaded))]
    except Exception as exc:  # the hub, network and format errors all end here  # noqa: BLE001
        raise UserError(f"cannot load dataset {spec!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "text" not in loaded.column_names:
        raise UserError(f"dataset {spec!r} has no 'text' column (columns: {', '.join(loaded.column_names)})")
    return [text for text in loaded["text"] if isinstance(text, str) and text.strip()]


def read_documents(spec: str) -> list[str]:
    """All documents of a data spec, in a stable order (before the split)."""
    if spec == BUILTIN_CORPUS:
        return list(stdlib_documents())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise UserError(f"data file {spec!r} must end in .txt or .jsonl")
        documents = _read_text_file(path)
    elif path.is_dir() or spec.startswith("hf:"):
        documents = _read_dataset(spec)
    else:
        raise UserError(f"data {spec!r} not found: give '{BUILTIN_CORPUS}', a .txt or .jsonl file, "
                        "a saved dataset directory or hf:NAME")
    if not documents:
        raise UserError(f"data {spec!r} holds no text")
    return documents


def load_tokens(spec: str, tokenizer, split: Split | str = Split.EVALUATION, max_tokens: int | None = None,
                start: int = 0) -> TokenStream:
    """Tokenize one split of a corpus into a single stream, documents separated by a blank line.

    ``start`` skips that many tokens of the split first, so disjoint samples of one split
    can be drawn (``start=0`` and ``start=n`` with ``max_tokens=n`` never overlap).
    A split with fewer tokens than asked for is an error naming how many it has.
    """
    split = Split(split)
    documents = [doc for doc in read_documents(spec) if split_of(doc) is split]
    # Documents are joined by a blank line, as in ordinary text. (An EOS token would do, but
    # in chat-tuned models EOS ends a turn, and the text after it reads as out of place.)
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    wanted = None if max_tokens is None else start + max_tokens
    pieces, count, used = [], 0, 0
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids = ids + separator
        pieces.append(torch.tensor(ids, dtype=torch.long))
        count += len(ids)
        used += 1
        if wanted is not None and count >= wanted:
            break
    if not pieces:
        raise UserError(f"data {spec!r} has no documents in its {split.value} split")
    stream = torch.cat(pieces)[start:wanted]
    if max_tokens is not None and stream.numel() < max_tokens:
        raise UserError(f"data {spec!r} {split.value} split has {count - start} tokens after skipping "
                        f"{start}, fewer than the {max_tokens} asked for")
    digest = hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:16]
    return TokenStream(stream, spec, split, used, digest)


def bos_id(tokenizer) -> int | None:
    """The BOS token id ``tokenizer`` puts before the text it encodes, or None when it adds none.

    Decided by encoding a probe with special tokens (a tokenizer's ``add_bos_token`` flag is
    not on every class, and a fast tokenizer's post-processor can add BOS without it): SmolLM2
    and GPT-2 name a BOS token but do not add it, so they get None.
    """
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        return None
    added = tokenizer(_BOS_PROBE, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_BOS_PROBE, add_special_tokens=False)["input_ids"]
    return int(bos) if added[:1] == [bos] and plain[:1] != [bos] else None


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Token rows [n, W] with ``bos`` put in front of each ([n, W + 1]); ``rows`` itself when
    ``bos`` is None (then nothing changes, not even the tensor)."""
    if bos is None:
        return rows
    column = torch.full((rows.shape[0], 1), bos, dtype=rows.dtype, device=rows.device)
    return torch.cat([column, rows], dim=1)


def split_sizes(spec: str, tokenizer) -> dict[str, int]:
    """Token counts of both splits (tokenizes the whole corpus; used for the README figures)."""
    sizes = {}
    for split in Split:
        sizes[split.value] = len(load_tokens(spec, tokenizer, split))
    return sizes


def python_version() -> str:
    """The Python version whose standard library makes the built-in corpus."""
    return ".".join(map(str, sys.version_info[:3]))
