"""Linguistic roles of layers: linear probes with control tasks on every layer's hidden states.

For each layer's hidden states (0 = the embedding output, l = the output of block l-1) a linear
probe learns five labelings of the same token stream, all derived from the corpus itself with
the tokenizer (no tagger, no download):

``lexical``
    the token's identity among the ``top_k`` most frequent token ids of the stream, every other
    token in one ``other`` class (see below why ``other`` is kept).
``morphology``
    whether a sub-word starts its word (leading space, or after a newline or punctuation) or
    continues it; only tokens holding letters or digits.
``word_class``
    ``function`` (closed-class lexicon, :mod:`.lexicon`), ``punctuation``, ``number`` or
    ``content`` word; the class of the whole word, given to *every* sub-word of it (so the
    last piece of ``" AbstractEventLoop"`` must know it belongs to a content word).
    Whitespace-only tokens are left out.
``nesting``
    the bracket / quote nesting depth (0, 1, 2+) of the text the token belongs to, from a scan
    of the decoded stream: ``()[]{}``, double quotes, runs of back-quotes and single quotes
    that open after a non-letter; brackets and quotes themselves count at the outer level, a
    blank line (paragraph or document break) closes everything.
``prediction``
    the *next* token's identity among the ``top_k`` most frequent ids (or ``other``).

Selectivity, not accuracy (Hewitt & Liang, 2019): each task has a control task that gives
every token *type* a fixed random label with the task's label distribution. A probe that
merely memorises token types scores as well on the control as on the task; selectivity =
accuracy - control accuracy is what the layer knows beyond the identity of the token it sits
on. This is also why ``lexical`` keeps an ``other`` class over all tokens: restricted to the
frequent types alone, identity *is* a type labeling and its selectivity would be 0 by
construction; with ``other``, the control must memorise thousands of rare types (and fails on
those first seen in held-out text) while "not one of the frequent tokens" generalises.
``prediction`` is the lexical task of the next token, so its control is the random type
labeling of the next token: keyed on the current token instead, the control would be a
deterministic, learnable function of the input while the next token is not, and the
"selectivity" would only measure how much less predictable the future is than the present.

The probes are ridge classifiers (scikit-learn's ``RidgeClassifier``, solved in closed form,
see :func:`probe_accuracies`) on features that are RMS-normalised per token, as the next
block's RMSNorm would see them (which also tames the huge activations of attention-sink
positions), then standardised. Accuracies are cross-fitted over ``FOLDS`` folds: every
position is predicted once, by a probe trained on the other folds, which halves the standard
error of a single 25% hold-out; from per-fold sufficient statistics this costs about one fit.
Folds are made of whole blocks of ``BLOCK`` consecutive positions, never single tokens, so
neighbouring positions (which share context) do not leak from training into held-out text.
Control accuracy is the mean over ``CONTROLS`` independent random maps.

Example::

    roles = probe_roles(hidden_states, tokens, tokenizer, seed=0)
    roles.dominant[12], roles.selectivity["word_class"][12]
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ..errors import UserError
from ..progress import progress_bar
from .lexicon import is_function_word

TASKS = ("lexical", "morphology", "word_class", "nesting", "prediction")
WORD_CLASSES = ("function", "punctuation", "number", "content")
TOP_K = 32
MAX_DEPTH = 2  # depths of 2 and more share one class
BLOCK = 128  # positions per cross-fitting block
FOLDS = 4
CONTROLS = 4  # random control maps per task, averaged: one map alone swings selectivity by +-0.03
RIDGE_ALPHA = 0.05  # times the number of training rows: features are standardised, so the gram's diagonal is n
MIN_PEAK = 0.02  # a task whose best selectivity stays below this is noise, not a role
SPREAD_FLOOR = 0.02  # least spread over depth a task is credited with (see dominant_roles)
EXCLUDED = -1

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {v: k for k, v in _OPENERS.items()}


# --------------------------------------------------------------------------- labels from text

def token_texts(tokenizer, token_ids: torch.Tensor | list[int]) -> list[str]:
    """The surface text of every token of a stream (leading spaces kept, special tokens as a blank line).

    Decodes each distinct id once. Sentencepiece tokenizers drop a word-start marker when
    decoding a lone token, so it is put back as a space.
    """
    ids = [int(i) for i in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    cache: dict[int, str] = {}
    for token_id in set(ids):
        if token_id in special:
            cache[token_id] = "\n\n"  # a document boundary
            continue
        text = tokenizer.decode([token_id])
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        cache[token_id] = text
    return [cache[i] for i in ids]


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def nesting_depths(text: str) -> list[int]:
    """The bracket / quote nesting depth of every character of ``text`` (uncapped).

    Openers and closers count at the outer level (``f(a)`` gives 0 0 1 0); a closer without a
    matching opener is ignored; a blank line closes everything.
    """
    depths, stack = [], []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "\n" and i + 1 < n and text[i + 1] == "\n":
            stack.clear()
        if char in _OPENERS:
            depths.append(len(stack))
            stack.append(char)
        elif char in _CLOSERS:
            if _CLOSERS[char] in stack:
                while stack.pop() != _CLOSERS[char]:
                    pass
            depths.append(len(stack))
        elif char == '"' or char == "`":
            run = 1
            if char == "`":  # ``literal`` is one pair of quotes, not two
                while i + run < n and text[i + run] == "`":
                    run += 1
            if stack and stack[-1] == char:
                stack.pop()
                depths.extend([len(stack)] * run)
            else:
                depths.extend([len(stack)] * run)
                stack.append(char)
            i += run
            continue
        elif char == "'":
            before = text[i - 1] if i else " "
            after = text[i + 1] if i + 1 < n else " "
            if stack and stack[-1] == "'" and not _is_word_char(after):
                stack.pop()
                depths.append(len(stack))
            elif not _is_word_char(before) and not after.isspace():
                depths.append(len(stack))
                stack.append("'")
            else:  # an apostrophe (don't, the user's)
                depths.append(len(stack))
        else:
            depths.append(len(stack))
        i += 1
    return depths


def word_class(word: str) -> str:
    """The coarse class of a word (letters, digits, underscores): ``function``, ``number`` or ``content``."""
    if is_function_word(word):
        return "function"
    if word.isdigit():
        return "number"
    return "content"


def task_labels(token_ids: torch.Tensor, tokenizer, *, top_k: int = TOP_K) -> dict[str, np.ndarray]:
    """Integer labels of every task for every token of the stream (``EXCLUDED`` = -1 where a task does not apply).

    ``lexical`` and ``prediction`` use ``0..top_k-1`` for the most frequent ids (by count in
    this stream, ties by id) and ``top_k`` for every other token; ``word_class`` indexes
    :data:`WORD_CLASSES`; ``morphology`` is 1 for a word start, 0 for a continuation;
    ``nesting`` is ``min(depth, MAX_DEPTH)``.
    """
    ids = token_ids.reshape(-1).cpu().numpy().astype(np.int64)
    n = len(ids)
    texts = token_texts(tokenizer, ids.tolist())
    text = "".join(texts)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=starts[1:])
    depths = nesting_depths(text)

    # Words are maximal runs of word characters; each character gets its word's class.
    char_class = [""] * len(text)
    i = 0
    while i < len(text):
        if _is_word_char(text[i]):
            j = i
            while j < len(text) and _is_word_char(text[j]):
                j += 1
            cls = word_class(text[i:j])
            char_class[i:j] = [cls] * (j - i)
            i = j
        else:
            i += 1

    morphology = np.full(n, EXCLUDED, dtype=np.int64)
    classes = np.full(n, EXCLUDED, dtype=np.int64)
    nesting = np.zeros(n, dtype=np.int64)
    for t, piece in enumerate(texts):
        begin = int(starts[t])
        stripped = len(piece) - len(piece.lstrip())
        if piece.strip():
            nesting[t] = min(depths[begin + stripped], MAX_DEPTH)
        elif piece:
            nesting[t] = min(depths[begin], MAX_DEPTH)
        first_word = next((k for k, c in enumerate(piece) if _is_word_char(c)), None)
        if first_word is not None:
            at = begin + first_word
            morphology[t] = int(at == 0 or not _is_word_char(text[at - 1]))
            classes[t] = WORD_CLASSES.index(char_class[at])
        elif piece.strip():
            classes[t] = WORD_CLASSES.index("punctuation")

    values, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((values, -counts))[:top_k]
    rank = {int(values[k]): r for r, k in enumerate(order)}
    lexical = np.array([rank.get(int(i), top_k) for i in ids], dtype=np.int64)
    prediction = np.full(n, EXCLUDED, dtype=np.int64)
    prediction[:-1] = lexical[1:]
    return {"lexical": lexical, "morphology": morphology, "word_class": classes,
            "nesting": nesting, "prediction": prediction}


def control_labels(labels: np.ndarray, type_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hewitt & Liang's control task: a fixed random label per token type, with the task's label distribution.

    ``type_ids[i]`` is the type whose label position ``i`` gets (the token itself, or the next
    token for ``prediction``). Types are shuffled and laid end to end by their token counts
    over the task's cumulative label distribution, each taking the label under its midpoint:
    a random type-to-label map whose token-level distribution matches the task's up to one
    type, so a probe that learns nothing scores the same majority rate on both. Tokens the
    task excludes stay excluded.
    """
    keep = labels != EXCLUDED
    if not keep.any():
        return labels.copy()
    classes, class_counts = np.unique(labels[keep], return_counts=True)
    types, type_counts = np.unique(type_ids[keep], return_counts=True)
    order = rng.permutation(len(types))
    midpoints = (np.cumsum(type_counts[order]) - type_counts[order] / 2) / type_counts.sum()
    bounds = np.cumsum(class_counts) / class_counts.sum()
    chosen = classes[np.minimum(np.searchsorted(bounds, midpoints), len(classes) - 1)]
    mapping = dict(zip(types[order].tolist(), chosen.tolist()))
    control = np.full_like(labels, EXCLUDED)
    control[keep] = [mapping[int(i)] for i in type_ids[keep]]
    return control


def fold_ids(n_tokens: int, seed: int, *, folds: int = FOLDS, block: int = BLOCK) -> np.ndarray:
    """The cross-fitting fold of every position: whole blocks of ``block`` consecutive positions, dealt to folds at random."""
    n_blocks = -(-n_tokens // block)
    if n_tokens < folds * block:
        raise UserError(f"linear probes need at least {folds * block} tokens ({folds} folds of whole "
                        f"{block}-token blocks), got {n_tokens}; give more calibration tokens")
    order = np.random.default_rng(seed).permutation(n_blocks)
    per_block = np.empty(n_blocks, dtype=np.int64)
    per_block[order] = np.arange(n_blocks) % folds
    return np.repeat(per_block, block)[:n_tokens]


def _features(hidden: torch.Tensor) -> np.ndarray:
    """Per-token RMS normalisation (as the next block's RMSNorm sees the residual stream), then standardisation.

    The standardisation uses all positions: it involves no labels, and it makes one ridge
    penalty fit every layer (each feature then has unit variance, so the gram's diagonal is n).
    """
    x = hidden.detach().to(torch.float32).cpu()
    x = x / x.pow(2).mean(dim=-1, keepdim=True).add(1e-12).sqrt()
    x = (x - x.mean(dim=0)) / (x.std(dim=0) + 1e-6)
    return x.numpy()


def fold_sums(x: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per fold: row count, feature sums and gram matrix (float64), the sufficient statistics of ridge."""
    n_folds = int(folds.max()) + 1
    counts = np.zeros(n_folds)
    sums = np.zeros((n_folds, x.shape[1]))
    grams = np.zeros((n_folds, x.shape[1], x.shape[1]))
    for f in range(n_folds):
        rows = x[folds == f]
        counts[f], sums[f], grams[f] = len(rows), rows.sum(0, dtype=np.float64), rows.T @ rows
    return counts, sums, grams


def probe_accuracies(x: np.ndarray, labelings: list[np.ndarray], folds: np.ndarray, alpha: float = RIDGE_ALPHA,
                     sums: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[float]:
    """Cross-fitted accuracy of a ridge classifier per labeling: each fold predicted by a probe trained on the others.

    The probe is scikit-learn's ``RidgeClassifier`` (one-vs-rest ridge regression on +-1
    targets, with intercept, penalty ``alpha`` times the number of training rows), solved in
    closed form from per-fold sufficient statistics: one gram matrix per layer
    (:func:`fold_sums`, passed as ``sums``) serves every fold, task and control, less the
    rows a task excludes (the labelings must exclude the same positions, as a task and its
    controls do). ``tests/test_probes.py`` checks it against ``sklearn.linear_model.Ridge``.
    """
    keep = labelings[0] != EXCLUDED
    if keep.sum() == 0:
        return [float("nan")] * len(labelings)
    n_folds = int(folds.max()) + 1
    counts, sx, xx = (np.array(a, copy=True) for a in (sums or fold_sums(x, folds)))
    for f in range(n_folds):
        dropped = x[~keep & (folds == f)]
        if len(dropped):
            counts[f] -= len(dropped)
            sx[f] -= dropped.sum(0, dtype=np.float64)
            xx[f] -= dropped.T @ dropped
    # Per fold and class: feature sums of the class's rows; the +-1 targets follow from them.
    classes = [np.unique(labels[keep]) for labels in labelings]
    class_sums, class_counts = [], []
    for f in range(n_folds):
        rows = keep & (folds == f)
        xf = x[rows]
        onehot = np.concatenate([labels[rows][:, None] == c[None, :] for labels, c in zip(labelings, classes)],
                                axis=1).astype(np.float32)
        class_sums.append((onehot.T @ xf).astype(np.float64))
        class_counts.append(onehot.sum(0, dtype=np.float64))
    total_n, total_sx, total_xx = counts.sum(), sx.sum(0), xx.sum(0)
    total_cs, total_cc = sum(class_sums), sum(class_counts)
    eye = np.eye(x.shape[1])
    correct = np.zeros(len(labelings))
    for f in range(n_folds):
        n = total_n - counts[f]
        if counts[f] == 0 or n == 0:
            continue
        mx = (total_sx - sx[f]) / n
        cc = total_cc - class_counts[f]
        xy = 2.0 * (total_cs - class_sums[f]).T - (total_sx - sx[f])[:, None]  # X^T (2*onehot - 1)
        my = (2.0 * cc - n) / n
        gram = total_xx - xx[f] - n * np.outer(mx, mx) + alpha * n * eye
        weights = scipy.linalg.solve(gram, xy - n * np.outer(mx, my), assume_a="pos")
        rows = keep & (folds == f)
        scores = x[rows] @ weights.astype(np.float32) + (my - mx @ weights).astype(np.float32)
        column = 0
        for k, (labels, c) in enumerate(zip(labelings, classes)):
            predicted = c[np.argmax(scores[:, column:column + len(c)], axis=1)]
            correct[k] += (predicted == labels[rows]).sum()
            column += len(c)
    return (correct / keep.sum()).tolist()


def smooth(curve: np.ndarray) -> np.ndarray:
    """A (1, 2, 1)/4 moving average over depth, renormalised at the ends."""
    if len(curve) < 3:
        return curve.copy()
    padded = np.concatenate([[0.0], curve, [0.0]])
    weights = np.concatenate([[0.0], np.ones_like(curve), [0.0]])
    kernel = np.array([1.0, 2.0, 1.0])
    return np.convolve(padded, kernel, "valid") / np.convolve(weights, kernel, "valid")


def dominant_roles(selectivity: dict[str, list[float]]) -> list[str]:
    """Per layer, the task this layer holds most of *relative to that task across depth*.

    Tasks differ in how much selectivity they can reach at all (word class about 0.3,
    nesting depth a few hundredths), so raw selectivity would crown the easiest task
    everywhere. Each task's curve is therefore smoothed over neighbouring layers
    (:func:`smooth`; consecutive residual streams differ little) and turned into a z-score
    over depth: how far this layer sits above the task's mean, in units of the task's spread
    across layers, the spread floored at ``SPREAD_FLOOR`` (about twice the sampling noise of
    one estimate) so that a flat curve's wiggles are not blown up. Dividing by each task's
    peak instead was tried and crowned near-flat curves everywhere: on SmolLM2-135M token
    identity stays within 0.18-0.22 over all 31 layers, so it was within 5% of its own peak
    at almost every layer. A task is eligible at a layer only where its selectivity there is
    positive and its best layer reaches ``MIN_PEAK``; a layer with no eligible task is ``none``.
    """
    raw = {t: np.nan_to_num(np.asarray(v, dtype=float), nan=0.0) for t, v in selectivity.items()}
    curves = {t: smooth(v) for t, v in raw.items()}
    tasks = [t for t, curve in curves.items() if len(curve) and curve.max() >= MIN_PEAK]
    n_layers = len(next(iter(selectivity.values()))) if selectivity else 0
    roles = []
    for layer in range(n_layers):
        best, best_score = "none", -np.inf
        for task in tasks:
            curve = curves[task]
            if raw[task][layer] <= 0 or curve[layer] <= 0:
                continue
            score = (curve[layer] - curve.mean()) / max(curve.std(), SPREAD_FLOOR)
            if score > best_score:
                best, best_score = task, score
        roles.append(best)
    return roles


@dataclass
class RoleProfile:
    """What linear probes read from each layer's hidden states (index 0 = embeddings, l = block l-1's output).

    ``selectivity[task][l]`` = ``accuracy[task][l] - control_accuracy[task][l]``, cross-fitted
    on held-out positions; ``chance[task]`` is the majority-class rate of the task's labels;
    ``dominant[l]`` is the task layer ``l`` is relatively best at (:func:`dominant_roles`).
    """

    tasks: list[str]
    selectivity: dict[str, list[float]]
    accuracy: dict[str, list[float]]
    control_accuracy: dict[str, list[float]]
    chance: dict[str, float]
    dominant: list[str]
    tokens: int = 0
    top_k: int = TOP_K
    seed: int = 0
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        """Number of probed layers (blocks + 1)."""
        return len(self.dominant)

    def block_roles(self, block: int) -> dict[str, float]:
        """Selectivity of every task on the *output* of decoder block ``block`` (layer ``block + 1``)."""
        return {task: self.selectivity[task][block + 1] for task in self.tasks}

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form (NaN, for a task with no held-out example, becomes None)."""
        data = asdict(self)
        for key in ("selectivity", "accuracy", "control_accuracy"):
            data[key] = {t: [None if v != v else v for v in vals] for t, vals in data[key].items()}
        return data

    @classmethod
    def from_json(cls, data: Any) -> RoleProfile:
        """Strict inverse of :meth:`to_json`."""
        try:
            data = dict(data)
            for key in ("selectivity", "accuracy", "control_accuracy"):
                data[key] = {t: [float("nan") if v is None else float(v) for v in vals]
                             for t, vals in data[key].items()}
            return cls(**data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"not a valid role profile ({exc}); re-run `autocompress profile`") from None


def probe_roles(hidden_states: list[torch.Tensor], token_ids: torch.Tensor, tokenizer, *, seed: int = 0,
                max_tokens: int | None = None, progress: bool = False, top_k: int = TOP_K) -> RoleProfile:
    """Probe every layer for the five linguistic tasks and return their selectivity curves.

    ``hidden_states[l]`` is ``[n_tokens, hidden]`` for layer ``l`` (0 = embedding output,
    ``l`` = output of block ``l-1``; Hugging Face's last entry has the final norm applied,
    whose per-feature gain the standardisation here undoes), all at the positions of
    ``token_ids`` (``[n_tokens]``, one contiguous stream, at least ``FOLDS * BLOCK`` = 512
    tokens). ``max_tokens`` keeps only the first that many positions. The seed fixes the
    folds and the control tasks, so a run is reproducible. A task with no example in the
    stream gets NaN accuracies (``None`` in JSON) and is never dominant.

    Example::

        out = model(tokens[None], output_hidden_states=True)
        roles = probe_roles([h[0] for h in out.hidden_states], tokens, tokenizer)
    """
    started = time.perf_counter()
    token_ids = torch.as_tensor(token_ids).reshape(-1)
    if not hidden_states:
        raise UserError("probe_roles needs the hidden states of at least one layer")
    n = token_ids.numel() if max_tokens is None else min(token_ids.numel(), max_tokens)
    for layer, hidden in enumerate(hidden_states):
        if hidden.dim() != 2 or hidden.shape[0] != token_ids.numel():
            raise UserError(f"hidden state of layer {layer} has shape {tuple(hidden.shape)}; expected "
                            f"[{token_ids.numel()}, hidden] to match the {token_ids.numel()} token ids")
    token_ids = token_ids[:n]
    folds = fold_ids(n, seed)
    labels = task_labels(token_ids, tokenizer, top_k=top_k)
    rng = np.random.default_rng(seed)
    ids = token_ids.cpu().numpy()
    next_ids = np.append(ids[1:], -1)
    controls = {task: [control_labels(labels[task], next_ids if task == "prediction" else ids, rng)
                       for _ in range(CONTROLS)] for task in TASKS}
    chance = {}
    for task in TASKS:
        kept = labels[task][labels[task] != EXCLUDED]
        chance[task] = float(np.bincount(kept).max() / len(kept)) if len(kept) else float("nan")

    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    accuracy = {t: [] for t in TASKS}
    control = {t: [] for t in TASKS}
    # One BLAS thread: the probes' products are small, and threaded OpenBLAS on a busy machine
    # was 14x slower than one thread here (6.8 s against 0.5 s for the unit-test stream).
    with threadpool_limits(limits=1), progress_bar("linear probes", len(hidden_states) * len(TASKS),
                                                    progress) as advance:
        for hidden in hidden_states:
            x = _features(hidden[:n])
            sums = fold_sums(x, folds)
            for task in TASKS:
                real, *random = probe_accuracies(x, [labels[task], *controls[task]], folds, sums=sums)
                accuracy[task].append(real)
                control[task].append(float(np.mean(random)))
                advance()
    selectivity = {t: [a - c for a, c in zip(accuracy[t], control[t])] for t in TASKS}
    return RoleProfile(tasks=list(TASKS), selectivity=selectivity, accuracy=accuracy, control_accuracy=control,
                       chance=chance, dominant=dominant_roles(selectivity), tokens=n, top_k=top_k, seed=seed,
                       seconds=time.perf_counter() - started)


def role_table(roles: RoleProfile, title: str = "linguistic roles (selectivity = probe - control accuracy)"):
    """A rich table: one row per layer, the selectivity of each task and the dominant role."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer", justify="right")
    for task in roles.tasks:
        table.add_column(task, justify="right")
    table.add_column("dominant")
    for layer in range(roles.layers):
        name = "embed" if layer == 0 else f"block {layer - 1}"
        cells = []
        for task in roles.tasks:
            value = roles.selectivity[task][layer]
            bold = roles.dominant[layer] == task
            cells.append(f"[bold]{value:+.3f}[/bold]" if bold else f"{value:+.3f}")
        table.add_row(name, *cells, roles.dominant[layer])
    return table
